"""Optimizer SPEC strings of the benchmark: what `--optimizer` accepts.

    runs/default/checkpoints              a meta-training checkpoint directory
    mnist1d-mlp-pes                       a shipped learned optimizer (`lopt.pretrained()`)
    optax:adam(learning_rate=1e-3)        an optax optimizer with literal arguments
    mypkg.opts:make_opt                   module:function returning an optax transformation
    mypkg.opts:make_opt(lr=3e-4)          ... called with literal arguments
    fast=optax:sgd(learning_rate=0.1)     any of the above with a label for the tables

A function (and a learned optimizer) gets the run's horizon as `num_steps=` when it takes
that argument. Every SPEC is parsed and built once up front, so a typo fails before any
training with one message naming what is wrong. SPECs are plain strings, so worker
processes rebuild the same transformation from them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import optax

from meta_train.cli import UserError

_LABEL = re.compile(r"^([A-Za-z_][\w.\-]*)=(?=[^=])")
_CALL = re.compile(r"^(?P<target>[^()\s]+?)(?:\((?P<args>.*)\))?$", re.S)


class SpecError(UserError):
    """A SPEC that does not name a usable optimizer."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A parsed `--optimizer` SPEC.

    Attributes:
      label: the name in tables and plots.
      spec: the SPEC as given (without the label).
      kind: 'shipped', 'checkpoint', 'optax' or 'function'.
      target: shipped name, checkpoint directory, optax function name, or
        'module:function'.
      kwargs: literal keyword arguments (optax and functions).
      args: literal positional arguments.
    """

    label: str
    spec: str
    kind: str
    target: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    args: tuple[Any, ...] = ()

    def make(
        self, num_steps: int, steps_per_epoch: float | None = None
    ) -> optax.GradientTransformation:
        """Builds the transformation for a run of `num_steps` steps.

        Args:
          num_steps: the run's horizon (learned optimizers' progress features refer to it).
          steps_per_epoch: the task's steps per pass over its training data
            (`tasks.epochs.steps_per_epoch`), for a shipped optimizer's per-epoch weight
            decay and a function that takes `steps_per_epoch=`; None where unknown.

        Returns:
          An optax transformation (plain or extra-args; the benchmark passes `loss=`).
        """
        if self.kind == "shipped":  # its weights checked against their hash
            from lopt.hub import load_pretrained  # noqa: PLC0415 - orbax is heavy

            return load_pretrained(self.target, num_steps, steps_per_epoch=steps_per_epoch)[0]
        if self.kind == "checkpoint":
            from lopt.export import load_optax  # noqa: PLC0415 - orbax is heavy

            return load_optax(self.target, num_steps)[0]
        fn = _resolve(self.kind, self.target)
        kwargs = dict(self.kwargs)
        if self.kind == "function" and _takes(fn, "num_steps") and "num_steps" not in kwargs:
            kwargs["num_steps"] = num_steps
        known = steps_per_epoch is not None and self.kind == "function"
        if known and _takes(fn, "steps_per_epoch", any_keyword=False):
            kwargs.setdefault("steps_per_epoch", steps_per_epoch)
        try:
            tx = fn(*self.args, **kwargs)
        except Exception as e:  # the user's function or arguments: report, do not crash
            raise SpecError(f"optimizer {self.spec!r}: calling {self.target} failed: {e}") from e
        if not isinstance(tx, optax.GradientTransformation | optax.GradientTransformationExtraArgs):
            raise SpecError(
                f"optimizer {self.spec!r}: {self.target} returned {type(tx).__name__}, "
                "not an optax GradientTransformation"
            )
        return tx


def _takes(fn: Any, name: str, any_keyword: bool = True) -> bool:
    """Whether `fn` accepts the keyword `name`: as a parameter of that name, or (with
    `any_keyword`) through a ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return name in params or (any_keyword and var_keyword)


def _resolve(kind: str, target: str) -> Any:
    if kind == "optax":
        obj: Any = optax
        for part in target.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise SpecError(f"optax has no {target!r} (e.g. optax:adam(learning_rate=1e-3))")
        if not callable(obj):
            raise SpecError(f"optax.{target} is not callable")
        return obj
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import module {module_name!r} of optimizer {target!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise SpecError(f"module {module_name!r} has no function {attr!r}")
    return fn


def _literal_args(text: str, spec: str) -> tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]]:
    """Parses 'a, b=1e-3' as a call's arguments; only Python literals are allowed."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError as e:
        raise SpecError(f"optimizer {spec!r}: cannot parse the arguments ({e.msg})") from e
    assert isinstance(call, ast.Call)
    if any(k.arg is None for k in call.keywords) or any(
        isinstance(a, ast.Starred) for a in call.args
    ):
        raise SpecError(f"optimizer {spec!r}: *args and **kwargs are not allowed")
    try:
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = tuple((k.arg, ast.literal_eval(k.value)) for k in call.keywords)
    except ValueError as e:
        raise SpecError(
            f"optimizer {spec!r}: arguments must be Python literals (numbers, strings, "
            f"lists, ...): {e}"
        ) from e
    return args, kwargs


def shipped_names() -> list[str]:
    """The shipped learned optimizers (`lopt.pretrained()`); none where none ship."""
    from lopt.hub import PretrainedError, pretrained  # noqa: PLC0415

    try:
        return pretrained()
    except PretrainedError:
        return []


def parse_spec(text: str) -> OptimizerSpec:
    """Parses one `--optimizer` SPEC (see the module docstring).

    Args:
      text: the SPEC, optionally prefixed with 'LABEL='.

    Returns:
      The parsed spec; nothing is built yet (`check` builds it).

    Raises:
      SpecError: for a SPEC that matches no form, naming the forms.
    """
    text = text.strip()
    label = None
    m = _LABEL.match(text)
    if m and ":" not in m.group(1) and "(" not in m.group(1):
        label, text = m.group(1), text[m.end() :]
    if not text:
        raise SpecError("empty optimizer SPEC")
    if text in shipped_names():
        return OptimizerSpec(label or text, text, "shipped", text)
    if Path(text).is_dir():
        return OptimizerSpec(label or Path(text).resolve().parent.name, text, "checkpoint", text)
    call = _CALL.match(text)
    if call is None or ":" not in call.group("target"):
        shipped = ", ".join(shipped_names()) or "none"
        raise SpecError(
            f"optimizer {text!r} is not a checkpoint directory, a shipped optimizer "
            f"({shipped}), 'optax:NAME(ARGS)' or 'module:function'"
        )
    target, arg_text = call.group("target"), call.group("args")
    args, kwargs = _literal_args(arg_text, text) if arg_text else ((), ())
    prefix, _, name = target.partition(":")
    if prefix == "optax":
        return OptimizerSpec(label or text, text, "optax", name, kwargs, args)
    return OptimizerSpec(label or text, text, "function", target, kwargs, args)


def check(spec: OptimizerSpec, num_steps: int = 100) -> None:
    """Builds `spec` once so a bad one fails before any training.

    Raises:
      SpecError: the optimizer cannot be built; the message says why.
    """
    try:
        spec.make(num_steps)
    except SpecError:
        raise
    except Exception as e:  # a checkpoint that does not load, ...
        raise SpecError(f"optimizer {spec.spec!r} could not be built: {e}") from e
