"""Run logging: a wandb run plus plain files in the run's output folder, and a progress line.

`RunLogger` mirrors every logged metric into ``out_dir/metrics.jsonl`` (one JSON object per
line) so results survive without wandb. wandb runs offline by default: no login, no network,
and everything it writes (run files, cache, settings) stays under ``out_dir``. Upload later
with ``wandb sync out_dir/wandb/offline-run-*``.

    logger = RunLogger(cfg.run.out_dir, cfg.to_dict(), mode=cfg.run.wandb_mode)
    logger.log(step, {"meta_loss": loss, "grad_norm": gnorm})
    logger.summary({"final_meta_loss": loss})
    logger.finish()

Note: this module is ``meta_train.logging``; import it by that name. Never run a script from
inside ``meta_train/`` (``python meta_train/x.py``), which would shadow the standard library's
``logging`` for every package.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
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
        self.run = None
        if mode != "disabled":
            self.run = self._start_wandb(config, project, name or self.out_dir.name, resume)
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
        if self.run is not None:
            self.run.log(values, step=int(step))

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
        """Closes metrics.jsonl and finishes the wandb run; safe to call twice.

        Args:
          exit_code: non-zero marks the wandb run as failed.
        """
        if not self._metrics.closed:
            self._metrics.close()
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


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


class ProgressBar:
    """A terminal progress line without dependencies.

    ``meta-train [##........] 120/500 outer steps | 3.2 it/s | ETA 1m58s | meta-loss 1.234``

    On a TTY the line is redrawn in place with '\\r'; otherwise (CI logs, files) a full line is
    printed at most every `print_every` seconds and once more on `close`.

    Args:
      total: number of steps.
      initial: steps already done (a resumed run); the rate counts only new steps.
      stream: where to write; defaults to sys.stderr.
      desc: prefix of the line.
      unit: what the steps are.
      width: characters of the bar.
      print_every: seconds between lines when the stream is not a TTY.
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
        width: int = 10,
        print_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = int(total)
        self.n = int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.desc = desc
        self.unit = unit
        self.width = width
        self.print_every = print_every
        self._clock = clock
        self._initial = self.n
        self._start = clock()
        self._last_print = self._start
        self._printed_n: int | None = None
        self._postfix: dict[str, float] = {}
        self._last_len = 0
        self._closed = False
        try:
            self._tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            self._tty = False

    def format(self, now: float | None = None) -> str:
        """Returns the progress line (without '\\r' or newline)."""
        now = self._clock() if now is None else now
        frac = min(max(self.n / self.total, 0.0), 1.0) if self.total > 0 else 1.0
        filled = int(frac * self.width)
        parts = [
            f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.n}/{self.total} {self.unit}"
        ]
        done, elapsed = self.n - self._initial, now - self._start
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            # Slow steps read better as seconds per step than as 0.0 it/s.
            parts.append(f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")
            parts.append(f"ETA {_fmt_duration(max(self.total - self.n, 0) / rate)}")
        else:
            parts += ["? it/s", "ETA ?"]
        parts += [f"{k.replace('_', '-')} {_fmt_value(v)}" for k, v in self._postfix.items()]
        return " | ".join(parts)

    def _write_line(self, now: float) -> None:
        line = self.format(now)
        if self._tty:
            # Pad with spaces so a shorter line fully covers the previous one.
            self.stream.write("\r" + line + " " * max(self._last_len - len(line), 0))
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_print = now
        self._printed_n = self.n

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advances by `n` steps and sets the values shown after the rate.

        Args:
          n: steps done since the last update.
          **postfix: values to show, e.g. ``meta_loss=1.23`` (shown as 'meta-loss 1.23').
        """
        self.n += n
        self._postfix.update({k: float(v) for k, v in postfix.items()})
        now = self._clock()
        if self._tty or now - self._last_print >= self.print_every:
            self._write_line(now)

    def write(self, text: str) -> None:
        """Writes a message on its own line; on a terminal the bar is redrawn below it."""
        if self._tty:
            self.stream.write("\r" + " " * self._last_len + "\r" + text + "\n")
            self._last_len = 0
            self._write_line(self._clock())
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Writes the final line (and a newline on a TTY); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._printed_n != self.n:
            self._write_line(self._clock())
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
