"""`python -m evaluate.bench` end to end on a tiny suite: outputs, common random numbers,
cached baselines, resuming, skipped tasks and user errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluate.bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = """
seeds = 2
eval_points = 4
train_bins = 10
baselines = "quick"

[[task]]
name = "mlp-mnist1d@40"
kind = "mlp"
steps = 40
dataset = "mnist1d"
hidden_sizes = [8]
batch_size = 32

[[task]]
name = "conv-cifar10@40"
kind = "conv"
steps = 40
dataset = "cifar10"
channels = [4]
kernel_sizes = [3]
strides = [2]
"""


def _bench(tmp_path, *extra, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        LOPT_DATA_DIR=str(tmp_path / "no-data"),  # cifar10 is nowhere: skipped
        LOPT_NO_TFDS="1",
    )
    cmd = [
        sys.executable, "-m", "evaluate.bench",
        "--optimizer", "optax:adam(learning_rate=1e-2)",
        "--optimizer", "mine=bench_optimizers:clipped_adam",
        "--suite", str(tmp_path / "tiny.toml"),
        "--workers", "1",
        "--out", str(tmp_path / "out"),
        "--cache-dir", str(tmp_path / "cache"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "tiny.toml").write_text(TINY)
    proc = _bench(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


@pytest.mark.slow  # ~40 s of CLI run
def test_a_worker_that_dies_fails_its_job_alone_and_workers_retire_and_are_replaced(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    proc = _bench(
        tmp_path,
        "--optimizer", "dies=bench_optimizers:dies_in_worker",
        env_extra={"LOPT_BENCH_JOBS_PER_WORKER": "2"},  # 6 jobs: retirements on 1 worker
    )  # fmt: skip
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    failed = {(f["task"], f["row"]): f["error"] for f in results["failed"]}
    assert list(failed) == [("mlp-mnist1d@40", "dies")], (failed, proc.stderr[-2000:])
    assert "worker process died (exit code 3)" in failed["mlp-mnist1d@40", "dies"]
    task = results["tasks"][0]
    for row in ("adam", "adam_cosine", "sgdm", "mine"):
        assert task["runs"][row]["runs"] == 2, row


@pytest.mark.slow  # ~30 s of CLI run; CI runs it after the default suite
def test_a_tiny_suite_runs_end_to_end(first_run):
    tmp, proc = first_run
    out = tmp / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["candidates"] == ["optax:adam(learning_rate=1e-2)", "mine"]
    assert [t["name"] for t in results["tasks"]] == ["mlp-mnist1d@40"]
    assert results["skipped"][0]["task"] == "conv-cifar10@40"
    assert "cifar10" in results["skipped"][0]["reason"]
    task = results["tasks"][0]
    assert set(task["runs"]) == set(results["rows"])
    assert set(task["baselines"]) == {"adam", "adam_cosine", "sgdm"}
    adam = task["runs"]["adam"]
    assert adam["speed_up_valid"]["speed_up"] == 1.0 and adam["speed_up_train"]["speed_up"] == 1.0
    assert task["baselines"]["adam"]["lr"] in task["baselines"]["adam"]["lrs"]
    assert all(not b["cached"] for b in task["baselines"].values())
    for row in results["rows"]:
        run = task["runs"][row]
        assert run["runs"] == 2 and len(run["valid_curve"]["mean"]) == len(task["eval_steps"])
        assert run["final"]["test_accuracy"]["mean"] is not None
        assert run["step_time_ratio"] > 0
    # Common random numbers: every row starts from the same parameters at each seed (the
    # same initial validation loss); the noise reference starts elsewhere.
    runs = task["runs"]
    start = {row: [s[0] for s in runs[row]["valid_curve"]["seeds"]] for row in results["rows"]}
    for row in results["rows"]:
        if row != "adam_fresh_seeds":
            assert start[row] == start["adam"]
    assert start["adam_fresh_seeds"] != start["adam"]
    md = (out / "results.md").read_text()
    assert "conv-cifar10@40" in md and "mine" in md
    assert (out / "speedup.png").stat().st_size > 1000
    assert (out / "curves" / "mlp-mnist1d_40.png").is_file()
    assert list((out / "wandb").glob("offline-run-*"))
    assert "bench [" in proc.stderr  # the progress line


@pytest.mark.slow  # three more CLI runs (~20 s); CI runs it after the default suite
def test_a_second_candidate_reuses_the_cached_baselines_and_a_rerun_resumes(first_run):
    tmp, _ = first_run
    before = json.loads((tmp / "out" / "results.json").read_text())
    proc = _bench(tmp, "--wandb-mode", "disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 already done (cache or earlier run), 0 to run" in proc.stderr
    after = json.loads((tmp / "out" / "results.json").read_text())
    assert all(b["cached"] for b in after["tasks"][0]["baselines"].values())
    for row in before["rows"]:
        assert after["tasks"][0]["runs"][row]["final"] == before["tasks"][0]["runs"][row]["final"]
    # An interrupted run (one candidate's result missing) and a torn cache entry: exactly
    # those two jobs run again, and give the same numbers.
    (job,) = (tmp / "out" / "jobs" / "mlp-mnist1d_40").glob("mine-*.json")
    job.unlink()
    (entry,) = (tmp / "cache" / "mlp-mnist1d_40").glob("adam-*.json")
    entry.write_text(entry.read_text()[:100])
    proc = _bench(tmp, "--wandb-mode", "disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 already done (cache or earlier run), 2 to run" in proc.stderr
    again = json.loads((tmp / "out" / "results.json").read_text())
    for row in ("mine", "adam", "adam_fresh_seeds"):
        assert again["tasks"][0]["runs"][row]["final"] == before["tasks"][0]["runs"][row]["final"]
    assert not again["tasks"][0]["baselines"]["adam"]["cached"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "optax:adamw(lr=)", "--suite", "quick"], "cannot parse"),
        (["--optimizer", "nonsense", "--suite", "quick"], "not a checkpoint directory"),
        (["--optimizer", "optax:sgd(0.1)", "--suite", "bigsuite"], "unknown suite 'bigsuite'"),
        (["--optimizer", "adam=optax:sgd(0.1)", "--suite", "quick"], "taken by a baseline"),
        (["--optimizer", "optax:sgd(0.1)", "--suite", "quick", "--seeds", "0"], "--seeds"),
        (["--optimizer", "optax:sgd(0.1)", "--suite", "quick", "--tasks", "zzz*"], "matches no"),
        (["--optimizer", "optax:sgd(0.1)", "--suite", "quick", "--config", "x.toml"], "in_family"),
        (["--optimizer", "optax:sgd(0.1)", "--suite", "in_family"], "needs a family"),
    ],
)
def test_user_errors_are_one_message_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


@pytest.mark.slow
def test_the_quick_suite_runs_with_the_shipped_optimizer(tmp_path):
    """What CI runs: the `quick` suite from nothing cached (about 2 minutes on 2 cores)."""
    cmd = [
        sys.executable, "-m", "evaluate.bench", "--optimizer", "mnist1d-mlp-pes",
        "--suite", "quick", "--out", str(tmp_path / "out"),
        "--cache-dir", str(tmp_path / "cache"), "--wandb-mode", "disabled",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [t["name"] for t in results["tasks"]] == ["mlp-mnist1d@300", "lstm-pydoc@200"]
    assert not results["skipped"] and not results["failed"]
    for task in results["tasks"]:
        learned = task["runs"]["mnist1d-mlp-pes"]
        assert learned["diverged"] == 0 and learned["final"]["valid_loss"]["mean"] is not None
    agg = results["aggregate"]["mnist1d-mlp-pes"]["valid"]
    assert agg["tasks"] == 2 and agg["win_rate"] is not None
    assert "Speed-up" in proc.stdout


def test_a_shipped_optimizers_cached_results_follow_its_index_entry(monkeypatch):
    # A new release under the same name (new weights, or a new weight decay) must not reuse
    # the old release's results: the index entry is part of the jobs' key.
    from evaluate.bench import cli
    from evaluate.bench.specs import parse_spec
    from lopt import hub

    spec = parse_spec("generalist")
    before = cli._spec_identity(spec)
    assert hub._index()["generalist"]["sha256"] in before
    entry = dict(hub._index()["generalist"], weight_decay=0.5)
    monkeypatch.setattr(hub, "_index", lambda: {"generalist": entry})
    assert cli._spec_identity(spec) != before
