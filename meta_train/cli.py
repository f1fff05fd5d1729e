"""What the command-line entry points share: user errors end in one message and exit code 2,
and compiled programs are kept on disk between runs (`meta_train.jit.use_compile_cache`).

A user error is a problem the user can fix from the message alone (a config value, a
missing dataset or checkpoint, a run folder that does not fit `--resume`, missing wandb
credentials); anything else is a bug and keeps its traceback. `--debug` shows the traceback
of user errors too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

USAGE_ERROR = 2


class UserError(ValueError):
    """Base of errors whose message alone tells the user what to fix (a bad option, an
    unknown name); entry points print it without a traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are user errors (imported lazily: orbax, jax, wandb)."""
    from meta_train.checkpoint import CheckpointError, ConfigMismatchError  # noqa: PLC0415
    from meta_train.config import ConfigError  # noqa: PLC0415
    from meta_train.logging import WandbError  # noqa: PLC0415
    from tasks.datasets import DatasetNotFoundError  # noqa: PLC0415

    return (
        ConfigError,
        ConfigMismatchError,
        CheckpointError,
        DatasetNotFoundError,
        WandbError,
        UserError,
    )


def run_cli(body: Callable[[], Any], debug: bool = False, compile_cache: bool = True) -> Any:
    """Runs `body`; a user error prints `error: <message>` as the last thing on stderr.

    With `compile_cache`, JAX's persistent compilation cache is on for the command
    (`meta_train.jit.use_compile_cache`, `LOPT_COMPILE_CACHE=off` turns it off): a rerun or
    a resume skips most of XLA's compile time. The measurement tools that report compile
    times run without it, so theirs stay cold.

    Args:
      body: the command; returns its exit status (or, for a measurement tool, its figures).
      debug: re-raise user errors (the traceback shows) instead of printing their message.
      compile_cache: turn on the persistent compilation cache first.

    Returns:
      What `body` returns, or 2 after a user error.
    """
    if compile_cache:
        from meta_train.jit import use_compile_cache  # noqa: PLC0415 - imports jax

        use_compile_cache()
    try:
        return body()
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        from meta_train.config import ConfigError  # noqa: PLC0415

        label = "config error" if isinstance(e, ConfigError) else "error"
        sys.stdout.flush()
        print(f"{label}: {e}", file=sys.stderr, flush=True)
        return USAGE_ERROR


def run_tool(main: Callable[[], Any]) -> int:
    """Runs a tool's `main` as `lopt` and `python -m` run it: through `run_cli` without the
    compile cache (some tools report compile times; the commands that want the cache turn
    it on inside their own `main`).

    Args:
      main: the tool's entry point; returns an exit status or, for a measurement tool, its
        figures.

    Returns:
      The exit status: `main`'s own, 0 for figures, 2 after a user error.
    """
    status = run_cli(main, compile_cache=False)
    return status if isinstance(status, int) else 0


# --------------------------------------------------------------------------- the `lopt` command

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("meta_train.main", "meta-train a learned optimizer, then evaluate it"),
    "resume": ("meta_train.main", "continue the run in a run folder from its own config"),
    "eval": ("evaluate.__main__", "evaluate a checkpoint against tuned Adam on held-out tasks"),
    "bench": ("evaluate.bench.cli", "benchmark any optimizer against tuned baselines"),
    "synthetic": ("meta_train.synthetic", "run estimators on problems with known answers"),
    "diagnose": ("meta_train.diagnose", "estimator noise at fixed meta-parameters"),
    "measure": ("", "the project's measurement tools (speed, cost, comparisons)"),
}
"""Subcommand → (module whose ``main(argv, prog=...)`` runs it, one-line description)."""

MEASURE_TOOLS: dict[str, tuple[str, str]] = {
    "speed": ("evaluate.measure.speed", "meta-training throughput against the reference"),
    "server-speed": ("evaluate.measure.server_speed", "gradient-server throughput"),
    "lopt-cost": ("evaluate.measure.lopt_cost", "cost of one learned update against Adam's"),
    "compare-estimators": (
        "evaluate.measure.compare_estimators",
        "estimators at equal meta-training budget",
    ),
    "compare-lopts": (
        "evaluate.measure.compare_lopts",
        "optimizer architectures at equal meta-training budget",
    ),
    "plot-runs": ("evaluate.measure.plot_runs", "plot meta-training runs from metrics.jsonl"),
    "valid-sweep": (
        "evaluate.measure.valid_sweep",
        "choose an optimizer option on a run's meta-validation tasks",
    ),
}
"""``lopt measure`` tools → (module, one-line description)."""

_EXAMPLES = """examples:
  lopt train --config configs/default.toml meta.outer_steps=500 run.out_dir=runs/short
  lopt resume runs/short meta.outer_steps=1000
  lopt eval --checkpoint runs/short/checkpoints
  lopt bench --optimizer runs/short/checkpoints --suite classic
  lopt measure speed --help

`lopt COMMAND --help` lists a command's options."""


def _usage(prog: str, commands: dict[str, tuple[str, str]], epilog: str = "") -> str:
    width = max(len(name) for name in commands)
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in commands.items())
    return f"usage: {prog} COMMAND [ARGS ...]\n\ncommands:\n{rows}\n" + (
        f"\n{epilog}\n" if epilog else ""
    )


def _dispatch(
    prog: str, commands: dict[str, tuple[str, str]], argv: list[str], epilog: str = ""
) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(prog, commands, epilog), end="")
        return 0 if argv else USAGE_ERROR
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(_usage(prog, commands, epilog), end="", file=sys.stderr)
        print(f"{prog}: error: unknown command {name!r}", file=sys.stderr)
        return USAGE_ERROR
    if prog == "lopt" and name == "measure":
        return _dispatch("lopt measure", MEASURE_TOOLS, rest)
    if prog == "lopt" and name == "resume":
        rest = _resume_argv(rest)
        if isinstance(rest, int):
            return rest
    import importlib  # noqa: PLC0415 - each command imports only what it needs

    module = importlib.import_module(commands[name][0])
    return run_tool(lambda: module.main(rest, prog=f"{prog} {name}"))


_RESUME_HELP = """usage: lopt resume RUN_DIR [--no-eval] [--debug] [section.key=value ...]

Continue the meta-training run in RUN_DIR from its last complete checkpoint, with the
config the run saved (RUN_DIR/config.json); overrides may change the keys a resume allows
(meta.outer_steps, meta.stop_after, run.*, eval.*, valid.every, valid.guard_*, server.*).

example:
  lopt resume runs/default meta.outer_steps=20000
"""


def _resume_argv(argv: list[str]) -> list[str] | int:
    """`lopt resume RUN_DIR ...` as the main job's arguments, or an exit status after help."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    if any(a in ("-h", "--help") for a in argv):
        print(_RESUME_HELP, end="")
        return 0
    dirs = [a for a in argv if not a.startswith("-") and "=" not in a]
    if len(dirs) != 1:
        print(_RESUME_HELP, end="", file=sys.stderr)
        print(f"lopt resume: error: expected one RUN_DIR, got {dirs or 'none'}", file=sys.stderr)
        return USAGE_ERROR
    run_dir = Path(dirs[0])
    if not (run_dir / "config.json").is_file():
        print(
            f"lopt resume: error: {run_dir} is not a run folder (it has no config.json); give "
            "the run.out_dir of the run to continue",
            file=sys.stderr,
        )
        return USAGE_ERROR
    rest = [a for a in argv if a != dirs[0]]
    # The run folder's own resolved config; run.out_dir last, so the folder may have moved.
    out_dir = f"run.out_dir={json.dumps(str(run_dir))}"  # a TOML string, whatever the path
    return ["--config", str(run_dir / "config.json"), "--resume", *rest, out_dir]


def main(argv: list[str] | None = None) -> int:
    """The `lopt` command: one entry for every tool of the project.

    ``lopt COMMAND [ARGS ...]`` runs the module behind COMMAND (`COMMANDS`, and
    `MEASURE_TOOLS` under ``lopt measure``) with ARGS; ``python -m MODULE ARGS`` does the same.

    Args:
      argv: the arguments after ``lopt``; defaults to ``sys.argv[1:]``.

    Returns:
      The exit status: the command's own, or 2 for an unknown command.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return _dispatch("lopt", COMMANDS, argv, _EXAMPLES)


if __name__ == "__main__":  # python -m meta_train.cli, the same as `lopt`
    sys.exit(main())
