"""Learned optimizers as pure functions, and their export as optax transformations.

`lopt.pretrained()` lists the shipped optimizers; `lopt.pretrained("NAME", num_steps=N)`
returns one as an optax transformation (`lopt.hub`). `lopt.compiler_options()` gives the
XLA options under which its update runs fastest on a CPU (`lopt.xla_options`).
"""

from lopt.hub import pretrained
from lopt.xla_options import compiler_options

__all__ = ["compiler_options", "pretrained"]
