"""Particles sharded across CPU devices (one per core) give the single-device estimate."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from meta_train.build import build_run
from meta_train.config import load_config
from meta_train.devices import pair_sharding, use_cpu_cores
from meta_train.learner import outer_step

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "task_family.hidden_sizes=[[16]]",
    "task_family.batch_sizes=[32]",
    "meta.num_pairs=4",
    "meta.window=10",
    "meta.min_episode_len=50",
    "meta.max_episode_len=50",
    "meta.task_groups=1",
    "run.wandb_mode='disabled'",
    "valid.every=0",  # meta-validation has its own tests (test_validation.py)
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from meta_train.devices import use_cpu_cores, pair_sharding
    use_cpu_cores()
    import jax
    from meta_train.build import build_run
    from meta_train.config import load_config
    from meta_train.learner import outer_step
    run = build_run(load_config(None, json.loads(sys.argv[1])))
    state = run.init_state()
    particles = jax.tree.leaves(state.est_state.particles)
    before = [len(x.sharding.device_set) for x in particles]
    metrics = []
    for _ in range(2):
        state, m = outer_step(run.estimator, state, run.outer_opt)
        metrics.append({k: float(m[k]) for k in ("meta_loss", "grad_norm")})
    after = [len(x.sharding.device_set) for x in jax.tree.leaves(state.est_state.particles)]
    theta_devices = len(jax.tree.leaves(state.theta)[0].sharding.device_set)
    print(json.dumps({"devices": len(jax.devices()), "before": before, "after": after,
                      "theta_devices": theta_devices, "metrics": metrics,
                      "odd_pairs_replicated": pair_sharding(3) is None}))
    """
)


def _single_device_metrics():
    run = build_run(load_config(None, TINY))
    state = run.init_state()
    out = []
    for _ in range(2):
        state, m = outer_step(run.estimator, state, run.outer_opt)
        out.append({k: float(m[k]) for k in ("meta_loss", "grad_norm")})
    return out


def run_json_script(script: str, overrides: list[str], env: dict[str, str]) -> dict:
    """Runs `script` in a fresh Python (its devices set by `env`) with the config overrides
    as its JSON argument; returns the JSON object it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(overrides)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~13 s; the back-to-back loop test also runs 2 devices (slow stage)
def test_pairs_shard_across_two_cpu_devices_and_estimate_the_same_gradient():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    got = run_json_script(SCRIPT, TINY, env)
    assert got["devices"] == 2
    assert set(got["before"]) == {2} and set(got["after"]) == {2}  # stays sharded
    assert got["theta_devices"] == 2  # replicated on both
    assert got["odd_pairs_replicated"]
    # The same estimate: only the order of the sums over pairs differs between one and two
    # devices (float32 round-off, ~1e-7 relative; two outer steps let it grow a little).
    for two, one in zip(got["metrics"], _single_device_metrics(), strict=True):
        for k in ("meta_loss", "grad_norm"):
            np.testing.assert_allclose(two[k], one[k], rtol=1e-4, err_msg=k)


def test_device_count_is_fixed_once_jax_runs():
    jax.devices()  # the backend is running in this process
    before = len(jax.devices())
    use_cpu_cores(4)  # too late: changes nothing and does not fail
    assert len(jax.devices()) == before
    if before == 1:
        assert pair_sharding(8) is None  # one device holds everything


@pytest.mark.slow  # ~20 s: two runs under two device counts; CI runs it
def test_a_run_resumes_under_another_device_count(tmp_path):
    # Checkpoints hold arrays placed on the devices of the process that saved them; a
    # resume restores onto its own devices (2 -> 1 -> 2 here), never "topology mismatch".
    from meta_train.main import main  # noqa: PLC0415

    args = [*TINY, f"run.out_dir='{tmp_path}'", "run.checkpoint_every=2", "--no-eval"]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")

    def two_devices(*extra):
        cmd = [sys.executable, "-m", "meta_train.main", *args, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    two_devices("meta.outer_steps=2")
    # A user's one-device process loads the two-device run's optimizer as it is (before
    # the fix: "Topology mismatch" reported as a corrupt checkpoint).
    from lopt.export import load_optax  # noqa: PLC0415

    tx, theta, _ = load_optax(str(tmp_path / "checkpoints"), num_steps=10)
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(theta))
    params = {"w": jax.numpy.ones((3, 2))}
    updates, _ = tx.update(params, tx.init(params), params, loss=jax.numpy.float32(1.0))
    assert np.all(np.isfinite(np.asarray(updates["w"])))
    assert main([*args, "--resume", "meta.outer_steps=4"]) == 0  # this process: one device
    two_devices("--resume", "meta.outer_steps=6")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and all(np.isfinite(r["meta_loss"]) for r in rows)


LOOP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from meta_train.build import build_run
    from meta_train.config import load_config
    run = build_run(load_config(None, json.loads(sys.argv[1])))
    state = run.init_state()
    for i in range(400):  # dispatched back to back: no sync in this loop
        state, metrics = run.outer_step(state, i)
    jax.block_until_ready(state.theta)
    print(json.dumps({"devices": len(jax.devices()), "meta_loss": float(metrics["meta_loss"])}))
    """
)


@pytest.mark.slow  # ~15 s; without `wait_if_collectives` it aborts after a 40 s rendezvous
def test_outer_steps_dispatched_back_to_back_on_two_devices_never_deadlock():
    # Before the fix, XLA's CPU all-reduce rendezvous timed out (process abort, rc 134)
    # within 400 outer steps of such a loop (2 runs of 2 with this config, 2 of 2 with the
    # default config), and `python -m evaluate.measure.server_speed --ways in_process_all` 4 of 4.
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    got = run_json_script(LOOP_SCRIPT, TINY, env)
    assert got["devices"] == 2
    assert np.isfinite(got["meta_loss"])
