"""Classification tasks: full-split metrics computed in bounded chunks equal the direct,
all-rows-at-once computation, keep the per-dataset masking, and trace under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks.base import chunked_sums
from tasks.classification import TaskHParams, mlp_task
from tasks.device_data import to_device

DIM, CLASSES = 6, 4
# float32 sums of the same numbers in another order (per chunk, then over chunks): the
# relative difference is a few ulps of float32.
TOL = dict(rtol=1e-6, atol=1e-7)


def _splits(seed: int, sizes: tuple[int, int, int]) -> dict:
    rng = np.random.default_rng(seed)

    def make(n):
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        return x, rng.integers(0, CLASSES, n).astype(np.int32)

    return dict(zip(("train", "valid", "test"), map(make, sizes), strict=True))


def _direct(task, params, split: str) -> dict[str, np.ndarray]:
    """The unchunked computation: logits of every row at once, the dataset's rows masked."""
    s = task.data.split(split)
    logits = task.logits(params, s.x)
    rows = jnp.arange(s.y.shape[0])
    first, count = s.offsets[task.hp.dataset], s.counts[task.hp.dataset]
    mask = (rows >= first) & (rows < first + count)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, s.y[:, None], axis=-1)[:, 0]
    correct = jnp.argmax(logits, -1) == s.y
    return {"loss": jnp.sum(nll * mask) / count, "accuracy": jnp.sum(correct * mask) / count}


def test_chunked_sums_equal_direct_sums_for_any_chunk():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(23, 3)).astype(np.float32))

    def fn(batch, rows):
        return {"sq": batch**2, "pos": batch[:, 0] > 0, "rows": rows}

    want_sq, want_pos = float(jnp.sum(x**2)), int(jnp.sum(x[:, 0] > 0))
    for chunk in (1, 5, 23, 100):  # 23 % 5 != 0: the last chunk overlaps the one before
        got = jax.jit(lambda x, c=chunk: chunked_sums(fn, x, c))(x)
        np.testing.assert_allclose(got["sq"], want_sq, **TOL)
        assert int(got["pos"]) == want_pos and got["pos"].dtype == jnp.int32
        assert int(got["rows"]) == sum(range(23))  # every row counted exactly once


def test_chunked_sums_refuses_no_rows():
    with pytest.raises(ValueError, match="chunked_sums needs rows"):
        chunked_sums(lambda b, r: {"s": b}, jnp.zeros((0, 2)), 4)


def test_full_split_metrics_in_chunks_equal_the_direct_computation():
    # Two datasets concatenated; splits of 37 and 29 rows, neither a multiple of the chunks.
    data = to_device([_splits(0, (40, 37, 29)), _splits(1, (30, 11, 9))])
    base = mlp_task(data, [16], CLASSES)
    params = base.init(jax.random.PRNGKey(0))
    # The task is a jit argument: both datasets (a traced index) share each compilation.
    metrics = jax.jit(lambda t, p, split: t.full_split_metrics(p, split), static_argnums=2)
    for dataset in (0, 1):
        hp = TaskHParams(jnp.int32(0), jnp.int32(dataset), jnp.float32(1.0))
        for chunk in (1, 8, 1000):
            task = base.replace(hp=hp, eval_batch_size=chunk)
            for split in ("train", "valid", "test"):
                got = metrics(task, params, split)
                want = _direct(task, params, split)
                assert set(got) == {"loss", "accuracy"}
                np.testing.assert_allclose(got["loss"], want["loss"], **TOL)
                np.testing.assert_allclose(got["accuracy"], want["accuracy"], **TOL)


def test_full_split_metrics_vmap_over_params():
    task = mlp_task(to_device([_splits(2, (40, 37, 29))]), [16], CLASSES).replace(eval_batch_size=8)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    params = jax.vmap(task.init)(keys)
    got = jax.jit(jax.vmap(lambda p: task.full_split_metrics(p, "test")))(params)
    for i in range(3):
        want = _direct(task, jax.tree.map(lambda a, i=i: a[i], params), "test")
        np.testing.assert_allclose(got["loss"][i], want["loss"], **TOL)
        np.testing.assert_allclose(got["accuracy"][i], want["accuracy"], **TOL)
