"""Byte-level language-model tasks: every model kind trains, with Adam and with the learned
optimizer, through the same `train` loop the evaluation uses; metrics are consistent."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evaluate.suite import train
from lopt.export import load_optax
from tasks.language import MODELS, lm_task
from tasks.text import TextCorpus, split_blocks

ROOT = Path(__file__).resolve().parents[1]


def _corpus() -> TextCorpus:
    # Short repetitive text: a model that learns anything lowers the loss fast.
    text = b"the quick brown fox jumps over the lazy dog. " * 120
    return TextCorpus("tiny", split_blocks(np.frombuffer(text, np.uint8)), "test")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_kind_trains_with_adam(model):
    task = lm_task(_corpus(), model, hidden=32, batch_size=8, seq_len=16)
    out = train(task, optax.adam(1e-2), 60, jax.random.PRNGKey(0), 60)
    curve = np.asarray(out["train_curve"])
    assert not bool(out["diverged"])
    # A fresh model predicts bytes about uniformly: ln 256 = 5.55 nats, give or take the
    # spread of its initial logits (the transformer's start at ~6.0).
    assert abs(curve[0] - math.log(256)) < 1.0
    assert curve[-10:].mean() < 0.6 * curve[:5].mean()


@pytest.mark.parametrize(
    "model",
    # the GRU in the slow stage (keeps the default stage under 10 minutes)
    [pytest.param("gru", marks=pytest.mark.slow), "transformer"],
)
def test_the_shipped_learned_optimizer_trains_a_language_model(model):
    # Meta-trained on MNIST-1D MLPs only: a language model is far outside its family.
    tx, _, _ = load_optax(str(ROOT / "checkpoints" / "mnist1d-mlp-pes"), num_steps=100)
    task = lm_task(_corpus(), model, hidden=32, batch_size=8, seq_len=16)
    out = train(task, tx, 100, jax.random.PRNGKey(1), 100)
    curve = np.asarray(out["train_curve"])
    assert not bool(out["diverged"]) and curve[-10:].mean() < curve[:5].mean() - 0.2


def test_full_split_metrics_are_next_byte_cross_entropy_in_bits():
    task = lm_task(_corpus(), "rnn", hidden=16, batch_size=4, seq_len=8)
    params = task.init(jax.random.PRNGKey(0))
    m = task.full_split_metrics(params, "valid")
    # Independent: windows of the valid split, log-softmax by hand, float64.
    data = np.asarray(task.valid.data)
    n = (len(data) - 1) // 8
    x, y = data[: n * 8].reshape(n, 8), data[1 : n * 8 + 1].reshape(n, 8)
    logits = np.asarray(task.apply_fn(params, jnp.asarray(x), task.hp), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, y[..., None], -1).mean()
    # float32 log-softmax over 256 classes against float64: rtol 1e-5.
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["bits_per_byte"]), want / math.log(2), rtol=1e-5)


@pytest.mark.slow  # keeps the default stage under 10 minutes (it took 9 min 57 s)
def test_full_split_metrics_in_chunks_equal_the_direct_computation():
    base = lm_task(_corpus(), "gru", hidden=8, batch_size=4, seq_len=8)
    params = base.init(jax.random.PRNGKey(2))
    # Direct: the model on every window of the split at once, through `metrics`.
    data = base.valid.data
    n = (data.shape[0] - 1) // 8
    assert n % 5 != 0  # the last chunk of 5 windows is a partial one
    windows = (data[: n * 8].reshape(n, 8), data[1 : n * 8 + 1].reshape(n, 8))
    want = base.metrics(params, windows)
    metrics = jax.jit(lambda t, p: t.full_split_metrics(p, "valid"))
    for chunk in (1, 5, 64):
        got = metrics(base.replace(eval_batch_size=chunk), params)
        assert set(got) == {"loss", "accuracy", "bits_per_byte"}
        for k in got:
            # Same float32 numbers summed in another order (per chunk, then over chunks).
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
    # vmapped over parameters (as the evaluation vmaps seeds and learning rates).
    stacked = jax.vmap(base.init)(jax.random.split(jax.random.PRNGKey(3), 2))
    task = base.replace(eval_batch_size=5)
    got = jax.jit(jax.vmap(lambda p: task.full_split_metrics(p, "valid")))(stacked)
    for i in range(2):
        want = base.metrics(jax.tree.map(lambda a, i=i: a[i], stacked), windows)
        np.testing.assert_allclose(got["loss"][i], want["loss"], rtol=1e-6)
        np.testing.assert_allclose(got["accuracy"][i], want["accuracy"], rtol=1e-6)


def test_tasks_of_equal_shapes_share_one_compilation():
    a = lm_task(_corpus(), "lstm", hidden=16, batch_size=4, seq_len=8)
    b = lm_task(_corpus(), "lstm", hidden=16, batch_size=4, seq_len=8)
    f = jax.jit(lambda t, k: t.loss(t.init(k), t.sample_batch(k)))
    f(a, jax.random.PRNGKey(0))
    f(b, jax.random.PRNGKey(1))
    assert f._cache_size() == 1


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown language model"):
        lm_task(_corpus(), "mamba")
