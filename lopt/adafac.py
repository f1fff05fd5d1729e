"""AdaFac: a per-parameter MLP learned optimizer with factored second-moment features.

Metz, Freeman, Harrison, Maheswaranathan, Sohl-Dickstein, "Practical tradeoffs between
memory, compute, and performance in learned optimizers" (CoLLAs 2022), the "AdaFac" MLP;
the factored second moment is Adafactor's (Shazeer and Stern, "Adafactor: Adaptive learning
rates with sublinear memory cost", ICML 2018).

Like `lopt.mlp_lopt.MLPLOpt`, a small MLP maps per-parameter features, laid out
feature-major over the whole flattened parameter tree, to a direction d and a log-magnitude
m, and the update is `step_mult * s(t) * a(t) * d * exp(exp_mult * m)`, with `s(t)` the
fixed step schedule (`lopt.base.step_schedule`) and `a(t)` the 1/t decay past the declared
horizon (`lopt.base.past_horizon_decay`). What differs is the second moment: no
per-parameter accumulator is kept. Every tensor is viewed as a matrix [a, b]
(`matrix_shape`: a dense kernel [in, out] as it is, a conv kernel [h, w, in, out] as
[h*w*in, out], a vector [n] as [1, n], a scalar as [1, 1]) and, at each of the
`rms_decays` β, the optimizer keeps

* row accumulators r_i: running means (decay β) of the row's mean squared gradient;
* column accumulators c_j: the same over columns;

and estimates the second moment as v_ij = r_i c_j / mean_i(r_i), exact when the squared
gradients form a rank-one matrix. For a vector or a scalar (a single row) the estimate is
c_j itself: a full accumulator, which is small there.

Per-parameter features, each normalised by its root mean square over the tensor
(`lopt.common.normalise_rows`), with K = len(momentum_decays), R = len(rms_decays), eps =
`lopt.common.EPS` and u_ij = rsqrt(r_i / mean(r) + eps) * rsqrt(c_j + eps) the factored
rsqrt(v):

* the parameter p and the gradient g (2);
* the momenta m_k, running means of g at each momentum decay (K);
* the factored rms sqrt(v_ij) = sqrt(r_i / mean(r)) * sqrt(c_j) at each rms decay (R);
* Adafactor-style normalised momenta m_k * u_ij, with u at the slowest rms decay (K);
* the normalised gradient g * u_ij at each rms decay (R);
* a row feature rsqrt(r_i + eps) and a column feature rsqrt(c_j + eps) at the slowest rms
  decay, the same along the row (column) (2);

F = 2 + 2K + 2R + 2 per-parameter features (16 by default), plus the training-progress
features shared by all parameters (`lopt.common.progress_features`, 8).

Sizes (h = hidden_size, L = hidden_layers):

* meta-parameters: (F + 8)·h + h + (L − 1)·(h² + h) + 2h + 2; the default configuration
  (h = 4, L = 2, K = R = 3) has (16 + 8)·4 + 4 + 20 + 10 = 130
  (`AdaFacLOpt().num_meta_params`; 290 at h = 8, the default before issue 22);
* state: the momenta, 4·K bytes per parameter, plus 4·R·(a + b) bytes per [a, b] tensor for
  the accumulators: 12 bytes per parameter for a large matrix by default (Adam 8, `MLPLOpt`
  20); a vector's entries keep 4·(K + R) bytes each (`AdaFacLOpt.state_bytes`);
* compute per parameter and update: about 2h·(F + (L − 1)·(h + 1) + 3) FLOPs in the
  network, plus about 5F + 3K + 20 for the state and the features: about 300 by default,
  560 with h = 8 (Adam: about 12).

Why 4×2: at equal meta-training budget it trained held-out tasks as well as 8×2 or better
(docs/optimizers.md, "Network size"), and its update costs about a quarter less (on the
project's 2-core CPU, `python -m evaluate.measure.lopt_cost`: 6.1× Adam's against 8.3× at
967k parameters, 2.85× against 3.71× at 10M; docs/speed.md). A checkpoint saves its sizes,
so one trained at 8×2 loads as it was. Since the fused pass sums its features along the rows
of each tensor's matrix view (`lopt.fused.matrix_sums`) and reduces the row and column
accumulators' inputs without writing them out, the default update costs 3.4-4.0× Adam's at
967k parameters and 1.8× at 10M on the same CPU. Three momenta stay: two trained worse at
equal budget (docs/optimizers.md, "Momenta").

Numerics (the contract of `lopt.common`):

* features, state and network are float32 for any float parameter dtype; only the update is
  cast back to the parameter's dtype;
* non-finite gradient entries get a zero update and leave the momenta untouched; the row
  (column) accumulators are updated with the mean squared gradient over the row's
  (column's) finite entries only, and a row (column) with no finite entry keeps its
  accumulators;
* gradient squares are capped (`capped_square`), sums and ratios of accumulators are taken
  so that they neither overflow nor flush to zero, and products of features are clipped to
  float32's range, so state and updates stay finite for gradients up to float32's maximum;
* past `num_steps` the progress features saturate and the update decays as
  `num_steps / step`;
* non-float leaves get zero updates of their own dtype; a tree without float leaves passes
  through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lopt.base import MetaParams, Optimizer, check_num_steps, step_scale, step_schedule_problems
from lopt.common import (
    EPS,
    NUM_PROGRESS_FEATURES,
    capped_square,
    ema,
    float_leaves,
    join_updates,
    normalise_rows,
    progress_features,
    split_tree,
)
from lopt.fused import (
    IMPLS,
    column_sums,
    elementwise_mlp,
    matrix_sums,
    network_multiply_adds,
    runs_fused,
    sums_along,
)
from lopt.mlp_lopt import (
    _apply_net,
    _PerParamMLP,
    hidden_and_output,
)

# Guards divisions by a mean that is zero only when every accumulator of a tensor is zero.
_TINY = 1e-30
_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
# Parameters per block of the network's loop (see `_steps`).
_BLOCK = 8192


class AdaFacLOptState(NamedTuple):
    """Inner-optimizer state (float32 whatever the parameter dtype).

    Every float leaf is viewed as a matrix [a, b] (`matrix_shape`).

    Attributes:
      momenta: per float leaf, the momenta at every momentum decay, [K, *shape].
      rows: per float leaf, the row accumulators at every rms decay, [R, a].
      cols: per float leaf, the column accumulators at every rms decay, [R, b].
      step: inner step counter (int32).
      num_steps: the training horizon the progress features refer to (int32).
    """

    momenta: Any
    rows: Any
    cols: Any
    step: jax.Array
    num_steps: jax.Array


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The [rows, columns] view of a tensor for the factored accumulators.

    Args:
      shape: the tensor's shape.

    Returns:
      (1, 1) for a scalar, (1, n) for a vector [n], else (product of all axes but the last,
      last axis): a dense kernel [in, out] as it is, a conv kernel [h, w, in, out] as
      [h*w*in, out].
    """
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return math.prod(shape[:-1]), int(shape[-1])


def _masked_mean_square(g2: jax.Array, finite: jax.Array, axis: int):
    """The mean of `g2` over the finite entries along `axis`, and whether there were any.

    Summing g2 / n (n the axis length) and rescaling by n / count keeps the sum below the
    cap of `capped_square` where a plain sum of capped squares overflows.
    """
    n = g2.shape[axis]
    # One reduction for both, with the mask and the square fused into it: as separate sums,
    # XLA wrote the mask, the masked gradient and its square out first (measured 1.9 ms of
    # a 5.5 ms update at 967k parameters).
    parts = (g2 * (1.0 / max(n, 1)), finite.astype(jnp.float32))
    total, count = column_sums(parts) if axis == 0 else sums_along(parts, axis)
    return total * (n / jnp.maximum(count, 1.0)), count > 0


def _sqrt_row_ratio(rows: jax.Array) -> jax.Array:
    """sqrt(r_i / mean_i(r_i)) for [R, a] accumulators; zero where all of them are zero.

    Overflow and underflow free for accumulators up to the cap of `capped_square`: the mean
    is a sum of r_i / a (sum(r_i) / a can overflow), and the division happens between square
    roots (XLA's CPU backend divides by multiplying with the reciprocal, and 1 / 1e38 is
    below float32's normal range, flushed to zero).
    """
    mean = jnp.sum(rows * (1.0 / max(rows.shape[1], 1)), axis=1, keepdims=True)
    return jnp.sqrt(rows) * jax.lax.rsqrt(jnp.maximum(mean, _TINY))


def _clip(x: jax.Array) -> jax.Array:
    """Maps the ±inf of an overflowed product of finite features to ±float32 max (then to a
    zero feature row in the normalisation), instead of NaN after normalisation."""
    return jnp.clip(x, -_FLOAT32_MAX, _FLOAT32_MAX)


class _Inputs(NamedTuple):
    """What the features of one tensor, viewed as [a, b], or of a block of it are made of.

    Attributes:
      p: parameters [a, b].
      g: gradients [a, b] (non-finite entries zeroed).
      g_elem: the gradients elementwise passes read: `g`, or in the fused pass the raw
        gradients (not finite where `g` is zeroed; the update is zeroed there anyway).
      m: momenta [K, a, b].
      sr: sqrt(r_i / mean(r)) [R, a, 1].
      sqrt_c: sqrt(c_j) [R, 1, b].
      inv_c: rsqrt(c_j + eps) [R, 1, b].
      inv_r: rsqrt(r_i + eps) at the slowest rms decay [1, a, 1].
    """

    p: jax.Array
    g: jax.Array
    g_elem: jax.Array
    m: jax.Array
    sr: jax.Array
    sqrt_c: jax.Array
    inv_c: jax.Array
    inv_r: jax.Array

    def block(self, r0: jax.Array, c0: jax.Array, rows: int, cols: int) -> _Inputs:
        """The inputs of the [rows, cols] block of the tensor starting at (r0, c0)."""
        ds = jax.lax.dynamic_slice_in_dim
        return _Inputs(
            p=jax.lax.dynamic_slice(self.p, (r0, c0), (rows, cols)),
            g=jax.lax.dynamic_slice(self.g, (r0, c0), (rows, cols)),
            g_elem=jax.lax.dynamic_slice(self.g_elem, (r0, c0), (rows, cols)),
            m=ds(ds(self.m, r0, rows, axis=1), c0, cols, axis=2),
            sr=ds(self.sr, r0, rows, axis=1),
            sqrt_c=ds(self.sqrt_c, c0, cols, axis=2),
            inv_c=ds(self.inv_c, c0, cols, axis=2),
            inv_r=ds(self.inv_r, r0, rows, axis=1),
        )


def _features(x: _Inputs, slow: int) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """The unnormalised per-parameter features of a tensor (or block) viewed as [a, b].

    Args:
      x: the inputs of a tensor or of a block of it.
      slow: index of the slowest rms decay (the one that normalises the momenta).

    Returns:
      `(parts, row, col)`: the per-parameter features as [k, a, b] groups of rows (p, g,
      momenta, factored rms, normalised momenta, normalised gradient), then the row feature
      [1, a, 1] and the column feature [1, 1, b], constant along the other axis (the module
      docstring's order; F rows in all once broadcast).
    """
    u = jax.lax.rsqrt(x.sr * x.sr + EPS) * x.inv_c  # the factored rsqrt(v), [R, a, b]
    parts = [
        x.p[None],
        x.g[None],
        x.m,
        x.sr * x.sqrt_c,
        _clip(x.m * u[slow]),
        _clip(x.g * u),
    ]
    return parts, x.inv_r, x.inv_c[slow][None]


def _feature_matrix(x: _Inputs, slow: int) -> jax.Array:
    """The normalised features of a whole tensor, [F, a * b] (`lopt.common.normalise_rows`)."""
    parts, row, col = _features(x, slow)
    shape = (1,) + x.g.shape
    feats = jnp.concatenate([*parts, jnp.broadcast_to(row, shape), jnp.broadcast_to(col, shape)])
    return normalise_rows(feats.reshape(feats.shape[0], -1))


def _inverse_rms(x: _Inputs, slow: int) -> jax.Array:
    """Per feature row of a whole tensor, the factor `lopt.common.normalise_rows` multiplies
    it by: rsqrt(mean square over the tensor + eps), [F].

    Split from the multiplication so that a large tensor is normalised block by block,
    without its [F, a, b] features ever being materialised whole (see `_steps`).
    """
    parts, row, col = _features(x, slow)
    shape = x.g.shape
    rows = [*parts, jnp.broadcast_to(row, (1,) + shape), jnp.broadcast_to(col, (1,) + shape)]
    return jnp.concatenate(
        [jax.lax.rsqrt(jnp.mean(jnp.square(r), axis=(1, 2)) + EPS) for r in rows]
    )


def _apply_net_to_block(
    theta: MetaParams, x: _Inputs, factors: jax.Array, shared: jax.Array, slow: int
) -> jax.Array:
    """The per-parameter network on a block of a tensor, features normalised by `factors`.

    The same function as `lopt.mlp_lopt._apply_net` on the block's normalised features,
    computed without concatenating them: the first layer is a sum of one matmul per group
    of feature rows (with the normalisation folded into the weights), and the row and
    column features, constant along a block's columns and rows, enter as [hidden, a, 1] and
    [hidden, 1, b] terms. Building the [F, n] feature block was the slower half of the
    update for small networks.

    Args:
      theta: the network's flax params.
      x: the block's inputs ([a, b] view).
      factors: [F] normalisation factors of the whole tensor (`_inverse_rms`).
      shared: [n_shared] progress features.
      slow: index of the slowest rms decay.

    Returns:
      [2, a * b]: direction and log-magnitude per parameter.
    """
    parts, row, col = _features(x, slow)
    a, b = x.g.shape
    n_feats = factors.shape[0]
    w = theta["w_in"][:n_feats] * factors[:, None]  # normalisation folded into the weights
    pre, offset = None, 0
    for part in parts:
        k = part.shape[0]
        term = jnp.einsum("fh,fn->hn", w[offset : offset + k], part.reshape(k, a * b))
        pre = term if pre is None else pre + term
        offset += k
    edges = w[offset][:, None, None] * row + w[offset + 1][:, None, None] * col  # [h, a, b]
    bias = shared @ theta["w_in"][n_feats:] + theta["b_in"]
    h = jax.nn.relu(pre.reshape(-1, a, b) + edges + bias[:, None, None])
    return hidden_and_output(theta, h.reshape(-1, a * b))


def _block_shape(a: int, b: int) -> tuple[int, int]:
    """Rows and columns of the blocks (at most `_BLOCK` entries) that tile an [a, b] tensor:
    whole rows where a row fits, else single rows split evenly."""
    if b <= _BLOCK:
        return min(a, _BLOCK // b), b
    return 1, -(-b // -(-b // _BLOCK))


def _starts(n: int, size: int) -> list[int]:
    """Start offsets of the blocks of `size` covering range(n); the last one is moved back to
    end at n (it overlaps its predecessor, whose values it recomputes identically)."""
    return [min(i, n - size) for i in range(0, n, size)]


def _unblock(blocks: jax.Array, a: int, b: int, rows: int, cols: int) -> jax.Array:
    """The [a, b] tensor from its [n_r, n_c, rows * cols] blocks (laid out by `_starts`)."""
    n_r, n_c = blocks.shape[:2]
    x = blocks.reshape(n_r, n_c, rows, cols).transpose(0, 2, 1, 3)
    x = x.reshape(n_r * rows, n_c * cols)
    # The last block of each axis overlaps the one before: keep its last entries only.
    keep_r, keep_c = a - (n_r - 1) * rows, b - (n_c - 1) * cols
    x = jnp.concatenate([x[: (n_r - 1) * rows], x[n_r * rows - keep_r :]], axis=0)
    return jnp.concatenate([x[:, : (n_c - 1) * cols], x[:, n_c * cols - keep_c :]], axis=1)


def _steps(
    theta: MetaParams,
    inputs: list[_Inputs],
    shared: jax.Array,
    scale: Any,
    exp_mult: float,
    slow: int,
) -> list[jax.Array]:
    """`scale * d * exp(exp_mult * m)` of the per-parameter network for every parameter.

    Up to `_BLOCK` parameters in all, the network (`lopt.mlp_lopt._apply_net`) runs as one
    feature-major matmul on the [F, N] normalised features of every parameter. Beyond, one
    loop runs it on blocks of at most `_BLOCK` parameters: each tensor of at least `_BLOCK`
    entries in tiles of whole rows of its [a, b] view (`_apply_net_to_block`, normalised by
    factors computed beforehand over the whole tensor), the smaller tensors as slices of
    their concatenated [F, n] features. The features of a large tensor are then never
    materialised whole, nor are the [hidden, N] activations. On this project's CPU, the
    fresh memory those took each step (hundreds of megabytes for a million parameters, the
    time mostly spent in page faults) made the update of the default network 2x to 3x
    slower. The result does not depend on the blocking.

    Args:
      theta: the network's flax params.
      inputs: per float leaf, its feature inputs.
      shared: [n_shared] progress features.
      scale: the step multiplier (a scalar).
      exp_mult: scale of the log-magnitude output.
      slow: index of the slowest rms decay.

    Returns:
      Per float leaf, its [a, b] steps.
    """

    def finish(out):
        return scale * out[0] * jnp.exp(exp_mult * out[1])

    shapes = [x.g.shape for x in inputs]
    big = [i for i, (a, b) in enumerate(shapes) if a * b >= _BLOCK]
    small = [i for i in range(len(inputs)) if i not in big]
    sizes = {i: shapes[i][0] * shapes[i][1] for i in small}
    group = [_feature_matrix(inputs[i], slow) for i in small]
    n_small = sum(sizes.values())
    out = {}
    if not big and n_small <= _BLOCK:  # one matmul, no loop
        flat = finish(_apply_net(theta, jnp.concatenate(group, axis=1), shared))
    else:
        # The loop's plan: per block, (branch, first row, first column, first group column).
        branches, plan = [], []
        for i in big:
            a, b = shapes[i]
            rows, cols = _block_shape(a, b)
            factors = _inverse_rms(inputs[i], slow)

            def branch(r0, c0, off, x=inputs[i], rows=rows, cols=cols, factors=factors):
                del off
                out = _apply_net_to_block(theta, x.block(r0, c0, rows, cols), factors, shared, slow)
                return jnp.pad(finish(out), (0, _BLOCK - rows * cols))

            plan += [(len(branches), r, c, 0) for r in _starts(a, rows) for c in _starts(b, cols)]
            branches.append(branch)
        n_group = -(-n_small // _BLOCK)
        if n_group:
            pad = jnp.zeros((group[0].shape[0], n_group * _BLOCK - n_small), jnp.float32)
            matrix = jnp.concatenate([*group, pad], axis=1)

            def group_branch(r0, c0, off):
                del r0, c0
                x = jax.lax.dynamic_slice_in_dim(matrix, off, _BLOCK, axis=1)
                return finish(_apply_net(theta, x, shared))

            plan += [(len(branches), 0, 0, k * _BLOCK) for k in range(n_group)]
            branches.append(group_branch)

        def body(carry, row):
            return carry, jax.lax.switch(row[0], branches, row[1], row[2], row[3])

        _, blocks = jax.lax.scan(body, None, jnp.asarray(plan, jnp.int32))
        first = 0
        for i in big:
            a, b = shapes[i]
            rows, cols = _block_shape(a, b)
            n_r, n_c = len(_starts(a, rows)), len(_starts(b, cols))
            mine = blocks[first : first + n_r * n_c, : rows * cols].reshape(n_r, n_c, -1)
            out[i] = _unblock(mine, a, b, rows, cols)
            first += n_r * n_c
        flat = blocks[first:].reshape(-1)
    offset = 0
    for i in small:
        out[i] = flat[offset : offset + sizes[i]].reshape(shapes[i])
        offset += sizes[i]
    return [out[i] for i in range(len(inputs))]


def _feature_list(x: _Inputs, slow: int) -> list[jax.Array]:
    """`_features`' per-parameter features as one [a, b] expression each (row and column
    features aside): built from [a, 1] and [1, b] factors feature by feature, never as
    [K, a, b] or [R, a, b] stacks, which XLA would write out to feed both the reduction
    and the network."""
    n_rms = x.sr.shape[0]

    def u(r):  # the factored rsqrt(v) at rms decay r
        return jax.lax.rsqrt(x.sr[r] * x.sr[r] + EPS) * x.inv_c[r]

    moms = [x.m[k] for k in range(x.m.shape[0])]
    return [
        x.p,
        x.g,
        *moms,
        *(x.sr[r] * x.sqrt_c[r] for r in range(n_rms)),
        *(_clip(m * u(slow)) for m in moms),
        *(_clip(x.g * u(r)) for r in range(n_rms)),
    ]


def _fused_steps(
    theta: MetaParams,
    inputs: list[_Inputs],
    shared: jax.Array,
    scale: Any,
    exp_mult: float,
    slow: int,
) -> list[jax.Array]:
    """`_steps` with the network fused per tensor (`lopt.fused`): the same function.

    Per tensor, the sums of squares of its features come first, in one reduction
    (`lopt.fused.matrix_sums`; the row and column features, constant along one axis, from
    their [a] and [b] vectors), and are folded into the first layer's weights; then the
    features, the network and the step are one elementwise pass over the [a, b] view, with
    the row and column features entering as [a, 1] and [1, b] broadcasts. Nothing of size
    [F, N] or [hidden, N] is written.

    Args:
      theta: the network's flax params.
      inputs: per float leaf, its feature inputs.
      shared: [n_shared] progress features.
      scale: the step multiplier (a scalar).
      exp_mult: scale of the log-magnitude output.
      slow: index of the slowest rms decay.

    Returns:
      Per float leaf, its [a, b] steps.
    """
    w = theta["w_in"]
    n_feats = w.shape[0] - shared.shape[0]
    bias = shared @ w[n_feats:] + theta["b_in"]  # the shared features, once per step
    steps = []
    for x in inputs:
        a, b = x.g.shape
        row, col = x.inv_r[0], x.inv_c[slow]  # [a, 1] and [1, b]
        # Mean squares over the tensor: a row feature is repeated b times, a column one a.
        # The masked gradient `x.g` has this one reader, so XLA fuses it in, unwritten.
        squares = [jnp.square(f) for f in _feature_list(x, slow)]
        sums = matrix_sums(squares, (a, b)) / (a * b)
        feats = _feature_list(x._replace(g=x.g_elem), slow)
        edge = jnp.stack([jnp.mean(jnp.square(row)), jnp.mean(jnp.square(col))])
        norms = jax.lax.rsqrt(jnp.concatenate([sums, edge]) + EPS)
        d, mag = elementwise_mlp(theta, [*feats, row, col], w[:n_feats] * norms[:, None], bias)
        steps.append(scale * d * jnp.exp(exp_mult * mag))
    return steps


@dataclasses.dataclass(frozen=True)
class AdaFacLOpt:
    """Per-parameter MLP learned optimizer with Adafactor-style factored features (AdaFac).

    See the module docstring for the features, the state, the sizes and the measured cost.

    Attributes:
      hidden_size: width of the per-parameter MLP.
      hidden_layers: number of hidden layers.
      momentum_decays: decays of the per-parameter momenta (K of them).
      rms_decays: decays of the factored row and column accumulators (R of them); the
        largest also normalises the momenta.
      step_mult: scale of the update (the step of a freshly initialised optimizer).
      exp_mult: scale of the log-magnitude output.
      step_schedule: 'constant' or 'cosine': the fixed multiplier of the update over the
        declared horizon (`lopt.base.step_schedule`).
      step_schedule_final: the cosine schedule's multiplier at the horizon, in [0, 1].
      impl: how the network runs, the same function either way (to float32 rounding):
        'fused' (`_fused_steps`: per-tensor reductions, then one elementwise pass),
        'matmul' (`_steps`: feature-major matmuls over blocks of parameters) or 'auto'
        (the default): 'fused' for networks of at most
        `lopt.fused.FUSED_MAX_MULTIPLY_ADDS` per parameter, as for `MLPLOpt`.
    """

    hidden_size: int = 4
    hidden_layers: int = 2
    momentum_decays: Sequence[float] = (0.5, 0.9, 0.99)
    rms_decays: Sequence[float] = (0.9, 0.99, 0.999)
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    step_schedule: str = "constant"
    step_schedule_final: float = 0.0
    impl: str = "auto"

    def __post_init__(self):
        problems = []
        if self.impl not in IMPLS:
            problems.append(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if not (isinstance(self.hidden_size, int) and self.hidden_size >= 1):
            problems.append(f"hidden_size must be an integer >= 1, got {self.hidden_size!r}")
        if not (isinstance(self.hidden_layers, int) and self.hidden_layers >= 1):
            problems.append(f"hidden_layers must be an integer >= 1, got {self.hidden_layers!r}")
        for name in ("momentum_decays", "rms_decays"):
            value = getattr(self, name)
            try:
                decays = tuple(float(d) for d in value)
            except (TypeError, ValueError):
                decays = ()
            if not decays or not all(0 <= d < 1 for d in decays):
                problems.append(f"{name} must be a non-empty sequence, each in [0, 1): {value!r}")
            else:  # hashable and JSON-friendly whatever sequence was given
                object.__setattr__(self, name, decays)
        for name in ("step_mult", "exp_mult"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        problems += step_schedule_problems(self)
        if problems:
            raise ValueError("AdaFacLOpt: " + "; ".join(problems))

    @property
    def num_per_param_features(self) -> int:
        # p, g, momenta, factored rms, normalised momenta, normalised g, row and col features
        return 2 + 2 * len(self.momentum_decays) + 2 * len(self.rms_decays) + 2

    @property
    def num_shared_features(self) -> int:
        return NUM_PROGRESS_FEATURES

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
    def num_meta_params(self) -> int:
        """The number of meta-parameters (floats in θ)."""
        h, n_in = self.hidden_size, self.num_per_param_features + self.num_shared_features
        return n_in * h + h + (self.hidden_layers - 1) * (h * h + h) + 2 * h + 2

    def state_bytes(self, shape: Sequence[int]) -> int:
        """Bytes of optimizer state kept for a float parameter of `shape`.

        Args:
          shape: the parameter's shape.

        Returns:
          4·K·size (momenta) + 4·R·(a + b) (row and column accumulators of the [a, b] view).
        """
        a, b = matrix_shape(shape)
        size = math.prod(shape)
        return 4 * (len(self.momentum_decays) * size + len(self.rms_decays) * (a + b))

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
        n_mom, n_rms = len(self.momentum_decays), len(self.rms_decays)
        mom_decays = jnp.asarray(self.momentum_decays, jnp.float32)
        rms_decays = jnp.asarray(self.rms_decays, jnp.float32)[:, None]
        slow = max(range(n_rms), key=lambda i: self.rms_decays[i])  # the slowest decay

        def init(params, num_steps) -> AdaFacLOptState:
            check_num_steps(num_steps)
            leaves = float_leaves(params)
            views = [matrix_shape(p.shape) for p in leaves]
            return AdaFacLOptState(
                momenta=[jnp.zeros((n_mom,) + p.shape, jnp.float32) for p in leaves],
                rows=[jnp.zeros((n_rms, a), jnp.float32) for a, _ in views],
                cols=[jnp.zeros((n_rms, b), jnp.float32) for _, b in views],
                step=jnp.zeros((), jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update(grads, state: AdaFacLOptState, params, loss=None):
            del loss  # this optimizer does not use the loss
            split = split_tree(grads, params, len(state.momenta))
            momenta, rows, cols, inputs = [], [], [], []
            for p, g, raw, finite, m, r, c in zip(
                split.params,
                split.grads,
                split.raw_grads,
                split.finite,
                state.momenta,
                state.rows,
                state.cols,
                strict=True,
            ):
                a, b = matrix_shape(p.shape)
                d = mom_decays.reshape((n_mom,) + (1,) * g.ndim)
                # The fused pass reads the raw gradient wherever the result is discarded
                # at non-finite entries (the kept momenta, the zeroed update): only the
                # reductions read the masked one, which then is not written (as MLPLOpt).
                g_elem = raw if self.fused else g
                m = ema(m, g_elem[None], d, finite[None])
                # Squared from `g_elem` and masked here, so the row and column reductions
                # compute the mask themselves: the masked gradient keeps one reader (the
                # fused pass's feature sums) and XLA does not write it out.
                fin = finite.reshape(a, b)
                g2 = jnp.where(fin, capped_square(g_elem.reshape(a, b)), 0.0)
                row_ms, row_any = _masked_mean_square(g2, fin, axis=1)
                col_ms, col_any = _masked_mean_square(g2, fin, axis=0)
                r = ema(r, row_ms[None], rms_decays, row_any[None])
                c = ema(c, col_ms[None], rms_decays, col_any[None])
                momenta.append(m)
                rows.append(r)
                cols.append(c)

                # Per-row and per-column quantities stay [R, a, 1] and [R, 1, b]: O(a + b)
                # work, broadcast to [a, b] only inside the features themselves.
                inputs.append(
                    _Inputs(
                        p=p.reshape(a, b),
                        g=g.reshape(a, b),
                        g_elem=g_elem.reshape(a, b),
                        m=m.reshape(n_mom, a, b),
                        sr=_sqrt_row_ratio(r)[:, :, None],
                        sqrt_c=jnp.sqrt(c)[:, None, :],
                        inv_c=jax.lax.rsqrt(c + EPS)[:, None, :],
                        inv_r=jax.lax.rsqrt(r[slow] + EPS)[None, :, None],
                    )
                )
            new_state = AdaFacLOptState(momenta, rows, cols, state.step + 1, state.num_steps)
            if not split.index:  # no float leaves: nothing to update
                return join_updates(split, []), new_state
            scale = step_scale(self, state.step, state.num_steps, self.step_mult)
            shared = progress_features(state.step, state.num_steps)
            run = _fused_steps if self.fused else _steps
            steps = run(theta, inputs, shared, scale, self.exp_mult, slow)
            return join_updates(split, steps), new_state

        return Optimizer(init, update)
