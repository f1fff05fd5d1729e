"""The fused per-parameter networks (lopt/fused.py; `impl="fused"` of `MLPLOpt`, `AdaFacLOpt`
and `HierarchicalLOpt`): the same function as the feature-major matmul formulation, without
its [features, N] buffers."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.adafac import AdaFacLOpt
from lopt.export import load_optax
from lopt.fused import column_sums, matrix_sums, sums_along, tensor_sums
from lopt.hierarchical import HierarchicalLOpt
from lopt.mlp_lopt import MLPLOpt
from tests.lopt_cases import MODEL_TREES, perturbed, perturbed_theta


def _tree(key):
    """Scalars, vectors, 2-D and 4-D kernels, low-precision and integer leaves."""
    k = jax.random.split(key, 6)
    return {
        "bias": jax.random.normal(k[0], (7,)),
        "conv": jax.random.normal(k[1], (3, 3, 4, 8)) * 0.2,
        "count": jnp.array(3, jnp.int32),
        "dense": jax.random.normal(k[2], (33, 17)) * 0.1,
        "half": jax.random.normal(k[3], (9, 5)).astype(jnp.bfloat16),
        "scale": jnp.asarray(1.5),
        "wide": jax.random.normal(k[4], (1200, 3)).astype(jnp.float16),
    }


def _grads(params, key, non_finite: bool):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for x, k in zip(leaves, keys, strict=True):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            out.append(jnp.zeros_like(x))
            continue
        g = jax.random.normal(k, x.shape) * 0.3
        if non_finite and g.ndim >= 1:
            g = g.at[(0,) * g.ndim].set(jnp.nan).at[(-1,) * g.ndim].set(jnp.inf)
        out.append(g.astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


def _run(lopt, theta, params, steps: int, non_finite: bool):
    """Updates and states of `steps` jitted steps (params fixed, fresh gradients each)."""
    opt = lopt.optimizer(theta)
    state = opt.init(params, 50)
    update = jax.jit(opt.update)
    out = []
    for i in range(steps):
        grads = _grads(params, jax.random.PRNGKey(10 + i), non_finite)
        updates, state = update(grads, state, params, jnp.float32(1.0))
        out.append((updates, state))
    return out


def _assert_close(a, b, rtol=1e-5):
    """Equal to float32 rounding; leaves of a lower precision to one unit in their last place
    (the same float32 value rounded once more, to the parameter's dtype)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            rtol = max(rtol, float(jnp.finfo(x.dtype).eps))
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.float32)
        scale = max(float(np.abs(y).max()), 1e-30)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)


_NAMES = (
    "feature_norm",
    "width_scaling",
    "schedule_head",
    "step_schedule",
    "output_norm",
    "weight_decay",
)
_DEFAULT_STAGE = (
    (True, "fan_in", 4, "cosine", "rms", 1e-2),
    (False, "none", 0, "constant", "none", 0.0),
)
# The default stage checks every switch on and every switch off; the slow stage all 64.
SWITCHES = [
    pytest.param(
        dict(zip(_NAMES, combo, strict=True)),
        marks=() if combo in _DEFAULT_STAGE else pytest.mark.slow,
        id="-".join(map(str, combo)),
    )
    for combo in itertools.product(
        (True, False),
        ("none", "fan_in"),
        (0, 4),
        ("constant", "cosine"),
        ("none", "rms"),
        (0.0, 1e-2),
    )
]


# Every size in the slow stage (~11 s each); an 8x2 network's fused and matmul paths are
# compared in the default stage, switch by switch, below.
@pytest.mark.slow
@pytest.mark.parametrize(
    "size", [(8, 1), (4, 2), (16, 2), (8, 3), (32, 2)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_fused_equals_matmul_for_every_network_size(size):
    hidden, layers = size
    fused = MLPLOpt(hidden_size=hidden, hidden_layers=layers, impl="fused")
    matmul = MLPLOpt(hidden_size=hidden, hidden_layers=layers, impl="matmul")
    theta = perturbed_theta(fused)
    params = _tree(jax.random.PRNGKey(0))
    for (u1, s1), (u2, s2) in zip(
        _run(fused, theta, params, 3, False), _run(matmul, theta, params, 3, False), strict=True
    ):
        _assert_close(u1, u2)
        _assert_close(s1, s2)


@pytest.mark.parametrize("switches", SWITCHES)
def test_fused_equals_matmul_for_every_switch_with_non_finite_gradients(switches):
    fused = MLPLOpt(
        hidden_size=8, hidden_layers=2, step_schedule_final=0.1, impl="fused", **switches
    )
    matmul = MLPLOpt(
        hidden_size=8, hidden_layers=2, step_schedule_final=0.1, impl="matmul", **switches
    )
    theta = perturbed_theta(fused)
    params = _tree(jax.random.PRNGKey(1))
    for (u1, s1), (u2, s2) in zip(
        _run(fused, theta, params, 2, True), _run(matmul, theta, params, 2, True), strict=True
    ):
        _assert_close(u1, u2)
        _assert_close(s1, s2)
        for leaf in jax.tree.leaves(u1):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("make_params", MODEL_TREES)
def test_fused_equals_matmul_on_user_model_trees(make_params):
    fused = MLPLOpt(hidden_size=16, impl="fused")
    matmul = MLPLOpt(hidden_size=16, impl="matmul")
    theta = perturbed_theta(fused)
    params = make_params()
    (u1, s1), (u2, s2) = (
        _run(fused, theta, params, 1, False)[0],
        _run(matmul, theta, params, 1, False)[0],
    )
    _assert_close(u1, u2)
    _assert_close(s1, s2)


def test_auto_fuses_small_networks_only():
    assert MLPLOpt(hidden_size=16, hidden_layers=2).fused  # 480 multiply-adds
    assert MLPLOpt(hidden_size=8, hidden_layers=1).fused
    assert MLPLOpt().fused  # the default 4×2: 72
    assert not MLPLOpt(hidden_size=32).fused  # 32×2: 1,472
    assert MLPLOpt(impl="fused").fused and not MLPLOpt(hidden_size=4, impl="matmul").fused
    with pytest.raises(ValueError, match="impl must be one of"):
        MLPLOpt(impl="pallas")


@pytest.mark.slow  # the fused 32×2 network compiles for ~15 s
def test_the_shipped_optimizer_gives_the_same_updates_either_way():
    tx, theta, lopt = load_optax("checkpoints/mnist1d-mlp-pes", num_steps=400)
    assert lopt.impl == "auto"  # a checkpoint saved before `impl` existed loads
    fused = dataclasses.replace(lopt, impl="fused")
    matmul = dataclasses.replace(lopt, impl="matmul")
    params = _tree(jax.random.PRNGKey(2))
    for (u1, _), (u2, _) in zip(
        _run(fused, theta, params, 3, True), _run(matmul, theta, params, 3, True), strict=True
    ):
        _assert_close(u1, u2)


def test_vmap_over_particles_equals_each_particle_alone():
    lopt = MLPLOpt(hidden_size=8, hidden_layers=1, impl="fused")
    theta = perturbed_theta(lopt)
    opt = lopt.optimizer(theta)
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    params = jax.vmap(lambda k: {"w": jax.random.normal(k, (40, 16)), "b": jnp.zeros(16)})(keys)
    grads = jax.tree.map(lambda p: jnp.cos(p * 3.0) + 0.1, params)
    states = jax.vmap(lambda p: opt.init(p, 100))(params)
    batched, _ = jax.jit(jax.vmap(opt.update))(grads, states, params)
    for i in range(3):
        one = jax.tree.map(lambda x, i=i: x[i], (grads, states, params))
        alone, _ = jax.jit(opt.update)(*one)
        _assert_close(jax.tree.map(lambda x, i=i: x[i], batched), alone)


def test_tensor_sums_is_accurate_on_a_long_tensor():
    x = jax.random.uniform(jax.random.PRNGKey(4), (1_000_003,), minval=0.5, maxval=1.5)
    got = np.asarray(tensor_sums([x, 2.0 * x]))
    exact = np.sum(np.asarray(x, np.float64))
    np.testing.assert_allclose(got, [exact, 2 * exact], rtol=2e-6)
    small = jnp.arange(5.0)  # shorter than a chunk: one partial sum
    assert float(tensor_sums([small])[0]) == 10.0


@pytest.mark.parametrize(
    "shape",
    [(1024, 880), (3, 2_000), (1, 4_099), (577, 64), (5, 1), (1, 1)],
    ids=["kernel", "divisible-long-rows", "prime-long-row", "conv-view", "column", "scalar"],
)
def test_matrix_and_column_sums_are_accurate_for_any_matrix_view(shape):
    # Row factors times column factors, as AdaFac's features are built; long rows are cut
    # into partial sums (or, with no divisor near the chunk length, summed flat).
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    row = jax.random.uniform(k1, (shape[0], 1), minval=0.5, maxval=1.5)
    col = jax.random.uniform(k2, (1, shape[1]), minval=0.5, maxval=1.5)
    x = jax.lax.rsqrt(row) * col
    exact = np.asarray(x, np.float64)
    got = np.asarray(matrix_sums([jnp.square(x), row, col], shape))
    r64, c64 = np.asarray(row, np.float64), np.asarray(col, np.float64)
    want = [np.sum(np.square(exact)), shape[1] * np.sum(r64), shape[0] * np.sum(c64)]
    np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 partial sums of ~512
    cols = column_sums([x, 2.0 * x])
    np.testing.assert_allclose(np.asarray(cols[0]), exact.sum(axis=0), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(cols[1]), 2 * exact.sum(axis=0), rtol=2e-6)


def test_sums_along_differentiates_with_a_constant_input():
    # The finite count is an input without a tangent: the variadic reduction's own rule
    # rejects it, the custom one sums tangents, forward and reverse.
    x = jax.random.normal(jax.random.PRNGKey(6), (40, 7))

    def f(x):
        total, count = column_sums([jnp.square(x), jnp.isfinite(x).astype(jnp.float32)])
        return jnp.sum(total * count) + jnp.sum(sums_along([x], 1)[0])

    np.testing.assert_allclose(jax.grad(f)(x), 2 * 40 * x + 1.0, rtol=1e-6)
    _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, float(jnp.sum(2 * 40 * x + 1.0)), rtol=1e-5)


def _temp_bytes(lopt, theta, params) -> int:
    """Temporary memory of one compiled update (state donated, as in a training loop)."""
    opt = lopt.optimizer(theta)
    state = opt.init(params, 100)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, jnp.float32(1.0)), donate_argnums=(1,))
    compiled = update.lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_fused_update_writes_no_per_parameter_buffers():
    params = {"conv": jnp.ones((3, 3, 64, 64)), "dense": jnp.ones((512, 400)), "b": jnp.ones(400)}
    n = sum(x.size for x in jax.tree.leaves(params))
    lopt = MLPLOpt(hidden_size=8, hidden_layers=2, impl="fused")
    theta = lopt.init_meta(jax.random.PRNGKey(0))
    fused = _temp_bytes(lopt, theta, params)
    matmul = _temp_bytes(dataclasses.replace(lopt, impl="matmul"), theta, params)
    # Features and hidden units of the matmul path are [12 + 8 + 8, N] floats; the fused
    # path keeps a few partial sums per tensor (0.09 bytes per parameter). The masked
    # gradient is not written either (4 more bytes before 4521e8a): only the reduction
    # reads it, the elementwise passes take the raw gradient.
    assert fused <= 1 * n, f"fused update: {fused / n:.1f} temporary bytes per parameter"
    assert matmul > 20 * n  # the bound can fail: the other formulation breaks it
    # An RMS-normalised output is a reduction of the output: there the masked gradient is
    # written once (4 bytes per parameter), and nothing else.
    rms = _temp_bytes(dataclasses.replace(lopt, output_norm="rms"), theta, params)
    assert rms <= 5 * n, f"fused, RMS output: {rms / n:.1f} temporary bytes per parameter"


# AdaFac and the hierarchical optimizer: the same fused pass (`lopt.adafac._fused_steps`,
# `HierarchicalLOpt._apply_fused`), the same function as their matmul paths.
def _big_tree(key):
    """`_tree` plus a tensor above AdaFac's block size (its matmul path then loops)."""
    params = _tree(key)
    params["big"] = jax.random.normal(jax.random.fold_in(key, 9), (300, 100)) * 0.05
    return params


OTHER_KINDS = [
    # ~7 s: the slow stage (keeps the default stage under 10 minutes)
    pytest.param(AdaFacLOpt, {}, False, id="adafac", marks=pytest.mark.slow),
    # 8x2, AdaFac's default before issue 22: saved checkpoints of that size must keep working
    pytest.param(AdaFacLOpt, {"hidden_size": 8}, False, id="adafac-8x2", marks=pytest.mark.slow),
    pytest.param(HierarchicalLOpt, {}, False, id="hierarchical"),
    # With a tensor above AdaFac's block size its matmul path loops over blocks (~40 s to
    # compile both paths on 2 cores): the slow stage.
    pytest.param(AdaFacLOpt, {}, True, id="adafac-big", marks=pytest.mark.slow),
    pytest.param(
        AdaFacLOpt,
        {"hidden_size": 4, "hidden_layers": 1, "step_schedule": "cosine"},
        True,
        id="adafac-4x1-cosine-big",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        HierarchicalLOpt,
        {"hidden_layers": 2, "mixing": "linear", "batch_below": 0, "step_schedule": "cosine"},
        True,
        id="hierarchical-2-layers-linear-big",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("cls", "options", "big"), OTHER_KINDS)
def test_other_kinds_fused_equal_matmul_with_non_finite_gradients(cls, options, big):
    fused, matmul = cls(impl="fused", **options), cls(impl="matmul", **options)
    assert cls(**options).fused  # 'auto' fuses the defaults
    theta = perturbed_theta(fused)
    params = (_big_tree if big else _tree)(jax.random.PRNGKey(6))
    for (u1, s1), (u2, s2) in zip(
        _run(fused, theta, params, 2, True), _run(matmul, theta, params, 2, True), strict=True
    ):
        _assert_close(u1, u2)
        _assert_close(s1, s2)
        for leaf in jax.tree.leaves(u1):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@pytest.mark.parametrize(("cls", "bound"), [(AdaFacLOpt, 5), (HierarchicalLOpt, 1)])
def test_other_kinds_fused_write_no_per_parameter_feature_buffers(cls, bound):
    params = {"conv": jnp.ones((3, 3, 64, 64)), "dense": jnp.ones((512, 400)), "b": jnp.ones(400)}
    n = sum(x.size for x in jax.tree.leaves(params))
    lopt = cls(impl="fused")
    theta = lopt.init_meta(jax.random.PRNGKey(0))
    fused = _temp_bytes(lopt, theta, params)
    matmul = _temp_bytes(dataclasses.replace(lopt, impl="matmul"), theta, params)
    # Measured at 4.0 (AdaFac: the masked gradient, its capped square and the finite
    # mask as float, which its row and column means read; 6.8 before its elementwise
    # passes took the raw gradient) and 0.31 (hierarchical, whose elementwise passes take
    # the raw gradient since 4521e8a; 8.2 before) bytes per parameter; the matmul paths
    # 28.5 and 66.
    assert fused <= bound * n, f"fused update: {fused / n:.1f} temporary bytes per parameter"
    assert matmul > 2 * fused


@pytest.mark.slow  # ~6 s; the MLP's vmap test runs in the default stage
def test_other_kinds_vmap_over_particles():
    for lopt in (AdaFacLOpt(impl="fused"), HierarchicalLOpt(impl="fused")):
        theta = perturbed_theta(lopt)
        opt = lopt.optimizer(theta)
        keys = jax.random.split(jax.random.PRNGKey(7), 2)
        params = jax.vmap(lambda k: {"w": jax.random.normal(k, (40, 16)), "b": jnp.zeros(16)})(keys)
        grads = jax.tree.map(lambda p: jnp.cos(p * 3.0) + 0.1, params)
        states = jax.vmap(lambda p, o=opt: o.init(p, 100))(params)
        loss = jnp.ones(2)
        batched, _ = jax.jit(jax.vmap(opt.update))(grads, states, params, loss)
        for i in range(2):
            one = jax.tree.map(lambda x, i=i: x[i], (grads, states, params, loss))
            alone, _ = jax.jit(opt.update)(*one)
            _assert_close(jax.tree.map(lambda x, i=i: x[i], batched), alone)


# Differentiating through the update (TBPTT meta-gradients, a user's hypergradient).
# The other kinds (23-28 s each to compile both paths' gradients) run in the slow stage.
_DIFF_KINDS = [
    pytest.param(MLPLOpt, {"hidden_size": 4}, id="mlp-4x2"),
    pytest.param(AdaFacLOpt, {}, id="adafac", marks=pytest.mark.slow),
    pytest.param(HierarchicalLOpt, {}, id="hierarchical", marks=pytest.mark.slow),
]


def _two_step_loss(lopt, params):
    """A scalar of θ and the parameters after two updates: the shape of a TBPTT meta-loss."""

    def loss(theta, params):
        opt = lopt.optimizer(theta)
        state = opt.init(params, 50)
        for _ in range(2):
            grads = jax.tree.map(lambda p: jnp.cos(p * 3.0) + 0.1 * p, params)
            updates, state = opt.update(grads, state, params, jnp.float32(1.0))
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        return sum(jnp.sum(jnp.sin(p) ** 2) for p in jax.tree.leaves(params))

    return loss


@pytest.mark.parametrize(("cls", "options"), _DIFF_KINDS)
def test_fused_derivatives_equal_matmul_derivatives(cls, options):
    fused, matmul = cls(impl="fused", **options), cls(impl="matmul", **options)
    theta = perturbed_theta(fused)
    params = {"w": jax.random.normal(jax.random.PRNGKey(3), (40, 16)), "b": jnp.full(16, 0.1)}
    f, m = _two_step_loss(fused, params), _two_step_loss(matmul, params)
    # Reverse mode, in θ and in the parameters.
    grad_f = jax.jit(jax.grad(f, (0, 1)))(theta, params)
    _assert_close(grad_f, jax.jit(jax.grad(m, (0, 1)))(theta, params), 1e-4)
    # Forward mode along a random direction of θ (jitted: op by op it took 10 s).
    direction = perturbed(jax.tree.map(jnp.zeros_like, theta), 1.0, 5)

    def derivative(loss):
        return jax.jit(lambda t, d: jax.jvp(lambda s: loss(s, params), (t,), (d,))[1])

    df, dm = derivative(f)(theta, direction), derivative(m)(theta, direction)
    np.testing.assert_allclose(float(df), float(dm), rtol=1e-4)


def test_the_differentiated_fused_network_is_matmuls_not_a_reduction_per_weight():
    # Transposed as written, the unrolled network gives every scalar weight a reduction over
    # its tensor (166 for 4x2, 1,030 for 16x2 in this jaxpr), and compiling TBPTT through
    # 3 inner steps of a 4x2 network took 117 s; its derivatives now go through matmuls
    # (14 reductions whatever the size; the matmul path has 10).
    params = {"w": jnp.ones((40, 16)), "b": jnp.zeros(16)}

    def reductions(hidden_size):
        lopt = MLPLOpt(hidden_size=hidden_size, impl="fused")
        theta = lopt.init_meta(jax.random.PRNGKey(0))
        jaxpr = jax.make_jaxpr(jax.grad(_two_step_loss(lopt, params)))(theta, params)
        return str(jaxpr).count("reduce_sum")

    small, wide = reductions(4), reductions(16)
    assert small == wide, (small, wide)
    assert small <= 40, small
