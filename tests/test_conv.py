"""The im2col convolution computes XLA's convolution; the ConvNet built on it trains."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evaluate.suite import train
from lopt.export import load_optax
from tasks.conv import ConvNet, conv2d, conv_task, same_padding, xla_conv2d
from tasks.device_data import to_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "hw, k, stride, cin, cout, padding",
    [
        ((28, 28), 3, 1, 1, 8, "SAME"),
        ((28, 28), 3, 2, 4, 16, "SAME"),
        ((32, 32), 5, 2, 3, 8, "SAME"),
        ((9, 7), 4, 3, 2, 5, "SAME"),  # even kernel, odd sizes: asymmetric padding
        ((28, 28), 3, 2, 3, 4, "VALID"),
        ((8, 8), 1, 1, 6, 3, "SAME"),
    ],
)
def test_conv2d_is_xlas_convolution(hw, k, stride, cin, cout, padding):
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, *hw, cin))
    kernel = jax.random.normal(kk, (k, k, cin, cout))

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    np.testing.assert_array_equal(xla_conv2d(x, kernel, stride, padding), reference(x, kernel))

    want = reference(x, kernel)
    got = conv2d(x, kernel, stride, padding)
    assert got.shape == want.shape
    # Sums of k·k·C_in float32 products in another order: relative 1e-5 of the output scale.
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    # And the same gradients (what meta-training differentiates).
    g_got = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, stride, padding))), (0, 1))(
        x, kernel
    )
    g_want = jax.grad(lambda x, w: jnp.sum(jnp.sin(reference(x, w))), (0, 1))(x, kernel)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_same_padding_matches_xla_output_sizes():
    for size in range(1, 20):
        for k in (1, 2, 3, 5):
            for s in (1, 2, 3):
                lo, hi = same_padding(size, k, s)
                assert (size + lo + hi - k) // s + 1 == -(-size // s)
                assert 0 <= hi - lo <= 1


def test_convnet_params_are_flax_conv_params_and_give_the_same_logits():
    net = ConvNet(channels=(8, 16), kernel_sizes=(3, 3), strides=(2, 2), num_classes=10)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
    params = net.init(jax.random.PRNGKey(2), x)["params"]

    class FlaxConvNet(nn.Module):  # the same network with flax's convolution
        @nn.compact
        def __call__(self, x):
            for c in (8, 16):
                x = jax.nn.relu(nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME")(x))
            return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

    flax_params = {
        "Conv_0": {"kernel": params["conv0_kernel"], "bias": params["conv0_bias"]},
        "Conv_1": {"kernel": params["conv1_kernel"], "bias": params["conv1_bias"]},
        "Dense_0": params["Dense_0"],
    }
    want = FlaxConvNet().apply({"params": flax_params}, x)
    got = net.apply({"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_convnet_trains_on_a_tiny_problem():
    # Class = which half of the image is brighter: learnable by a small ConvNet.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    x = rng.normal(size=(64, 12, 12, 1)).astype(np.float32)
    x[np.arange(64), :, :6, 0] += np.where(y == 0, 1.5, 0.0)[:, None, None]
    x[np.arange(64), :, 6:, 0] += np.where(y == 1, 1.5, 0.0)[:, None, None]
    net = ConvNet(channels=(8, 8), kernel_sizes=(3, 3), strides=(1, 2), num_classes=2)
    params = net.init(jax.random.PRNGKey(0), x)
    tx = optax.adam(1e-2)
    state = tx.init(params)

    def loss_fn(p):
        logits = net.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.3


def _halves_data(n=256, hw=12, seed=0):
    # Class = which half of the image is brighter, as above, as on-device splits.
    rng = np.random.default_rng(seed)

    def split(m):
        y = rng.integers(0, 2, m).astype(np.int32)
        x = rng.normal(size=(m, hw, hw, 1)).astype(np.float32)
        x[np.arange(m), :, : hw // 2, 0] += np.where(y == 0, 1.5, 0.0)[:, None, None]
        x[np.arange(m), :, hw // 2 :, 0] += np.where(y == 1, 1.5, 0.0)[:, None, None]
        return x, y

    return to_device([{"train": split(n), "valid": split(64), "test": split(64)}])


@pytest.mark.parametrize("optimizer", ["adam", "learned"])
def test_conv_task_trains_with_adam_and_with_the_learned_optimizer(optimizer):
    task = conv_task(_halves_data(), (8, 8), (3, 3), (2, 2), 2, batch_size=32)
    if optimizer == "adam":
        tx = optax.adam(1e-2)
    else:  # the shipped optimizer (meta-trained on MNIST-1D MLPs): outside its family
        tx, _, _ = load_optax(str(ROOT / "checkpoints" / "mnist1d-mlp-pes"), num_steps=100)
    out = train(task, tx, 100, jax.random.PRNGKey(0), 100)
    curve = np.asarray(out["train_curve"])
    assert not bool(out["diverged"])
    assert curve[-10:].mean() < 0.7 * curve[:5].mean()
    assert float(out["final_test_accuracy"]) > 0.8


def test_conv_task_refuses_inputs_that_are_not_images():
    rng = np.random.default_rng(0)
    split = (rng.normal(size=(8, 40)).astype(np.float32), np.zeros(8, np.int32))
    data = to_device([{"train": split, "valid": split, "test": split}])
    with pytest.raises(ValueError, match=r"needs images \[H, W, C\]"):
        conv_task(data, (4, 4), (3, 3), (2, 2), 2)
