"""`python -m evaluate`: [eval] overrides, and user errors as one message with exit code 2."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from evaluate.__main__ import main
from meta_train import checkpoint
from meta_train.checkpoint import Checkpointer, load_theta
from meta_train.config import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist1d-mlp-pes"
# A small evaluation: one held-out task, two seeds, 20 steps, Adam at one rate.
SMALL = [
    "eval.num_tasks=1",
    "eval.num_seeds=2",
    "eval.num_steps=20",
    "eval.eval_every=10",
    "eval.adam_lrs=[1e-2]",
]


@pytest.fixture
def run_dir(tmp_path):
    """A copy of the shipped run: the evaluation writes next to its checkpoints."""
    shutil.copytree(SHIPPED, tmp_path / "run" / "checkpoints")
    return tmp_path / "run"


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.slow  # keeps the default stage under 10 minutes (it took 9 min 57 s)
def test_eval_overrides_change_the_evaluation_and_never_overwrite_the_saved_one(run_dir, capsys):
    saved_eval = load_theta(str(SHIPPED))[1]["eval"]
    assert saved_eval["num_tasks"] == 3 and saved_eval["num_seeds"] == 3  # what we override
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text('{"saved": true}')
    # Flags may come between the overrides.
    assert (
        main(
            ["--checkpoint", str(run_dir / "checkpoints"), *SMALL[:2], "--step", "10000"]
            + SMALL[2:]
        )
        == 0
    )
    assert "learned" in capsys.readouterr().out
    outs = [p for p in run_dir.iterdir() if p.name.startswith("eval_")]
    assert len(outs) == 1  # another folder for other settings: the saved results stay
    assert json.loads((run_dir / "eval" / "results.json").read_text()) == {"saved": True}
    results = json.loads((outs[0] / "results.json").read_text())
    assert results["config"]["num_tasks"] == 1 and results["config"]["num_seeds"] == 2
    assert results["config"]["num_steps"] == 20 and results["config"]["adam_lrs"] == [1e-2]
    assert results["summary"]["learned"]["runs"] == 2  # 1 task × 2 seeds
    assert results["eval_steps"] == [0, 10, 20]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["meta.sigma=0.1"], "takes only eval.key=value overrides"),
        (["eval.num_tasks=0"], "config error: eval.num_tasks must be an integer >= 1"),
        (["eval.adam_lrs=[]"], "config error: eval.adam_lrs must be a non-empty list"),
        (["eval.num_taks=2"], "unknown key(s) eval.num_taks"),
        (["--num-steps", "0"], "--num-steps must be an integer >= 1"),
        (["--step", "5"], "no checkpoint for step 5"),
    ],
)
def test_bad_arguments_are_one_message_and_exit_code_2(run_dir, capsys, extra, message):
    assert main(["--checkpoint", str(run_dir / "checkpoints"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in _last_line(err) and "Traceback" not in err
    assert not [p for p in run_dir.iterdir() if p.name.startswith("eval")]


def test_a_wrong_checkpoint_is_one_message_and_exit_code_2(run_dir, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _last_line(capsys.readouterr().err)
    assert main(["--checkpoint", str(run_dir)]) == 2  # the run folder, not its checkpoints
    assert "checkpoints/ (holds step folders" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--checkpoint", str(tmp_path / "file")]) == 2
    assert "is a file" in _last_line(capsys.readouterr().err)
    with pytest.raises(ConfigError, match="eval.num_seeds"):
        main(["--checkpoint", str(run_dir / "checkpoints"), "eval.num_seeds=0", "--debug"])


def test_a_checkpoint_with_non_finite_theta_is_refused(tmp_path, capsys, monkeypatch):
    theta, config = load_theta(str(SHIPPED))
    nan_theta = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), theta)
    # What a version without the guard could write: a complete checkpoint of NaN θ.
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_non_finite", lambda tree: [])
        with Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
            ckpt.save(7, nan_theta, {"step": jnp.int32(7)}, config)
    assert main(["--checkpoint", str(tmp_path / "checkpoints"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "not finite" in _last_line(err) and str(tmp_path / "checkpoints" / "7") in err
    assert not (tmp_path / "eval").exists()
