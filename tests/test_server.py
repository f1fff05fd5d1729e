"""The gradient server: roles, staleness, backends, faults, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_devices import run_json_script
from test_meta_train import TINY as TINY_RUN

from meta_train.build import build_run
from meta_train.checkpoint import Checkpointer, load_theta
from meta_train.config import ConfigError, load_config
from meta_train.main import meta_train
from meta_train.server import GradientServer, InProcessWorkers, uses_server

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "run.log_every=1"]  # every step logged: the counters are checked


def _config(tmp_path, *extra):
    return load_config(None, [*TINY, f"run.out_dir='{tmp_path}'", *extra])


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def test_server_settings_are_checked_and_say_which_path_runs():
    assert not uses_server(load_config(None, []).server)  # the default: the fused in-process step
    assert uses_server(load_config(None, ["server.workers=2"]).server)
    assert uses_server(load_config(None, ["server.backend='ray'"]).server)
    # Sync averages every worker's estimate; async `meta_batch` of them (0: one per worker).
    sync = load_config(None, ["server.workers=3", "server.meta_batch=1"]).server
    assert sync.estimates_per_step == 3
    asy = load_config(None, ["server.workers=3", "server.mode='async'", "server.meta_batch=1"])
    assert asy.server.estimates_per_step == 1
    every = load_config(None, ["server.workers=3", "server.mode='async'"])
    assert every.server.estimates_per_step == 3
    for bad, key in [
        ("server.backend='mpi'", "server.backend"),
        ("server.workers=0", "server.workers"),
        ("server.mode='eager'", "server.mode"),
        ("server.max_staleness=-1", "server.max_staleness"),
        ("server.worker_timeout_s=0", "server.worker_timeout_s"),
        ("server.threads=2", "threads"),
        ("server.queue_depth=0", "server.queue_depth"),
        ("server.queue_depth=2", "server.queue_depth=2 needs server.mode='async'"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


# ~17 s and ~12 s: the slow stage (keeps the default stage under 10 minutes; the other
# in-process server tests below stay in it)
@pytest.mark.slow
@pytest.mark.parametrize(
    "groups",
    [(), ("meta.task_groups=2", "meta.switch_every=1")],
    ids=["one_program", "groups_switching"],
)
def test_one_in_process_worker_through_the_server_reproduces_the_fused_step(tmp_path, groups):
    # The same algorithm in two places: the worker's estimate half and the learner's apply
    # half give the fused jitted step's θ, to float32 rounding of separate programs; also
    # when groups switch templates (one jitted call per group on both sides).
    run = build_run(_config(tmp_path / "a", "meta.outer_steps=3", *groups))
    assert run.switching == bool(groups)
    fused = run.init_state()
    for step in range(3):
        fused, _ = run.outer_step(fused, step)
    server = GradientServer(run, InProcessWorkers(run, 1))
    state = run.init_server_state()
    for step in range(3):
        state, metrics = server.step(state, step)
    a, b = _flat(fused.theta), _flat(state.theta)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    assert int(state.step) == 3 and metrics["server/staleness_0"] == 3
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(fused.key))


def _serve(path, steps, *extra):
    """`steps` outer steps of an in-process gradient server: (state, last metrics, server)."""
    run = build_run(_config(path, *extra))
    server = GradientServer(run)
    state = run.init_server_state()
    for step in range(steps):
        state, metrics = server.step(state, step)
    return state, metrics, server


@pytest.mark.slow  # two runs (~13 s); the queued-estimate test keeps async in the default stage
def test_async_workers_are_stale_by_their_count_and_stale_estimates_are_dropped(tmp_path):
    # In-process async is a deterministic round-robin: with 3 workers and one estimate per
    # step, estimates are 2 versions old once every worker is busy.
    three = ("server.workers=3", "server.mode='async'", "server.meta_batch=1")
    _, metrics, _ = _serve(tmp_path, 6, *three)
    hist = {k: v for k, v in metrics.items() if k.startswith("server/staleness_")}
    assert hist["server/staleness_0"] == 1 and hist["server/staleness_max"] == 2
    assert metrics["server/staleness_2"] >= 3 and metrics["server/dropped_stale_total"] == 0
    # The same with at most 1 version of staleness: the 2-old estimates are dropped, counted,
    # and their workers start again on the newest θ; the run still advances every step.
    state, metrics, _ = _serve(tmp_path / "b", 6, *three, "server.max_staleness=1")
    assert int(state.step) == 6
    assert metrics["server/dropped_stale_total"] >= 1
    assert metrics["server/dropped_stale_total"] == metrics.get("server/staleness_2", 0)
    assert np.all(np.isfinite(_flat(state.theta)))


@pytest.mark.slow  # ~11 s; keeps the default stage under 10 minutes
def test_a_queued_estimate_hides_the_round_trip_at_one_version_of_staleness(tmp_path):
    # queue_depth=2: a worker's next estimate is queued before its last one comes back, so
    # after the first estimate every one is exactly one version old (never more, with one
    # worker), and the run applies one per step.
    queued = ("server.mode='async'", "server.queue_depth=2", "server.meta_batch=1")
    state, metrics, server = _serve(tmp_path, 5, *queued)
    assert len(server.workers.vacancies(2)) == 1  # one still queued; the next step refills
    assert int(state.step) == 5 and metrics["server/staleness_max"] == 1
    assert metrics["server/staleness_0"] == 1 and metrics["server/staleness_1"] == 4
    assert metrics["server/dropped_stale_total"] == 0


# Two 4-step async runs, about 16 s: in the slow stage, to shorten the default stage (over
# 10 minutes on a slow day); the tests above keep the async server's counters in it.
@pytest.mark.slow
def test_the_in_process_server_is_deterministic_and_logs_its_counters(tmp_path):
    extra = ("server.workers=2", "server.mode='async'", "meta.outer_steps=4")
    a, _ = meta_train(build_run(_config(tmp_path / "a", *extra)))
    b, _ = meta_train(build_run(_config(tmp_path / "b", *extra)))
    np.testing.assert_array_equal(_flat(a.theta), _flat(b.theta))
    np.testing.assert_array_equal(_flat(a.opt_state), _flat(b.opt_state))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    for key in (
        "server/workers_alive",
        "server/staleness_mean",
        "server/dropped_stale",
        "server/worker_restarts",
        "server/lost_estimates",
        "server/worker0_inner_steps_per_s",
        "checkpoint/last_saved_step",
        "meta_loss",
        "grad_norm",
        "reset_fraction",
    ):
        assert key in logged, key


@pytest.mark.slow  # three runs (~10 s)
def test_a_run_resumes_across_backends_from_its_last_checkpoint(tmp_path):
    # A fused run's checkpoint (with particles) resumes under the server (particles
    # dropped: workers own theirs), and back (particles started afresh from the saved θ).
    out = tmp_path / "run"
    fused = ("meta.outer_steps=2", "run.checkpoint_every=1")
    meta_train(build_run(_config(out, *fused)))
    saved = _flat(load_theta(str(out / "checkpoints"), 2)[0])
    server = ("meta.outer_steps=4", "run.checkpoint_every=1", "server.workers=2")
    state, _ = meta_train(build_run(_config(out, *server)), resume=True)
    assert int(state.step) == 4
    assert not np.array_equal(_flat(state.theta), saved)
    state, _ = meta_train(build_run(_config(out, "meta.outer_steps=5")), resume=True)
    assert int(state.step) == 5 and jax.tree.leaves(state.est_state)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kills a process started in its own session and everything it started there."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _main_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meta_train.main",
        "--no-eval",
        *TINY,
        f"run.out_dir='{out}'",
        "run.checkpoint_every=1",
        *extra,
    ]


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a killed learner's and everything it started)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow  # a learner process killed mid-run, then resumed (~40 s; Ray ~60 s)
@pytest.mark.parametrize("backend", ["in_process", "ray"])
def test_a_killed_learner_resumes_from_its_last_complete_checkpoint(tmp_path, backend):
    out = tmp_path / "run"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", WANDB_MODE="disabled")
    extra = (
        "meta.outer_steps=1000",
        "server.workers=2",
        "server.mode='async'",
        f"server.backend='{backend}'",
    )
    proc = subprocess.Popen(
        _main_cmd(out, *extra),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        ckpt_dir = out / "checkpoints"
        while time.monotonic() < deadline:
            done = [p for p in ckpt_dir.glob("[0-9]*") if p.name.isdigit()]
            if len(done) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 120 s")
    finally:
        _kill_tree(proc)  # SIGKILL: no clean-up in the learner
        # Ray's own processes (its GCS, raylet, workers) run in the learner's session:
        # they go with it.
        deadline = time.monotonic() + 30
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            for pid in _session_pids(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        assert not _session_pids(proc.pid), "processes of the killed learner left running"
    ckpt = Checkpointer(str(ckpt_dir))
    last = ckpt.latest_step()
    ckpt.close()
    run = build_run(_config(out, *extra[1:], "meta.outer_steps=1000"))
    # What the resumed learner starts from is the last complete checkpoint, bit for bit.
    from meta_train.main import _restore  # noqa: PLC0415

    ckpt = Checkpointer(str(ckpt_dir))
    restored = _restore(run, ckpt, last, server=True)
    ckpt.close()
    theta_saved = load_theta(str(ckpt_dir), last)[0]
    np.testing.assert_array_equal(_flat(restored.theta), _flat(theta_saved))
    assert int(restored.step) == last
    # And the resumed process runs on from there.
    subprocess.run(
        _main_cmd(out, *extra[1:], f"meta.outer_steps={last + 2}", "--resume"),
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
    )
    ckpt = Checkpointer(str(ckpt_dir))
    assert ckpt.latest_step() == last + 2
    ckpt.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # starts Ray on localhost (~20 s)
def test_one_synchronous_ray_worker_matches_the_in_process_run(tmp_path):
    steps = ("meta.outer_steps=4",)
    fused, _ = meta_train(build_run(_config(tmp_path / "fused", *steps)))
    run = build_run(_config(tmp_path / "ray", *steps, "server.backend='ray'"))
    state, metrics = meta_train(run)
    # The worker runs on one pinned core (one device) where this process may shard pairs
    # over several; separate programs sum in other orders: agreement to 1e-5 of θ's scale.
    a, b = _flat(fused.theta), _flat(state.theta)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    assert metrics["server/workers_alive"] == 1 and metrics["server/staleness_0"] == 4


@pytest.mark.slow  # starts Ray on localhost with two workers, kills one (~40 s each)
@pytest.mark.parametrize("queue_depth", [1, 2])
def test_a_killed_ray_worker_is_replaced_and_the_run_keeps_advancing(tmp_path, queue_depth):
    import ray  # noqa: PLC0415

    run = build_run(
        _config(
            tmp_path,
            "server.backend='ray'",
            "server.workers=2",
            "server.mode='async'",
            "server.meta_batch=1",
            f"server.queue_depth={queue_depth}",
        )
    )
    server = GradientServer(run)
    pids = []
    try:
        pids = [ray.get(a.pid.remote()) for a in server.workers.actors]
        state = run.init_server_state()
        state, _ = server.step(state, 0)
        # Async: the other worker's estimate is in flight now; SIGKILL its process.
        busy = [j.worker for j in server.workers._inflight.values()]
        victim = max(set(busy), key=busy.count)  # the one with the most jobs in flight
        owed = busy.count(victim)  # running and queued (with queue_depth=2: two)
        assert owed == queue_depth
        os.kill(pids[victim], signal.SIGKILL)
        # The other worker keeps the run advancing while Ray notices the death (quickly
        # on an idle machine, later on a busy one).
        step, events, deadline = 1, [], time.monotonic() + 120
        while not events and time.monotonic() < deadline:
            state, metrics = server.step(state, step)
            events += server.events()
            step += 1
        for _ in range(2):  # and on, with the replacement
            state, metrics = server.step(state, step)
            step += 1
        assert int(state.step) == step
        # Replaced once, however many of its jobs fail after it (each is redone and logged
        # as lost; one that finished just before the kill is not lost).
        assert metrics["server/worker_restarts"] == 1
        assert 1 <= metrics["server/lost_estimates"] <= owed
        assert metrics["server/workers_alive"] == 2
        assert sum("died" in e for e in events) == 1, events
        assert np.all(np.isfinite(_flat(state.theta)))
        pids.append(ray.get(server.workers.actors[victim].pid.remote()))
    finally:
        server.close()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 20
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_pid_alive(p) for p in pids), "worker processes left running"


WORKER_SCRIPT = """
import json, sys
import jax
from jax.flatten_util import ravel_pytree
from meta_train.build import build_run
from meta_train.config import load_config
from meta_train.server import GradientWorker, flat_theta
run = build_run(load_config(None, json.loads(sys.argv[1])))
worker = GradientWorker(run.config, 0, run=run)
theta = flat_theta(run.init_server_state().theta)
estimates = [worker.estimate(theta, v) for v in range(2)]
devices = {len(x.sharding.device_set) for x in jax.tree.leaves(worker._particles.particles)}
print(json.dumps({"devices": len(jax.devices()), "particle_devices": sorted(devices),
                  "grads": [e.grad.tolist() for e in estimates]}))
"""


def _worker_run(flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return run_json_script(WORKER_SCRIPT, [*TINY, "meta.num_pairs=4"], env)


@pytest.mark.slow  # two subprocesses (~25 s)
def test_a_worker_spreads_its_particles_over_every_local_device():
    two = _worker_run("--xla_force_host_platform_device_count=2")
    one = _worker_run("")
    assert two["devices"] == 2 and two["particle_devices"] == [2]
    assert one["devices"] == 1 and one["particle_devices"] == [1]
    # The same estimates: only the order of the sums over pairs differs (float32 round-off).
    for a, b in zip(two["grads"], one["grads"], strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def test_theta_is_published_once_per_version_whatever_the_workers(tmp_path):
    run = build_run(_config(tmp_path, "server.workers=3"))
    workers = InProcessWorkers(run, 3)
    calls = []
    publish = workers.publish
    workers.publish = lambda theta, version: calls.append(version) or publish(theta, version)
    server = GradientServer(run, workers)
    state = run.init_server_state()
    for step in range(2):
        state, metrics = server.step(state, step)
    assert calls == [0, 1] and metrics["server/estimates"] == 3


@pytest.mark.slow  # starts Ray with two workers, freezes one for its timeout (~40 s)
def test_a_silent_ray_worker_is_declared_lost_and_replaced(tmp_path):
    import ray  # noqa: PLC0415

    run = build_run(
        _config(tmp_path, "server.backend='ray'", "server.workers=2", "server.worker_timeout_s=8")
    )
    server = GradientServer(run)
    frozen = None
    try:
        state = run.init_server_state()
        state, _ = server.step(state, 0)  # both workers have answered: the timeout applies
        frozen = ray.get(server.workers.actors[1].pid.remote())
        os.kill(frozen, signal.SIGSTOP)  # alive but silent, as a hung or swapped-out host
        t0 = time.monotonic()
        state, metrics = server.step(state, 1)
        assert 8 <= time.monotonic() - t0 < 120
        assert metrics["server/worker_restarts"] == 1 and metrics["server/lost_estimates"] == 1
        assert any("silent" in e for e in server.events())
        state, metrics = server.step(state, 2)
        assert int(state.step) == 3 and metrics["server/staleness_0"] == 6
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.close()
    assert not ray.is_initialized()
