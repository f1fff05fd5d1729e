"""Tests of meta_train.logging: offline wandb runs, metrics files and the progress line."""

from __future__ import annotations

import io
import json
import os
import re
import time

import jax.numpy as jnp
import numpy as np
import pytest

from meta_train.logging import ProgressBar, RunLogger, read_metrics

CONFIG = {"meta": {"window": 20, "sigma": 0.01}, "run": {"name": "t"}}


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_run_writes_metrics_and_wandb_folder(tmp_path, isolated_env):
    out = tmp_path / "run"
    logger = RunLogger(str(out), CONFIG, mode="offline", name="test-run")
    logger.log(0, {"meta_loss": jnp.float32(2.5), "grad_norm": np.float64(0.25)})
    logger.log(10, {"meta_loss": jnp.asarray([1.5]), "inner_steps": np.int64(200), "lr": 3})
    logger.summary({"final_meta_loss": jnp.float32(1.5), "best_step": 10})
    logger.finish()
    logger.finish()  # idempotent

    # Binary fractions logged: exact through float32 and JSON.
    assert read_lines(out / "metrics.jsonl") == [
        {"step": 0, "meta_loss": 2.5, "grad_norm": 0.25},
        {"step": 10, "meta_loss": 1.5, "inner_steps": 200.0, "lr": 3.0},
    ]
    assert json.loads((out / "summary.json").read_text()) == {
        "final_meta_loss": 1.5,
        "best_step": 10.0,
    }
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    # Nothing went to the home directory; wandb's cache and settings stay in the run folder.
    assert list(isolated_env.iterdir()) == []
    assert os.environ["WANDB_CACHE_DIR"].startswith(str(out))


def test_resume_appends_and_reuses_the_run_id(tmp_path, isolated_env):
    out = tmp_path / "run"
    with RunLogger(str(out), CONFIG) as logger:
        run_id = logger.run.id
        logger.log(1, {"loss": 3.0})
        logger.log(2, {"loss": 2.0})
    with RunLogger(str(out), CONFIG, resume=True) as logger:
        assert logger.run.id == run_id
        logger.log(2, {"loss": 1.9})  # re-done after restoring the checkpoint of step 1
        logger.log(3, {"loss": 1.0})
    assert [r["step"] for r in read_lines(out / "metrics.jsonl")] == [1, 2, 2, 3]
    assert read_metrics(str(out)) == [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 1.9},
        {"step": 3, "loss": 1.0},
    ]


def test_disabled_mode_starts_no_wandb(tmp_path, isolated_env):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 9.0}\n')  # an earlier run
    (out / "summary.json").write_text('{"old": 1}\n')
    logger = RunLogger(str(out), CONFIG, mode="disabled")
    assert logger.run is None
    logger.log(5, {"loss": jnp.float32(0.5)})
    logger.summary({"loss": 0.5})
    logger.finish()
    assert not (out / "wandb").exists()
    assert "WANDB_DIR" not in os.environ
    assert read_lines(out / "metrics.jsonl") == [{"step": 5, "loss": 0.5}]
    # A fresh run moves the old metrics aside instead of deleting them.
    assert read_lines(out / "metrics.jsonl.1") == [{"step": 0, "loss": 9.0}]
    assert json.loads((out / "summary.json").read_text()) == {"loss": 0.5}
    assert json.loads((out / "summary.json.1").read_text()) == {"old": 1}


def test_disabled_mode_tables_images_and_artifacts_do_nothing(tmp_path, isolated_env):
    logger = RunLogger(str(tmp_path), CONFIG, mode="disabled", step_metric="outer_step")
    logger.log(1, {"loss": 1.0})
    logger.log_table("eval/results", ["optimizer", "loss"], [["adam", 0.5]])
    logger.log_image("eval/curves", tmp_path / "missing.png")  # not even opened
    files = {"1": tmp_path / "missing"}
    assert logger.log_artifact("lopt-t", "learned-optimizer", files, {"a": 1}) is None
    logger.finish()
    assert not (tmp_path / "wandb").exists()
    # The step metric is wandb's x-axis only: metrics.jsonl keeps "step".
    assert read_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


def test_bad_arguments(tmp_path, isolated_env):
    with pytest.raises(ValueError, match="wandb mode"):
        RunLogger(str(tmp_path), CONFIG, mode="cloud")
    logger = RunLogger(str(tmp_path), CONFIG, mode="disabled")
    with pytest.raises(TypeError, match="'hist'.*scalar"):
        logger.log(1, {"hist": np.ones(3)})
    with pytest.raises(TypeError, match="'name'"):
        logger.log(1, {"name": "x"})
    logger.finish()


def test_online_without_login_fails_fast_with_advice(tmp_path, isolated_env):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"wandb login.*run\.wandb_mode=offline"):
        RunLogger(str(tmp_path / "run"), CONFIG, mode="online")
    assert time.monotonic() - start < 20


# --------------------------------------------------------------------------- ProgressBar


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, cursor moves, line erases


def test_progress_bar_non_tty_prints_full_lines_rarely():
    clock, stream = FakeClock(), io.StringIO()
    bar = ProgressBar(500, initial=100, stream=stream, print_every=10, clock=clock)
    clock.now = 5.0
    bar.update(20, meta_loss=jnp.float32(1.5))
    assert stream.getvalue() == ""  # nothing before print_every seconds
    clock.now = 10.0
    bar.update(20, meta_loss=1.2345678)
    # The rate is measured between updates (20 steps in 5 s), not from the resumed step 100.
    # The bar: 140/500 of 20 characters is 5 and a half.
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(
        r"meta-train \[━{5}╸ {14}\] 140/500 outer steps \| 4\.0 it/s \| ETA 0:01:30 \| "
        r"meta-loss 1\.235",
        line,
    ), line
    clock.now = 12.5
    bar.update(10, meta_loss=1.0, grad_norm=0.5)
    bar.close()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the close prints the final state once
    assert re.fullmatch(
        r"meta-train \[━{6} {14}\] 150/500 outer steps \| 4\.0 it/s \| ETA 0:01:28 \| "
        r"meta-loss 1 \| grad-norm 0\.5",
        lines[1],
    ), lines[1]
    # Plain text for logs: no carriage returns, colours or cursor movements.
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_progress_bar_tty_redraws_in_place(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the fake terminal's width
    clock, stream = FakeClock(), FakeTTY()
    bar = ProgressBar(4, stream=stream, desc="demo", unit="steps", clock=clock)
    clock.now = 20.0
    bar.update(1)
    clock.now = 40.0
    bar.update(1, loss=float("nan"))
    bar.close()
    raw = stream.getvalue()
    # Each redraw returns to the line's start and erases it: one line, drawn over.
    frames = [ANSI.sub("", f).rstrip() for f in raw.split("\r\x1b[2K")]
    # The start, two updates and the final draw (filled red, unfilled grey: all '━').
    want = [
        r"demo \[━{20}\] 0/4 steps \| \? it/s \| ETA -:--:--",
        r"demo \[━{5}╺━{14}\] 1/4 steps \| \? it/s \| ETA -:--:--",
        r"demo \[━{10}╺━{9}\] 2/4 steps \| 20\.0 s/it \| ETA 0:00:40 \| loss nan",
    ]
    assert len(frames) == 4 and frames[3] == frames[2], frames
    for pattern, frame in zip(want, frames, strict=False):
        assert re.fullmatch(pattern, frame), frame
    assert ANSI.sub("", raw).endswith("\n") and raw.count("\n") == 1


def test_progress_bar_before_any_step():
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, clock=FakeClock())
    assert re.fullmatch(
        r"meta-train \[ {20}\]  0/10 outer steps \| \? it/s \| ETA -:--:--", bar.format()
    )
    bar.close()
    assert stream.getvalue() == bar.format() + "\n"


def test_progress_bar_messages_go_on_their_own_lines(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    clock, stream = FakeClock(), io.StringIO()
    bar = ProgressBar(10, stream=stream, print_every=100, clock=clock)
    bar.write("valid @ 0: score 1.0 [not markup]")
    assert stream.getvalue() == "valid @ 0: score 1.0 [not markup]\n"
    tty = FakeTTY()
    bar = ProgressBar(10, stream=tty, clock=clock)
    clock.now = 1.0
    bar.update(1)
    bar.write("guard @ 1: worse")
    text = ANSI.sub("", tty.getvalue())
    # The bar's line is erased, the message gets a line, the bar is redrawn below it.
    assert "\rguard @ 1: worse\n" in text
    assert re.search(r"1/10 outer steps \| \? it/s \| ETA -:--:-- *$", text), text
    bar.close()


def test_progress_bar_as_the_benchmark_uses_it(capsys):
    # evaluate/bench: default stream (stderr), its own description and unit, a postfix.
    clock = FakeClock()
    with ProgressBar(6, desc="bench", unit="work units", print_every=0, clock=clock) as bar:
        bar.update(2, jobs_done=1)
        bar.write("task x / row y failed")
        clock.now = 2.0
        bar.update(4, jobs_done=2)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"bench \[━{6}╸ {13}\] 2/6 work units \| \? it/s \| ETA -:--:-- \| jobs-done 1", lines[0]
    )
    assert lines[1] == "task x / row y failed"
    assert re.fullmatch(
        r"bench \[━{20}\] 6/6 work units \| 2\.0 it/s \| ETA 0:00:00 \| jobs-done 2", lines[2]
    )
    assert len(lines) == 3


def test_alerts_accumulate_in_the_summary(tmp_path, isolated_env):
    logger = RunLogger(str(tmp_path), CONFIG, mode="disabled")
    logger.summary({"loss": 0.5})
    logger.alert("meta-validation is worsening", "score 2 after 1")
    logger.alert("meta-validation is worsening", "score 3 after 2")
    logger.finish()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss"] == 0.5
    assert summary["alerts"] == [
        "meta-validation is worsening: score 2 after 1",
        "meta-validation is worsening: score 3 after 2",
    ]
