"""A hierarchical learned optimizer: a per-tensor LSTM that steers a per-parameter MLP.

After Metz, Harrison, Freeman, Merchant, Beyer, Bradbury, Agrawal, Poole, Mordatch,
Roberts, Sohl-Dickstein, "VeLO: Training Versatile Learned Optimizers by Scaling Up"
(arXiv:2211.09760, 2022).

Two levels, both shared across every tensor of any parameter tree:

* **Per tensor**, an LSTM (one cell applied to the batch of float tensors, its hidden and
  cell state kept in the optimizer state across steps) reads summary features of the tensor
  (`HierarchicalLOpt.tensor_feature_names`): log magnitudes of the gradient, the momenta,
  the running mean square and the parameters; the gradient's sign agreement with each
  momentum; the tensor's fraction of non-finite gradient entries; the training loss against
  exponential moving averages of its history and against the first loss; training progress
  (`lopt.common.progress_features`); the tensor's rank (one-hot 0..4+), log size and log
  fan-in. Logs are clipped and scaled by 1/10, ratios clipped, so every feature is finite
  and bounded for zero, tiny and huge gradients and for zero, negative or non-finite losses.
  A linear head on the LSTM output gives, per tensor, `num_mix` mixing weights (softmax, or
  linear around the uniform 1/num_mix), a step-size multiplier `exp(r · tanh(z / r))`
  (log-space, bounded by `r = tensor_step_range`, 1 for z = 0) and `num_context` context
  values in [-1, 1].
* **Per parameter**, an MLP whose weights are that tensor's mixture of a bank of `num_mix`
  weight sets (the hypernetwork) reads per-parameter features normalised per tensor, like
  `lopt.mlp_lopt` (parameter, gradient, momenta at each decay, the running mean square,
  momenta / sqrt(rms), gradient / sqrt(rms)), plus the tensor's context values, and outputs
  a direction d and a log-magnitude m. The update is
  `step_mult · mult_tensor · d · exp(exp_mult · m) · s(t) · past_horizon_decay(t)`, with
  `s(t)` the fixed schedule of `lopt.base.step_schedule`.

How the per-parameter MLP runs (both ways compute the same function, feature-major like
`lopt.mlp_lopt._apply_net`):

* Tensors with fewer than `batch_below` entries (biases, norm scales, small kernels) run
  together, as one batched computation over their concatenated parameters. The mixture is
  linear in the weights, so a layer with mixed weights is the mixture of the bank members'
  layers: with `a[k, n]` the mixing weight of the tensor that parameter n belongs to, every
  layer computes `Σ_k a[k, n] · (W_k^T x_n + b_k)` as `num_mix` [out, in] @ [in, N]
  matmuls, accumulated under per-parameter weight rows (each tensor's values broadcast over
  its segment of the concatenation, so nothing per parameter is gathered). This is exact at
  every layer, not only the first: a layer's input is already the mixed network's
  activation, so mixing the layer's outputs equals applying the mixed weights. It costs
  `num_mix` times a single MLP's matmuls, for a number of kernels independent of the number
  of tensors.
* Larger tensors each apply their own mixture of the bank's weights (formed per tensor,
  [num_tensors, in, out]): one [out, in] @ [in, n] matmul per layer and tensor, with the
  tensor's context folded into the first layer's bias. Measured on a 2-core CPU, running
  every tensor through the bank made the whole update 4-5x slower on 1M-parameter models
  (`evaluate.measure.lopt_cost`'s ConvNet: 164x Adam's update time against 41x) and 2.4x slower on
  tensors of 1,024 entries; the per-tensor matmuls' overhead only shows on tiny tensors,
  whose count (and so compile time) the batched path keeps down.

Meta-parameters of the default configuration: 8,847 (LSTM 8,192: 31 tensor features and 32
hidden units, 4 · 32 · (31 + 32 + 1); head 231: 32 → 4 mixing + 1 step + 2 context; bank
424: 4 × (10 · 8 + 8 + 8 · 2 + 2)); `HierarchicalLOpt.num_meta_params` computes it for any
configuration. (9,167 with three momenta, the default before two were measured level at
equal meta-training budget: docs/optimizers.md, "Momenta".)

FLOPs per parameter of one update with three momenta (two do less of each; a multiply-add
counts 2, a compare, square root or exponential 1): about 80 elementwise for the state
update (momenta 9, rms 5), the per-parameter features and their per-tensor normalisation
(37) and the tensor summaries (29); then for a tensor that applies its own weights 2 · (10 ·
8 + 8 · 2) = 192 for the matmuls and about 25 for biases, ReLU and the output, ≈ 300 in all;
for a batched tensor 2 · 4 · (12 · 8 + 8 · 2) = 896 for the bank's matmuls, 2 · 4 · (8 + 2)
= 80 for the mixing and about 55 for biases, ReLU and the output, ≈ 1,100 in all. Per
tensor, the LSTM cell 2 · 128 · (33 + 32) = 16,640, its gates about 200, the head 2 · 32 · 7
= 448 and mixing the bank's weights 2 · 4 · 112 = 896: ≈ 18,200, which on a 1M-parameter MLP
of 6 tensors is 0.1 per parameter.

Numerics follow `lopt.common`: float32 features, state and networks for any float dtype;
non-finite gradient entries get a zero update and stay out of the state; a non-finite loss
is no new information (the loss history is left untouched, the step's loss reads as its
fastest moving average, and a feature flags it); past `num_steps` the update decays as
`num_steps / step`; non-float leaves get zero updates; a tree without float leaves passes
through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt.base import MetaParams, Optimizer, check_num_steps, step_scale, step_schedule_problems
from lopt.common import (
    EPS,
    NUM_PROGRESS_FEATURES,
    advance_moments,
    capped_square,
    ema,
    fan_in,
    float_leaves,
    join_updates,
    moment_feature_arrays,
    moment_features,
    normalise_rows,
    num_moment_features,
    progress_features,
    split_tree,
)
from lopt.fused import (
    IMPLS,
    elementwise_layers,
    network_multiply_adds,
    runs_fused,
    tensor_sums,
)

MIXINGS = ("softmax", "linear")
# Log features are clipped to ±LOG_CLIP (float32 spans e^±88) and scaled by LOG_SCALE, so
# they sit in [-8, 8] whatever the magnitudes; ratios of losses are clipped to ±RATIO_CLIP.
LOG_CLIP = 80.0
LOG_SCALE = 0.1
RATIO_CLIP = 5.0
# Losses below this magnitude count as zero in relative features and logs.
LOSS_FLOOR = 1e-6
MAX_RANK = 4  # ranks 0..3 one-hot, 4 and above share the last slot


class HierarchicalLOptState(NamedTuple):
    """Inner-optimizer state (float32 whatever the parameter dtype).

    Attributes:
      momenta: per float leaf, momenta at every decay stacked on a first axis
        [n_decays, *shape].
      rms: per float leaf, the running mean of squared gradients.
      lstm_h: the per-tensor LSTM's hidden state, [num_float_leaves, lstm_hidden].
      lstm_c: its cell state, [num_float_leaves, lstm_hidden].
      loss_ema: moving averages of the training loss at each of `loss_decays`, started at the
        first finite loss.
      loss_first: the first finite training loss (0 before one was seen).
      loss_seen: 1.0 once a finite loss was seen, else 0.0.
      step: inner step counter (int32).
      num_steps: the training horizon the progress features refer to (int32).
    """

    momenta: Any
    rms: Any
    lstm_h: jax.Array
    lstm_c: jax.Array
    loss_ema: jax.Array
    loss_first: jax.Array
    loss_seen: jax.Array
    step: jax.Array
    num_steps: jax.Array


def _log(x: jax.Array) -> jax.Array:
    """A bounded log feature of a non-negative (possibly overflowed, +inf) magnitude."""
    return LOG_SCALE * jnp.clip(jnp.log(x + 1e-30), -LOG_CLIP, LOG_CLIP)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / |den|, clipped: a relative change that stays bounded when `den` is ~0."""
    return jnp.clip(num / (jnp.abs(den) + LOSS_FLOOR), -RATIO_CLIP, RATIO_CLIP)


def _lstm_cell(theta: MetaParams, x: jax.Array, h: jax.Array, c: jax.Array):
    """One LSTM step on a batch of tensors. x: [T, D]; h, c: [T, H]. Gates: i, f, g, o."""
    gates = x @ theta["wx"] + h @ theta["wh"] + theta["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _bank_layer(layer: MetaParams, x: jax.Array, mix: jax.Array) -> jax.Array:
    """A layer whose weights are each parameter's mixture of the bank's, feature-major.

    Args:
      layer: {"w": [K, in, out], "b": [K, out]}: the bank's weights of this layer.
      x: [in, N] layer input.
      mix: [K, N] each parameter's mixing weights (its tensor's).

    Returns:
      [out, N]: `Σ_k mix[k] · (w[k]^T x + b[k])`, i.e. the layer with mixed weights.
    """
    out = None
    # One 2-D matmul per bank member: a batched einsum over the bank axis, or one
    # [K·out, in] matmul reshaped, did not finish in minutes at 1M parameters on XLA:CPU
    # where these take about 0.1 s.
    for k in range(layer["w"].shape[0]):
        z = jnp.einsum("io,in->on", layer["w"][k], x) + layer["b"][k][:, None]
        out = mix[k] * z if out is None else out + mix[k] * z
    return out


def _bank_layers(bank: MetaParams) -> list[MetaParams]:
    """The bank's layers, input first (a dict `layer_0`, `layer_1`, ... like flax's names)."""
    return [bank[f"layer_{i}"] for i in range(len(bank))]


def _apply_bank(bank: MetaParams, x: jax.Array, mix: jax.Array) -> jax.Array:
    """The mixed per-parameter MLP on feature-major input x [in, N]: returns [2, N]."""
    layers = _bank_layers(bank)
    h = x
    for i, layer in enumerate(layers):
        h = _bank_layer(layer, h, mix)
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def _fused_tensor_inputs(
    p: jax.Array, g: jax.Array, raw: jax.Array, finite: jax.Array, m: jax.Array, v: jax.Array
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """One tensor's per-parameter features (one array each), their normalising factors and
    its summary means, all sums in one reduction (`lopt.fused.tensor_sums`).

    The same numbers as `HierarchicalLOpt._prepare`'s matmul path (`normalise_rows` of
    `moment_features`, and the summaries' means), to float32 rounding.

    Args:
      p: the parameter (float32).
      g: its gradient, non-finite entries zeroed (for the sums).
      raw: its gradient unmasked (for the features: their updates are discarded where the
        gradient is not finite, and the pass then reads no masked copy).
      finite: where the gradient was finite.
      m: [n_decays, *shape] momenta after this step.
      v: the mean square after this step.

    Returns:
      `(features, norms, means)`: the raw features, [features] rsqrt of their mean squares
      (+ eps), and the [5 + 2 * n_decays] summary means.
    """
    feats, squares = moment_feature_arrays(p, g, m, v, g_features=raw)
    n_decays = m.shape[0]
    ms = [m[k] for k in range(n_decays)]
    mid = ms[n_decays // 2]
    summed = [
        jnp.abs(g),
        *(capped_square(x) for x in ms),
        v,
        capped_square(p),
        *(jnp.sign(g) * jnp.sign(x) for x in ms),
        # |mid| · rsqrt, not |mid · rsqrt| (equal: rsqrt > 0): the latter is the feature
        # m · rsqrt(v + eps) itself, which XLA then wrote out to share (0.6 ms at 1M)
        jnp.abs(mid) * jax.lax.rsqrt(EPS + v),
        jnp.where(finite, 0.0, 1.0),
    ]
    means = tensor_sums([*squares, *summed]) / max(g.size, 1)
    n_f = len(feats)
    return feats, jax.lax.rsqrt(means[:n_f] + EPS), means[n_f:]


@dataclasses.dataclass(frozen=True)
class HierarchicalLOpt:
    """Hierarchical learned optimizer (VeLO style): a per-tensor LSTM that mixes a bank of
    per-parameter MLPs and sets each tensor's step size.

    Attributes:
      lstm_hidden: width of the per-tensor LSTM.
      hidden_size: width of the per-parameter MLP.
      hidden_layers: number of hidden layers of the per-parameter MLP.
      num_mix: number of per-parameter MLP weight sets in the bank.
      mixing: 'softmax' (convex mixtures) or 'linear' (1/num_mix + the raw head output).
      num_context: per-tensor context values the LSTM passes to the per-parameter MLP.
      momentum_decays: decays of the momentum features. Two (0.9 and 0.99) by default:
        level with three (0.5, 0.9, 0.99) at equal meta-training budget over two seeds, at
        3.3× Adam's update at 1M parameters instead of 4.1× (docs/optimizers.md, "Momenta").
      rms_decay: decay of the running mean of squared gradients.
      loss_decays: decays of the moving averages of the training loss.
      step_mult: scale of the update (the step of a freshly initialised optimizer).
      exp_mult: scale of the log-magnitude output.
      tensor_step_range: bound r of the per-tensor log step multiplier: the multiplier is in
        [e^-r, e^r].
      step_schedule: 'constant' or 'cosine': the fixed multiplier of the update over the
        declared horizon (`lopt.base.step_schedule`).
      step_schedule_final: the cosine schedule's multiplier at the horizon, in [0, 1].
      batch_below: tensors with fewer entries run together through the bank in one batched
        computation; larger ones apply their own mixed weights (the same function, computed
        faster for them: see the module docstring). 0 applies every tensor's own weights.
        Used by the 'matmul' implementation only.
      impl: how the per-parameter network runs, the same function either way (to float32
        rounding): 'fused' (each tensor's feature norms and summaries in one reduction,
        then its own mixture of the bank's weights applied in one elementwise pass,
        `lopt.fused`), 'matmul' (feature-major matmuls, small tensors batched through the
        bank) or 'auto' (the default): 'fused' for per-parameter networks of at most
        `lopt.fused.FUSED_MAX_MULTIPLY_ADDS`, as for `MLPLOpt`.
    """

    lstm_hidden: int = 32
    hidden_size: int = 8
    hidden_layers: int = 1
    num_mix: int = 4
    mixing: str = "softmax"
    num_context: int = 2
    momentum_decays: Sequence[float] = (0.9, 0.99)
    rms_decay: float = 0.999
    loss_decays: Sequence[float] = (0.9, 0.99)
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    tensor_step_range: float = 3.0
    step_schedule: str = "constant"
    step_schedule_final: float = 0.0
    batch_below: int = 1024
    impl: str = "auto"

    def __post_init__(self):
        problems = []
        if self.impl not in IMPLS:
            problems.append(f"impl must be one of {IMPLS}, got {self.impl!r}")
        for name in ("lstm_hidden", "hidden_size", "hidden_layers", "num_mix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("num_context", "batch_below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        if self.mixing not in MIXINGS:
            problems.append(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        for name in ("momentum_decays", "loss_decays"):
            value = getattr(self, name)
            if not value or not all(0 <= d < 1 for d in value):
                problems.append(f"{name} must be non-empty, each in [0, 1): {value}")
        if not 0 <= self.rms_decay < 1:
            problems.append(f"rms_decay must be in [0, 1), got {self.rms_decay}")
        for name in ("step_mult", "exp_mult", "tensor_step_range"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, got {value}")
        problems += step_schedule_problems(self)
        if problems:
            raise ValueError("HierarchicalLOpt: " + "; ".join(problems))

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
    def tensor_feature_names(self) -> tuple[str, ...]:
        """Names of the LSTM's per-tensor input features, in order."""
        md = [f"{d:g}" for d in self.momentum_decays]
        ld = [f"{d:g}" for d in self.loss_decays]
        return (
            ("log_mean_abs_grad",)
            + tuple(f"log_rms_momentum_{d}" for d in md)
            + ("log_sqrt_mean_rms", "log_rms_param")
            + tuple(f"sign_agreement_{d}" for d in md)
            + ("log_momentum_over_sqrt_rms", "nonfinite_fraction")
            + tuple(f"loss_vs_ema_{d}" for d in ld)
            + tuple(f"ema_{d}_vs_first_loss" for d in ld)
            + ("loss_vs_first_loss", "log_loss", "loss_nonfinite")
            + tuple(f"progress_{i}" for i in range(NUM_PROGRESS_FEATURES))
            + tuple(f"rank_{r}" for r in range(MAX_RANK + 1))
            + ("log_size", "log_fan_in")
        )

    @property
    def _head_size(self) -> int:
        return self.num_mix + 1 + self.num_context  # mixing, log step, context

    @property
    def num_meta_params(self) -> int:
        """The number of meta-parameters (the size of `init_meta`'s pytree)."""
        d, hl, k, hm = (
            len(self.tensor_feature_names),
            self.lstm_hidden,
            self.num_mix,
            self.hidden_size,
        )
        lstm = 4 * hl * (d + hl + 1)
        head = (hl + 1) * self._head_size
        sizes = [self.num_per_param_features + self.num_context]
        sizes += [hm] * self.hidden_layers + [2]
        bank = k * sum((i + 1) * o for i, o in zip(sizes[:-1], sizes[1:], strict=True))
        return lstm + head + bank

    def init_meta(self, key: jax.Array) -> MetaParams:
        """Returns fresh meta-parameters: nested dicts of float32 arrays.

        `{"lstm": {"wx", "wh", "b"}, "head": {"w", "b"}, "bank": {"layer_0": {"w", "b"}, ...}}`
        with bank weights `w` [num_mix, in, out] and biases `b` [num_mix, out].

        The LSTM starts Lecun-normal with zero biases (the forget gate's at 1, to keep the
        per-tensor memory from the start); the head at a tenth of that scale, so a fresh
        optimizer mixes the bank about uniformly with tensor multipliers near 1; the bank so
        that its uniform mixture is Lecun-normal, with zero biases.
        """
        d, hl, k = len(self.tensor_feature_names), self.lstm_hidden, self.num_mix
        keys = iter(jax.random.split(key, 3 + self.hidden_layers + 1))

        def lecun(key, shape, fan):
            return jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan)

        bias = jnp.zeros((4 * hl,), jnp.float32).at[hl : 2 * hl].set(1.0)
        lstm = {
            "wx": lecun(next(keys), (d, 4 * hl), d),
            "wh": lecun(next(keys), (hl, 4 * hl), hl),
            "b": bias,
        }
        head = {
            "w": 0.1 * lecun(next(keys), (hl, self._head_size), hl),
            "b": jnp.zeros((self._head_size,), jnp.float32),
        }
        sizes = [self.num_per_param_features + self.num_context]
        sizes += [self.hidden_size] * self.hidden_layers + [2]
        # Members at sqrt(num_mix) times the Lecun scale: the uniform mixture of a fresh
        # bank, an average of num_mix independent draws, is then at the Lecun scale.
        layers = [
            {
                "w": math.sqrt(k) * lecun(next(keys), (k, i, o), i),
                "b": jnp.zeros((k, o), jnp.float32),
            }
            for i, o in zip(sizes[:-1], sizes[1:], strict=True)
        ]
        bank = {f"layer_{i}": layer for i, layer in enumerate(layers)}
        return {"lstm": lstm, "head": head, "bank": bank}

    def _shape_features(self, shapes: list[tuple[int, ...]]) -> np.ndarray:
        """[T, MAX_RANK + 3]: rank one-hot, scaled log size and log fan-in (static)."""
        rows = []
        for shape in shapes:
            onehot = [0.0] * (MAX_RANK + 1)
            onehot[min(len(shape), MAX_RANK)] = 1.0
            size = max(int(np.prod(shape)), 1)
            rows.append(onehot + [LOG_SCALE * math.log(size), LOG_SCALE * math.log(fan_in(shape))])
        return np.asarray(rows, np.float32).reshape(len(shapes), MAX_RANK + 3)

    def _loss_features(self, loss, state: HierarchicalLOptState):
        """Updates the loss history; returns (features, loss_ema, loss_first, loss_seen)."""
        loss = jnp.asarray(loss, jnp.float32).reshape(())
        finite = jnp.isfinite(loss)
        seen = state.loss_seen > 0
        decays = jnp.asarray(self.loss_decays, jnp.float32)
        # The first finite loss starts the averages (no bias towards an arbitrary zero).
        started = jnp.where(seen, state.loss_ema, loss)
        loss_ema = jnp.where(finite, ema(started, loss, decays, True), state.loss_ema)
        loss_first = jnp.where(finite & ~seen, loss, state.loss_first)
        loss_seen = jnp.where(finite, 1.0, state.loss_seen).astype(jnp.float32)
        # A non-finite loss reads as the fastest average (no change against it), flagged.
        current = jnp.where(finite, loss, loss_ema[0])
        feats = jnp.concatenate(
            [
                _ratio(current - loss_ema, loss_ema),
                _ratio(loss_ema - loss_first, loss_first),
                jnp.stack(
                    [
                        _ratio(current - loss_first, loss_first),
                        _log(jnp.clip(current, LOSS_FLOOR, 1.0 / LOSS_FLOOR)),
                        jnp.where(finite, 0.0, 1.0),
                    ]
                ),
            ]
        )
        return feats, loss_ema, loss_first, loss_seen

    def _prepare(self, grads: Any, state: HierarchicalLOptState, params: Any, loss: Any):
        """The state update and both levels' features (everything but the networks).

        Returns:
          `(split, new_state, rows, x_t)`: the split tree; the new state with the LSTM state
          not yet advanced; per float leaf its normalised per-parameter features
          [num_per_param_features, size] (fused: its raw features, one array each, and
          their normalising factors [num_per_param_features]); the per-tensor LSTM input
          [T, D].
        """
        if loss is None:
            raise ValueError(
                "HierarchicalLOpt reads the training loss: update(grads, state, params, loss)"
            )
        n_decays = len(self.momentum_decays)
        decays = jnp.asarray(self.momentum_decays, jnp.float32)
        split = split_tree(grads, params, len(state.rms))
        loss_feats, loss_ema, loss_first, loss_seen = self._loss_features(loss, state)
        momenta, rms, rows, stats = [], [], [], []
        for p, g, raw, finite, m, v in zip(
            split.params,
            split.grads,
            split.raw_grads,
            split.finite,
            state.momenta,
            state.rms,
            strict=True,
        ):
            if self.fused:
                # the state is kept where the gradient is not finite: no masked copy needed
                m, v = advance_moments(raw, finite, m, v, decays, self.rms_decay)
                momenta.append(m)
                rms.append(v)
                feats, norms, means = _fused_tensor_inputs(p, g, raw, finite, m, v)
                rows.append((feats, norms))
                stats.append(means)
                continue
            mf = moment_features(p, g, finite, m, v, decays, self.rms_decay)
            momenta.append(mf.momenta)
            rms.append(mf.rms)
            rows.append(normalise_rows(jnp.concatenate(mf.parts)))
            _, g_flat, m_flat, v_flat, m_inv, _ = mf.parts
            # Per-tensor summaries: means of these rows. Squares are capped; sums of huge
            # entries may still overflow to +inf (then clipped by `_log`). One reduction per
            # row: XLA fuses them as they read the same inputs (a reduction of the rows'
            # concatenation ran 5x slower, materialising it).
            summed = [
                jnp.abs(g_flat),
                capped_square(m_flat),
                v_flat,
                capped_square(p.reshape(1, -1)),
                jnp.sign(g_flat) * jnp.sign(m_flat),
                jnp.abs(m_inv[n_decays // 2 : n_decays // 2 + 1]),
                jnp.where(finite, 0.0, 1.0).reshape(1, -1),
            ]
            sums = jnp.concatenate([jnp.sum(x, axis=1) for x in summed])
            stats.append(sums / max(g.size, 1))
        new_state = HierarchicalLOptState(
            momenta,
            rms,
            state.lstm_h,
            state.lstm_c,
            loss_ema,
            loss_first,
            loss_seen,
            state.step + 1,
            state.num_steps,
        )
        num_t = len(split.index)
        means = jnp.stack(stats) if stats else jnp.zeros((0, 5 + 2 * n_decays))
        # Magnitudes as logs (of root mean squares for squares); sign agreements and the
        # non-finite fraction as they are.
        kinds = np.asarray([1] + [2] * n_decays + [2, 2] + [0] * n_decays + [1, 0])
        roots = jnp.where(kinds == 2, jnp.sqrt(means), means)
        summaries = jnp.where(kinds > 0, _log(roots), means)
        shared = jnp.concatenate([loss_feats, progress_features(state.step, state.num_steps)])
        x_t = jnp.concatenate(
            [
                summaries,
                jnp.broadcast_to(shared, (num_t, shared.shape[0])),
                jnp.asarray(self._shape_features([p.shape for p in split.params])),
            ],
            axis=1,
        )
        return split, new_state, rows, x_t

    def tensor_features(
        self, grads: Any, state: HierarchicalLOptState, params: Any, loss: Any
    ) -> jax.Array:
        """The per-tensor LSTM input of the update `update(grads, state, params, loss)`.

        Args:
          grads: the gradients, as for the optimizer's `update`.
          state: the optimizer state, as for `update`.
          params: the parameters, as for `update`.
          loss: the loss, as for `update`.

        Returns:
          [num_float_leaves, len(tensor_feature_names)] float32, in `tensor_feature_names`
          order (for inspection: the update computes the same array).
        """
        return self._prepare(grads, state, params, loss)[3]

    def _apply_batched(self, theta, rows, mix, scale, context) -> list[jax.Array]:
        """Flat updates of tensors, all in one batched computation through the bank.

        Args:
          theta: the meta-parameters.
          rows: per tensor, its normalised per-parameter features [features, size].
          mix: [T, num_mix] the tensors' mixing weights.
          scale: [T] the tensors' step sizes (step_mult and schedules included).
          context: [T, num_context] the tensors' context values.

        Returns:
          Per tensor, its float32 update, flat.
        """
        k = self.num_mix
        sizes = [r.shape[1] for r in rows]
        # Per-tensor values broadcast over each tensor's segment of the concatenation.
        per_tensor = jnp.concatenate([mix, scale[:, None], context], axis=1)
        seg = jnp.concatenate(
            [
                jnp.broadcast_to(per_tensor[t][:, None], (per_tensor.shape[1], n))
                for t, n in enumerate(sizes)
            ],
            axis=1,
        )
        x = jnp.concatenate([jnp.concatenate(rows, axis=1), seg[k + 1 :]], axis=0)
        out = _apply_bank(theta["bank"], x, seg[:k])
        step = seg[k] * out[0] * jnp.exp(self.exp_mult * out[1])
        offsets = np.cumsum([0] + sizes)
        return [step[o : o + n] for o, n in zip(offsets[:-1], sizes, strict=True)]

    def _mixed_layers(self, theta, mix, context) -> tuple[list[jax.Array], list[jax.Array]]:
        """Each tensor's own mixture of the bank's layers: ([T, in, out] kernels, [T, out]
        biases) per layer, the context folded into the first layer's bias (it is constant
        over a tensor). Shared by `_apply_direct` and `_apply_fused`."""
        layers = _bank_layers(theta["bank"])
        ws = [jnp.einsum("tk,kio->tio", mix, layer["w"]) for layer in layers]
        bs = [mix @ layer["b"] for layer in layers]
        n_f = self.num_per_param_features
        bs[0] = jnp.einsum("tc,tco->to", context, ws[0][:, n_f:]) + bs[0]
        return ws, bs

    def _apply_direct(self, theta, rows, mix, scale, context) -> list[jax.Array]:
        """Flat updates of tensors, each through its own mixture of the bank's weights.

        Arguments as `_apply_batched`'s.
        """
        ws, bs = self._mixed_layers(theta, mix, context)
        n_f = self.num_per_param_features
        out = []
        for t, x in enumerate(rows):
            h = jnp.einsum("io,in->on", ws[0][t, :n_f], x) + bs[0][t][:, None]
            for j in range(1, len(ws)):
                h = jax.nn.relu(h)
                h = jnp.einsum("io,in->on", ws[j][t], h) + bs[j][t][:, None]
            out.append(scale[t] * h[0] * jnp.exp(self.exp_mult * h[1]))
        return out

    def _apply_fused(self, theta, inputs, mix, scale, context) -> list[jax.Array]:
        """Updates of tensors, each through its own mixture of the bank's weights as one
        elementwise pass (`lopt.fused.elementwise_layers`), its normalising factors and
        context folded into the first layer.

        Args:
          theta: the meta-parameters.
          inputs: per tensor, its raw features (one array each) and their normalising
            factors.
          mix: [T, num_mix] the tensors' mixing weights.
          scale: [T] the tensors' step sizes (step_mult and schedules included).
          context: [T, num_context] the tensors' context values.

        Returns:
          Per tensor, its float32 update, of the parameter's shape.
        """
        ws, bs = self._mixed_layers(theta, mix, context)
        n_f = self.num_per_param_features
        out = []
        for t, (feats, norms) in enumerate(inputs):
            weights = [(ws[0][t, :n_f] * norms[:, None], bs[0][t])]
            weights += [(ws[j][t], bs[j][t]) for j in range(1, len(ws))]
            d, mag = elementwise_layers(weights, feats)
            out.append(scale[t] * d * jnp.exp(self.exp_mult * mag))
        return out

    def optimizer(self, theta: MetaParams) -> Optimizer:
        """Returns the optimizer with meta-parameters `theta`."""
        n_decays = len(self.momentum_decays)
        hl, k = self.lstm_hidden, self.num_mix

        def init(params, num_steps) -> HierarchicalLOptState:
            check_num_steps(num_steps)
            leaves = float_leaves(params)
            return HierarchicalLOptState(
                momenta=[jnp.zeros((n_decays,) + p.shape, jnp.float32) for p in leaves],
                rms=[jnp.zeros(p.shape, jnp.float32) for p in leaves],
                lstm_h=jnp.zeros((len(leaves), hl), jnp.float32),
                lstm_c=jnp.zeros((len(leaves), hl), jnp.float32),
                loss_ema=jnp.zeros((len(self.loss_decays),), jnp.float32),
                loss_first=jnp.zeros((), jnp.float32),
                loss_seen=jnp.zeros((), jnp.float32),
                step=jnp.zeros((), jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update(grads, state: HierarchicalLOptState, params, loss=None):
            split, new_state, rows, x_t = self._prepare(grads, state, params, loss)
            num_t = len(split.index)
            if not num_t:  # no float leaves: nothing to update
                return join_updates(split, []), new_state

            # Per-tensor level: one LSTM step over the batch of tensors.
            h, c = _lstm_cell(theta["lstm"], x_t, state.lstm_h, state.lstm_c)
            head = h @ theta["head"]["w"] + theta["head"]["b"]
            if self.mixing == "softmax":
                mix = jax.nn.softmax(head[:, :k], axis=-1)
            else:
                mix = 1.0 / k + head[:, :k]
            r = self.tensor_step_range
            tensor_mult = jnp.exp(r * jnp.tanh(head[:, k] / r))
            context = jnp.tanh(head[:, k + 1 :])
            new_state = new_state._replace(lstm_h=h, lstm_c=c)

            step_mult = step_scale(self, state.step, state.num_steps, self.step_mult)
            scale = step_mult * tensor_mult
            # Per-parameter level: small tensors batched through the bank, larger ones each
            # with its own mixture of the bank's weights (see the module docstring).
            if self.fused:
                updates = self._apply_fused(theta, rows, mix, scale, context)
                return join_updates(split, updates), new_state
            updates = [None] * num_t
            small = [t for t, p in enumerate(split.params) if p.size < self.batch_below]
            large = [t for t in range(num_t) if t not in small]
            for group, apply in ((small, self._apply_batched), (large, self._apply_direct)):
                if group:
                    index = np.asarray(group)
                    out = apply(
                        theta, [rows[t] for t in group], mix[index], scale[index], context[index]
                    )
                    for t, u in zip(group, out, strict=True):
                        updates[t] = u
            return join_updates(split, updates), new_state

        return Optimizer(init, update)
