"""Truncated unrolls of persistent particles: the one unroll implementation.

An *inner problem* is anything with

* `reset(theta, key, num_steps) -> inner`: a fresh inner state for an episode of
  `num_steps` steps (e.g. a sampled task, its initial params and optimizer state);
* `step(theta, inner, key) -> (inner, loss, finite)`: one inner step; `loss` is the
  per-step meta-loss (already clipped and finite) and `finite` says the step did not diverge;
* optionally `eval_loss(theta, inner, key) -> loss`: an evaluation (e.g. validation) loss of
  a state, used by window objectives measured at the end of a window.

A *particle* wraps an inner state with its episode counter and length. Particles come in
groups of *members* (2 for an antithetic pair) that run with different θ but share every
random key (data, resets, episode lengths) and reset together, so the members stay
comparable. `unroll_window` advances one group K steps in one `lax.scan`; callers `vmap` it
over groups. Resets use `jnp.where` on a small decision with the fresh state computed once
per window (never `lax.cond` under vmap, which would run both branches every step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import struct


class InnerProblem(Protocol):
    def reset(self, theta: Any, key: jax.Array, num_steps: jax.Array) -> Any: ...

    def step(self, theta: Any, inner: Any, key: jax.Array) -> tuple[Any, jax.Array, jax.Array]: ...


class Particle(struct.PyTreeNode):
    """One inner run (per member of a group: leading member axis when grouped).

    Attributes:
      inner: the problem's inner state.
      step: steps taken in the current episode.
      length: length of the current episode.
    """

    inner: Any
    step: jax.Array
    length: jax.Array


@dataclasses.dataclass(frozen=True)
class EpisodeSchedule:
    """Episode lengths: log-uniform in [min_len, max_len].

    Attributes:
      window: truncation window K.
      min_len, max_len: the range of episode lengths T.
      whole_windows: round lengths to multiples of K (episode ends then fall on window ends);
        otherwise an episode may end inside a window, and the particle continues in a fresh
        episode for the rest of it.
    """

    window: int
    min_len: int
    max_len: int
    whole_windows: bool = True

    def __post_init__(self):
        # Fresh states are computed once per window, so an episode must not end twice in one.
        if not 1 <= self.window <= self.min_len <= self.max_len:
            raise ValueError(
                f"need 1 <= window <= min_len <= max_len, got {self.window}, {self.min_len}, "
                f"{self.max_len}"
            )

    def sample_length(self, key: jax.Array) -> jax.Array:
        lo, hi = jnp.log(self.min_len), jnp.log(self.max_len)
        t = jnp.exp(jax.random.uniform(key, (), minval=lo, maxval=hi))
        if self.whole_windows:
            t = jnp.clip(jnp.round(t / self.window) * self.window, self.window, self.max_len)
        else:
            t = jnp.clip(jnp.round(t), self.min_len, self.max_len)
        return t.astype(jnp.int32)

    def sample_first_length(self, key: jax.Array) -> jax.Array:
        """Length of a particle's first episode: a random whole-window part of a sampled one.

        Starting particles at random points of their first episode staggers them, so their
        episode ends (and the gradients' phase within an episode) are spread over time.
        """
        k1, k2 = jax.random.split(key)
        full = self.sample_length(k1)
        windows = full // self.window
        keep = jax.random.randint(k2, (), 1, windows + 1)
        return (keep * self.window).astype(jnp.int32)


class WindowOut(NamedTuple):
    """Per-step record of one window of one group, arrays shaped [K, members].

    Attributes:
      losses: per-step meta-losses.
      finite: whether each step stayed finite.
      resets: [K] whether the group reset after this step (episode end or divergence).
      eval_losses: the problem's `eval_loss` of the state after the last step (before any
        reset) in row K-1; zeros elsewhere and when not requested.
    """

    losses: jax.Array
    finite: jax.Array
    resets: jax.Array
    eval_losses: jax.Array

    def segment(self) -> jax.Array:
        """[K] index of the episode each step belongs to, counted from the window start."""
        r = self.resets.astype(jnp.int32)
        return jnp.cumsum(r) - r


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf of `tree` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def _member_map(fn, thetas, *args, shared=()):
    """vmaps `fn(theta, *args, *shared)` over the member axis of `thetas` and `args`."""
    in_axes = (0,) * (1 + len(args)) + (None,) * len(shared)
    return jax.vmap(fn, in_axes=in_axes)(thetas, *args, *shared)


def init_group(
    problem: InnerProblem,
    thetas: Any,
    key: jax.Array,
    schedule: EpisodeSchedule,
    truncate_first: bool = True,
) -> Particle:
    """Fresh particles for one group (member axis first).

    With `truncate_first`, the first episode is a random whole-window part of a sampled one,
    which staggers particles within an episode.
    """
    k_len, k_reset = jax.random.split(key)
    if truncate_first:
        length = schedule.sample_first_length(k_len)
    else:
        length = schedule.sample_length(k_len)
    inner = _member_map(problem.reset, thetas, shared=(k_reset, length))
    members = jax.tree.leaves(thetas)[0].shape[0]
    return Particle(
        inner, jnp.zeros((members,), jnp.int32), jnp.full((members,), length, jnp.int32)
    )


def unroll_window(
    problem: InnerProblem,
    thetas: Any,
    particle: Particle,
    key: jax.Array,
    schedule: EpisodeSchedule,
    with_eval: bool = False,
) -> tuple[Particle, WindowOut]:
    """Advances one group of particles `schedule.window` steps.

    Args:
      problem: the inner problem.
      thetas: meta-parameters per member (leading member axis).
      particle: the group's particles (leading member axis).
      key: this window's key; shared by all members.
      schedule: episode lengths and the window K.
      with_eval: also record `problem.eval_loss` at the end of the window.

    Returns:
      The advanced particles and the window's per-step record.
    """
    k_reset, k_len, k_data, k_eval = jax.random.split(key, 4)
    new_len = schedule.sample_length(k_len)
    members = particle.step.shape[0]
    fresh = Particle(
        _member_map(problem.reset, thetas, shared=(k_reset, new_len)),
        jnp.zeros((members,), jnp.int32),
        jnp.full((members,), new_len, jnp.int32),
    )

    def body(p: Particle, xs):
        k, last = xs
        inner, loss, finite = _member_map(problem.step, thetas, p.inner, shared=(k,))
        stepped = Particle(inner, p.step + 1, p.length)
        # One decision for the whole group keeps the members paired.
        reset = jnp.any(stepped.step >= stepped.length) | ~jnp.all(finite)
        # The last step's reset waits until after the end-of-window evaluation, which must
        # see the state before it; one traced copy of the step keeps the graph small.
        return _where(reset & ~last, fresh, stepped), (loss, finite, reset)

    keys = jax.random.split(k_data, schedule.window)
    last = jnp.arange(schedule.window) == schedule.window - 1
    stepped, (losses, finite, resets) = jax.lax.scan(body, particle, (keys, last))
    if with_eval:
        ev = _member_map(problem.eval_loss, thetas, stepped.inner, shared=(k_eval,))
    else:
        ev = jnp.zeros_like(losses[-1])
    particle = _where(resets[-1], fresh, stepped)
    evals = jnp.zeros_like(losses).at[-1].set(ev)
    return particle, WindowOut(losses, finite, resets, evals)
