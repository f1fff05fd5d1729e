"""Tasks and task families: on-device data, jitted batch sampling, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks.classification import mlp_task
from tasks.datasets import Dataset
from tasks.device_data import to_device
from tasks.family import FamilyConfig, TaskFamily


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
    fam = TaskFamily(
        FamilyConfig(
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
    fam = TaskFamily(
        FamilyConfig(datasets=("a", "wide"), hidden_sizes=((8,), (4, 4)), batch_sizes=(16, 32)),
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
    fam = TaskFamily(FamilyConfig())
    task = fam.sample(jax.random.PRNGKey(0))
    assert task.data.input_shape == (40,) and task.num_classes == 10


def _kinds_config(**kw):
    base = dict(
        kinds=("mlp", "conv", "lm"),
        datasets=("mnist1d",),
        hidden_sizes=((8,),),
        batch_sizes=(8,),
        conv_datasets=("fashion_mnist",),
        conv_channels=((4, 4), (4, 4, 8)),
        conv_strides=((2, 2), (2, 1, 2)),
        conv_batch_sizes=(8,),
        lm_models=("lstm", "transformer"),
        lm_hidden=(8,),
        lm_seq_lens=(8,),
        lm_batch_sizes=(4,),
        activations=("relu", "tanh"),
        init_scale=(0.5, 2.0),
    )
    return FamilyConfig(**{**base, **kw})


@pytest.mark.slow  # keeps the default stage under 10 minutes (it took 9 min 57 s)
def test_a_family_of_every_kind_samples_each_with_traced_numbers():
    from mixed_data import mixed_family  # noqa: PLC0415

    class _C:  # mixed_family reads config.task_family
        task_family = _kinds_config()

    fam = mixed_family(_C)
    assert [t.kind for t in fam.templates] == ["mlp", "conv", "conv", "lm", "lm"]
    assert fam.kinds == ["mlp", "conv", "lm"]
    conv = fam.templates[2]
    assert conv.shape["channels"] == [4, 4, 8] and conv.shape["strides"] == [2, 1, 2]
    # Losses are normalised by the uniform predictor's: ln 3 for the classifiers, ln 256 for
    # the byte-level language models.
    norms = {t.kind: t.sampler.loss_norm for t in fam.templates}
    assert norms == pytest.approx({"mlp": np.log(3), "conv": np.log(3), "lm": np.log(256)})

    @jax.jit
    def first_loss(task, key):
        return task.loss(task.init(key), task.sample_batch(key))

    kinds, per_template = set(), {}
    for i in range(24):
        task, info = fam.sample_with_info(jax.random.PRNGKey(i))
        kinds.add(info["kind"])
        per_template.setdefault(info["template"], set()).add(
            (info.get("activation"), info["init_scale"])
        )
        assert np.isfinite(float(first_loss(task, jax.random.PRNGKey(i))))
    assert kinds == {"mlp", "conv", "lm"}
    # One compilation per template visited, however many tasks of it were drawn.
    assert first_loss._cache_size() == len(per_template)
    assert max(len(v) for v in per_template.values()) > 1


def test_conv_kind_refuses_datasets_that_are_not_images():
    with pytest.raises(ValueError, match="not images"):
        TaskFamily(_kinds_config(kinds=("conv",), conv_datasets=("a",)), [_dataset("a")])


def test_sampler_draws_augmentations_only_when_switched_on_and_they_act_as_stated():
    from tasks.augment import LabelNoise, LossScaled, Reparameterised  # noqa: PLC0415

    data = [_dataset("a")]
    plain = TaskFamily(_kinds_config(kinds=("mlp",), datasets=("a",)), data).templates[0]
    draw = plain.sampler(jax.random.PRNGKey(0))
    assert draw.reparam is None and draw.loss_scale is None and draw.label_noise is None
    assert plain.sampler.task(plain.task, draw) == plain.task.replace(hp=draw.hp)

    cfg = _kinds_config(
        kinds=("mlp",),
        datasets=("a",),
        reparam_scale=(0.1, 10.0),
        loss_scale=(0.2, 5.0),
        label_noise=0.3,
    )
    t = TaskFamily(cfg, data).templates[0]
    draw = t.sampler(jax.random.PRNGKey(1))
    # The base numbers are drawn exactly as without augmentation (held-out tasks unchanged).
    assert jax.tree.map(float, draw.hp) == jax.tree.map(
        float, plain.sampler(jax.random.PRNGKey(1)).hp
    )
    assert draw.reparam.shape == (4,) and bool(
        jnp.all((draw.reparam >= 0.1) & (draw.reparam <= 10))
    )
    assert 0.2 <= float(draw.loss_scale) <= 5.0 and 0 <= float(draw.label_noise) <= 0.3
    task = t.sampler.task(t.task, draw)
    assert isinstance(task, Reparameterised) and isinstance(task.task, LossScaled)
    assert isinstance(task.task.task, LabelNoise)
    # Gradients w.r.t. the trained w = p / c are s · c · ∂L/∂p (on clean labels: one batch
    # of the base task, since label noise only changes which labels are drawn).
    base = t.task.replace(hp=draw.hp)
    key = jax.random.PRNGKey(2)
    p = base.init(key)
    w = task.init(key)
    batch = base.sample_batch(key)
    g_w = jax.grad(task.loss)(w, batch)
    g_p = jax.grad(base.loss)(p, batch)
    s = float(draw.loss_scale)
    for gw, gp, c in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_p), draw.reparam, strict=True):
        # float32 chains of two scalings: 1e-4 relative, plus a floor at the tensor's scale.
        np.testing.assert_allclose(gw, s * float(c) * gp, rtol=1e-4, atol=1e-6 * s * float(c))
    # The meta-loss sees the task's own loss: the scale divided out.
    np.testing.assert_allclose(
        t.sampler.unscaled(draw, task.loss(w, batch)), base.loss(p, batch), rtol=1e-5
    )


@pytest.mark.slow  # ~7 s; the slow stage keeps the default stage under 10 minutes
def test_conv_family_on_colour_cifar10_files_from_the_data_dir(tmp_path, monkeypatch):
    from test_datasets import write_cifar  # noqa: PLC0415 - CIFAR-10 python pickles

    write_cifar(tmp_path / "cifar10")
    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path / "cache"))
    config = _kinds_config(
        kinds=("conv",),
        conv_datasets=("cifar10",),
        grayscale=False,
        data_dir=str(tmp_path),
        valid_size=0.2,
        conv_channels=((4, 4),),
        conv_strides=((2, 2),),
    )
    fam = TaskFamily(config)
    (template,) = fam.templates
    assert template.shape["input"] == [32, 32, 3] and template.datasets == ("cifar10",)
    task, info = fam.sample_with_info(jax.random.PRNGKey(0))
    assert info["kind"] == "conv" and info["dataset"] == "cifar10"
    params = task.init(jax.random.PRNGKey(1))
    assert params["conv0_kernel"].shape == (3, 3, 3, 4)  # colour in, HWIO
    assert np.isfinite(float(task.loss(params, task.sample_batch(jax.random.PRNGKey(2)))))
