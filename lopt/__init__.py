"""Learned optimizers as pure functions, and their export as optax transformations.

`lopt.pretrained()` lists the shipped optimizers; `lopt.pretrained("NAME", num_steps=N)`
returns one as an optax transformation (`lopt.hub`).
"""

from lopt.hub import pretrained

__all__ = ["pretrained"]
