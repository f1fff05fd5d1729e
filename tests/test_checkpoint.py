"""Tests of meta_train.checkpoint: round trips, rotation, interrupted and corrupt checkpoints."""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity

from meta_train import checkpoint
from meta_train.checkpoint import (
    RESUME_MUTABLE_KEYS,
    Checkpointer,
    CheckpointError,
    ConfigMismatchError,
    CorruptCheckpointError,
    NonFiniteThetaError,
    check_compatible,
    load_theta,
    pick_step,
    read_best,
    saved_steps,
    write_best,
)

ROOT = Path(__file__).resolve().parents[1]

CONFIG = {
    "run": {"name": "t", "seed": 0, "log_every": 10, "checkpoint_every": 50},
    "meta": {"window": 20, "outer_steps": 200, "sigma": 0.01},
    "lopt": {"kind": "mlp", "momentum_decays": (0.5, 0.9)},
    "eval": {"num_tasks": 3, "adam_lrs": (1e-3, 1e-2)},
}


def make_theta(scale: float = 1.0):
    return {
        "dense_0": {"kernel": scale * jnp.arange(12.0).reshape(3, 4), "bias": jnp.zeros(4)},
        "dense_1": {"kernel": scale * jnp.ones((4, 2)), "bias": jnp.full((2,), 0.5)},
    }


def make_state(step: int = 17):
    theta = make_theta()
    outer = optax.adam(1e-3)
    opt_state = outer.init(theta)
    _, opt_state = outer.update(jax.tree.map(jnp.ones_like, theta), opt_state, theta)
    keys = jax.random.split(jax.random.key(3), 4)
    return {
        "outer_opt": opt_state,
        "key": jax.random.key_data(jax.random.key(11)),  # new-style key as raw uint32
        "particle_keys": jax.random.key_data(keys),
        "legacy_key": jax.random.PRNGKey(7),  # old-style uint32 key
        "step": jnp.int32(step),
        "inner_steps": jnp.arange(4, dtype=jnp.int32) * 20,
    }


def abstract(tree):
    return jax.eval_shape(lambda: tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def ckpt_dir(tmp_path):
    return str(tmp_path / "checkpoints")


# ---------------------------------------------------------------------------- round trips


def test_round_trip_restores_namedtuples_keys_and_config(ckpt_dir):
    theta, state = make_theta(), make_state()
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(5, theta, state, CONFIG)
        assert ckpt.latest_step() == 5
        theta2, state2, config2 = ckpt.restore(abstract(theta), abstract(state))

    assert_trees_equal(theta2, theta)
    assert_trees_equal(state2, state)
    adam_state = state2["outer_opt"][0]
    assert isinstance(adam_state, optax.ScaleByAdamState)
    assert adam_state.count.dtype == jnp.int32 and int(adam_state.count) == 1
    assert state2["key"].dtype == jnp.uint32
    assert state2["particle_keys"].shape == (4, 2)
    assert state2["step"].dtype == jnp.int32 and int(state2["step"]) == 17
    # The stored key data rebuilds the same key stream.
    key = jax.random.wrap_key_data(state2["key"])
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.split(key)),
        jax.random.key_data(jax.random.split(jax.random.key(11))),
    )
    # Concrete trees work as targets too (e.g. freshly initialised ones).
    with Checkpointer(ckpt_dir) as ckpt:
        theta3, state3, _ = ckpt.restore(make_theta(0.0), make_state(0))
    assert_trees_equal(theta3, theta)
    assert_trees_equal(state3, state)
    # JSON turns tuples into lists; the configs still count as equal.
    assert config2["lopt"]["momentum_decays"] == [0.5, 0.9]
    check_compatible(config2, CONFIG)


def test_python_scalars_restore_as_arrays_with_eval_shape_dtypes(ckpt_dir):
    state = {"step": 3, "lr": 0.5, "count": np.int64(9)}
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, make_theta(), state, CONFIG)
        _, state2, _ = ckpt.restore(abstract(make_theta()), abstract(state))
    assert int(state2["step"]) == 3 and state2["step"].dtype == jnp.int32
    assert float(state2["lr"]) == 0.5 and state2["lr"].dtype == jnp.float32
    assert int(state2["count"]) == 9


def test_restore_explicit_step_and_rotation(ckpt_dir):
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(step, make_theta(step), make_state(step), CONFIG)
        assert ckpt.all_steps() == [30, 40]
        theta, state, _ = ckpt.restore(abstract(make_theta()), abstract(make_state()), step=30)
        assert int(state["step"]) == 30
        np.testing.assert_array_equal(theta["dense_1"]["kernel"], 30 * np.ones((4, 2)))
        with pytest.raises(CheckpointError, match=r"step 10 .*steps: \[30, 40\]"):
            ckpt.restore(abstract(make_theta()), abstract(make_state()), step=10)
    assert sorted(p for p in os.listdir(ckpt_dir) if not p.startswith(".")) == ["30", "40"]


def test_save_never_overwrites(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(2, make_theta(2.0), make_state(2), CONFIG)
        with pytest.raises(CheckpointError, match="never overwritten"):
            ckpt.save(2, make_theta(9.0), make_state(9), CONFIG)
        with pytest.raises(CheckpointError, match="step 2 is already saved"):
            ckpt.save(1, make_theta(9.0), make_state(9), CONFIG)
        theta, state, _ = ckpt.restore(abstract(make_theta()), abstract(make_state()))
    assert int(state["step"]) == 2
    np.testing.assert_array_equal(theta["dense_1"]["kernel"], 2 * np.ones((4, 2)))


def test_failed_save_raises_and_keeps_previous_steps(ckpt_dir, monkeypatch):
    ckpt = Checkpointer(ckpt_dir, max_to_keep=1)
    ckpt.save(1, make_theta(), make_state(1), CONFIG)

    async def failing_finalize(self):
        raise OSError("disk full (injected)")

    with monkeypatch.context() as m:
        m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", failing_finalize)
        with pytest.raises(CheckpointError, match="saving step 2 .*disk full"):
            ckpt.save(2, make_theta(), make_state(2), CONFIG)

    # With max_to_keep=1 a failed save must not have rotated away the only good step.
    assert ckpt.latest_step() == 1
    # ... nor left its half-written folder behind.
    assert sorted(os.listdir(ckpt_dir)) == ["1"]
    _, state, _ = ckpt.restore(abstract(make_theta()), abstract(make_state()))
    assert int(state["step"]) == 1
    # The same step can be saved once the problem is gone; then rotation applies.
    ckpt.save(2, make_theta(), make_state(2), CONFIG)
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_invalid_inputs_raise_before_writing(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(TypeError, match=r"state\['key'\].*key_data"):
            ckpt.save(1, make_theta(), {"key": jax.random.key(0)}, CONFIG)
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, make_theta(), make_state(), {"run": {"x": object()}})
        with pytest.raises(ValueError, match="non-negative"):
            ckpt.save(-1, make_theta(), make_state(), CONFIG)
        with pytest.raises(ValueError, match="state holds no arrays"):
            ckpt.save(1, make_theta(), {}, CONFIG)
        assert ckpt.latest_step() is None
    assert os.listdir(ckpt_dir) == []


# ----------------------------------------------------------------------- mismatched targets


def test_restore_with_mismatched_shapes_names_the_leaf(ckpt_dir):
    theta, state = make_theta(), make_state()
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, theta, state, CONFIG)
        wrong = abstract(theta)
        wrong["dense_0"]["kernel"] = jax.ShapeDtypeStruct((5, 4), jnp.float32)
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(wrong, abstract(state))
        message = str(info.value)
        assert "theta['dense_0']['kernel']" in message
        assert "(3, 4)" in message and "(5, 4)" in message
        assert ckpt_dir in message

        # A dtype change would otherwise be cast silently by orbax.
        wrong_state = abstract(state)
        wrong_state["step"] = jax.ShapeDtypeStruct((), jnp.float32)
        with pytest.raises(CheckpointError, match=r"state\['step'\].*int32.*float32"):
            ckpt.restore(abstract(theta), wrong_state)

        # Structure: a leaf the checkpoint lacks, and one the target lacks.
        extra = dict(abstract(state), momentum=jax.ShapeDtypeStruct((3,), jnp.float32))
        with pytest.raises(CheckpointError, match=r"state\['momentum'\]: expected by the target"):
            ckpt.restore(abstract(theta), extra)
        missing = {k: v for k, v in abstract(state).items() if k != "legacy_key"}
        with pytest.raises(CheckpointError, match=r"state\['legacy_key'\]: in the checkpoint but"):
            ckpt.restore(abstract(theta), missing)


# ------------------------------------------------------------------------------ load_theta


def test_load_theta_from_directory_alone(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, make_theta(1.0), make_state(1), CONFIG)
        ckpt.save(2, make_theta(2.0), make_state(2), CONFIG)
    theta, config = load_theta(ckpt_dir)
    assert isinstance(theta, dict) and set(theta) == {"dense_0", "dense_1"}
    assert_trees_equal(theta, make_theta(2.0))
    assert config["meta"]["window"] == 20
    theta1, _ = load_theta(ckpt_dir, step=1)
    assert_trees_equal(theta1, make_theta(1.0))


def test_load_theta_without_checkpoints_lists_what_it_found(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint .*empty"):
        load_theta(str(empty))
    (empty / "3.orbax-checkpoint-tmp").mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"3\.orbax-checkpoint-tmp \(interrupted save.*notes"):
        load_theta(str(empty))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_theta(str(tmp_path / "nowhere"))


def test_load_theta_hints_at_the_checkpoint_subfolder(tmp_path):
    with Checkpointer(str(tmp_path / "run" / "checkpoints")) as ckpt:
        ckpt.save(1, make_theta(), make_state(), CONFIG)
    with pytest.raises(CheckpointError, match="checkpoints/ \\(holds step folders"):
        load_theta(str(tmp_path / "run"))


# ------------------------------------------------------------------ interrupted and corrupt


def test_interrupted_save_folder_is_ignored(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, make_theta(1.0), make_state(1), CONFIG)
        ckpt.save(2, make_theta(2.0), make_state(2), CONFIG)
    partial = Path(ckpt_dir) / "3.orbax-checkpoint-tmp"
    (partial / "theta").mkdir(parents=True)
    (partial / "theta" / "garbage").write_bytes(b"\0" * 10)

    with Checkpointer(ckpt_dir) as ckpt:  # a fresh process resuming
        assert ckpt.all_steps() == [1, 2]
        theta, state, _ = ckpt.restore(abstract(make_theta()), abstract(make_state()))
        assert int(state["step"]) == 2
        assert_trees_equal(theta, make_theta(2.0))
        ckpt.save(3, make_theta(3.0), make_state(3), CONFIG)  # replaces the stale tmp folder
        assert ckpt.all_steps() == [1, 2, 3]
    assert not partial.exists()


KILLED_SAVE = """
import sys, time
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from meta_train.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, {"w": jnp.ones(3)}, {"step": jnp.int32(1)}, {"a": 1})

async def hang(self):  # everything is written; only the final rename is left
    print("READY", flush=True)
    time.sleep(600)

atomicity.AtomicRenameTemporaryPath.finalize = hang
ckpt.save(2, {"w": jnp.full(3, 2.0)}, {"step": jnp.int32(2)}, {"a": 2})
"""


def test_sigkill_mid_save_keeps_last_complete_step(ckpt_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_SAVE), ckpt_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(ckpt_dir)) == ["1", "2.orbax-checkpoint-tmp"]

    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == 1
        theta, state, config = ckpt.restore(
            {"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
            {"step": jax.ShapeDtypeStruct((), jnp.int32)},
        )
    np.testing.assert_array_equal(theta["w"], np.ones(3))
    assert int(state["step"]) == 1 and config == {"a": 1}


def _largest_data_file(step_dir: Path, item: str) -> Path:
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _two_steps(ckpt_dir: str) -> None:
    theta = {"w": jnp.arange(2000.0).reshape(40, 50), "b": jnp.zeros(4)}
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, theta, make_state(1), CONFIG)
        ckpt.save(2, jax.tree.map(lambda x: x + 1, theta), make_state(2), CONFIG)


ABSTRACT_THETA = {
    "w": jax.ShapeDtypeStruct((40, 50), jnp.float32),
    "b": jax.ShapeDtypeStruct((4,), jnp.float32),
}


# orbax abandons the sibling reads of a failed one; their coroutines are reported at collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_metadata", "empty_step"])
def test_corrupt_latest_step_raises_and_earlier_step_still_restores(ckpt_dir, damage):
    _two_steps(ckpt_dir)
    step_dir = Path(ckpt_dir) / "2"
    if damage == "truncate":
        data = _largest_data_file(step_dir, "theta")
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "flip_byte":  # may decode fine: only the checksum can tell
        data = _largest_data_file(step_dir, "theta")
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "delete_metadata":
        (step_dir / "state" / "_METADATA").unlink()
    else:
        for child in step_dir.iterdir():
            if child.is_dir():
                import shutil  # noqa: PLC0415

                shutil.rmtree(child)

    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(CorruptCheckpointError) as info:
            ckpt.restore(ABSTRACT_THETA, abstract(make_state()))
        message = str(info.value)
        assert str(step_dir) in message
        assert "Earlier steps on disk: [1]" in message
        theta, state, _ = ckpt.restore(ABSTRACT_THETA, abstract(make_state()), step=1)
    assert int(state["step"]) == 1
    np.testing.assert_array_equal(theta["w"], np.arange(2000.0).reshape(40, 50))


def test_checksum_mismatch_is_detected(ckpt_dir):
    _two_steps(ckpt_dir)
    manifest_file = Path(ckpt_dir) / "2" / "manifest" / "metadata"
    manifest = json.loads(manifest_file.read_text())
    entry = next(e for e in manifest["theta"] if e["path"] == "['w']")
    entry["sha256"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=r"theta\['w'\] differ .*checksum"):
        with Checkpointer(ckpt_dir) as ckpt:
            ckpt.restore(ABSTRACT_THETA, abstract(make_state()))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        load_theta(ckpt_dir)


# ------------------------------------------------------------------------ check_compatible


def test_check_compatible_allows_mutable_keys():
    current = json.loads(json.dumps(CONFIG))  # lists instead of tuples
    current["meta"]["outer_steps"] = 500
    current["run"]["log_every"] = 1
    current["run"]["checkpoint_every"] = 5
    current["eval"] = {"num_tasks": 10, "adam_lrs": [1e-4], "new_key": True}
    check_compatible(CONFIG, current)


def test_check_compatible_takes_a_key_added_since_at_its_default():
    from meta_train.config import Config  # noqa: PLC0415

    saved = Config().to_dict()
    del saved["valid"]["weight_decay_per_epoch"]  # a checkpoint from before the key
    current = Config().to_dict()
    check_compatible(saved, current)
    current["valid"]["weight_decay_per_epoch"] = 0.3
    with pytest.raises(ConfigMismatchError, match="valid.weight_decay_per_epoch"):
        check_compatible(saved, current)


def test_check_compatible_names_each_differing_key():
    current = json.loads(json.dumps(CONFIG))
    current["meta"]["window"] = 10
    current["meta"]["outer_steps"] = 999  # allowed, must not be listed
    current["lopt"]["momentum_decays"] = [0.5, 0.99]
    del current["run"]["seed"]
    with pytest.raises(ConfigMismatchError) as info:
        check_compatible(CONFIG, current)
    message = str(info.value)
    assert "meta.window: saved 20, now 10" in message
    assert "lopt.momentum_decays: saved [0.5, 0.9], now [0.5, 0.99]" in message
    assert "run.seed: saved 0, now <missing>" in message
    assert "outer_steps: saved" not in message
    assert [d[0] for d in info.value.differences] == [
        "lopt.momentum_decays",
        "meta.window",
        "run.seed",
    ]


def test_mutable_keys_exist_in_the_run_config():
    from meta_train.config import Config  # noqa: PLC0415

    sections = Config().to_dict()
    for key in RESUME_MUTABLE_KEYS:
        section, name = key.split(".")
        assert section in sections, key
        assert any(fnmatch.fnmatchcase(k, name) for k in sections[section]), key


# ------------------------------------------------------------------- non-finite meta-parameters


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_theta_is_never_saved(ckpt_dir, bad):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, make_theta(), make_state(1), CONFIG)
        theta = make_theta()
        theta["dense_1"]["bias"] = theta["dense_1"]["bias"].at[1].set(bad)
        with pytest.raises(NonFiniteThetaError, match=r"step 2 .*theta\['dense_1'\]\['bias'\]"):
            ckpt.save(2, theta, make_state(2), CONFIG)
        assert ckpt.all_steps() == [1]
    assert sorted(os.listdir(ckpt_dir)) == ["1"]  # nothing written, not even a tmp folder
    assert_trees_equal(load_theta(ckpt_dir)[0], make_theta())


def _save_without_the_finiteness_guard(monkeypatch, ckpt_dir, step, theta):
    """What a version without the guard wrote: a complete checkpoint holding NaN θ."""
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_non_finite", lambda tree: [])
        with Checkpointer(ckpt_dir) as ckpt:
            ckpt.save(step, theta, make_state(step), CONFIG)


def test_a_checkpoint_with_non_finite_theta_is_refused_with_the_earlier_steps(
    ckpt_dir, monkeypatch
):
    from lopt.export import load_optax  # noqa: PLC0415

    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, make_theta(), make_state(1), CONFIG)
    nan_theta = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), make_theta())
    _save_without_the_finiteness_guard(monkeypatch, ckpt_dir, 2, nan_theta)
    where = os.path.join(ckpt_dir, "2")

    with pytest.raises(NonFiniteThetaError) as info:
        load_theta(ckpt_dir)
    lines = str(info.value).splitlines()
    assert where in lines[0] and "not finite" in lines[0]
    assert lines[-1].startswith("Earlier steps on disk: [1]") and f"move {where} aside" in lines[-1]
    with pytest.raises(NonFiniteThetaError, match="not finite"):
        load_optax(ckpt_dir)  # the export refuses it too (it loads through load_theta)
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(NonFiniteThetaError, match="Earlier steps on disk: \\[1\\]"):
            ckpt.restore(abstract(make_theta()), abstract(make_state()))
        theta, _, _ = ckpt.restore(abstract(make_theta()), abstract(make_state()), step=1)
    assert_trees_equal(theta, make_theta())
    assert_trees_equal(load_theta(ckpt_dir, step=1)[0], make_theta())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("item", ["theta", "state", "config", "manifest"])
def test_earlier_steps_hint_ends_the_message_whichever_item_is_corrupt(ckpt_dir, item):
    _two_steps(ckpt_dir)
    step_dir = Path(ckpt_dir) / "2"
    if item in ("theta", "state"):
        (step_dir / item / "_METADATA").unlink()
    else:
        (step_dir / item / "metadata").write_text("{not json")
    hint = (
        "Earlier steps on disk: [1]; restore one with step=... (python -m evaluate --step), "
        f"or move {step_dir} aside to resume from step 1."
    )
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(CorruptCheckpointError) as info:
            ckpt.restore(ABSTRACT_THETA, abstract(make_state()))
        assert str(info.value).splitlines()[-1] == hint
        if item == "config":
            with pytest.raises(CorruptCheckpointError) as info:
                ckpt.read_config()
            assert str(info.value).splitlines()[-1] == hint
        else:
            assert ckpt.read_config() == json.loads(json.dumps(CONFIG))
    if item != "state":  # load_theta reads everything but the state
        with pytest.raises(CorruptCheckpointError) as info:
            load_theta(ckpt_dir)
        assert str(info.value).splitlines()[-1] == hint


def test_saved_steps_reads_without_creating_anything(tmp_path, ckpt_dir):
    assert saved_steps(str(tmp_path / "nowhere")) == []
    assert not (tmp_path / "nowhere").exists()
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(3, make_theta(), make_state(3), CONFIG)
    assert saved_steps(ckpt_dir) == [3]


def test_where_a_run_lives_is_not_part_of_its_identity():
    saved = dict(CONFIG, run=dict(CONFIG["run"], out_dir="runs/a"))
    moved = dict(CONFIG, run=dict(CONFIG["run"], out_dir="/elsewhere/runs/a-copy"))
    check_compatible(saved, moved)


# ------------------------------------------------------------------------------ the best step


def _save_steps(ckpt: Checkpointer, steps, best: int | None = None):
    for step in steps:
        ckpt.save(step, make_theta(float(step)), make_state(step), CONFIG)
        if best == step:
            write_best(ckpt.directory, {"step": step, "score": 0.5, "history": []})


def test_the_best_step_survives_rotation_and_loads_by_default(ckpt_dir):
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        _save_steps(ckpt, [1, 2, 3, 4, 5], best=2)
        assert ckpt.all_steps() == [2, 4, 5]  # the newest two, and the best
    assert pick_step(ckpt_dir) == 2
    theta, _ = load_theta(ckpt_dir)  # the best by default
    np.testing.assert_array_equal(theta["dense_1"]["kernel"], 2.0 * np.ones((4, 2)))
    theta, _ = load_theta(ckpt_dir, "latest")
    np.testing.assert_array_equal(theta["dense_1"]["kernel"], 5.0 * np.ones((4, 2)))
    assert pick_step(ckpt_dir, 4) == 4 and pick_step(ckpt_dir, "best") == 2


def test_a_formerly_best_step_rotates_away_once_the_mark_moves(ckpt_dir):
    with Checkpointer(ckpt_dir, max_to_keep=1) as ckpt:
        _save_steps(ckpt, [1, 2], best=1)
        assert ckpt.all_steps() == [1, 2]
        write_best(ckpt.directory, {"step": 2, "score": 0.4, "history": []})
        ckpt.rotate()
        assert ckpt.all_steps() == [2]


def test_without_a_mark_the_latest_step_loads(ckpt_dir):
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        _save_steps(ckpt, [1, 2])
    assert read_best(ckpt_dir) is None and pick_step(ckpt_dir) == 2
    with pytest.raises(CheckpointError, match="no best step is marked"):
        pick_step(ckpt_dir, "best")


def test_a_mark_of_a_missing_step_or_a_corrupt_mark_is_an_error(ckpt_dir):
    with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        _save_steps(ckpt, [1, 2])
    write_best(ckpt_dir, {"step": 7, "score": 0.5, "history": []})
    with pytest.raises(CheckpointError, match="marks step 7 as the best.*not on disk"):
        load_theta(ckpt_dir)
    assert pick_step(ckpt_dir, "latest") == 2  # the user can still choose
    Path(ckpt_dir, "best.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="best.json"):
        load_theta(ckpt_dir)
