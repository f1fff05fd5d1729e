"""Shared cases for the learned optimizers' tests: users' parameter trees, and the float64
NumPy reference of the per-parameter network that the MLP and AdaFac tests check against."""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Progress features shared by every parameter: frac, frac², sqrt(frac), tanh(step / s).
TANH_SCALES = (3.0, 10.0, 30.0, 100.0, 300.0)
EPS = 1e-8  # inside every rsqrt (documented as sqrt(rms + eps) and rms-over-rows + eps)


def flax_params(hidden: int = 16):
    """A flax linen MLP's params (a FrozenDict-free nested dict)."""
    model = nn.Sequential([nn.Dense(hidden), nn.relu, nn.Dense(3)])
    return model.init(jax.random.PRNGKey(0), jnp.ones((2, 5)))["params"]


def haiku_params(hidden: int = 16):
    """A haiku MLP's params (module-name keys with '/')."""
    f = hk.transform(lambda x: hk.nets.MLP([hidden, 3])(x))
    return f.init(jax.random.PRNGKey(0), jnp.ones((2, 5)))


def nnx_state(hidden: int = 16):
    """A flax nnx model's `nnx.State` of its params."""
    model = nnx.Sequential(
        nnx.Linear(5, hidden, rngs=nnx.Rngs(0)), nnx.Linear(hidden, 3, rngs=nnx.Rngs(1))
    )
    return nnx.state(model, nnx.Param)


MODEL_TREES = [flax_params, haiku_params, nnx_state]


def perturbed(theta, scale: float, seed: int = 1):
    """θ with every entry moved by scale · N(0, 1), so every part of θ matters."""
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def perturbed_theta(lopt, seed: int = 0, scale: float = 0.3):
    """Fresh meta-parameters of `lopt` (key `seed`) with every entry perturbed (biases and
    output layers start at zero): a θ that looks trained."""
    return perturbed(lopt.init_meta(jax.random.PRNGKey(seed)), scale, seed + 1)


def assert_masked_entries_keep_state(updates, new_state, state, zero_state, mask) -> None:
    """Non-finite gradient entries (`mask`, per key of a dict of params, in sorted order as
    the state's leaves are) get zero updates and keep the old momenta and rms; every other
    entry gets a non-zero finite update and the state a gradient with zeros there gives."""
    for i, k in enumerate(sorted(mask)):  # dict leaves come out in sorted key order
        assert np.all(np.isfinite(updates[k]))
        assert np.all(updates[k][mask[k]] == 0.0)
        assert np.all(updates[k][~mask[k]] != 0.0)
        for new, old, zero in (
            (new_state.rms[i], state.rms[i], zero_state.rms[i]),
            (new_state.momenta[i], state.momenta[i], zero_state.momenta[i]),
        ):
            new, old, zero = (np.asarray(x) for x in (new, old, zero))
            np.testing.assert_array_equal(new[..., mask[k]], old[..., mask[k]])
            np.testing.assert_array_equal(new[..., ~mask[k]], zero[..., ~mask[k]])


def reference_network_update(lopt, theta, columns, step: int, num_steps: int) -> np.ndarray:
    """The documented per-parameter update from one tensor's raw feature columns.

    Every feature is normalised by its RMS over the tensor, the progress features are
    appended, the network (flax `w_in`/`b_in`, `Dense_i`) gives a direction and a
    log-magnitude, and the step schedule and past-horizon decay scale the result.

    Args:
      lopt: the optimizer (its hidden_layers, step_mult, exp_mult, step_schedule[_final]).
      theta: its meta-parameters.
      columns: the tensor's feature arrays, each of the tensor's shape (float64).
      step, num_steps: the step being taken and the declared horizon.

    Returns:
      The flat update of the tensor (float64).
    """
    feats = np.stack([x.ravel() for x in columns], axis=1)  # one row per parameter
    feats = feats / np.sqrt(np.mean(feats**2, axis=0, keepdims=True) + EPS)  # per tensor
    frac = min(step, num_steps) / max(num_steps, 1)  # saturates past the horizon
    shared = [frac, frac**2, np.sqrt(frac)] + [np.tanh(step / s) for s in TANH_SCALES]
    x = np.concatenate([feats, np.tile(shared, (feats.shape[0], 1))], axis=1)
    w = jax.tree.map(lambda t: np.asarray(t, np.float64), theta)
    h = np.maximum(x @ w["w_in"] + w["b_in"], 0.0)
    for i in range(lopt.hidden_layers - 1):
        h = np.maximum(h @ w[f"Dense_{i}"]["kernel"] + w[f"Dense_{i}"]["bias"], 0.0)
    last = w[f"Dense_{lopt.hidden_layers - 1}"]
    out = h @ last["kernel"] + last["bias"]
    decay = min(1.0, num_steps / max(step, 1))  # 1/t annealing past the horizon
    if lopt.step_schedule == "cosine":  # from 1 to `final` at the horizon, then flat
        f = lopt.step_schedule_final
        decay *= f + (1 - f) * 0.5 * (1 + np.cos(np.pi * frac))
    return decay * lopt.step_mult * out[:, 0] * np.exp(lopt.exp_mult * out[:, 1])
