"""2-D convolutions as patches plus one matmul (im2col), and a flax ConvNet built on them.

XLA's CPU convolution is slow for the small images and channel counts of learned-optimizer
tasks; gathering each output position's receptive field with strided slices and
contracting it with the kernel in one matmul computes the same function (up to float32
summation order) much faster there (see `conv2d`). Kernels are HWIO and images NHWC, as
in `flax.linen.Conv`, so parameters are interchangeable with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tasks.classification import (
    ClassificationTask,
    TaskHParams,
    apply_activation,
    check_activations,
    module_task,
)
from tasks.device_data import DeviceData


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA/TensorFlow "SAME" padding (low, high) of one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "SAME") -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (stride, stride), padding)` for NHWC/HWIO, as
    strided slices (im2col) and one matmul.

    Args:
      x: images [N, H, W, C_in].
      kernel: [kh, kw, C_in, C_out].
      stride: the same stride on both spatial axes.
      padding: "SAME" or "VALID".

    Returns:
      [N, H_out, W_out, C_out].
    """
    kh, kw, cin, cout = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"image has {x.shape[-1]} channels, the kernel expects {cin}")
    if padding == "SAME":
        pads = [same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)]
        x = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    elif padding != "VALID":
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    # Patch feature index (i, j, c) with c fastest: the order of kernel.reshape(-1, C_out).
    patches = jnp.concatenate(
        [
            x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    return patches @ kernel.reshape(kh * kw * cin, cout)


def xla_conv2d(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "SAME"
) -> jax.Array:
    """XLA's own convolution with `conv2d`'s signature (the reference it is measured against)."""
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=dims
    )


class ConvNet(nn.Module):
    """Convolution layers (`conv2d`, activation after each), global mean pool, linear head.

    Attributes:
      channels: output channels of each convolution layer.
      kernel_sizes: square kernel size of each layer.
      strides: stride of each layer (stride 2 halves the resolution: the network's pooling).
      num_classes: logits of the head.
      activations: activation names; the call's `activation` index (may be traced) picks one.
      conv: the convolution (`conv2d`; `xla_conv2d` computes the same function).
    """

    channels: Sequence[int]
    kernel_sizes: Sequence[int]
    strides: Sequence[int]
    num_classes: int
    activations: Sequence[str] = ("relu",)
    conv: Callable[..., jax.Array] = conv2d

    @nn.compact
    def __call__(self, x: jax.Array, activation: jax.Array | int = 0) -> jax.Array:
        if not len(self.channels) == len(self.kernel_sizes) == len(self.strides):
            raise ValueError("channels, kernel_sizes and strides need one entry per layer")
        for i, (c, k, s) in enumerate(
            zip(self.channels, self.kernel_sizes, self.strides, strict=True)
        ):
            kernel = self.param(
                f"conv{i}_kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], c)
            )
            bias = self.param(f"conv{i}_bias", nn.initializers.zeros, (c,))
            x = apply_activation(self.conv(x, kernel, s) + bias, activation, self.activations)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def conv_task(
    data: DeviceData,
    channels: Sequence[int],
    kernel_sizes: Sequence[int],
    strides: Sequence[int],
    num_classes: int,
    *,
    batch_size: int = 128,
    activations: Sequence[str] = ("relu",),
    hp: TaskHParams | None = None,
) -> ClassificationTask:
    """A ConvNet image classifier (`ConvNet` with the im2col `conv2d`) over `data`.

    Args:
      data: on-device images [N, H, W, C].
      channels: output channels, one entry per convolution layer.
      kernel_sizes: kernel sizes, one entry per convolution layer.
      strides: strides, one entry per convolution layer.
      num_classes: output classes.
      batch_size: training batch size.
      activations: names the traced `hp.activation` index chooses from.
      hp: per-task numbers; defaults to activation 0, dataset 0, init scale 1.

    Returns:
      A `ClassificationTask`.
    """
    if len(data.input_shape) != 3:
        raise ValueError(
            f"a ConvNet needs images [H, W, C]; the data's inputs have shape {data.input_shape}"
        )
    check_activations(activations)
    module = ConvNet(
        tuple(channels), tuple(kernel_sizes), tuple(strides), num_classes, tuple(activations)
    )
    return module_task(module, data, num_classes, batch_size=batch_size, hp=hp, name="conv")
