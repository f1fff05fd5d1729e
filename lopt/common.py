"""Building blocks shared by the learned optimizers of the zoo.

Every learned optimizer here follows the same numerics contract (`lopt.mlp_lopt` documents
it): features, state and networks are float32 whatever the parameter dtype; non-finite
gradient entries get a zero update and stay out of the state; squares of huge gradients are
capped; non-float leaves pass through with zero updates of their own dtype. These helpers
implement that contract once.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-8
# Gradient squares are capped here: accumulators stay below float32's maximum (3.4e38).
MAX_SQUARE = 1e38
# Time scales (in steps) of the tanh(step / s) progress features.
TANH_SCALES = (3.0, 10.0, 30.0, 100.0, 300.0)


def is_float(x: Any) -> bool:
    """Whether `x` is an array of a floating dtype (params and gradients that get updates)."""
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def float_leaves(tree: Any) -> list[jax.Array]:
    """The float leaves of `tree`, in flattening order."""
    return [jnp.asarray(x) for x in jax.tree.leaves(tree) if is_float(x)]


class SplitTree(NamedTuple):
    """A parameter tree split into its float leaves (float32) and the rest.

    Attributes:
      treedef: the parameter tree's structure.
      leaves: every parameter leaf (any dtype), in flattening order.
      index: positions of the float leaves in `leaves`.
      params: the float leaves, as float32.
      grads: their gradients, as float32, non-finite entries set to 0.
      finite: per float leaf, where its gradient was finite.
      raw_grads: their gradients, as float32, unmasked: for elementwise passes whose
        result is discarded where the gradient is not finite (`ema`, `join_updates`), so
        that the masked gradient, which a reduction needs, is not also read there.
    """

    treedef: Any
    leaves: list[Any]
    index: list[int]
    params: list[jax.Array]
    grads: list[jax.Array]
    finite: list[jax.Array]
    raw_grads: list[jax.Array]


def split_tree(grads: Any, params: Any, num_state_leaves: int | None = None) -> SplitTree:
    """Splits `params` and `grads` into float32 float leaves with finite gradients.

    Args:
      grads: the gradient tree (same structure as `params`).
      params: the parameter tree.
      num_state_leaves: the number of float leaves the optimizer state was built for; a
        mismatch raises.

    Raises:
      ValueError: `params` is None, or its float leaves do not match the state's.
    """
    if params is None:
        raise ValueError("a learned optimizer's update needs the current params")
    leaves, treedef = jax.tree.flatten(params)
    g_all = treedef.flatten_up_to(grads)
    index = [i for i, p in enumerate(leaves) if is_float(p)]
    if num_state_leaves is not None and len(index) != num_state_leaves:
        raise ValueError(
            f"params have {len(index)} float leaves, the optimizer state was made "
            f"for {num_state_leaves}: init the state with these params"
        )
    ps, gs, fs, raw = [], [], [], []
    for i in index:
        g = jnp.asarray(g_all[i]).astype(jnp.float32)
        finite = jnp.isfinite(g)
        ps.append(jnp.asarray(leaves[i]).astype(jnp.float32))
        gs.append(jnp.where(finite, g, 0.0))
        fs.append(finite)
        raw.append(g)
    return SplitTree(treedef, leaves, index, ps, gs, fs, raw)


def join_updates(split: SplitTree, updates: list[jax.Array]) -> Any:
    """The update tree: `updates` (float32, one per float leaf) where gradients were finite,
    cast to each parameter's dtype; zeros for non-float leaves."""
    out = [jnp.zeros_like(p) for p in split.leaves]
    for i, u, finite in zip(split.index, updates, split.finite, strict=True):
        p = split.leaves[i]
        out[i] = jnp.where(finite, u.reshape(jnp.shape(p)), 0.0).astype(jnp.asarray(p).dtype)
    return jax.tree.unflatten(split.treedef, out)


def capped_square(g: jax.Array) -> jax.Array:
    """g², capped so that accumulators of it stay finite in float32."""
    return jnp.minimum(jnp.square(g), MAX_SQUARE)


def ema(old: jax.Array, new: jax.Array, decay: Any, finite: jax.Array) -> jax.Array:
    """`decay * old + (1 - decay) * new` where `finite`, `old` elsewhere (broadcasting)."""
    return jnp.where(finite, old * decay + new * (1 - decay), old)


def normalise_rows(x: jax.Array) -> jax.Array:
    """Divides every feature row of [features, n] by its root mean square over the n.

    Inputs are finite (non-finite gradients are masked, squares capped), so a row whose
    mean square overflows float32 (entries beyond ~1e19) becomes zero, never NaN.
    """
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=1, keepdims=True) + EPS)


class MomentFeatures(NamedTuple):
    """One tensor's advanced accumulators and its LOLv2 per-parameter feature rows.

    Attributes:
      momenta: the new momenta, [n_decays, *shape].
      rms: the new running mean of squared gradients, [*shape].
      parts: the raw (unnormalised) feature rows, each [k, size]: parameter, gradient,
        momenta, rms, momenta / sqrt(rms), gradient / sqrt(rms). Concatenated they are the
        [num_moment_features(n_decays), size] per-parameter input.
    """

    momenta: jax.Array
    rms: jax.Array
    parts: tuple[jax.Array, ...]


def num_moment_features(n_decays: int) -> int:
    """Rows of `moment_features`: p, g, n_decays momenta, rms, n_decays ratios, g ratio."""
    return 2 * n_decays + 4


def moment_features(
    p: jax.Array,
    g: jax.Array,
    finite: jax.Array,
    momenta: jax.Array,
    rms: jax.Array,
    decays: jax.Array,
    rms_decay: float,
) -> MomentFeatures:
    """Advances one tensor's momenta and rms by the gradient and builds its feature rows.

    The per-parameter inputs of Metz et al. 2022 ("Practical tradeoffs between memory,
    compute, and performance in learned optimizers"), shared by the per-parameter MLP and
    the hierarchical optimizer's per-parameter level.

    Args:
      p: the parameter (float32).
      g: its gradient, non-finite entries already zeroed (`split_tree`).
      finite: where the gradient was finite; elsewhere the accumulators are kept.
      momenta: [n_decays, *shape] momenta before this step.
      rms: the mean of squared gradients before this step.
      decays: [n_decays] momentum decays.
      rms_decay: decay of the mean of squared gradients.

    Returns:
      The new accumulators and the raw feature rows (`MomentFeatures`).
    """
    n_decays = decays.shape[0]
    m, v = advance_moments(g, finite, momenta, rms, decays, rms_decay)
    inv = jax.lax.rsqrt(v + EPS).reshape(1, -1)
    m_flat, g_flat = m.reshape(n_decays, -1), g.reshape(1, -1)
    parts = (p.reshape(1, -1), g_flat, m_flat, v.reshape(1, -1), m_flat * inv, g_flat * inv)
    return MomentFeatures(m, v, parts)


def advance_moments(
    g: jax.Array,
    finite: jax.Array,
    momenta: jax.Array,
    rms: jax.Array,
    decays: jax.Array,
    rms_decay: float,
) -> tuple[jax.Array, jax.Array]:
    """One tensor's momenta and mean square advanced by its gradient (`moment_features`).

    Args:
      g: the gradient, non-finite entries already zeroed (`split_tree`).
      finite: where the gradient was finite; elsewhere the accumulators are kept.
      momenta: [n_decays, *shape] momenta before this step.
      rms: the mean of squared gradients before this step.
      decays: [n_decays] momentum decays.
      rms_decay: decay of the mean of squared gradients.

    Returns:
      `(momenta, rms)` after this step.
    """
    d = decays.reshape((decays.shape[0],) + (1,) * g.ndim)
    return ema(momenta, g[None], d, finite[None]), ema(rms, capped_square(g), rms_decay, finite)


def moment_feature_arrays(
    p: jax.Array,
    g: jax.Array,
    momenta: jax.Array,
    rms: jax.Array,
    g_features: jax.Array | None = None,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """The raw features of `moment_features` as per-parameter arrays, and their squares.

    The fused per-parameter networks (`lopt.fused`) take the features one array each, in
    the order of `MomentFeatures.parts` (p, g, momenta, rms, momenta / sqrt(rms),
    g / sqrt(rms)), and normalise them by the sums of `squares`. The squares of the ratio
    features are written as m² · (1 / (rms + eps)), not (m · rsqrt(rms + eps))², so the
    reduction and the network share no expensive intermediate and XLA materialises none.

    Args:
      p: the parameter (float32).
      g: its gradient, non-finite entries zeroed.
      momenta: [n_decays, *shape] momenta after this step (`advance_moments`).
      rms: the mean square after this step.
      g_features: the gradient the features use (default `g`): a fused update passes the
        unmasked one, whose non-finite entries' updates are zeroed anyway, so its
        elementwise pass reads no masked copy; the squares, which are summed, use `g`.

    Returns:
      `(features, squares)`: two lists of `num_moment_features(n_decays)` arrays of the
      parameter's shape.
    """
    ms = [momenta[k] for k in range(momenta.shape[0])]
    inv = jax.lax.rsqrt(rms + EPS)
    gf = g if g_features is None else g_features
    features = [p, gf, *ms, rms, *[m * inv for m in ms], gf * inv]
    # one division shared by the five ratio squares: a division per square made the
    # reduction twice as slow on the CPU (2.8 against 1.35 ms on 900k parameters)
    inv_denom = 1.0 / (rms + EPS)
    squares = [p * p, g * g, *[m * m for m in ms], rms * rms]
    squares += [m * m * inv_denom for m in ms] + [g * g * inv_denom]
    return features, squares


def progress_features(step: jax.Array, num_steps: jax.Array) -> jax.Array:
    """Training-progress features: frac, frac², √frac and tanh(step / s) for `TANH_SCALES`.

    The fraction of training done saturates at 1: training on past the declared horizon
    looks like its last step, instead of extrapolating features never seen in meta-training.
    """
    num = jnp.maximum(num_steps.astype(jnp.float32), 1.0)
    frac = jnp.minimum(step.astype(jnp.float32), num) / num
    scales = jnp.asarray(TANH_SCALES)
    return jnp.concatenate([jnp.stack([frac, frac**2, jnp.sqrt(frac)]), jnp.tanh(step / scales)])


NUM_PROGRESS_FEATURES = 3 + len(TANH_SCALES)


def fan_in(shape: tuple[int, ...]) -> int:
    """The fan-in of a parameter tensor: 1 for scalars and vectors (biases, norms), else the
    product of every axis but the last (dense kernels [in, out], conv kernels [h, w, in, out])."""
    if len(shape) < 2:
        return 1
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


WIDTH_SCALINGS = ("none", "fan_in")
OUTPUT_NORMS = ("none", "rms")


def rms_normalise(update: jax.Array) -> jax.Array:
    """`update` divided by its root mean square over the tensor (Celo2's output
    normalisation: Moudgil, Knyazev, Belilovsky, ICLR 2026, arXiv 2602.19142).

    A learned rule normalised this way decides each update's direction and its shape across
    the tensor; the step size is then the schedule's alone, as with an ordinary learning
    rate. An all-zero update stays zero.

    Args:
      update: one tensor's raw update (float32).

    Returns:
      The update with RMS 1 over the tensor (0 where the raw update is all zeros).
    """
    return update * jax.lax.rsqrt(jnp.mean(jnp.square(update)) + EPS * EPS)


def width_scale(shape: tuple[int, ...], kind: str, ref: float, max_scale: float = 0.0) -> float:
    """Width-aware (μP-style) multiplier of a tensor's update.

    'fan_in' multiplies the update of every tensor of rank ≥ 2 by `ref / fan_in` (Thérien et
    al. 2024, "μLO: Compute-Efficient Meta-Generalization of Learned Optimizers", after Yang
    et al.'s μP): an update whose entries have a width-independent size (as a learned
    optimizer's per-tensor-normalised update does) changes a layer's pre-activations by
    ~fan_in times that size, so dividing by fan_in keeps the change the same for a layer
    wider (or an input larger) than those seen in meta-training. Vectors and scalars
    (biases, norm scales) are left alone, as in μP. `ref` is the fan-in at which the
    multiplier is 1; 'none' is 1 everywhere. `max_scale` caps the multiplier of tensors
    narrower than `ref` (1: they keep the rule's own step; 0: no cap).

    Args:
      shape: the parameter tensor's shape (static).
      kind: one of `WIDTH_SCALINGS`.
      ref: the reference fan-in (> 0).
      max_scale: the largest multiplier (> 0), or 0 for none.

    Returns:
      A Python float.
    """
    if kind == "none" or len(shape) < 2:
        return 1.0
    if kind != "fan_in":
        raise ValueError(f"unknown width scaling {kind!r}; known: {WIDTH_SCALINGS}")
    scale = ref / fan_in(shape)
    return min(scale, max_scale) if max_scale > 0 else scale


MAX_RANK_FEATURE = 4  # ranks 0..3 one-hot, 4 and above share the last slot
NUM_TENSOR_FEATURES = MAX_RANK_FEATURE + 1 + 2  # rank one-hot, log size, log fan-in


def tensor_features(shapes: list[tuple[int, ...]]) -> np.ndarray:
    """Static per-tensor features [n_tensors, NUM_TENSOR_FEATURES]: a one-hot of the rank
    (0, 1, 2, 3, >= 4), log(size) / 10 and log(fan-in) / 10 (`fan_in`).

    Args:
      shapes: the float leaves' shapes.

    Returns:
      A float32 NumPy array (a constant under jit: shapes are static).
    """
    rows = []
    for shape in shapes:
        one_hot = [0.0] * (MAX_RANK_FEATURE + 1)
        one_hot[min(len(shape), MAX_RANK_FEATURE)] = 1.0
        size = max(math.prod(shape), 1)
        rows.append(one_hot + [math.log(size) / 10.0, math.log(fan_in(shape)) / 10.0])
    return np.asarray(rows, np.float32).reshape(len(shapes), NUM_TENSOR_FEATURES)


# The learned schedule's log-multiplier is bounded to ±this: at most e³ ≈ 20× up or down.
SCHEDULE_HEAD_BOUND = 3.0


def schedule_head_init(key: jax.Array, hidden: int) -> dict[str, jax.Array]:
    """Meta-parameters of a learned per-tensor step-size schedule (see `schedule_head`).

    The output layer starts at zero, so a fresh head multiplies every update by exactly 1.
    """
    n_in = NUM_PROGRESS_FEATURES + NUM_TENSOR_FEATURES
    w = jax.random.normal(key, (n_in, hidden), jnp.float32) / math.sqrt(n_in)
    return {
        "w1": w,
        "b1": jnp.zeros((hidden,), jnp.float32),
        "w2": jnp.zeros((hidden,), jnp.float32),
        "b2": jnp.zeros((), jnp.float32),
    }


def schedule_head(
    params: dict[str, jax.Array], progress: jax.Array, tensors: jax.Array
) -> jax.Array:
    """Per-tensor step-size multipliers from training progress and what each tensor is.

    A small MLP of [progress features, tensor features] outputs a log-multiplier per tensor,
    bounded to ±`SCHEDULE_HEAD_BOUND` with tanh: the head can anneal late in training (or
    warm up early) and treat kernels and biases differently, and no θ makes a step infinite.

    Args:
      params: from `schedule_head_init`.
      progress: [NUM_PROGRESS_FEATURES] (`progress_features`).
      tensors: [num_tensors, NUM_TENSOR_FEATURES] (`tensor_features` of each tensor).

    Returns:
      [num_tensors] positive multipliers.
    """
    x = jnp.concatenate(
        [jnp.broadcast_to(progress, (tensors.shape[0],) + progress.shape), tensors], 1
    )
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    out = h @ params["w2"] + params["b2"]
    return jnp.exp(SCHEDULE_HEAD_BOUND * jnp.tanh(out / SCHEDULE_HEAD_BOUND))
