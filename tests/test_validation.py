"""Meta-validation: deterministic scores, tasks apart from the evaluation's, the guard, and
the best checkpoint through rotation, resume and a diverging run."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.export import load_optax
from meta_train.build import build_run
from meta_train.checkpoint import load_theta, pick_step, read_best, saved_steps
from meta_train.config import ConfigError, load_config
from meta_train.main import meta_train
from meta_train.validation import Guard, build_validator, horizons, validation_tasks

TINY = [
    "task_family.hidden_sizes=[[8], [16]]",
    "task_family.batch_sizes=[32]",
    "meta.num_pairs=2",
    "meta.window=5",
    "meta.min_episode_len=20",
    "meta.max_episode_len=40",
    "valid.num_tasks=2",
    "valid.num_seeds=2",
    "valid.points=2",
    "run.wandb_mode=disabled",
    "run.log_every=2",
]


def _config(out_dir, *extra):
    return load_config(None, [*TINY, f"run.out_dir='{out_dir}'", *extra])


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # ~10 s; keeps the default stage under 10 minutes
def test_scores_are_deterministic_for_fixed_theta(tmp_path):
    run = build_run(_config(tmp_path))
    theta = run.init_state().theta
    first = build_validator(run)
    a, b = first(theta), first(theta)
    c = build_validator(build_run(_config(tmp_path)))(theta)  # rebuilt: same tasks, seeds
    for key in ("score", "final_loss", "mean_loss", "ratio_final", "ratio_mean"):
        assert a[key] == b[key] == c[key], key
    assert math.isfinite(a["score"]) and a["score"] > 0
    other = jax.tree.map(lambda x: x + 0.05, theta)
    assert first(other)["score"] != a["score"]  # it measures θ


@pytest.mark.slow  # ~6-11 s; keeps the default stage under 10 minutes
def test_a_horizon_scale_trains_the_same_tasks_longer(tmp_path):
    run = build_run(_config(tmp_path))
    base, longer = build_validator(run), build_validator(run, horizon_scale=3)
    assert [t.horizon for t in longer.tasks] == [3 * t.horizon for t in base.tasks]
    assert [t.info for t in longer.tasks] == [t.info for t in base.tasks]
    # the reference Adam trains 3x longer too: its final losses move
    assert not np.allclose(longer.adam_final, base.adam_final)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="horizon_scale"):
            build_validator(run, horizon_scale=bad)


@pytest.mark.slow  # ~8 s; keeps the default stage under 10 minutes
def test_a_decay_per_epoch_scores_each_task_with_its_own_decay(tmp_path):
    from tasks.epochs import steps_per_epoch  # noqa: PLC0415

    run = build_run(_config(tmp_path, "valid.weight_decay_per_epoch=0.5"))
    theta = run.init_state().theta
    decayed = build_validator(run)
    steps = [steps_per_epoch(t.task) for t in decayed.tasks]
    assert [lo.weight_decay for lo in decayed.task_lopts] == [0.5 / n for n in steps]
    plain = build_validator(build_run(_config(tmp_path)))
    assert plain.task_lopts is None
    np.testing.assert_array_equal(plain.adam_final, decayed.adam_final)  # Adam has no decay
    assert decayed(theta)["score"] != plain(theta)["score"]
    with pytest.raises(ConfigError, match="no weight_decay|has none"):
        build_validator(
            build_run(_config(tmp_path, "valid.weight_decay_per_epoch=0.5", "lopt.kind=adafac"))
        )


def test_tasks_span_templates_and_horizons_and_are_not_the_evaluations(tmp_path):
    assert horizons(4, 200, 2000) == [200, 431, 928, 2000]
    assert horizons(3, 400, 400) == [400, 400, 400]
    run = build_run(_config(tmp_path, "task_family.init_scale=[0.5, 2.0]"))
    tasks = validation_tasks(run.family, run.held_out_key(), 2, 20, 40)
    assert sorted(t.info["template"] for t in tasks) == [0, 1]  # every template first
    assert sorted(t.horizon for t in tasks) == [20, 40]

    def numbers(task):  # what a task draws: its hyperparameters (init seed, activation, ...)
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(task.hp)]).tolist()

    evaluation = [
        numbers(run.family.sample(k))
        for k in jax.random.split(run.held_out_key(), run.config.eval.num_tasks)
    ]
    assert all(numbers(t.task) not in evaluation for t in tasks)


def test_guard_tracks_the_best_and_fires_after_patience():
    g = Guard(margin=0.1, patience=2, action="lower_lr", lr_factor=0.5)
    assert g.observe(0, 1.0) == (True, None)
    assert g.observe(10, 1.05) == (False, None)  # within the margin: not worse
    assert g.observe(20, 1.2) == (False, None) and g.worse == 1
    best, message = g.observe(30, math.inf)  # diverged counts as worse
    assert not best and "worse than the best" in message and g.lr_scale == 0.5
    assert g.fired == [30] and g.worse == 0 and not g.stop
    assert g.observe(40, 0.9) == (True, None) and g.best_step == 40

    stopper = Guard(margin=0.0, patience=1, action="stop")
    stopper.observe(0, 1.0)
    assert "stopping" in stopper.observe(5, 1.01)[1] and stopper.stop

    history = [{"step": s, "score": v} for s, v in [(0, 1.0), (10, 1.2), (20, None), (30, 0.8)]]
    replayed = Guard(margin=0.1, patience=2)
    replayed.replay(history)
    straight = Guard(margin=0.1, patience=2)
    for r in history:
        straight.observe(r["step"], math.inf if r["score"] is None else r["score"])
    assert replayed == straight


@pytest.mark.slow  # 15 s: three runs
def test_best_checkpoint_survives_rotation_and_resume(tmp_path):
    common = ["valid.every=2", "run.max_to_keep=1", "run.checkpoint_every=1"]
    straight, _ = meta_train(build_run(_config(tmp_path / "a", *common, "meta.outer_steps=8")))
    meta_train(build_run(_config(tmp_path / "b", *common, "meta.outer_steps=4")))
    resumed, _ = meta_train(
        build_run(_config(tmp_path / "b", *common, "meta.outer_steps=8")), resume=True
    )
    for name in ("a", "b"):
        ckpt = tmp_path / name / "checkpoints"
        best = read_best(str(ckpt))
        assert [r["step"] for r in best["history"]] == [0, 2, 4, 6, 8]
        # The newest step and the best one, whatever max_to_keep says.
        assert saved_steps(str(ckpt)) == sorted({best["step"], 8})
        assert best["score"] == min(r["score"] for r in best["history"])
    a = read_best(str(tmp_path / "a" / "checkpoints"))
    b = read_best(str(tmp_path / "b" / "checkpoints"))
    assert a == b  # resuming redoes nothing differently
    np.testing.assert_array_equal(
        jax.flatten_util.ravel_pytree(straight.theta)[0],
        jax.flatten_util.ravel_pytree(resumed.theta)[0],
    )
    scores = [
        r["valid/score"] for r in _read(tmp_path / "b" / "metrics.jsonl") if "valid/score" in r
    ]
    assert len(scores) == 5


@pytest.mark.slow  # ~15 s: three runs
def test_a_run_stopped_before_its_second_save_resumes_from_step_0(tmp_path):
    import shutil  # noqa: PLC0415

    common = ["valid.every=2", "run.checkpoint_every=2", "meta.outer_steps=4"]
    straight, _ = meta_train(build_run(_config(tmp_path / "a", *common)))

    stopped = build_run(_config(tmp_path / "b", *common))

    def killed(state, step):  # the process dies in its first outer step
        raise KeyboardInterrupt

    stopped.outer_step = killed
    with pytest.raises(KeyboardInterrupt):
        meta_train(stopped)
    ckpt = tmp_path / "b" / "checkpoints"
    assert saved_steps(str(ckpt)) == [0]
    assert [r["step"] for r in read_best(str(ckpt))["history"]] == [0]
    # The same folder without its marker: a crash between the save of step 0 and the marker.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "c" / "checkpoints" / "best.json").unlink()

    for name in ("b", "c"):
        resumed, _ = meta_train(build_run(_config(tmp_path / name, *common)), resume=True)
        np.testing.assert_array_equal(
            jax.flatten_util.ravel_pytree(straight.theta)[0],
            jax.flatten_util.ravel_pytree(resumed.theta)[0],
        )
        assert read_best(str(tmp_path / name / "checkpoints")) == read_best(
            str(tmp_path / "a" / "checkpoints")
        ), name
        assert saved_steps(str(tmp_path / name / "checkpoints")) == [0, 2, 4], name


# ~20 s: the slow stage (the guard's logic is checked above, its lower_lr action end to end
# below; this is the 'stop' action end to end)
@pytest.mark.slow
def test_guard_fires_on_a_diverging_run_and_keeps_the_best_theta(tmp_path, capsys):
    config = _config(
        tmp_path,
        "meta.outer_lr=3.0",  # Adam steps of 3 per coordinate: θ is destroyed at once
        "meta.outer_steps=40",
        "valid.every=2",
        "valid.guard_patience=2",
        "valid.guard_margin=0.0",
        "valid.guard_action='stop'",
        "run.checkpoint_every=1000",
        "run.max_to_keep=1",
    )
    state, _ = meta_train(build_run(config))
    stderr = capsys.readouterr().err
    assert "guard @" in stderr and "stopping" in stderr
    ckpt = str(tmp_path / "checkpoints")
    best = read_best(ckpt)
    stopped_at = int(state.step)
    assert stopped_at < 40 and best["step"] < stopped_at and best["guard_fired"] == [stopped_at]
    assert saved_steps(ckpt) == [best["step"], stopped_at]
    # load_optax and the evaluation get the best θ, not the diverged last one.
    assert pick_step(ckpt) == best["step"]
    _, theta, _ = load_optax(ckpt)
    saved_best, _ = load_theta(ckpt, best["step"])
    last, _ = load_theta(ckpt, "latest")
    flat = jax.flatten_util.ravel_pytree
    np.testing.assert_array_equal(flat(theta)[0], flat(saved_best)[0])
    assert not np.array_equal(flat(theta)[0], flat(last)[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["valid_stopped"] and summary["valid_best_step"] == best["step"]
    assert any("worsening" in a for a in summary["alerts"])


@pytest.mark.slow  # ~12 s; keeps the default stage under 10 minutes
def test_lower_lr_guard_scales_the_outer_updates(tmp_path):
    config = _config(
        tmp_path,
        "meta.outer_lr=3.0",
        "meta.outer_steps=6",
        "valid.num_tasks=1",  # one compiled validation curve, not two (~4 s)
        "valid.every=1",
        "valid.guard_patience=1",
        "valid.guard_margin=0.0",
        "valid.guard_lr_factor=0.25",
    )
    state, _ = meta_train(build_run(config))
    rows = [r for r in _read(tmp_path / "metrics.jsonl") if "valid/lr_scale" in r]
    fired = [r["step"] for r in rows if r["valid/guard_fired"]]
    assert fired, "the guard never fired on a destroyed θ"
    assert float(state.lr_scale) == pytest.approx(0.25 ** len(fired))
    assert float(jnp.asarray(state.lr_scale)) == rows[-1]["valid/lr_scale"]
