"""Tasks and task families: on-device data, jitted batch sampling, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks.classification import mlp_task
from tasks.datasets import Dataset
from tasks.device_data import to_device
from tasks.family import MLPFamilyConfig, MLPTaskFamily


def _blobs(n, d=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, d)) * 3
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y.astype(np.int32)


def _dataset(name, seed=0, d=12):
    return Dataset(
        name,
        {
            "train": _blobs(300, d, seed=seed),
            "valid": _blobs(50, d, seed=seed + 1),
            "test": _blobs(50, d, seed=seed + 2),
        },
        3,
        "test",
    )


def test_k_step_unroll_is_one_scan_with_batches_sampled_inside():
    data = to_device([_dataset("a").splits])
    task = mlp_task(data, [16], 3, batch_size=32)
    params = task.init(jax.random.PRNGKey(0))

    @jax.jit
    def unroll(params, key):
        def step(p, k):
            loss, g = jax.value_and_grad(task.loss)(p, task.sample_batch(k))
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), loss

        return jax.lax.scan(step, params, jax.random.split(key, 100))

    _, losses = unroll(params, jax.random.PRNGKey(1))
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    # The jaxpr holds a single scan and no per-step Python: the data is an argument.
    text = str(jax.make_jaxpr(unroll)(params, jax.random.PRNGKey(1)))
    assert text.count(" scan[") == 1 and "length=100" in text


def test_sampling_tasks_of_equal_shapes_does_not_recompile():
    fam = MLPTaskFamily(
        MLPFamilyConfig(
            datasets=("a", "b"), activations=("relu", "tanh", "gelu"), init_scale=(0.5, 2.0)
        ),
        [_dataset("a", 0), _dataset("b", 10)],
    )
    assert fam.num_templates == 1 and fam.dataset_groups == [["a", "b"]]

    @jax.jit
    def first_loss(task, key):
        return task.loss(task.init(key), task.sample_batch(key))

    seen = set()
    for i in range(12):
        task, info = fam.sample_with_info(jax.random.PRNGKey(i))
        seen.add((info["dataset"], info["activation"]))
        assert np.isfinite(float(first_loss(task, jax.random.PRNGKey(i))))
    assert len(seen) > 3  # varied tasks...
    assert first_loss._cache_size() == 1  # ...one compilation


def test_shape_choices_become_templates_and_dataset_index_is_respected():
    fam = MLPTaskFamily(
        MLPFamilyConfig(datasets=("a", "wide"), hidden_sizes=((8,), (4, 4)), batch_sizes=(16, 32)),
        [_dataset("a", 0), _dataset("wide", 5, d=20)],
    )
    # two input shapes × two widths × two batch sizes
    assert fam.num_templates == 8
    shapes = {(t.task.batch_size, t.task.data.input_shape) for t in fam.templates}
    assert shapes == {(16, (12,)), (32, (12,)), (16, (20,)), (32, (20,))}
    task = fam.templates[0].task
    x, _ = task.sample_batch(jax.random.PRNGKey(0), "test")
    assert x.shape == (task.eval_batch_size, 12)


def test_full_split_metrics_cover_only_the_tasks_dataset():
    datasets = [_dataset("a", 0), _dataset("b", 10)]
    data = to_device([d.splits for d in datasets])
    task = mlp_task(data, [8], 3)
    params = task.init(jax.random.PRNGKey(0))
    got = [
        task.replace(hp=task.hp.replace(dataset=jnp.int32(i))).full_split_metrics(params, "test")
        for i in range(2)
    ]
    assert float(got[0]["loss"]) != pytest.approx(float(got[1]["loss"]))
    for ds, m in zip(datasets, got, strict=True):
        # Reference: cross-entropy and accuracy in float64 over that dataset's rows only.
        x, y = ds.splits["test"]
        logits = np.asarray(task.logits(params, jnp.asarray(x)), np.float64)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        # float32 log-softmax and a masked mean over 50 rows: rtol=1e-5.
        np.testing.assert_allclose(m["loss"], -logp[np.arange(len(y)), y].mean(), rtol=1e-5)
        acc = np.mean(logits.argmax(axis=1) == y)
        np.testing.assert_allclose(m["accuracy"], acc, rtol=1e-6)  # a float32 ratio of counts


def test_default_family_builds_offline_from_mnist1d():
    fam = MLPTaskFamily(MLPFamilyConfig())
    task = fam.sample(jax.random.PRNGKey(0))
    assert task.data.input_shape == (40,) and task.num_classes == 10
