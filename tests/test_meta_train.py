"""Meta-training end to end: it learns, resumes exactly, refuses bad resumes, survives
diverging inner runs, logs, and its checkpoint alone gives the optax optimizer."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evaluate.suite import train_seeds
from lopt.export import as_optax, load_optax
from meta_train.build import build_run
from meta_train.checkpoint import ConfigMismatchError
from meta_train.config import ConfigError, load_config
from meta_train.main import main, meta_train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "task_family.hidden_sizes=[[16]]",
    "task_family.batch_sizes=[32]",
    "task_family.activations=['relu', 'tanh']",
    "meta.num_pairs=4",
    "meta.window=10",
    "meta.min_episode_len=50",
    "meta.max_episode_len=50",
    "meta.task_groups=1",
    "run.wandb_mode=disabled",
    "run.log_every=5",
]


def _config(tmp_path, *extra):
    return load_config(None, TINY + [f"run.out_dir='{tmp_path}'", *extra])


def _mean_training_loss(run, theta, steps=50):
    """The meta-objective measured the same way for any θ: fixed held-out tasks and seeds."""
    total = []
    for i in range(3):
        task = run.family.sample(jax.random.fold_in(run.held_out_key(), i))
        out = train_seeds(
            task,
            as_optax(run.lopt, theta, steps),
            steps,
            jax.random.split(jax.random.PRNGKey(i), 2),
            10,
        )
        total.append(np.mean(out["train_curve"]))
    return float(np.mean(total))


def test_a_few_outer_steps_lower_the_meta_loss(tmp_path):
    run = build_run(
        _config(tmp_path, "meta.outer_steps=120", "meta.outer_lr=1e-2", "run.checkpoint_every=1000")
    )
    before = _mean_training_loss(run, run.init_state().theta)
    state, metrics = meta_train(run)
    after = _mean_training_loss(run, state.theta)
    assert np.isfinite(metrics["meta_loss"])
    assert after < before - 0.05, (before, after)


def test_resume_continues_exactly(tmp_path):
    straight = build_run(_config(tmp_path / "a", "meta.outer_steps=6", "run.checkpoint_every=3"))
    s_a, _ = meta_train(straight)
    first = build_run(_config(tmp_path / "b", "meta.outer_steps=3", "run.checkpoint_every=3"))
    meta_train(first)
    # outer_steps may change on resume; the rest must match.
    second = build_run(_config(tmp_path / "b", "meta.outer_steps=6", "run.checkpoint_every=3"))
    s_b, _ = meta_train(second, resume=True)
    assert int(s_b.step) == 6
    for a, b in zip(jax.tree.leaves(s_a), jax.tree.leaves(s_b), strict=True):
        np.testing.assert_array_equal(a, b)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["meta"]["outer_steps"] == 6


def test_incompatible_resume_and_accidental_overwrite_fail_clearly(tmp_path):
    meta_train(build_run(_config(tmp_path, "meta.outer_steps=2", "run.checkpoint_every=2")))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ConfigMismatchError, match="meta.window"):
        meta_train(build_run(_config(tmp_path, "meta.outer_steps=4", "meta.window=5")), resume=True)
    with pytest.raises(ConfigError, match="--resume"):
        meta_train(build_run(_config(tmp_path, "meta.outer_steps=4")))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_diverging_inner_runs_never_poison_theta(tmp_path):
    # A learned optimizer whose steps are enormous makes every inner run blow up.
    run = build_run(
        _config(tmp_path, "lopt.step_mult=1e30", "meta.outer_steps=5", "run.log_every=1")
    )
    state, metrics = meta_train(run)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.theta))
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 5 and any(r["diverged_pairs"] > 0 for r in log)
    assert all(np.isfinite(r["grad_norm"]) and np.isfinite(r["meta_loss"]) for r in log)


def test_checkpoint_alone_gives_the_exported_optimizer(tmp_path):
    run = build_run(_config(tmp_path, "meta.outer_steps=2", "run.checkpoint_every=2"))
    state, _ = meta_train(run)
    tx, theta, lopt = load_optax(str(tmp_path / "checkpoints"))
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    grads = {"w": jnp.cos(jnp.arange(6.0)).reshape(2, 3)}
    u_loaded, _ = tx.update(grads, tx.init(params), params, loss=jnp.float32(1.0))
    opt = run.lopt.optimizer(state.theta)
    u_direct, _ = opt.update(grads, opt.init(params, 50), params, jnp.float32(1.0))
    np.testing.assert_array_equal(u_loaded["w"], u_direct["w"])
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_readme_example_runs_against_a_checkpoint(tmp_path):
    meta_train(build_run(_config(tmp_path, "meta.outer_steps=2", "run.checkpoint_every=2")))
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"runs/default/checkpoints"', repr(str(tmp_path / "checkpoints")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    params, state = scope["params"], scope["state"]
    losses = []
    for _ in range(30):
        params, state, loss = scope["step"](params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_main_job_end_to_end_logs_offline_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    rc = main(
        [
            "--config",
            str(ROOT / "configs" / "default.toml"),
            *TINY,
            f"run.out_dir='{tmp_path}'",
            "run.wandb_mode=offline",
            "meta.outer_steps=10",
            "eval.num_tasks=2",
            "eval.num_seeds=2",
            "eval.adam_lrs=[1e-3, 1e-2]",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "learned (pes)" in out and "adam (tuned" in out and "±" in out
    for f in (
        "config.json",
        "metrics.jsonl",
        "eval/results.json",
        "eval/results.md",
        "eval/curves.png",
    ):
        assert (tmp_path / f).exists(), f
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"meta_loss", "grad_norm", "inner_steps_per_s", "resets"} <= set(rows[-1])


def test_main_rejects_a_bad_config_key(capsys):
    assert main(["meta.windw=3"]) == 2
    assert "meta.windw" in capsys.readouterr().err


@pytest.mark.parametrize(
    "estimator, extra",
    [
        ("pes", ["meta.objective='valid_final'", "meta.diff_clip=1.0"]),
        ("es_single", ["meta.stagger='burn_in'"]),
        ("tes", ["meta.objective='final'", "meta.sign_diff=true"]),
        ("full_es", ["meta.window=50"]),
        ("tbptt", ["meta.stagger='none'"]),
    ],
)
def test_every_estimator_runs_from_the_config_and_logs_diagnostics(tmp_path, estimator, extra):
    run = build_run(
        _config(
            tmp_path,
            f"meta.estimator='{estimator}'",
            "meta.outer_steps=3",
            "run.log_every=1",
            "run.checkpoint_every=3",
            *extra,
        )
    )
    theta0 = run.init_state().theta
    state, _ = meta_train(run)
    leaves0, leaves1 = jax.tree.leaves(theta0), jax.tree.leaves(state.theta)
    assert all(np.all(np.isfinite(x)) for x in leaves1)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves0, leaves1, strict=True))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for key in ("estimate_variance", "grad_cosine", "reset_fraction", "meta_loss", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["grad_cosine"] == 0.0  # no previous gradient yet
    assert -1.0 <= rows[-1]["grad_cosine"] <= 1.0
