"""Outer-gradient estimators for truncated unrolls, behind one interface.

Every estimator is a pytree (its inner problems' data are jit arguments) with

* `init(key, theta) -> state`: persistent particles (staggered) and estimator state;
* `estimate(state, theta, key) -> (gradient, state, metrics)`: one window of every particle.

Implementations (see ../shared/specs/estimators.md):

* `PersistentES(mode="pes")`: Persistent ES, Vicol, Metz, Sohl-Dickstein, ICML 2021.
* `PersistentES(mode="es_single")`: ES-Single / noise-reuse ES, Vicol et al. ICML 2023;
  Li et al. NeurIPS 2023: one perturbation per episode, no accumulation.
* `PersistentES(mode="tes")`: truncated ES: a fresh perturbation every window around one
  shared state (biased: ignores how θ shaped the state).
* `FullES`: antithetic ES over whole episodes from initialisation.
* `TBPTT`: the analytic gradient through the window only (incoming state stop-gradiented).

The per-window objective is set by `WindowObjective`: the mean per-step loss over the window
(normalised by K), the per-step loss at the end of the window, or the problem's evaluation
(validation) loss at the end of the window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from meta_train.unroll import EpisodeSchedule, Particle, WindowOut, init_group, unroll_window

ESTIMATORS = ("pes", "es_single", "tes", "full_es", "tbptt")
OBJECTIVES = ("mean", "final", "valid_final")
STAGGERS = ("truncate", "burn_in", "none")


@dataclasses.dataclass(frozen=True)
class WindowObjective:
    """What one window contributes to the meta-objective, and how differences are treated.

    Attributes:
      kind: 'mean' (mean per-step loss over the K steps, so gradients scale like one step's
        loss), 'final' (the per-step loss at the last step of the window) or 'valid_final'
        (the problem's `eval_loss` of the state at the end of the window, before any reset).
      sign: use only the sign of each antithetic loss difference.
      clip: clip each antithetic loss difference to [-clip, clip] (0: off).
      late_weight: weight each window's (transformed) difference by the episode's progress
        at the window's end, `(step / length) ** late_weight` (0: every window alike). A
        learned optimizer is judged by the loss it reaches at the end of training (and a
        tuned Adam's learning rate is chosen so): uniform weights let the many early
        windows, where fitting fast always pays, outvote the few late ones where fitting
        fast overfits.
    """

    kind: str = "mean"
    sign: bool = False
    clip: float = 0.0
    late_weight: float = 0.0

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.kind!r}; known: {OBJECTIVES}")
        if not (math.isfinite(self.late_weight) and self.late_weight >= 0):
            raise ValueError(f"late_weight must be a finite number >= 0, got {self.late_weight}")

    def split(self, out: WindowOut) -> tuple[jax.Array, jax.Array]:
        """Per member: the window objective of the steps before and after a reset.

        Args:
          out: one group's window record ([K, members] arrays).

        Returns:
          `(before, after)`, each [members].
        """
        k = out.losses.shape[0]
        if self.kind == "mean":
            values, weights = out.losses, jnp.full((k,), 1.0 / k)
        else:
            values = out.losses if self.kind == "final" else out.eval_losses
            weights = jnp.zeros((k,)).at[k - 1].set(1.0)
        seg = out.segment()
        w = weights[:, None] * values
        before = jnp.sum(jnp.where((seg == 0)[:, None], w, 0.0), axis=0)
        after = jnp.sum(jnp.where((seg > 0)[:, None], w, 0.0), axis=0)
        return before, after

    @property
    def needs_eval(self) -> bool:
        return self.kind == "valid_final"

    def progress_weights(
        self, end: Particle, crossed: jax.Array, dtype: Any = jnp.float32
    ) -> tuple[jax.Array, jax.Array]:
        """Per pair: the weights of the differences before and after a reset (`late_weight`).

        Args:
          end: the pairs' particles after the window ([pairs, members] leaves).
          crossed: [pairs] whether an episode ended inside the window.
          dtype: the weights' dtype (the meta-parameters').

        Returns:
          `(w_before, w_after)`, each [pairs]: an episode that ended inside the window is
          at progress 1; the episode running at the window's end at `step / length`.
        """
        now = end.step[:, 0].astype(dtype) / jnp.maximum(end.length[:, 0], 1).astype(dtype)
        before = jnp.where(crossed, 1.0, now)
        return before**self.late_weight, now**self.late_weight

    def transform(self, diff: jax.Array) -> jax.Array:
        """Sign or clip of an antithetic loss difference; NaN differences become 0."""
        diff = jnp.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0)
        if self.sign:
            return jnp.sign(diff)
        if self.clip > 0:
            return jnp.clip(diff, -self.clip, self.clip)
        return diff


class EstimatorState(struct.PyTreeNode):
    """Per task group: particles [pairs, members, ...], accumulated noise ξ and current ε
    ([pairs, D], θ flattened to D numbers in `ravel_pytree` order). `FullES` and `TBPTT`
    keep only what they use."""

    particles: tuple[Particle, ...]
    accum: tuple[Any, ...] = ()
    noise: tuple[Any, ...] = ()

    def group(self, g: int) -> EstimatorState:
        """Group g's state alone (the state of a one-group estimator)."""
        return EstimatorState(
            self.particles[g : g + 1], self.accum[g : g + 1], self.noise[g : g + 1]
        )

    @staticmethod
    def join(groups: list[EstimatorState]) -> EstimatorState:
        """The state of all groups from one-group states, in order."""
        return EstimatorState(
            sum((s.particles for s in groups), ()),
            sum((s.accum for s in groups), ()),
            sum((s.noise for s in groups), ()),
        )


def flat_normal(key: jax.Array, num: int, size: int, sigma: float, dtype=jnp.float32):
    """[num, size] Gaussian perturbations with standard deviation `sigma` (Box-Muller).

    One draw for the whole flattened θ. Its log and cos are "expensive" for XLA, so the
    generator is computed once rather than fused (recomputed) into every consumer of ε.
    """
    u = jax.random.uniform(key, (2, num, size), dtype, minval=jnp.finfo(dtype).tiny)
    return sigma * jnp.sqrt(-2.0 * jnp.log(u[0])) * jnp.cos(2.0 * jnp.pi * u[1])


def pair_thetas(flat_theta: jax.Array, eps: jax.Array, unravel) -> Any:
    """θ+ε and θ−ε for every pair, as θ-structured leaves [pairs, 2, ...].

    Args:
      flat_theta: θ flattened, [D].
      eps: perturbations [pairs, D].
      unravel: `ravel_pytree`'s inverse for θ.
    """
    both = jnp.stack([flat_theta + eps, flat_theta - eps], axis=1)
    return jax.vmap(jax.vmap(unravel))(both)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def combine_estimates(
    per_pairs: list[jax.Array], stats: list[list[dict]]
) -> tuple[jax.Array, dict]:
    """The mean estimate over all pairs of all groups, and the window's metrics.

    Args:
      per_pairs: per call of `estimate_per_pair`, its [pairs, D] single-pair estimates.
      stats: per call, its per-group statistics.

    Returns:
      The flat [D] meta-gradient and the metrics.
    """
    per_pair = jnp.concatenate(per_pairs)
    stats = [s for group_stats in stats for s in group_stats]
    grad = jnp.mean(per_pair, axis=0)
    # Trace of the covariance of single-pair estimates: the estimator's noise level.
    var = jnp.sum(jnp.var(per_pair, axis=0))
    n_pairs = sum(s["pairs"] for s in stats)
    metrics = {
        "meta_loss": sum(s["meta_loss"] * s["pairs"] for s in stats) / n_pairs,
        "resets": sum(s["resets"] for s in stats),
        "reset_fraction": sum(s["reset_pairs"] for s in stats) / n_pairs,
        "diverged_pairs": sum(s["diverged"] for s in stats),
        # Member-steps whose loss sat at the loss clip: there a diverging member and a
        # merely bad one look alike, and their difference carries no signal.
        "loss_clip_fraction": sum(s["at_clip"] * s["pairs"] for s in stats) / n_pairs,
        "estimate_variance": var,
    }
    return grad, metrics


def _window_stats(
    out: WindowOut, ok: jax.Array, objective: WindowObjective, loss_clip: float | None = None
) -> dict:
    crossed = jnp.any(out.resets, axis=1)
    at_clip = jnp.mean(out.losses >= loss_clip) if loss_clip else jnp.zeros(())
    before, after = jax.vmap(objective.split)(out)
    return {
        # The window objective itself (mean over pairs and members), whatever its kind.
        "meta_loss": jnp.mean(before + after),
        "resets": jnp.sum(out.resets),
        "reset_pairs": jnp.sum(crossed),
        "diverged": jnp.sum(~ok),
        "at_clip": at_clip,
        "pairs": out.losses.shape[0],
    }


def unroll_pairs(
    problem,
    thetas: Any,
    particles: Particle,
    keys: jax.Array,
    schedule: EpisodeSchedule,
    objective: WindowObjective | None = None,
) -> tuple[Particle, WindowOut]:
    """`unroll_window` for every pair (leading axis of `thetas`, `particles`, `keys`), vmapped.

    (A `lax.map` over pairs, which keeps one pair's arrays in cache, measured 3 % slower on
    the speed benchmark's configuration on an idle core and compiled 0.7 s longer.)
    """
    with_eval = objective is not None and objective.needs_eval

    def one(th, part, key):
        return unroll_window(problem, th, part, key, schedule, with_eval)

    return jax.vmap(one)(thetas, particles, keys)


class _Base(struct.PyTreeNode):
    """Fields and particle initialisation shared by the estimators."""

    problems: tuple
    schedule: EpisodeSchedule = struct.field(pytree_node=False)
    pairs_per_group: int = struct.field(pytree_node=False)
    objective: WindowObjective = struct.field(pytree_node=False, default=WindowObjective())
    stagger: str = struct.field(pytree_node=False, default="truncate")
    members: int = struct.field(pytree_node=False, default=2)  # runs per particle group

    def estimate(
        self, state: EstimatorState, theta: Any, key: jax.Array
    ) -> tuple[Any, EstimatorState, dict]:
        """One window of every group: the mean meta-gradient (θ-structured), the new state
        and the window's metrics."""
        per_pair, new_state, stats = self.estimate_per_pair(state, theta, key)
        grad, metrics = combine_estimates([per_pair], [stats])
        return ravel_pytree(theta)[1](grad), new_state, metrics

    def _init_particles(
        self, key: jax.Array, theta: Any, first_group: int = 0
    ) -> tuple[Particle, ...]:
        if self.stagger not in STAGGERS:
            raise ValueError(f"unknown stagger {self.stagger!r}; known: {STAGGERS}")
        n = self.pairs_per_group
        thetas = jax.tree.map(lambda t: jnp.broadcast_to(t, (n, self.members) + t.shape), theta)
        groups = []
        for g, problem in enumerate(self.problems):
            k_init, k_burn = jax.random.split(jax.random.fold_in(key, first_group + g))
            keys = jax.random.split(k_init, n)
            init = jax.vmap(init_group, in_axes=(None, 0, 0, None, None))
            parts = init(problem, thetas, keys, self.schedule, self.stagger == "truncate")
            if self.stagger == "burn_in":
                parts = _burn_in(problem, thetas, parts, k_burn, self.schedule)
            groups.append(parts)
        return tuple(groups)


def _burn_in(problem, thetas, particles: Particle, key: jax.Array, schedule: EpisodeSchedule):
    """Advances each pair a random number of windows (uniform over an episode) with θ.

    The gradients of these windows are discarded; afterwards the particles sit at spread-out
    points of realistic (not truncated) episodes.
    """
    n = particles.step.shape[0]
    max_windows = -(-schedule.max_len // schedule.window)
    k_off, k_run = jax.random.split(key)
    offsets = jax.random.randint(k_off, (n,), 0, max_windows)

    def body(w, parts):
        keys = jax.random.split(jax.random.fold_in(k_run, w), n)
        stepped, _ = unroll_pairs(problem, thetas, parts, keys, schedule)
        return _select(w < offsets, stepped, parts)

    return jax.lax.fori_loop(0, max_windows, body, particles)


class PersistentES(_Base):
    """PES, ES-Single/NRES and truncated ES over persistent antithetic pairs.

    Each window every pair runs its two members (θ+ε, θ−ε) K steps from their persistent
    states; with D the (transformed) difference of their window objectives,

    * pes: ε is new every window and ξ ← ξ + ε accumulates over the episode;
      ĝ = D_before ξ + D_after ε, where D_after is the part after an episode reset inside the
      window; after a reset ξ restarts from ε if the new episode already ran steps in this
      window, from 0 if the reset fell on its last step (so PES with K = T is FullES).
    * es_single: ε is drawn when an episode starts and reused for all of its windows;
      ĝ = (D_before + D_after) ε.
    * tes: ε is new every window and both members start from one shared state (the +
      member's, so the shared state follows θ+ε — an O(σ) drift that the estimate ignores);
      ĝ = (D_before + D_after) ε.

    all divided by 2σ² and averaged over pairs. A pair with a non-finite step contributes 0.

    Attributes:
      sigma: standard deviation of ε.
      mode: 'pes', 'es_single' or 'tes'.
    """

    sigma: float = struct.field(pytree_node=False, default=0.01)
    mode: str = struct.field(pytree_node=False, default="pes")

    def init(self, key: jax.Array, theta: Any, first_group: int = 0) -> EstimatorState:
        if self.mode not in ("pes", "es_single", "tes"):
            raise ValueError(f"unknown mode {self.mode!r}")
        flat = ravel_pytree(theta)[0]
        zeros = jnp.zeros((self.pairs_per_group, flat.size), flat.dtype)
        groups = len(self.problems)
        return EstimatorState(
            self._init_particles(key, theta, first_group), (zeros,) * groups, (zeros,) * groups
        )

    def _group(self, problem, theta, unravel, particles: Particle, accum, noise, key):
        """One group's window; `theta` is θ flattened, `accum`, `noise` and the returned
        per-pair estimates are [pairs, D]."""
        n = self.pairs_per_group
        k_eps, k_unroll = jax.random.split(key)
        fresh = flat_normal(k_eps, n, theta.size, self.sigma, theta.dtype)
        if self.mode == "es_single":
            # A new ε only where an episode starts at this window (the state has not yet
            # been run with any ε); an episode that began mid-window keeps the ε it began with.
            eps = jnp.where((particles.step[:, 0] == 0)[:, None], fresh, noise)
            xi = eps
        elif self.mode == "tes":
            eps, xi = fresh, fresh
            particles = jax.tree.map(lambda x: jnp.repeat(x[:, :1], 2, axis=1), particles)
        else:
            eps = fresh
            xi = accum + eps

        keys = jax.random.split(k_unroll, n)
        particles, out = unroll_pairs(
            problem,
            pair_thetas(theta, eps, unravel),
            particles,
            keys,
            self.schedule,
            self.objective,
        )
        before, after = jax.vmap(self.objective.split)(out)  # [pairs, 2] each
        ok = jnp.all(out.finite, axis=(1, 2))
        d_before = jnp.where(ok, self.objective.transform(before[:, 0] - before[:, 1]), 0.0)
        d_after = jnp.where(ok, self.objective.transform(after[:, 0] - after[:, 1]), 0.0)
        crossed = jnp.any(out.resets, axis=1)
        if self.objective.late_weight:
            w_before, w_after = self.objective.progress_weights(particles, crossed, theta.dtype)
            d_before, d_after = w_before * d_before, w_after * d_after
        c = 1.0 / (2.0 * self.sigma**2)
        per_pair = c * (d_before[:, None] * xi + d_after[:, None] * eps)
        # After an episode end, ξ restarts from the ε the new episode has run with so far:
        # ε if it ran steps inside this window, nothing if the reset fell on the last step.
        # (Fresh states are treated as independent of θ.)
        ran_after = jnp.any(jax.vmap(WindowOut.segment)(out) > 0, axis=1)
        restart = jnp.where(ran_after[:, None], eps, 0.0)
        new_accum = jnp.where(crossed[:, None], restart, xi) if self.mode == "pes" else accum
        return (
            per_pair,
            particles,
            new_accum,
            eps,
            _window_stats(out, ok, self.objective, _loss_clip(problem)),
        )

    def estimate_per_pair(
        self, state: EstimatorState, theta: Any, key: jax.Array, first_group: int = 0
    ) -> tuple[jax.Array, EstimatorState, list[dict]]:
        """One window of every group: single-pair estimates [pairs of all groups, D] (θ
        flattened), the new state and per-group statistics (see `combine_estimates`).

        Group g draws from `fold_in(key, first_group + g)`, so the groups of one estimator
        run as separate one-group estimators (`first_group=g`) give the same numbers.
        """
        flat, unravel = ravel_pytree(theta)
        results = [
            self._group(
                p,
                flat,
                unravel,
                state.particles[g],
                state.accum[g],
                state.noise[g],
                jax.random.fold_in(key, first_group + g),
            )
            for g, p in enumerate(self.problems)
        ]
        new_state = EstimatorState(
            tuple(r[1] for r in results),
            tuple(r[2] for r in results),
            tuple(r[3] for r in results),
        )
        return jnp.concatenate([r[0] for r in results]), new_state, [r[4] for r in results]


def _select(cond: jax.Array, a: Any, b: Any) -> Any:
    """Per pair: `a` where `cond` ([pairs]) else `b`."""
    return jax.tree.map(lambda x, y: jnp.where(_bcast(cond, x), x, y), a, b)


class FullES(_Base):
    """Antithetic ES over whole episodes: every estimate starts each pair from a fresh
    episode (shared keys for both members) and runs it to its end.

    ĝ = (1/N) Σ_i D_i ε_i / (2σ²), D the difference of the episode objectives (the window
    objective with K = T). Unbiased for the Gaussian-smoothed objective; one meta-step per
    episode. Requires episodes of one fixed length T (the schedule's window).

    Attributes:
      sigma: standard deviation of ε.
    """

    sigma: float = struct.field(pytree_node=False, default=0.01)

    def init(self, key: jax.Array, theta: Any, first_group: int = 0) -> EstimatorState:
        del key, theta, first_group
        return EstimatorState(particles=())

    def estimate_per_pair(
        self, state: EstimatorState, theta: Any, key: jax.Array, first_group: int = 0
    ) -> tuple[jax.Array, EstimatorState, list[dict]]:
        """See `PersistentES.estimate_per_pair`."""
        n, sched = self.pairs_per_group, self.schedule
        flat, unravel = ravel_pytree(theta)
        per_pairs, stats = [], []
        for g, problem in enumerate(self.problems):
            # Keys derived as in PersistentES: the same key gives the same ε and data.
            k_eps, k_unroll = jax.random.split(jax.random.fold_in(key, first_group + g))
            eps = flat_normal(k_eps, n, flat.size, self.sigma, flat.dtype)
            thetas = pair_thetas(flat, eps, unravel)

            def episode(th, k, problem=problem):
                length = jnp.int32(sched.window)
                k_res = jax.random.fold_in(k, 1)
                inner = jax.vmap(problem.reset, in_axes=(0, None, None))(th, k_res, length)
                fresh = Particle(inner, jnp.zeros((2,), jnp.int32), jnp.full((2,), length))
                return unroll_window(problem, th, fresh, k, sched, self.objective.needs_eval)[1]

            out = jax.vmap(episode)(thetas, jax.random.split(k_unroll, n))
            before, after = jax.vmap(self.objective.split)(out)
            total = before + after
            ok = jnp.all(out.finite, axis=(1, 2))
            d = jnp.where(ok, self.objective.transform(total[:, 0] - total[:, 1]), 0.0)
            per_pairs.append((d / (2.0 * self.sigma**2))[:, None] * eps)
            stats.append(_window_stats(out, ok, self.objective, _loss_clip(problem)))
        return jnp.concatenate(per_pairs), state, stats


class TBPTT(_Base):
    """Truncated backpropagation through time: the exact gradient of each particle's window
    objective with respect to θ, with the incoming state held fixed (stop-gradient).

    Biased (ignores how θ shaped the incoming state). One member per particle; a particle
    with a non-finite step contributes 0.
    """

    members: int = struct.field(pytree_node=False, default=1)

    def init(self, key: jax.Array, theta: Any, first_group: int = 0) -> EstimatorState:
        return EstimatorState(self._init_particles(key, theta, first_group))

    def estimate_per_pair(
        self, state: EstimatorState, theta: Any, key: jax.Array, first_group: int = 0
    ) -> tuple[jax.Array, EstimatorState, list[dict]]:
        """See `PersistentES.estimate_per_pair`."""
        n = self.pairs_per_group
        per_pairs, groups, stats = [], [], []
        for g, problem in enumerate(self.problems):
            keys = jax.random.split(jax.random.fold_in(key, first_group + g), n)

            def window(th, particle, k, problem=problem):
                particle = jax.lax.stop_gradient(particle)
                new, out = unroll_window(
                    problem,
                    jax.tree.map(lambda t: t[None], th),
                    particle,
                    k,
                    self.schedule,
                    self.objective.needs_eval,
                )
                before, after = self.objective.split(out)
                return jnp.sum(before + after), (new, out)

            grad_fn = jax.vmap(jax.grad(window, has_aux=True), in_axes=(None, 0, 0))
            grads, (parts, out) = grad_fn(theta, state.particles[g], keys)
            ok = jnp.all(out.finite, axis=(1, 2))
            finite = jnp.all(
                jnp.stack(
                    [
                        jnp.all(jnp.isfinite(x), axis=range(1, x.ndim))
                        for x in jax.tree.leaves(grads)
                    ]
                ),
                axis=0,
            )
            flat_grads = jax.vmap(lambda t: ravel_pytree(t)[0])(_zero_nan(grads))  # [pairs, D]
            per_pairs.append((ok & finite).astype(flat_grads.dtype)[:, None] * flat_grads)
            groups.append(parts)
            stats.append(_window_stats(out, ok, self.objective, _loss_clip(problem)))
        return jnp.concatenate(per_pairs), EstimatorState(tuple(groups)), stats


def _loss_clip(problem) -> float | None:
    """The problem's loss clip, if it clips (learned-optimizer problems do)."""
    return getattr(problem, "loss_clip", None)


def _zero_nan(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), tree)


def make_estimator(
    name: str,
    problems: tuple,
    schedule: EpisodeSchedule,
    *,
    pairs_per_group: int,
    sigma: float,
    objective: WindowObjective = WindowObjective(),
    stagger: str = "truncate",
):
    """Builds estimator `name` (one of `ESTIMATORS`).

    Args:
      name: 'pes', 'es_single', 'tes', 'full_es' or 'tbptt'.
      problems: one inner problem per task group.
      schedule: window K and episode lengths (FullES: episodes of exactly K steps).
      pairs_per_group: antithetic pairs (TBPTT: particles) per group.
      sigma: perturbation scale (ES estimators).
      objective: the per-window objective and loss-difference treatment.
      stagger: 'truncate' (first episodes cut at a random window), 'burn_in' (run a random
        number of windows first, gradients discarded) or 'none'.

    Returns:
      The estimator.
    """
    common = dict(
        problems=tuple(problems),
        schedule=schedule,
        pairs_per_group=pairs_per_group,
        objective=objective,
        stagger=stagger,
    )
    if name in ("pes", "es_single", "tes"):
        return PersistentES(**common, sigma=sigma, mode=name)
    if name == "full_es":
        if schedule.min_len != schedule.max_len or schedule.max_len != schedule.window:
            raise ValueError(
                "full_es runs whole episodes: set meta.window = meta.min_episode_len = "
                f"meta.max_episode_len (got {schedule.window}, {schedule.min_len}, "
                f"{schedule.max_len})"
            )
        return FullES(**common, sigma=sigma)
    if name == "tbptt":
        if objective.late_weight:
            raise ValueError("late_weight weights ES differences; tbptt has none (set it to 0)")
        return TBPTT(**common)
    raise ValueError(f"unknown estimator {name!r}; known: {ESTIMATORS}")
