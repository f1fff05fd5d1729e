"""Task augmentations change the optimizer's view exactly as stated, not the function."""

import jax
import jax.numpy as jnp
import numpy as np

from tasks.augment import LabelNoise, LossScaled, Reparameterised
from tasks.classification import mlp_task
from tasks.device_data import to_device

NUM_CLASSES = 5


def _task():
    rng = np.random.default_rng(0)

    def split(n):
        return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, NUM_CLASSES, n)

    data = to_device([{"train": split(512), "valid": split(64), "test": split(64)}])
    return mlp_task(data, [8], NUM_CLASSES, batch_size=4096)


def test_reparameterisation_scales_each_tensors_gradient_by_its_c():
    task = _task()
    aug = Reparameterised.sample(task, jax.random.PRNGKey(0), 1e-2, 1e2)
    scales = jax.tree.leaves(aug.scales)
    assert len(set(float(c) for c in scales)) == len(scales)  # one scale per tensor
    assert all(1e-2 <= float(c) <= 1e2 for c in scales)
    key = jax.random.PRNGKey(1)
    w = aug.init(key)
    p = task.init(key)
    # The same function: w·c are the task's initial parameters, and the losses agree.
    for a, b in zip(jax.tree.leaves(aug.to_task_params(w)), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # (p/c)·c: two float32 roundings
    batch = task.sample_batch(key)
    np.testing.assert_allclose(aug.loss(w, batch), task.loss(p, batch), rtol=1e-6)
    # ∂L/∂w = c · ∂L/∂p, tensor by tensor.
    g_w = jax.grad(aug.loss)(w, batch)
    g_p = jax.grad(task.loss)(p, batch)
    for gw, gp, c in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_p), scales, strict=True):
        np.testing.assert_allclose(gw, c * gp, rtol=1e-4, atol=1e-7 * float(c))
    m_aug, m_task = aug.full_split_metrics(w, "valid"), task.full_split_metrics(p, "valid")
    np.testing.assert_allclose(m_aug["loss"], m_task["loss"], rtol=1e-6)


def test_loss_scaling_scales_gradients_not_metrics():
    task = _task()
    aug = LossScaled(task, jnp.float32(37.0))
    key = jax.random.PRNGKey(2)
    params = aug.init(key)
    batch = aug.sample_batch(key)
    g_aug = jax.grad(aug.loss)(params, batch)
    g = jax.grad(task.loss)(params, batch)
    for a, b in zip(jax.tree.leaves(g_aug), jax.tree.leaves(g), strict=True):
        # Gradients are float32 sums over 4,096 examples computed in another order (the
        # scale enters before the reduction): 1e-5 of each tensor's gradient scale.
        scale = 37.0 * float(jnp.abs(b).max())
        np.testing.assert_allclose(a, 37.0 * b, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(
        aug.full_split_metrics(params, "test")["loss"],
        task.full_split_metrics(params, "test")["loss"],
    )


def test_label_noise_replaces_the_stated_fraction_of_training_labels():
    task = _task()
    key = jax.random.PRNGKey(3)
    k_batch = jax.random.split(key, 3)[0]
    _, clean = task.sample_batch(k_batch)
    for fraction in (0.0, 0.3, 1.0):
        aug = LabelNoise(task, jnp.float32(fraction))
        x, y = aug.sample_batch(key)
        changed = float(np.mean(np.asarray(y) != np.asarray(clean)))
        # A replaced label is uniform, so it equals the clean one with probability 1/K:
        # the changed fraction is fraction·(1 − 1/K), within ±0.03 on 4,096 labels.
        np.testing.assert_allclose(changed, fraction * (1 - 1 / NUM_CLASSES), atol=0.03)
        assert set(np.unique(np.asarray(y))) <= set(range(NUM_CLASSES))
    # Validation batches are never noisy.
    noisy = LabelNoise(task, jnp.float32(1.0))
    _, y_valid = noisy.sample_batch(key, "valid")
    _, y_clean = task.sample_batch(k_batch, "valid")
    np.testing.assert_array_equal(y_valid, y_clean)
