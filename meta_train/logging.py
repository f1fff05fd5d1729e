"""Run logging: a wandb run plus plain files in the run's output folder, and a progress line.

`RunLogger` mirrors every logged metric into ``out_dir/metrics.jsonl`` (one JSON object per
line) so results survive without wandb. wandb runs offline by default: no login, no network,
and everything it writes (run files, cache, settings) stays under ``out_dir``. Upload later
with ``wandb sync out_dir/wandb/offline-run-*``.

    logger = RunLogger(cfg.run.out_dir, cfg.to_dict(), mode=cfg.run.wandb_mode,
                       step_metric="outer_step")
    logger.log(step, {"meta_loss": loss, "grad_norm": gnorm})
    logger.summary({"final_meta_loss": loss})
    logger.log_table("eval/results", ["optimizer", "loss"], [["adam", 0.3]])
    logger.log_image("eval/curves", "eval/curves.png")
    logger.log_artifact("lopt-x", "learned-optimizer", {"10": "checkpoints/10"}, metadata)
    logger.finish()

Tables, images and artifacts go to wandb only (they are files of the run already); with
wandb disabled those calls do nothing.

Note: this module is ``meta_train.logging``; import it by that name. Never run a script from
inside ``meta_train/`` (``python meta_train/x.py``), which would shadow the standard library's
``logging`` for every package.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["ProgressBar", "RunLogger", "WandbError", "read_metrics"]

ONLINE_INIT_TIMEOUT = 30.0
"""Seconds `wandb.init` may take in online mode before we give up (instead of hanging)."""

_MODES = ("offline", "online", "disabled")
_RUN_ID_FILE = "wandb_run_id"


class WandbError(RuntimeError):
    """wandb could not start (no credentials, no network, ...); the message says what to do."""


def _to_number(key: str, value: Any) -> float:
    """A float from a Python, numpy or jax scalar (or one-element array)."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value)
    try:
        array = np.asarray(value)  # also pulls jax arrays to the host
    except Exception as e:  # any failure means "not a number"
        raise TypeError(f"metric {key!r}: cannot convert {type(value).__name__} to float") from e
    # dtype kinds: objects, strings, bytes, datetimes are not metrics (bfloat16 is kind 'V').
    if array.size != 1 or array.dtype.kind in "OUSmM":
        raise TypeError(
            f"metric {key!r}: expected a scalar number, got {type(value).__name__} "
            f"of shape {array.shape} and dtype {array.dtype}"
        )
    return float(array.reshape(()))


def _to_json_value(key: str, value: Any) -> Any:
    """Numbers become floats; strings, bools, None and containers of them pass through."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json_value(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return _to_number(key, value)


def _write_json_atomic(path: Path, data: Any) -> None:
    # Write-then-rename: a crash never leaves a half-written summary.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# Values this module put into os.environ, so a later logger may move them to its own out_dir
# while values the user set are left alone.
_ENV_SET_HERE: dict[str, str] = {}


def _set_default_env(out_dir: Path) -> None:
    """Keeps everything an offline wandb run writes inside `out_dir` (unless the user chose)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    for var, sub in (
        # Not under out_dir/.wandb: wandb would then put its run folders there, not in wandb/.
        ("WANDB_CACHE_DIR", "wandb/.cache"),
        ("WANDB_CONFIG_DIR", "wandb/.config"),
        ("WANDB_DATA_DIR", "wandb/.data"),
    ):
        current = os.environ.get(var)
        if not current or current == _ENV_SET_HERE.get(var):
            _ENV_SET_HERE[var] = os.environ[var] = str(out_dir / sub)
    os.environ["WANDB_DIR"] = str(out_dir)


class RunLogger:
    """A wandb run (offline by default) plus ``metrics.jsonl`` and ``summary.json`` in out_dir.

    Args:
      out_dir: the run's output folder (created if missing).
      config: the run configuration (stored in the wandb run).
      mode: 'offline' (default; no login or network), 'online' (needs ``wandb login``) or
        'disabled' (wandb is not even imported; only the files are written).
      project: wandb project.
      name: wandb run name; defaults to the folder name of out_dir.
      resume: continue the wandb run recorded in out_dir and append to metrics.jsonl. A fresh
        run moves an existing metrics.jsonl / summary.json aside (``metrics.jsonl.1``, ...)
        instead of deleting them.
      step_metric: if set, every wandb row also carries the step under this name, and it is
        the x-axis of every chart (``define_metric``); e.g. "outer_step". metrics.jsonl keeps
        the step as "step" either way.

    Raises:
      ValueError: unknown mode.
      WandbError: wandb could not start (e.g. online without login or network); the message
        says to run ``wandb login`` or use ``run.wandb_mode=offline``.
    """

    def __init__(
        self,
        out_dir: str,
        config: dict,
        *,
        mode: str = "offline",
        project: str = "lopt-meta",
        name: str | None = None,
        resume: bool = False,
        step_metric: str | None = None,
    ):
        if mode not in _MODES:
            raise ValueError(f"wandb mode must be one of {_MODES}, got {mode!r}")
        self.out_dir = Path(out_dir).absolute()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.summary_path = self.out_dir / "summary.json"
        if not resume:  # keep an earlier run's files, but out of this run's way
            for path in (self.metrics_path, self.summary_path):
                if path.exists() and path.stat().st_size:
                    path.rename(self._free_name(path))
        self.name = name or self.out_dir.name
        self.step_metric = step_metric
        self._last_step: int | None = None
        self.run = None
        if mode != "disabled":
            self.run = self._start_wandb(config, project, self.name, resume)
            if step_metric:
                # Charts then plot against the step by name (also across a resumed run's
                # files); step_sync fills it into rows that lack it.
                self.run.define_metric(step_metric)
                self.run.define_metric("*", step_metric=step_metric)
        # Opened after wandb so a failed start leaves no empty metrics file behind.
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")

    @staticmethod
    def _free_name(path: Path) -> Path:
        i = 1
        while path.with_name(f"{path.name}.{i}").exists():
            i += 1
        return path.with_name(f"{path.name}.{i}")

    def _start_wandb(self, config: dict, project: str, name: str, resume: bool) -> Any:
        if self.mode == "offline":
            _set_default_env(self.out_dir)
        import wandb  # noqa: PLC0415 - heavy, and unused when disabled

        id_file = self.out_dir / _RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        if self.mode == "online":
            hint = (
                "Run `wandb login` (and check the network), or log offline with "
                "run.wandb_mode=offline (upload later with `wandb sync`)."
            )
        else:
            hint = (
                "Use run.wandb_mode=disabled to run without wandb (metrics.jsonl is still written)."
            )
        settings: dict[str, Any] = {
            # The progress bar redraws its line with '\r'; console capture would copy every
            # redraw into the run's output.log and wrap sys.stdout/stderr process-wide.
            "console": "off",
        }
        if self.mode == "online":
            # Without credentials wandb would prompt for a key on a terminal: fail fast instead.
            if wandb.run is None and not wandb.login(prompt=False, verify=False):
                raise WandbError(f"wandb mode 'online' but no W&B credentials found. {hint}")
            settings["init_timeout"] = ONLINE_INIT_TIMEOUT
        try:
            run = wandb.init(
                project=project,
                name=name,
                config=config,
                dir=str(self.out_dir),
                mode=self.mode,
                id=run_id,  # None: wandb picks a new id
                resume="allow" if run_id else None,
                settings=wandb.Settings(**settings),
            )
        except Exception as e:  # wandb raises CommError, UsageError, TimeoutError, ...
            raise WandbError(f"wandb.init failed in {self.mode} mode: {e}. {hint}") from e
        id_file.write_text(run.id + "\n")
        return run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Logs scalar metrics at `step` to wandb and as one line of metrics.jsonl.

        Args:
          step: the outer step.
          metrics: name -> scalar (Python, numpy or jax); stored as floats (NaN stays NaN).
        """
        values = {k: _to_number(k, v) for k, v in metrics.items()}
        record = {"step": int(step), **values}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()  # a crash must not lose logged steps
        self._wandb_log(values, int(step))

    def _wandb_log(self, payload: dict[str, Any], step: int | None) -> None:
        if step is None:
            step = self._last_step
        if step is not None:
            self._last_step = step
        if self.run is None:
            return
        if step is None:
            self.run.log(payload)
            return
        if self.step_metric:
            payload = {**payload, self.step_metric: step}
        self.run.log(payload, step=step)

    def log_table(
        self,
        key: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        step: int | None = None,
    ) -> None:
        """Logs a table as a `wandb.Table`; does nothing without wandb.

        Args:
          key: the table's name in the run, e.g. "eval/results".
          columns: column names.
          rows: one sequence of cells (numbers, strings, None) per row.
          step: the step it belongs to; defaults to the last step logged.
        """
        if self.run is None:
            return
        import wandb  # noqa: PLC0415 - imported already by the run

        table = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
        self._wandb_log({key: table}, step)

    def log_image(
        self, key: str, path: str | os.PathLike, step: int | None = None, caption: str | None = None
    ) -> None:
        """Logs an image file (e.g. a PNG figure) as a `wandb.Image`; does nothing without wandb.

        Args:
          key: the image's name in the run, e.g. "eval/curves".
          path: the image file.
          step: the step it belongs to; defaults to the last step logged.
          caption: shown under the image.
        """
        if self.run is None:
            return
        import wandb  # noqa: PLC0415

        self._wandb_log({key: wandb.Image(str(path), caption=caption)}, step)

    def log_artifact(
        self,
        name: str,
        type: str,
        files: Mapping[str, str | os.PathLike],
        metadata: Mapping[str, Any] | None = None,
        aliases: Sequence[str] = (),
    ) -> Any:
        """Logs files and folders as a wandb Artifact of this run; does nothing without wandb.

        The files are copied into wandb's staging folder (out_dir/wandb/.data when offline),
        so later changes to them do not change the artifact.

        Args:
          name: the artifact's name (letters, digits, '-', '_', '.'); each call with the same
            name makes a new version.
          type: the artifact's type, e.g. "learned-optimizer".
          files: path inside the artifact -> a local file or folder (a folder is added whole,
            under that path).
          metadata: JSON-friendly values stored with the artifact.
          aliases: version aliases besides "latest" (which wandb always sets).

        Returns:
          The `wandb.Artifact`, or None without wandb.
        """
        if self.run is None:
            return None
        import wandb  # noqa: PLC0415

        meta = {k: _to_json_value(k, v) for k, v in (metadata or {}).items()}
        artifact = wandb.Artifact(name, type=type, metadata=meta)
        for dest, source in files.items():
            if Path(source).is_dir():
                artifact.add_dir(str(source), name=dest)
            else:
                artifact.add_file(str(source), name=dest)
        return self.run.log_artifact(artifact, aliases=["latest", *aliases])

    def summary(self, values: dict) -> None:
        """Records final values in the wandb run summary and in out_dir/summary.json.

        Args:
          values: name -> number, string or nested lists/dicts of them; merged into earlier
            summaries.
        """
        values = {k: _to_json_value(k, v) for k, v in values.items()}
        merged = {}
        if self.summary_path.exists():
            try:
                merged = json.loads(self.summary_path.read_text())
            except json.JSONDecodeError:
                merged = {}
        merged.update(values)
        _write_json_atomic(self.summary_path, merged)
        if self.run is not None:
            self.run.summary.update(values)

    def alert(self, title: str, text: str) -> None:
        """Records a warning: in the summary (``alerts``) and as a wandb alert, which online
        runs send to the user (offline runs keep it in the summary)."""
        alerts = []
        if self.summary_path.exists():
            try:
                alerts = list(json.loads(self.summary_path.read_text()).get("alerts", []))
            except (json.JSONDecodeError, AttributeError):
                alerts = []
        self.summary({"alerts": [*alerts, f"{title}: {text}"]})
        if self.run is not None and self.mode == "online":
            self.run.alert(title=title, text=text)

    def finish(self, exit_code: int | None = None) -> None:
        """Closes metrics.jsonl and finishes the wandb run; safe to call twice. An offline
        run's files are complete when it returns (see `FLUSH_TIMEOUT`).

        Args:
          exit_code: non-zero marks the wandb run as failed.
        """
        if not self._metrics.closed:
            self._metrics.close()
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)
            if self.mode == "offline":
                _wait_for_run_file(Path(run.dir).parent / f"run-{run.id}.wandb")

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


FLUSH_TIMEOUT = 30.0
"""Seconds `RunLogger.finish` waits for wandb to write an offline run's file completely."""


def _wait_for_run_file(path: Path, timeout: float = FLUSH_TIMEOUT) -> bool:
    """Waits until an offline run's transaction log holds its exit record.

    `wandb.Run.finish` returns before wandb's service has flushed and closed the run's
    ``run-<id>.wandb`` (that happens in the background, measured up to a second later under
    load): a sync, copy or read of the run folder right after would miss its last records.

    Returns:
      Whether the exit record was found within `timeout` seconds.
    """
    from lopt.export import wandb_run_records  # noqa: PLC0415 - only for offline runs

    deadline = time.monotonic() + timeout
    while path.exists():  # created by wandb.init; another wandb's layout: nothing to wait for
        try:
            if any(r.HasField("exit") for r in wandb_run_records(str(path))):
                return True
        except ValueError:  # not even the header flushed yet, or a format we do not know
            if path.stat().st_size >= 7:
                return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False


def read_metrics(out_dir: str) -> list[dict[str, Any]]:
    """Reads out_dir/metrics.jsonl; for a step logged twice (resumed run) the last one wins.

    Args:
      out_dir: a run's output folder.

    Returns:
      The records sorted by step.
    """
    records: dict[int, dict[str, Any]] = {}
    with open(Path(out_dir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    return [records[s] for s in sorted(records)]


def _fmt_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s`` (the benchmark report's durations)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _fmt_value(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


# Wide enough that a log line is never wrapped or cropped (a file has no width of its own).
_LOG_WIDTH = 1000


def _columns(unit: str, width: int) -> list[Any]:
    """The rich columns of the progress line (rich imported only when a bar is made)."""
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    class BracketedBar(BarColumn):
        # Without colours (logs) the bar's unfilled part is blank: brackets show its end.
        def render(self, task) -> Table:
            grid = Table.grid(padding=0)
            grid.add_row("[", super().render(task), "]")
            return grid

    class Rate(ProgressColumn):
        # Slow steps read better as seconds per step than as 0.0 it/s; rich measures the
        # rate between updates, so it shows from the second update on.
        def render(self, task) -> Text:
            rate = task.speed
            if not rate:
                return Text("? it/s")
            return Text(f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")

    sep = TextColumn("|")
    return [
        TextColumn("{task.description}", markup=False),
        BracketedBar(bar_width=width),
        MofNCompleteColumn(),
        TextColumn(unit, markup=False),
        sep,
        Rate(),
        sep,
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[postfix]}", markup=False),
    ]


class ProgressBar:
    """A progress line drawn by `rich.progress`.

    ``meta-train [━━━━╸     ] 120/500 outer steps | 3.2 it/s | ETA 0:01:58 | meta-loss 1.234``

    On a terminal rich redraws the line in place. Otherwise (CI logs, files) the same line
    is printed in plain text, without colours or control characters, at most every
    `print_every` seconds and once more on `close`. The rate (and so the ETA) is measured
    between updates: it appears from the second update on, and leaves out the time before
    the first (e.g. meta-training's compilation).

    Args:
      total: number of steps.
      initial: steps already done (a resumed run); the rate counts only new steps.
      stream: where to write; defaults to sys.stderr.
      desc: prefix of the line.
      unit: what the steps are.
      width: characters of the bar.
      print_every: seconds between lines when the stream is not a terminal.
      clock: time source in seconds (for tests).
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        stream: TextIO | None = None,
        desc: str = "meta-train",
        *,
        unit: str = "outer steps",
        width: int = 20,
        print_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        from rich.console import Console  # noqa: PLC0415 - rich only when a bar is made
        from rich.progress import Progress  # noqa: PLC0415

        self.total = int(total)
        self.stream = sys.stderr if stream is None else stream
        self.print_every = print_every
        self._clock = clock
        try:
            self._tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            self._tty = False
        # Terminal or not is decided by the stream alone (FORCE_COLOR, TERM, ... are
        # ignored): a log file never gets cursor movements or colours.
        console = Console(
            file=self.stream,
            force_terminal=self._tty,
            color_system="auto" if self._tty else None,
            width=None if self._tty else _LOG_WIDTH,
            highlight=False,
        )
        self._progress = Progress(
            *_columns(unit, width),
            console=console,
            auto_refresh=False,  # redrawn on each update: no thread, deterministic output
            # The rate over the last updates however far apart (rich keeps 1000 samples);
            # rich's 30 s window would show no rate when updates come less often.
            speed_estimate_period=math.inf,
            # On the real terminal, other print()s then go above the line, not through it.
            redirect_stdout=self._tty and self.stream in (sys.stdout, sys.stderr),
            redirect_stderr=self._tty and self.stream in (sys.stdout, sys.stderr),
            get_time=clock,
        )
        self._task = self._progress.add_task(desc, total=self.total, completed=int(initial))
        self._postfix: dict[str, float] = {}
        self._set_postfix()
        self._last_print = clock()
        self._printed_n: int | None = None  # the step of the last plain line printed
        self._closed = False
        if self._tty:
            self._progress.start()

    @property
    def n(self) -> int:
        """Steps done so far (including `initial`)."""
        return int(self._progress.tasks[0].completed)

    def _set_postfix(self) -> None:
        text = " | ".join(
            f"{k.replace('_', '-')} {_fmt_value(v)}" for k, v in self._postfix.items()
        )
        self._progress.update(self._task, postfix=f"| {text}" if text else "")

    def format(self) -> str:
        """Returns the progress line as plain text (what a non-terminal stream gets)."""
        from rich.console import Console  # noqa: PLC0415

        console = Console(
            file=io.StringIO(), force_terminal=False, color_system=None, width=_LOG_WIDTH
        )
        with console.capture() as capture:
            console.print(self._progress.get_renderable())
        return capture.get().rstrip()

    def _print_line(self) -> None:
        self.stream.write(self.format() + "\n")
        self.stream.flush()
        self._last_print = self._clock()
        self._printed_n = self.n

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advances by `n` steps and sets the values shown after the ETA.

        Args:
          n: steps done since the last update.
          **postfix: values to show, e.g. ``meta_loss=1.23`` (shown as 'meta-loss 1.23').
        """
        self._postfix.update({k: float(v) for k, v in postfix.items()})
        self._set_postfix()
        self._progress.update(self._task, advance=n)
        if self._tty:
            self._progress.refresh()
        elif self._clock() - self._last_print >= self.print_every:
            self._print_line()

    def write(self, text: str) -> None:
        """Writes a message on its own line; on a terminal the bar is redrawn below it."""
        if self._tty:
            # rich prints it above the live line; soft_wrap: long messages are not re-wrapped.
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Shows the final line (a terminal keeps it); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._tty:
            self._progress.stop()  # final redraw, newline, cursor shown again
        elif self._printed_n != self.n:
            self._print_line()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
