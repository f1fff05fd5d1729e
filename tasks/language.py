"""Byte-level language-model tasks: recurrent (LSTM, GRU, vanilla RNN) and small causal
transformers over a `tasks.text` corpus, with the same interface as classification tasks.

The loss is the mean next-byte cross-entropy in nats; `full_split_metrics` also reports bits
per byte. The corpus lives on the device and sequences are sampled with `jax.random` inside
jit, so a task is a pytree that passes through jit as an argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from tasks.base import KeyedFn, chunked_sums, cross_entropy, scale_weights
from tasks.classification import TaskHParams, apply_activation, check_activations
from tasks.text import VOCAB, TextCorpus, TextSplit, bits_per_byte

RECURRENT_CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}
MODELS = (*RECURRENT_CELLS, "transformer")


class RecurrentLM(nn.Module):
    """Byte embedding, `layers` recurrent layers of `hidden` units, a linear readout."""

    cell: str
    hidden: int
    layers: int = 1
    embed: int = 32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, self.embed)(tokens)
        for _ in range(self.layers):
            x = nn.RNN(RECURRENT_CELLS[self.cell](self.hidden))(x)
        return nn.Dense(VOCAB)(x)


class TransformerLM(nn.Module):
    """Pre-norm causal transformer: byte and learned position embeddings, `layers` blocks of
    self-attention and an MLP (4× wider; its activation picked from `activations` by the
    call's traced `activation` index), a final norm and a linear readout."""

    width: int
    layers: int = 1
    heads: int = 2
    max_len: int = 128
    activations: tuple[str, ...] = ("gelu",)

    @nn.compact
    def __call__(self, tokens: jax.Array, activation: jax.Array | int = 0) -> jax.Array:
        t = tokens.shape[-1]
        x = nn.Embed(VOCAB, self.width)(tokens)
        x = (
            x
            + self.param("positions", nn.initializers.normal(0.02), (self.max_len, self.width))[:t]
        )
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
            h = nn.LayerNorm()(x)
            h = apply_activation(nn.Dense(4 * self.width)(h), activation, self.activations)
            x = x + nn.Dense(self.width)(h)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


class LanguageModelTask(struct.PyTreeNode):
    """Next-byte prediction on a corpus's splits.

    Attributes:
      train, valid, test: the splits on the device.
      hp: per-task numbers: init scale (weight matrices and embeddings) and the transformer's
        activation index (traced; the dataset index is unused).
      init_fn: `init_fn(key, tokens) -> params` (static).
      apply_fn: `apply_fn(params, tokens, hp) -> logits` (static).
      batch_size, seq_len: training batch shape (static).
      num_classes: 256 (bytes).
      eval_batch_size: windows per chunk of `full_split_metrics` (static).
    """

    train: TextSplit
    valid: TextSplit
    test: TextSplit
    hp: TaskHParams
    init_fn: Callable[..., Any] = struct.field(pytree_node=False)
    apply_fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False, default=32)
    seq_len: int = struct.field(pytree_node=False, default=64)
    num_classes: int = struct.field(pytree_node=False, default=VOCAB)
    eval_batch_size: int = struct.field(pytree_node=False, default=64)

    def init(self, key: jax.Array) -> Any:
        tokens = jnp.zeros((1, self.seq_len), jnp.int32)
        return scale_weights(self.init_fn(key, tokens), self.hp.init_scale)

    def split(self, name: str) -> TextSplit:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'valid' or 'test'")
        return getattr(self, name)

    def sample_batch(self, key: jax.Array, split: str = "train"):
        return self.split(split).sample(key, self.batch_size, self.seq_len)

    def loss(self, params: Any, batch) -> jax.Array:
        x, y = batch
        logits = self.apply_fn(params, x, self.hp)
        return cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def metrics(self, params: Any, batch) -> dict[str, jax.Array]:
        x, y = batch
        logits = self.apply_fn(params, x, self.hp).reshape(-1, VOCAB)
        loss = cross_entropy(logits, y.reshape(-1))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y.reshape(-1))
        return {"loss": loss, "accuracy": accuracy, "bits_per_byte": bits_per_byte(loss)}

    def full_split_metrics(self, params: Any, split: str) -> dict[str, jax.Array]:
        """Metrics over every non-overlapping window of `seq_len + 1` bytes of the split.

        Computed `eval_batch_size` windows at a time (`chunked_sums`): the [windows,
        seq_len, 256] logits of a whole split never exist at once.

        Args:
          params: the model's parameters.
          split: 'train', 'valid' or 'test'.

        Returns:
          {'loss': mean next-byte cross-entropy in nats, 'accuracy': share of bytes
          predicted exactly, 'bits_per_byte': the loss in bits}.
        """
        data = self.split(split).data
        n = (data.shape[0] - 1) // self.seq_len
        x = data[: n * self.seq_len].reshape(n, self.seq_len)
        y = data[1 : n * self.seq_len + 1].reshape(n, self.seq_len)

        def per_window(batch, rows):
            del rows  # every window counts
            xb, yb = batch
            logits = self.apply_fn(params, xb, self.hp)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, yb[..., None], axis=-1)[..., 0]
            return {"nll": nll, "correct": jnp.argmax(logits, -1) == yb}

        sums = chunked_sums(per_window, (x, y), self.eval_batch_size)
        loss = sums["nll"] / (n * self.seq_len)
        accuracy = sums["correct"] / (n * self.seq_len)
        return {"loss": loss, "accuracy": accuracy, "bits_per_byte": bits_per_byte(loss)}


def lm_task(
    corpus: TextCorpus,
    model: str = "lstm",
    *,
    hidden: int = 64,
    layers: int = 1,
    batch_size: int = 32,
    seq_len: int = 64,
    heads: int = 2,
    activations: tuple[str, ...] | list[str] = ("gelu",),
    eval_batch_size: int = 64,
    hp: TaskHParams | None = None,
) -> LanguageModelTask:
    """A byte-level language-model task.

    Args:
      corpus: the text (`tasks.text.load_text`).
      model: 'lstm', 'gru', 'rnn' (recurrent, `hidden` units per layer) or 'transformer'
        (width `hidden`, `heads` heads, learned positions up to `seq_len`).
      hidden: recurrent units or transformer width.
      layers: recurrent layers or transformer blocks.
      batch_size: training batch size (sequences).
      seq_len: training sequence length (bytes).
      heads: attention heads (transformer).
      activations: names the traced `hp.activation` picks from for the transformer's MLP
        (recurrent cells keep their own nonlinearities).
      eval_batch_size: windows per chunk of `full_split_metrics` (bounds its memory).
      hp: per-task numbers; defaults to activation 0, init scale 1.

    Returns:
      The task.
    """
    check_activations(activations)
    if model in RECURRENT_CELLS:
        module: nn.Module = RecurrentLM(model, hidden, layers)
    elif model == "transformer":
        module = TransformerLM(
            hidden, layers, heads, max_len=seq_len, activations=tuple(activations)
        )
    else:
        raise ValueError(f"unknown language model {model!r}; known: {', '.join(MODELS)}")

    def init_fn(key, tokens):
        return module.init(key, tokens)["params"]

    def apply_fn(params, tokens, hp):
        if model == "transformer":
            return module.apply({"params": params}, tokens, hp.activation)
        return module.apply({"params": params}, tokens)

    splits = {k: TextSplit.from_bytes(v) for k, v in corpus.splits.items()}
    return LanguageModelTask(
        **splits,
        hp=TaskHParams.default() if hp is None else hp,
        init_fn=KeyedFn(init_fn, ("lm-init", module)),
        apply_fn=KeyedFn(apply_fn, ("lm-apply", module)),
        batch_size=batch_size,
        seq_len=seq_len,
        eval_batch_size=eval_batch_size,
    )
