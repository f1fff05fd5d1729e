"""A per-parameter network as one elementwise pass: no [features, N] or [hidden, N] buffers.

The per-parameter optimizers of the zoo feed every parameter a row of features, each
normalised by its root mean square over the parameter's tensor, through a small MLP. Written
feature-major (`lopt.mlp_lopt._apply_net`), the features and every hidden layer are
materialised as [width, N] arrays and read back by matmuls: for a narrow network the update
then costs far more memory traffic than the network's arithmetic. Here the same function is
computed in two passes over a tensor:

1. the per-feature sums of squares, in one variadic reduction (`tensor_sums`), so the
   normalising factors are known before any feature is used;
2. the network, unrolled into scalar-weight elementwise operations on per-parameter arrays
   (`elementwise_mlp`), with the normalising factors folded into the first layer's weights
   (``(f_i * s_i) @ W = f_i @ (s_i * W)``). XLA fuses the whole pass, from the optimizer
   state to the update, into one loop: the temporary memory of an update is its outputs.

The result equals the feature-major formulation to float32 rounding (summation order only;
`tests/test_fused.py`). Cost grows with the network's size (hidden × (features + hidden)
multiply-adds per parameter, unrolled at trace time), so small networks gain most; the
choice between the two is measured by `python -m evaluate.measure.lopt_cost`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from lopt.base import MetaParams

# Elements per partial sum of `tensor_sums`: partial sums of this length keep float32
# rounding of a million-element sum near that of a pairwise sum.
_CHUNK = 512


IMPLS = ("auto", "fused", "matmul")
"""How a per-parameter network runs (the `impl` option of the per-parameter kinds)."""

FUSED_MAX_MULTIPLY_ADDS = 600
"""'auto' fuses networks with at most this many multiply-adds per parameter (16×2 with 12
features: 480; 32×2: 1,472). Measured with the 967k-parameter ConvNet of
`python -m evaluate.measure.lopt_cost` (docs/speed.md): fused updates were 3-9× faster than
the matmul path up to 16×2, while 32×2 fused compiled for about 30 s and ran no faster."""


def network_multiply_adds(hidden_size: int, hidden_layers: int, num_features: int) -> int:
    """Multiply-adds per parameter of a per-parameter MLP (shared inputs aside): the first
    layer, the hidden layers and the two outputs."""
    h = hidden_size
    return h * num_features + (hidden_layers - 1) * h * h + 2 * h


def runs_fused(impl: str, multiply_adds: int) -> bool:
    """Whether a kind with option `impl` and a network of `multiply_adds` runs fused:
    'fused' and 'matmul' say so, 'auto' fuses up to `FUSED_MAX_MULTIPLY_ADDS`."""
    if impl == "auto":
        return multiply_adds <= FUSED_MAX_MULTIPLY_ADDS
    return impl == "fused"


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def sums_along(arrays: Sequence[jax.Array], axis: int) -> tuple[jax.Array, ...]:
    """Each of several same-shape arrays summed over `axis`, in one variadic reduction.

    The arrays are read once, in one loop, and their producers (a square, a mask) are fused
    into it, so nothing is written but the sums: a reduction per array would be a pass per
    array, and XLA's CPU reductions write their inputs out before reducing.

    Args:
      arrays: float32 arrays of one shape.
      axis: the axis summed over.

    Returns:
      The sums, one array per input, without `axis`.
    """
    return tuple(
        jax.lax.reduce(
            tuple(arrays),
            tuple(jnp.float32(0) for _ in arrays),
            lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
            (axis,),
        )
    )


@sums_along.defjvp
def _sums_along_jvp(axis, primals, tangents):
    # A sum is linear: its tangent is the sum of the tangents. Written as plain sums, which
    # JAX can transpose; the variadic reduction's own rule neither transposes nor accepts an
    # input whose tangent is symbolically zero (a count of non-finite entries, say).
    (arrays,), (dots,) = primals, tangents
    return sums_along(arrays, axis), tuple(jnp.sum(t, axis) for t in dots)


# Rows per block of `column_sums`' first stage.
_COLUMN_BLOCK = 16


def column_sums(arrays: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """`sums_along(arrays, 0)` for [a, b] arrays, in two stages: blocks of `_COLUMN_BLOCK`
    rows first, then the blocks.

    One reduction over the outer axis walks every column with a stride of a row, which
    XLA's CPU emitter does not vectorise when the reduction is variadic; over a short
    middle axis it runs along the rows (measured on a [1024, 880] kernel: 0.13-0.2 ms
    against 0.38 ms for a gradient's masked square and its count).

    Args:
      arrays: float32 arrays of one shape [a, b].

    Returns:
      The [b] column sums, one per input.
    """
    a = arrays[0].shape[0]
    if a <= 2 * _COLUMN_BLOCK:
        return sums_along(arrays, 0)
    rows = -(-a // _COLUMN_BLOCK) * _COLUMN_BLOCK
    # Zero rows add nothing to a sum.
    blocks = tuple(
        jnp.pad(x, ((0, rows - a), (0, 0))).reshape(rows // _COLUMN_BLOCK, _COLUMN_BLOCK, -1)
        for x in arrays
    )
    return sums_along(sums_along(blocks, 1), 0)


def tensor_sums(arrays: Sequence[jax.Array]) -> jax.Array:
    """The sum of each of several same-size arrays, in one pass over them.

    One variadic reduction (`sums_along`) reads every array once; its inputs are fused into
    it, so a caller passes expressions (squares of features) and nothing is written. It sums
    in two stages, partial sums of `_CHUNK` elements and then their sum, for the accuracy of
    a pairwise sum. For expressions built from row and column factors of a matrix, whose
    structure this flat view hides from XLA, `matrix_sums` is faster.

    Args:
      arrays: k float32 arrays with the same number of elements (any shapes).

    Returns:
      [k] float32 sums.
    """
    n = arrays[0].size
    chunk = _CHUNK if n >= 2 * _CHUNK else max(n, 1)
    rows = -(-n // chunk)
    # Zero padding adds nothing to a sum.
    blocks = tuple(
        jnp.pad(x.reshape(-1), (0, rows * chunk - n)).reshape(rows, chunk) for x in arrays
    )
    # One reduction of the stacked partial sums, not one per array: on small tensors each
    # reduction is a kernel launch, and launches are most of a small tensor's cost.
    partial = jnp.stack(sums_along(blocks, 1))
    return partial[:, 0] if rows == 1 else jnp.sum(partial, axis=1)


def _row_chunk(b: int) -> int | None:
    """The length of the partial sums `matrix_sums` takes along rows of length `b`: the
    whole row up to 2 * `_CHUNK`, else a divisor of `b` near `_CHUNK` (None if none)."""
    if b <= 2 * _CHUNK:
        return max(b, 1)
    for step in range(_CHUNK // 2 + 1):
        for c in (_CHUNK + step, _CHUNK - step):
            if b % c == 0:
                return c
    return None


def matrix_sums(arrays: Sequence[jax.Array], shape: tuple[int, int]) -> jax.Array:
    """`tensor_sums` of expressions over an [a, b] matrix, summed along its rows.

    Expressions made of [a, 1] row factors and [1, b] column factors (AdaFac's features)
    keep their structure in this view: a row factor's arithmetic (a reciprocal square root,
    say) is done once per row, where the flat view of `tensor_sums` repeats it per entry
    (measured 3.7x slower for AdaFac's 16 features on a [1024, 880] kernel). Long rows are
    cut into partial sums of about `_CHUNK` entries, for the accuracy of a pairwise sum; a
    row length without a divisor near that falls back to `tensor_sums`.

    Args:
      arrays: k float32 arrays broadcasting to `shape`.
      shape: the matrix's [a, b].

    Returns:
      [k] float32 sums.
    """
    a, b = shape
    full = [jnp.broadcast_to(x, shape) for x in arrays]
    chunk = _row_chunk(b)
    if chunk is None:
        return tensor_sums(full)
    blocks = tuple(x.reshape(a, b // chunk, chunk) for x in full)
    partial = jnp.stack(sums_along(blocks, 2)).reshape(len(full), -1)
    return partial[:, 0] if partial.shape[1] == 1 else jnp.sum(partial, axis=1)


def _dense(weights: jax.Array, bias: jax.Array, inputs: list[jax.Array]) -> list[jax.Array]:
    """One dense layer unrolled: output j is sum_i weights[i, j] * inputs[i] + bias[j]."""
    return [
        sum(weights[i, j] * x for i, x in enumerate(inputs)) + bias[j]
        for j in range(weights.shape[1])
    ]


def elementwise_mlp(
    theta: MetaParams,
    features: Sequence[jax.Array],
    first_weights: jax.Array,
    first_bias: jax.Array,
) -> list[jax.Array]:
    """The per-parameter network on per-parameter arrays, as elementwise operations.

    The same function as `lopt.mlp_lopt._apply_net` (layer for layer: a ReLU first layer,
    the flax ``Dense_i`` layers of θ, ReLU between them, none after the last), with the
    first layer given separately so a caller can fold per-tensor factors and shared inputs
    into it.

    Args:
      theta: the network's flax params (the ``Dense_i`` layers after the first are used).
      features: the per-parameter inputs, each an array of the parameter's shape (or one
        that broadcasts to it, after the first).
      first_weights: [len(features), hidden] first-layer weights (normalising factors
        folded in).
      first_bias: [hidden] first-layer bias (the shared features' contribution added).

    Returns:
      The last layer's outputs, one array of the parameter's shape each (for the zoo's
      networks: direction and log-magnitude).
    """
    layers = sorted((k for k in theta if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    weights = [(first_weights, first_bias)]
    weights += [(theta[name]["kernel"], theta[name]["bias"]) for name in layers]
    return elementwise_layers(weights, features)


def elementwise_layers(
    layers: Sequence[tuple[jax.Array, jax.Array]], features: Sequence[jax.Array]
) -> list[jax.Array]:
    """An MLP given as its layers' (kernel [in, out], bias [out]), ReLU between layers and
    none after the last, on per-parameter arrays as elementwise operations.

    Differentiable in the weights and the features, forward and reverse: derivatives are
    taken through the feature-major form of the same network (`_feature_major_layers`).
    Transposed, the unrolled form would give every scalar weight its own reduction over
    the tensor, hundreds per tensor per step, and XLA's compile time grows faster than
    their number (a 4×2 network through 3 unrolled inner steps of TBPTT: 117 s against 2 s).

    Args:
      layers: the layers' weights, input first.
      features: the per-parameter inputs (the first of the parameter's shape, the others of
        it or broadcasting to it).

    Returns:
      The last layer's outputs, one array of the parameter's shape each.
    """
    return _unrolled_layers(list(layers), list(features))


@jax.custom_jvp
def _unrolled_layers(
    layers: list[tuple[jax.Array, jax.Array]], features: list[jax.Array]
) -> list[jax.Array]:
    # θ closed over by a user's jit is a constant there, and XLA's constant folding would
    # turn every scalar weight times an array into an array-sized constant (gigabytes for
    # a 32×2 network): the barrier keeps the weights opaque to it, at no cost at run time.
    weights = jax.lax.optimization_barrier(layers)
    h = features
    for i, (kernel, bias) in enumerate(weights):
        h = _dense(kernel, bias, h)
        if i < len(weights) - 1:
            h = [jax.nn.relu(x) for x in h]
    return h


@_unrolled_layers.defjvp
def _unrolled_layers_jvp(primals, tangents):
    # The value stays the unrolled one, so a differentiated update equals an undifferentiated
    # one bit for bit; only the tangents (and so the transposed, reverse-mode pass) go
    # through the feature-major matmuls, whose weight gradients are one matmul per layer.
    _, tangents_out = jax.jvp(_feature_major_layers, primals, tangents)
    return _unrolled_layers(*primals), tangents_out


def _feature_major_layers(
    layers: list[tuple[jax.Array, jax.Array]], features: list[jax.Array]
) -> list[jax.Array]:
    """`_unrolled_layers` as matmuls on the stacked [features, N] rows (same function)."""
    shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in features))
    h = jnp.stack([jnp.broadcast_to(x, shape).reshape(-1) for x in features])
    for i, (kernel, bias) in enumerate(layers):
        h = kernel.T @ h + bias[:, None]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return [row.reshape(shape) for row in h]
