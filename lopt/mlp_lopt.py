"""A per-parameter MLP learned optimizer in the style of LOLv2.

Metz, Freeman, Harrison, Maheswaranathan, Sohl-Dickstein, "Practical tradeoffs between
memory, compute, and performance in learned optimizers" (CoLLAs 2022).

Every parameter is fed, as one row of a batched matmul over the whole flattened parameter
tree, per-parameter features (parameter, gradient, momenta at several decays, the rms of
the gradient, and Adam-like ratios), each normalised by its second moment over the tensor
it belongs to, plus training-progress features shared by all parameters. A small MLP
outputs a direction d and a log-magnitude m; the update is
`step_mult * d * exp(exp_mult * m)`, so a freshly initialised network takes small, stable
steps (about `step_mult` per parameter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lopt.base import MetaParams, Optimizer

_EPS = 1e-8


class MLPLOptState(NamedTuple):
    """Inner-optimizer state.

    Attributes:
      momenta: per leaf, momenta at every decay stacked on a last axis [*shape, n_decays].
      rms: per leaf, the running mean of squared gradients.
      step: inner step counter (int32).
      num_steps: the training horizon the progress features refer to (int32).
    """

    momenta: Any
    rms: Any
    step: jax.Array
    num_steps: jax.Array


class _PerParamMLP(nn.Module):
    """The per-parameter network, with the shared progress features as a first-layer bias.

    Writing x·W as [per-param, shared]·[W_p; W_s] = per-param·W_p + shared·W_s computes the
    shared part once per tensor instead of once per parameter (same function, less work).
    """

    hidden_size: int
    hidden_layers: int

    @nn.compact
    def __call__(self, per_param: jax.Array, shared: jax.Array) -> jax.Array:
        n_p, n_s = per_param.shape[-1], shared.shape[-1]
        init = nn.initializers.lecun_normal()
        w = self.param("w_in", init, (n_p + n_s, self.hidden_size))
        b = self.param("b_in", nn.initializers.zeros, (self.hidden_size,))
        h = jax.nn.relu(per_param @ w[:n_p] + (shared @ w[n_p:] + b))
        for _ in range(self.hidden_layers - 1):
            h = jax.nn.relu(nn.Dense(self.hidden_size)(h))
        return nn.Dense(2)(h)


def _progress_features(step: jax.Array, num_steps: jax.Array) -> jax.Array:
    """Training-progress features shared by every parameter."""
    frac = step.astype(jnp.float32) / jnp.maximum(num_steps.astype(jnp.float32), 1.0)
    scales = jnp.array([3.0, 10.0, 30.0, 100.0, 300.0])
    return jnp.concatenate([jnp.stack([frac, frac**2, jnp.sqrt(frac)]), jnp.tanh(step / scales)])


def _normalise(x: jax.Array) -> jax.Array:
    """Divides every feature column by its root mean square over the tensor's rows."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=0, keepdims=True) + _EPS)


@dataclasses.dataclass(frozen=True)
class MLPLOpt:
    """Per-parameter MLP learned optimizer (LOLv2 style).

    Attributes:
      hidden_size: width of the per-parameter MLP.
      hidden_layers: number of hidden layers.
      momentum_decays: decays of the momentum features.
      rms_decay: decay of the running mean of squared gradients.
      step_mult: scale of the update (the step of a freshly initialised optimizer).
      exp_mult: scale of the log-magnitude output.
    """

    hidden_size: int = 32
    hidden_layers: int = 2
    momentum_decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999)
    rms_decay: float = 0.999
    step_mult: float = 1e-3
    exp_mult: float = 1e-3

    @property
    def num_per_param_features(self) -> int:
        # p, g, momenta, rms, momenta/sqrt(rms), g/sqrt(rms)
        return 2 + 2 * len(self.momentum_decays) + 2

    @property
    def num_shared_features(self) -> int:
        return int(_progress_features(jnp.int32(0), jnp.int32(1)).shape[0])

    @property
    def _net(self) -> _PerParamMLP:
        return _PerParamMLP(self.hidden_size, self.hidden_layers)

    def init_meta(self, key: jax.Array) -> MetaParams:
        """Returns fresh meta-parameters (flax params of the per-parameter MLP)."""
        p = jnp.zeros((1, self.num_per_param_features))
        s = jnp.zeros((self.num_shared_features,))
        return self._net.init(key, p, s)["params"]

    def optimizer(self, theta: MetaParams) -> Optimizer:
        """Returns the optimizer with meta-parameters `theta`."""
        decays = jnp.asarray(self.momentum_decays, jnp.float32)
        net = self._net

        def init(params, num_steps) -> MLPLOptState:
            leaves = _float_leaves(params)
            return MLPLOptState(
                momenta=[
                    jnp.zeros(p.shape + (len(self.momentum_decays),), p.dtype) for p in leaves
                ],
                rms=[jnp.zeros_like(p) for p in leaves],
                step=jnp.zeros((), jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update(grads, state: MLPLOptState, params, loss=None):
            del loss  # this optimizer does not use the loss
            if params is None:
                raise ValueError("MLPLOpt.update needs the current params")
            g_leaves = _float_leaves(grads)
            p_leaves = _float_leaves(params)
            momenta = [
                m * decays + g[..., None] * (1 - decays)
                for m, g in zip(state.momenta, g_leaves, strict=True)
            ]
            rms = [
                v * self.rms_decay + jnp.square(g) * (1 - self.rms_decay)
                for v, g in zip(state.rms, g_leaves, strict=True)
            ]
            rows = []
            for p, g, m, v in zip(p_leaves, g_leaves, momenta, rms, strict=True):
                inv = jax.lax.rsqrt(v + _EPS)
                feats = jnp.concatenate(
                    [
                        p[..., None],
                        g[..., None],
                        m,
                        v[..., None],
                        m * inv[..., None],
                        (g * inv)[..., None],
                    ],
                    axis=-1,
                ).reshape(-1, self.num_per_param_features)
                rows.append(_normalise(feats.astype(jnp.float32)))
            shared = _progress_features(state.step, state.num_steps)
            out = net.apply({"params": theta}, jnp.concatenate(rows, axis=0), shared)
            step = self.step_mult * out[:, 0] * jnp.exp(self.exp_mult * out[:, 1])
            sizes = [p.size for p in p_leaves]
            splits = jnp.split(step, list(_cumsum(sizes[:-1])))
            upd_leaves = [
                s.reshape(p.shape).astype(p.dtype) for s, p in zip(splits, p_leaves, strict=True)
            ]
            updates = _unflatten_like(grads, upd_leaves)
            return updates, MLPLOptState(momenta, rms, state.step + 1, state.num_steps)

        return Optimizer(init, update)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _float_leaves(tree) -> list[jax.Array]:
    return [jnp.asarray(x) for x in jax.tree.leaves(tree) if _is_float(x)]


def _unflatten_like(tree, float_values: list[jax.Array]):
    """Puts `float_values` back at the float leaves of `tree`; other leaves get zeros."""
    leaves, treedef = jax.tree.flatten(tree)
    it = iter(float_values)
    out = [next(it) if _is_float(x) else jnp.zeros_like(x) for x in leaves]
    return jax.tree.unflatten(treedef, out)


def _cumsum(xs: Sequence[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out
