"""What the command-line entry points share: user errors end in one message and exit code 2.

A user error is a problem the user can fix from the message alone (a config value, a
missing dataset or checkpoint, a run folder that does not fit `--resume`, missing wandb
credentials); anything else is a bug and keeps its traceback. `--debug` shows the traceback
of user errors too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

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


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """Runs `body`; a user error prints `error: <message>` as the last thing on stderr.

    Args:
      body: the command; returns its exit status.
      debug: re-raise user errors (the traceback shows) instead of printing their message.

    Returns:
      `body`'s status, or 2 after a user error.
    """
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
