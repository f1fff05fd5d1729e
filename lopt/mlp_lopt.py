"""A per-parameter MLP learned optimizer in the style of LOLv2.

Metz, Freeman, Harrison, Maheswaranathan, Sohl-Dickstein, "Practical tradeoffs between
memory, compute, and performance in learned optimizers" (CoLLAs 2022).

Every parameter is fed, as one row of a batched matmul over the whole flattened parameter
tree, per-parameter features (parameter, gradient, momenta at several decays, the rms of
the gradient, and Adam-like ratios), each normalised by its second moment over the tensor
it belongs to, plus training-progress features shared by all parameters. A small MLP
outputs a direction d and a log-magnitude m; the update is
`step_mult * s(t) * d * exp(exp_mult * m)`, so a freshly initialised network takes small,
stable steps (about `step_mult` per parameter). `s(t)` is a fixed step-size schedule over
the declared horizon (`lopt.base.step_schedule`: 1, or a cosine decay that anneals late in
training, which truncated meta-training does not learn by itself).

Numerics, whatever the parameter tree holds:

* features, state and network are float32 for any float parameter dtype (float16, bfloat16,
  float64); only the update is cast back to the parameter's dtype;
* non-finite gradient entries (NaN, ±inf) get a zero update and leave the state untouched;
  squares of huge finite gradients are capped, so the state stays finite;
* past `num_steps` the progress features stay at their end-of-training values and the
  update decays as `num_steps / step` (`lopt.base.past_horizon_decay`): training on past the
  declared horizon continues the end-of-training annealing instead of extrapolating;
* non-float leaves (integer counters, `float0` gradients from `jax.grad(allow_int=True)`)
  get zero updates of the parameter's dtype; a tree with no float leaves passes through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lopt.base import MetaParams, Optimizer, check_num_steps, step_scale, step_schedule_problems
from lopt.common import (
    EPS,
    NUM_PROGRESS_FEATURES,
    OUTPUT_NORMS,
    WIDTH_SCALINGS,
    advance_moments,
    float_leaves,
    join_updates,
    moment_feature_arrays,
    moment_features,
    normalise_rows,
    num_moment_features,
    progress_features,
    rms_normalise,
    schedule_head,
    schedule_head_init,
    split_tree,
    tensor_features,
    width_scale,
)
from lopt.fused import (
    IMPLS,
    elementwise_mlp,
    network_multiply_adds,
    runs_fused,
    tensor_sums,
)


class MLPLOptState(NamedTuple):
    """Inner-optimizer state (float32 whatever the parameter dtype).

    Attributes:
      momenta: per float leaf, momenta at every decay stacked on a first axis
        [n_decays, *shape].
      rms: per float leaf, the running mean of squared gradients.
      step: inner step counter (int32).
      num_steps: the training horizon the progress features refer to (int32).
    """

    momenta: Any
    rms: Any
    step: jax.Array
    num_steps: jax.Array


class _PerParamMLP(nn.Module):
    """The per-parameter network (defines the meta-parameters; see `_apply_net`).

    The input row of a parameter is [per-param features, shared progress features].
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


def _apply_net(theta: MetaParams, per_param: jax.Array, shared: jax.Array) -> jax.Array:
    """The same function as `_PerParamMLP`, on features laid out [features, parameters].

    Feature-major layout makes every layer a [out, in] @ [in, N] matmul with a long N, which
    XLA's CPU matmuls run faster than [N, in] @ [in, out] for these narrow layers. Writing
    x·W as [per-param, shared]·[W_p; W_s] = per-param·W_p + shared·W_s computes the shared
    part once per step instead of once per parameter.

    Args:
      theta: the network's flax params.
      per_param: [n_per_param, N] features.
      shared: [n_shared] progress features.

    Returns:
      [2, N]: direction and log-magnitude per parameter.
    """
    n_p = per_param.shape[0]
    w, b = theta["w_in"], theta["b_in"]
    h = jax.nn.relu(jnp.einsum("fh,fn->hn", w[:n_p], per_param) + (shared @ w[n_p:] + b)[:, None])
    return hidden_and_output(theta, h)


def hidden_and_output(theta: MetaParams, h: jax.Array) -> jax.Array:
    """The per-parameter network after its first layer: [hidden, n] first-layer activations
    in, [2, n] direction and log-magnitude out (the flax `Dense_i` layers of `_PerParamMLP`,
    feature-major)."""
    layers = sorted((k for k in theta if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    for i, name in enumerate(layers):
        h = jnp.einsum("ih,in->hn", theta[name]["kernel"], h) + theta[name]["bias"][:, None]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


@dataclasses.dataclass(frozen=True)
class MLPLOpt:
    """Per-parameter MLP learned optimizer (LOLv2 style).

    Attributes:
      hidden_size: width of the per-parameter MLP.
      hidden_layers: number of hidden layers.
      momentum_decays: decays of the momentum features. Two (0.9 and 0.99) by default:
        at equal meta-training budget they were level with LOLv2's four (0.5, 0.9, 0.99,
        0.999) on held-out validation loss over two meta-training seeds, and each momentum
        is a state array read and written every step, so the update costs 2.8× Adam's at
        1M parameters instead of 4.0× (docs/optimizers.md, "Momenta"). Checkpoints save
        their own, so one trained with four loads as it was.
      rms_decay: decay of the running mean of squared gradients.
      step_mult: scale of the update (the step of a freshly initialised optimizer).
      exp_mult: scale of the log-magnitude output.
      step_schedule: 'constant' or 'cosine': the fixed multiplier of the update over the
        declared horizon (`lopt.base.step_schedule`).
      step_schedule_final: the cosine schedule's multiplier at the horizon, in [0, 1].
      width_scaling: 'none' or 'fan_in': μP-style scaling of each tensor's update by
        `width_ref / fan_in` (`lopt.common.width_scale`), so an optimizer meta-trained on
        narrow networks takes steps of the right size on wide ones.
      width_ref: the fan-in at which 'fan_in' scaling is 1.
      width_scale_max: the largest multiplier 'fan_in' scaling gives (0: no cap). 1 keeps
        tensors narrower than `width_ref` at the rule's own step instead of enlarging it
        (docs/generalist.md, "Narrow layers").
      schedule_head: hidden width of a learned per-tensor step-size schedule
        (`lopt.common.schedule_head`: progress and tensor shape in, a bounded multiplier
        out, starting at 1); 0 turns it off.
      feature_norm: normalise every per-parameter feature by its RMS over the tensor, so the
        update does not depend on the gradient's scale (True), or feed raw features (False:
        for comparison only).
      output_norm: 'none', or 'rms': divide each tensor's network output
        `d * exp(exp_mult * m)` by its RMS over the tensor before the step size, schedule
        and width scaling multiply it (`lopt.common.rms_normalise`, after Celo2), so
        `step_mult` and the schedule alone set the size of every tensor's step.
      impl: how the network runs, the same function either way (to float32 rounding):
        'fused' computes each tensor's feature norms in one reduction, then features,
        network and update in one elementwise pass (`lopt.fused`: no [features, N] or
        [hidden, N] buffers); 'matmul' builds the feature rows of the whole tree and runs
        the network as feature-major matmuls (`_apply_net`); 'auto' (the default) takes
        'fused' for networks of at most `lopt.fused.FUSED_MAX_MULTIPLY_ADDS` per parameter, where it
        measured faster, and 'matmul' for wider ones, whose unrolled pass compiles slowly
        and runs no faster (docs/speed.md).
      weight_decay: decoupled weight decay per step (Loshchilov & Hutter, "Decoupled
        weight decay regularization", ICLR 2019): every float parameter also moves by
        `-weight_decay * s(t) * p`, with the same schedule `s(t)` (and past-horizon decay)
        as the step. Not a meta-parameter: a fixed pressure towards small weights against
        overfitting small datasets, which the rules meta-trained here did not learn (with
        the decay inside meta-training they learned to push against it; docs/generalist.md).
        0 turns it off.
    """

    hidden_size: int = 4
    hidden_layers: int = 2
    momentum_decays: Sequence[float] = (0.9, 0.99)
    rms_decay: float = 0.999
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    step_schedule: str = "constant"
    step_schedule_final: float = 0.0
    width_scaling: str = "none"
    width_ref: float = 64.0
    width_scale_max: float = 0.0
    schedule_head: int = 0
    feature_norm: bool = True
    output_norm: str = "none"
    impl: str = "auto"
    weight_decay: float = 0.0

    def __post_init__(self):
        problems = []
        if self.impl not in IMPLS:
            problems.append(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.hidden_size < 1:
            problems.append(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.hidden_layers < 1:
            problems.append(f"hidden_layers must be >= 1, got {self.hidden_layers}")
        if not self.momentum_decays or not all(0 <= d < 1 for d in self.momentum_decays):
            problems.append(
                f"momentum_decays must be non-empty, each in [0, 1): {self.momentum_decays}"
            )
        if not 0 <= self.rms_decay < 1:
            problems.append(f"rms_decay must be in [0, 1), got {self.rms_decay}")
        for name in ("step_mult", "exp_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, got {value}")
        problems += step_schedule_problems(self)
        if self.width_scaling not in WIDTH_SCALINGS:
            problems.append(
                f"width_scaling must be one of {WIDTH_SCALINGS}, got {self.width_scaling!r}"
            )
        if not (math.isfinite(self.width_ref) and self.width_ref > 0):
            problems.append(f"width_ref must be a finite number > 0, got {self.width_ref}")
        if not (math.isfinite(self.width_scale_max) and self.width_scale_max >= 0):
            problems.append(
                f"width_scale_max must be a finite number >= 0 (0: no cap), got "
                f"{self.width_scale_max}"
            )
        if self.output_norm not in OUTPUT_NORMS:
            problems.append(f"output_norm must be one of {OUTPUT_NORMS}, got {self.output_norm!r}")
        if self.schedule_head < 0:
            problems.append(f"schedule_head must be >= 0 (0: off), got {self.schedule_head}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if problems:
            raise ValueError("MLPLOpt: " + "; ".join(problems))

    @property
    def num_per_param_features(self) -> int:
        return num_moment_features(len(self.momentum_decays))

    @property
    def multiply_adds(self) -> int:
        """Multiply-adds of the per-parameter network per parameter (shared inputs aside)."""
        return network_multiply_adds(
            self.hidden_size, self.hidden_layers, self.num_per_param_features
        )

    @property
    def fused(self) -> bool:
        """Whether updates run fused (`impl`, `lopt.fused.runs_fused`)."""
        return runs_fused(self.impl, self.multiply_adds)

    @property
    def num_shared_features(self) -> int:
        return NUM_PROGRESS_FEATURES

    @property
    def _net(self) -> _PerParamMLP:
        return _PerParamMLP(self.hidden_size, self.hidden_layers)

    def init_meta(self, key: jax.Array) -> MetaParams:
        """Returns fresh meta-parameters: the flax params of the per-parameter MLP, plus the
        learned schedule's under 'schedule_head' when it is on."""
        p = jnp.zeros((1, self.num_per_param_features))
        s = jnp.zeros((self.num_shared_features,))
        # The network keeps the key it always had: θ of earlier versions are reproduced.
        theta = dict(self._net.init(key, p, s)["params"])
        if self.schedule_head:
            theta["schedule_head"] = schedule_head_init(
                jax.random.fold_in(key, 1), self.schedule_head
            )
        return theta

    def optimizer(self, theta: MetaParams) -> Optimizer:
        """Returns the optimizer with meta-parameters `theta`."""
        n_decays = len(self.momentum_decays)
        decays = jnp.asarray(self.momentum_decays, jnp.float32)

        def init(params, num_steps) -> MLPLOptState:
            check_num_steps(num_steps)
            leaves = float_leaves(params)
            return MLPLOptState(
                momenta=[jnp.zeros((n_decays,) + p.shape, jnp.float32) for p in leaves],
                rms=[jnp.zeros(p.shape, jnp.float32) for p in leaves],
                step=jnp.zeros((), jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update(grads, state: MLPLOptState, params, loss=None):
            del loss  # this optimizer does not use the loss
            if self.fused:
                return fused_update(grads, state, params)
            split = split_tree(grads, params, len(state.rms))
            momenta, rms, rows = [], [], []
            for p, g, finite, m, v in zip(
                split.params, split.grads, split.finite, state.momenta, state.rms, strict=True
            ):
                mf = moment_features(p, g, finite, m, v, decays, self.rms_decay)
                momenta.append(mf.momenta)
                rms.append(mf.rms)
                feats = jnp.concatenate(mf.parts)
                rows.append(normalise_rows(feats) if self.feature_norm else feats)
            new_state = MLPLOptState(momenta, rms, state.step + 1, state.num_steps)
            if not split.index:  # no float leaves: nothing to update
                return join_updates(split, []), new_state
            shared = progress_features(state.step, state.num_steps)
            out = _apply_net(theta, jnp.concatenate(rows, axis=1), shared)
            step_mult = step_scale(self, state.step, state.num_steps, self.step_mult)
            raw = out[0] * jnp.exp(self.exp_mult * out[1])
            sizes = [p.size for p in split.params]
            offsets = [sum(sizes[:k]) for k in range(len(sizes))]
            updates = [output(raw[o : o + n]) for o, n in zip(offsets, sizes, strict=True)]
            scales = tensor_scales([p.shape for p in split.params], shared)
            updates = [step_mult * u * sc for u, sc in zip(updates, scales, strict=True)]
            updates = decayed(updates, split.params, state)
            return join_updates(split, updates), new_state

        def output(raw: jax.Array) -> jax.Array:
            """One tensor's network output as the update direction (`output_norm`)."""
            return rms_normalise(raw) if self.output_norm == "rms" else raw

        def decayed(updates: list[Any], params: list[Any], state: MLPLOptState) -> list[Any]:
            """`updates` with the decoupled weight decay (`weight_decay`) added."""
            if not self.weight_decay:
                return updates
            rate = step_scale(self, state.step, state.num_steps, self.weight_decay)
            # the matmul path's updates are flat, the fused path's shaped: follow the update
            return [u - rate * p.reshape(u.shape) for u, p in zip(updates, params, strict=True)]

        def tensor_scales(shapes: list[tuple[int, ...]], shared: jax.Array) -> list[Any]:
            """Each tensor's update multiplier: width scaling times the learned schedule."""
            scales = [
                width_scale(sh, self.width_scaling, self.width_ref, self.width_scale_max)
                for sh in shapes
            ]
            if self.schedule_head:
                tensors = jnp.asarray(tensor_features(shapes))
                head = schedule_head(theta["schedule_head"], shared, tensors)
                scales = [sc * head[t] for t, sc in enumerate(scales)]
            return scales

        def fused_update(grads, state: MLPLOptState, params):
            """`update` with the network fused per tensor (`lopt.fused`)."""
            split = split_tree(grads, params, len(state.rms))
            new_step = state.step + 1
            if not split.index:  # no float leaves: nothing to update
                return join_updates(split, []), MLPLOptState([], [], new_step, state.num_steps)
            shared = progress_features(state.step, state.num_steps)
            n_feats = self.num_per_param_features
            w = theta["w_in"]
            bias = shared @ w[n_feats:] + theta["b_in"]  # the shared features, once per step
            step_mult = step_scale(self, state.step, state.num_steps, self.step_mult)
            scales = tensor_scales([p.shape for p in split.params], shared)
            momenta, rms, updates = [], [], []
            for p, g, raw, finite, m, v, scale in zip(
                split.params,
                split.grads,
                split.raw_grads,
                split.finite,
                state.momenta,
                state.rms,
                scales,
                strict=True,
            ):
                # Where the gradient is not finite the state is kept and the update is 0,
                # whatever the raw gradient gives there: only reductions need it masked,
                # and the elementwise passes then do not read a masked copy (0.5 of 4.3 ms
                # on 900k parameters). An RMS-normalised output is itself a reduction.
                g_elem = raw if self.output_norm == "none" else g
                m, v = advance_moments(g_elem, finite, m, v, decays, self.rms_decay)
                momenta.append(m)
                rms.append(v)
                feats, squares = moment_feature_arrays(p, g, m, v, g_features=g_elem)
                w_feats = w[:n_feats]
                if self.feature_norm:  # normalise_rows, folded into the first layer
                    norms = jax.lax.rsqrt(tensor_sums(squares) / max(p.size, 1) + EPS)
                    w_feats = w_feats * norms[:, None]
                d, mag = elementwise_mlp(theta, feats, w_feats, bias)
                updates.append(step_mult * output(d * jnp.exp(self.exp_mult * mag)) * scale)
            new_state = MLPLOptState(momenta, rms, new_step, state.num_steps)
            return join_updates(split, decayed(updates, split.params, state)), new_state

        return Optimizer(init, update)
