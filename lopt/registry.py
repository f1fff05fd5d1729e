"""Builds learned optimizers from plain (JSON-serialisable) descriptions."""

from __future__ import annotations

from typing import Any

from lopt.adafac import AdaFacLOpt
from lopt.base import LearnedOptimizer
from lopt.hierarchical import HierarchicalLOpt
from lopt.hyper import LearnedAdamLOpt, LearnedScheduleLOpt
from lopt.mlp_lopt import MLPLOpt

# kind -> class; every class is a frozen dataclass of JSON-friendly options (`[lopt]`).
LOPTS: dict[str, type] = {
    "mlp": MLPLOpt,
    "adafac": AdaFacLOpt,
    "hierarchical": HierarchicalLOpt,
    "learned_adam": LearnedAdamLOpt,
    "learned_schedule": LearnedScheduleLOpt,
}


def make_lopt(kind: str, **kwargs: Any) -> LearnedOptimizer:
    """Returns the learned optimizer `kind` built with `kwargs`.

    Raises:
      ValueError: for an unknown kind or option, naming it.
    """
    if kind not in LOPTS:
        raise ValueError(f"unknown learned optimizer {kind!r}; known: {sorted(LOPTS)}")
    cls = LOPTS[kind]
    fields = set(cls.__dataclass_fields__)
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for lopt {kind!r}; known {sorted(fields)}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)
