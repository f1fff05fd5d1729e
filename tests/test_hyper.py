"""Tests of the learned-hyperparameter optimizers (learned Adam, learned lr schedules)."""

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lopt_cases import MODEL_TREES, TANH_SCALES, perturbed

from lopt.export import as_optax
from lopt.hyper import LearnedAdamLOpt, LearnedScheduleLOpt, OptaxScheduleLOpt

# Progress features: frac, frac², sqrt(frac), tanh(step / s) for these s.
N_PROGRESS = 3 + len(TANH_SCALES)
N_TENSOR = 5 + 2  # rank one-hot (0, 1, 2, 3, >= 4), log size / 10, log fan-in / 10
SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 3, 2)}
LONG = 10_000  # a horizon far beyond the steps taken: no past-horizon decay


def _mlp_count(n_in, hidden, layers, n_out):
    widths = [n_in] + [hidden] * layers + [n_out]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


def _size(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _reading_frac(lopt, output, weight):
    """θ = 0 except: hidden unit 0 = relu(frac), and output `output` = weight · frac."""
    theta = jax.tree.map(jnp.zeros_like, lopt.init_meta(jax.random.PRNGKey(0)))
    theta["Dense_0"]["kernel"] = theta["Dense_0"]["kernel"].at[0, 0].set(1.0)
    theta["Dense_1"]["kernel"] = theta["Dense_1"]["kernel"].at[0, output].set(weight)
    return theta


def _with_output_bias(lopt, output, value):
    theta = jax.tree.map(jnp.zeros_like, lopt.init_meta(jax.random.PRNGKey(0)))
    theta["Dense_1"]["bias"] = theta["Dense_1"]["bias"].at[output].set(value)
    return theta


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _grad_stream(n, seed=1):
    """Gradients of varied scale (1e-3 to 1e3) from step to step."""
    rng = np.random.default_rng(seed)
    return [
        {k: (rng.normal(size=s) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
         for k, s in SHAPES.items()}
        for _ in range(n)
    ]  # fmt: skip


# ---------------------------------------------------------------- meta-parameter counts


def test_meta_parameter_counts_match_the_docstrings():
    key = jax.random.PRNGKey(0)

    def init_meta(lopt):
        return jax.eval_shape(lopt.init_meta, key)  # shapes and dtypes, nothing computed

    # The figures in the docstrings: 212, 324 and 161.
    assert _mlp_count(N_PROGRESS, 16, 1, 4) == 212
    assert _mlp_count(N_PROGRESS + N_TENSOR, 16, 1, 4) == 324
    assert _mlp_count(N_PROGRESS, 16, 1, 1) == 161
    assert _size(init_meta(LearnedAdamLOpt())) == 212 == LearnedAdamLOpt().num_meta_params
    assert _size(init_meta(LearnedAdamLOpt(per_tensor=True))) == 324
    for base in ("adam", "sgd", "rmsprop", "adamw", "lion"):
        assert _size(init_meta(LearnedScheduleLOpt(base=base))) == 161
    other = LearnedAdamLOpt(per_tensor=True, hidden_size=8, hidden_layers=2)
    assert _size(init_meta(other)) == _mlp_count(N_PROGRESS + N_TENSOR, 8, 2, 4)
    assert other.num_meta_params == _mlp_count(N_PROGRESS + N_TENSOR, 8, 2, 4)
    linear = LearnedScheduleLOpt(hidden_layers=0)
    assert _size(init_meta(linear)) == linear.num_meta_params == N_PROGRESS + 1
    for theta in (init_meta(LearnedAdamLOpt()), init_meta(LearnedScheduleLOpt())):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(theta))


@pytest.mark.parametrize(
    "lopt",
    [
        LearnedAdamLOpt(per_tensor=True, beta2=0.99, step_schedule="cosine"),
        LearnedScheduleLOpt(base="lion", base_lr=3e-4, hidden_layers=2),
    ],
)
def test_options_round_trip_through_json(lopt):
    options = json.loads(json.dumps(dataclasses.asdict(lopt)))
    assert type(lopt)(**options) == lopt


# ---------------------------------------------------------------- learned Adam


@pytest.mark.parametrize("per_tensor", [False, True])
def test_default_theta_is_optax_adam(per_tensor):
    lopt = LearnedAdamLOpt(per_tensor=per_tensor)
    init = lopt.init_meta(jax.random.PRNGKey(3))
    ref = optax.adam(1e-3)
    # θ is an argument: one compilation serves both θs.
    update = jax.jit(lambda theta, *args: lopt.optimizer(theta).update(*args, jnp.float32(1)))
    ref_update = jax.jit(ref.update)
    params = _params()
    ref_state = ref.init(params)
    thetas = {"init_meta": init, "zeros": jax.tree.map(jnp.zeros_like, init)}
    states = {name: lopt.optimizer(init).init(params, LONG) for name in thetas}
    for grads in _grad_stream(6):
        ref_updates, ref_state = ref_update(grads, ref_state, params)
        got = {}
        for name, theta in thetas.items():
            got[name], states[name] = update(theta, grads, states[name], params)
        for k in SHAPES:
            np.testing.assert_array_equal(got["zeros"][k], got["init_meta"][k])
            # optax's own float32 inconsistency bounds the match: its moments use
            # 1 - 0.999 = 1e-3 but its bias correction 1 - float32(0.999) = 0.99998713e-3,
            # so its update is off by 6.4e-6 (relative) at step 1, where this optimizer's is
            # exactly -lr · g / (|g| + ε). Measured gaps reach 1.03e-5: 3e-5 leaves 3x.
            np.testing.assert_allclose(got["zeros"][k], ref_updates[k], rtol=3e-5, err_msg=k)
    # The first step is exactly -lr · g / (|g| + ε): the moments and their bias corrections
    # use the same rounded 1 - β (a power-of-two gradient keeps every product exact).
    zeros = {"b": np.zeros(5, np.float32)}
    opt = lopt.optimizer(init)
    step1, _ = opt.update({"b": np.full(5, -2.0, np.float32)}, opt.init(zeros, 9), zeros, 1.0)
    np.testing.assert_array_equal(step1["b"], np.full(5, np.float32(1e-3)))


def _ref_network(theta, x):
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), theta)
    layers = sorted(w, key=lambda name: int(name.split("_")[1]))
    for name in layers[:-1]:
        x = np.maximum(x @ w[name]["kernel"] + w[name]["bias"], 0.0)
    return x @ w[layers[-1]]["kernel"] + w[layers[-1]]["bias"]


def _ref_hyperparameters(lopt, theta, shapes, step, num_steps):
    """The documented hyperparameters in float64 NumPy, written from the docstring."""
    frac = min(step, num_steps) / max(num_steps, 1)
    progress = [frac, frac**2, math.sqrt(frac)] + [math.tanh(step / s) for s in TANH_SCALES]
    rows = []
    for shape in shapes if lopt.per_tensor else [None]:
        row = list(progress)
        if lopt.per_tensor:
            one_hot = [0.0] * 5
            one_hot[min(len(shape), 4)] = 1.0
            fan = int(np.prod(shape[:-1])) if len(shape) >= 2 else 1
            row += one_hot + [math.log(max(int(np.prod(shape)), 1)) / 10, math.log(fan) / 10]
        rows.append(row)
    out = _ref_network(theta, np.asarray(rows, np.float64))

    def bound(o, r):
        return r * np.tanh(o / r)

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    def logit(p):
        return math.log(p / (1 - p))

    scale = min(1.0, num_steps / max(step, 1))  # 1/t past the horizon
    if lopt.step_schedule == "cosine":
        f = lopt.step_schedule_final
        scale *= f + (1 - f) * 0.5 * (1 + math.cos(math.pi * frac))
    return {
        "lr": lopt.base_lr * np.exp(bound(out[:, 0], lopt.lr_range)) * scale,
        "beta1": sigmoid(logit(lopt.beta1) + bound(out[:, 1], lopt.beta_range)),
        "beta2": sigmoid(logit(lopt.beta2) + bound(out[:, 2], lopt.beta_range)),
        "eps": lopt.eps * np.exp(bound(out[:, 3], lopt.eps_range)),
    }


@pytest.mark.parametrize(
    "lopt",
    [
        LearnedAdamLOpt(per_tensor=True),
        LearnedAdamLOpt(hidden_size=8, hidden_layers=2, beta2=0.99, eps=1e-3),
        LearnedAdamLOpt(per_tensor=True, step_schedule="cosine", step_schedule_final=0.3),
    ],
    ids=["per-tensor", "global-2-layers", "cosine"],
)
def test_learned_adam_matches_an_independent_float64_reference(lopt):
    # Every meta-parameter perturbed: all four hyperparameters vary over steps and tensors.
    # The reference keeps the products Π β in float64 and corrects with 1 - Π β. The
    # horizon is 4 of the 7 steps, so the 1/t decay past it is checked as well.
    theta = perturbed(lopt.init_meta(jax.random.PRNGKey(0)), 0.5)
    num_steps, shapes = 4, list(SHAPES.values())  # dict leaves flatten in key order
    opt = lopt.optimizer(theta)
    update = jax.jit(opt.update)
    params = _params()
    state = opt.init(params, num_steps)
    # Two references: with the float64 hyperparameters, and with the optimizer's float32
    # ones (checked against the float64 ones first) to check the arithmetic tightly.
    refs = {
        name: {
            "m": {k: np.zeros(s) for k, s in SHAPES.items()},
            "v": {k: np.zeros(s) for k, s in SHAPES.items()},
            "prod1": np.ones(len(shapes)),
            "prod2": np.ones(len(shapes)),
        }
        for name in ("float64", "rounded")
    }
    betas1 = []
    for step, grads in enumerate(_grad_stream(7, seed=2)):
        updates, state = update(grads, state, params, jnp.float32(1.0))
        hp64 = _ref_hyperparameters(lopt, theta, shapes, step, num_steps)
        got = lopt.hyperparameters(theta, shapes, step, num_steps)
        for name in hp64:
            np.testing.assert_allclose(got[name], hp64[name], rtol=2e-6, err_msg=name)
        betas1.append(hp64["beta1"][0])
        for ref_name, hp in (("float64", hp64), ("rounded", got)):
            hp = {k: np.broadcast_to(np.float64(x), len(shapes)) for k, x in hp.items()}
            r = refs[ref_name]
            r["prod1"], r["prod2"] = r["prod1"] * hp["beta1"], r["prod2"] * hp["beta2"]
            for i, k in enumerate(SHAPES):
                g = np.float64(grads[k])
                r["m"][k] = hp["beta1"][i] * r["m"][k] + (1 - hp["beta1"][i]) * g
                r["v"][k] = hp["beta2"][i] * r["v"][k] + (1 - hp["beta2"][i]) * g**2
                m_hat = r["m"][k] / (1 - r["prod1"][i])
                v_hat = r["v"][k] / (1 - r["prod2"][i])
                ref = -hp["lr"][i] * m_hat / (np.sqrt(v_hat) + hp["eps"][i])
                scale = np.abs(ref).max()
                # Rounded: float32 moments of gradients whose scale varies 1e6-fold from
                # step to step, measured within 1.7e-6 of the tensor's update scale.
                # Float64: a float32 β is within 3e-8 of the exact one, so 1 - β2 (~1e-3)
                # is off by up to 3e-5 of itself; measured 9e-6 of the update scale.
                tol = 5e-6 if ref_name == "rounded" else 3e-5
                np.testing.assert_allclose(
                    updates[k], ref, rtol=tol, atol=tol * scale, err_msg=f"{ref_name} {k}"
                )
    assert np.ptp(betas1) > 1e-3  # β1 did vary over time
    one_minus = 1 - refs["rounded"]["prod1"]
    kept = np.broadcast_to(state.one_minus_beta1_prod, one_minus.shape)
    np.testing.assert_allclose(kept, one_minus, rtol=1e-6)


def test_bias_correction_with_time_varying_beta1_uses_the_product_of_betas():
    # β1 falls with progress (output weight -4 on frac): 0.9 at step 0, sigmoid(logit(0.9)
    # - 3 tanh(4 t / 3N)) later. The update must divide by 1 - Π β1 (NumPy, float64); the
    # usual 1 - β1_t^t would be wrong by tens of percent here.
    lopt = LearnedAdamLOpt()
    theta = _reading_frac(lopt, 1, -4.0)
    num_steps, g = 5, np.array([1.0, -0.5, 2.0], np.float32)
    opt = lopt.optimizer(theta)
    params = {"w": np.zeros(3, np.float32)}
    state = opt.init(params, num_steps)
    logit = math.log(0.9 / 0.1)
    m, v, prod, b2 = np.zeros(3), np.zeros(3), 1.0, np.float64(np.float32(0.999))
    for t in range(5):
        grads = {"w": g * (t + 1) * (-1) ** t}
        updates, state = opt.update(grads, state, params, 1.0)
        b1 = 1 / (1 + math.exp(-(logit + 3 * math.tanh(-4 * t / num_steps / 3))))
        gt = np.float64(grads["w"])
        m, v, prod = b1 * m + (1 - b1) * gt, b2 * v + (1 - b2) * gt**2, prod * b1
        v_hat = v / (1 - b2 ** (t + 1))
        ref = -1e-3 * (m / (1 - prod)) / (np.sqrt(v_hat) + 1e-8)
        np.testing.assert_allclose(updates["w"], ref, rtol=2e-6)
        naive = -1e-3 * (m / (1 - b1 ** (t + 1))) / (np.sqrt(v_hat) + 1e-8)
        if t >= 2:
            assert np.abs(naive - ref).max() > 0.05 * np.abs(ref).max()
    hp = lopt.hyperparameters(theta, [(3,)], 4, num_steps)
    assert float(hp["beta1"][0]) < 0.7


def test_raising_beta1_keeps_more_momentum_and_lr_follows_progress():
    lopt = LearnedAdamLOpt()
    params = {"w": np.zeros(4, np.float32)}
    g = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    second = {}
    for name, bias in (("default", 0.0), ("raised", 1.5)):
        theta = _with_output_bias(lopt, 1, bias)
        beta1 = 1 / (1 + math.exp(-(math.log(9) + 3 * math.tanh(bias / 3))))
        hp = lopt.hyperparameters(theta, [(4,)], 0, LONG)
        np.testing.assert_allclose(hp["beta1"], [beta1], rtol=1e-6)
        np.testing.assert_allclose(hp["lr"], [1e-3], rtol=1e-7)
        opt = lopt.optimizer(theta)
        state = opt.init(params, LONG)
        _, state = opt.update({"w": g}, state, params, 1.0)
        u, _ = opt.update({"w": -g}, state, params, 1.0)
        # After g then -g: m/c1 = -(1 - β1) g / (1 + β1) and v/c2 = g², so the second
        # step turns back by only lr (1 - β1) / (1 + β1) per entry: less with more momentum.
        np.testing.assert_allclose(u["w"], 1e-3 * (1 - beta1) / (1 + beta1) * np.sign(g), 1e-4)
        second[name] = np.abs(u["w"]).max()
    assert second["raised"] < 0.5 * second["default"]
    # The learning rate as a function of progress: base_lr · exp(3 tanh(-2 frac / 3)).
    theta = _reading_frac(lopt, 0, -2.0)
    for step in (0, 25, 50, 100):
        expected = 1e-3 * math.exp(3 * math.tanh(-2 * step / 100 / 3))
        lr = lopt.hyperparameters(theta, [(4,)], step, 100)["lr"]
        np.testing.assert_allclose(lr, [expected], rtol=1e-6)
        state = lopt.optimizer(theta).init(params, 100)._replace(step=jnp.int32(step))
        u, _ = lopt.optimizer(theta).update({"w": g}, state, params, 1.0)
        np.testing.assert_allclose(u["w"], -expected * np.sign(g), rtol=1e-5)


def test_per_tensor_gives_a_matrix_and_a_vector_different_hyperparameters():
    shapes = [(6, 4), (4,)]
    params = {"b": np.zeros(4, np.float32), "w": np.zeros((6, 4), np.float32)}
    grads = {"b": np.ones(4, np.float32), "w": np.ones((6, 4), np.float32)}
    for per_tensor in (True, False):
        lopt = LearnedAdamLOpt(per_tensor=per_tensor)
        theta = perturbed(lopt.init_meta(jax.random.PRNGKey(5)), 0.5)
        hp = lopt.hyperparameters(theta, shapes, 3, 100)
        if per_tensor:
            for name, values in hp.items():
                assert values.shape == (2,)
                if name.startswith("beta"):  # compare 1 - β: β2 stays within 0.02 of 1
                    values = 1 - values
                assert abs(float(values[0]) / float(values[1]) - 1) > 1e-2, name
        else:
            assert all(values.shape == (1,) for values in hp.values())
        # A constant gradient of 1 at step 0: the update is -lr / (1 + ε) per tensor.
        opt = lopt.optimizer(theta)
        u, _ = opt.update(grads, opt.init(params, 100), params, 1.0)
        lr = lopt.hyperparameters(theta, [(4,), (6, 4)], 0, 100)["lr"]
        np.testing.assert_allclose(u["b"], -np.broadcast_to(lr, 2)[0], rtol=1e-5)
        np.testing.assert_allclose(u["w"], -np.broadcast_to(lr, 2)[1], rtol=1e-5)
        assert (np.abs(u["b"][0] / u["w"][0, 0] - 1) > 1e-3) == per_tensor


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_huge_theta_keeps_hyperparameters_in_bounds_and_updates_finite(scale):
    # 1e30 overflows the network (inf - inf = NaN in its last layer): NaN outputs fall
    # back to the defaults, infinite ones to the bounds.
    lopt = LearnedAdamLOpt(per_tensor=True)
    theta = perturbed(lopt.init_meta(jax.random.PRNGKey(0)), scale)
    opt = lopt.optimizer(theta)
    params = _params()
    state = opt.init(params, 20)
    for t, grads in enumerate(_grad_stream(3) + [jax.tree.map(lambda g: g * 1e36, _params(3))]):
        hp = lopt.hyperparameters(theta, list(SHAPES.values()), t, 20)
        assert np.all(hp["beta1"] < 1) and np.all(hp["beta2"] < 1)
        assert np.all(hp["beta1"] > 0) and np.all(hp["beta2"] > 0.98)
        assert np.all(hp["lr"] <= 1e-3 * math.exp(3) * (1 + 1e-6))
        assert np.all(hp["lr"] >= 1e-3 * math.exp(-3) * (1 - 1e-6))
        assert np.all(hp["eps"] > 0) and np.all(np.isfinite(hp["eps"]))
        updates, state = opt.update(grads, state, params, 1.0)
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_widest_allowed_beta_range_keeps_beta_below_one():
    top = 16.0 - math.log(0.9999 / 0.0001) - 1e-9
    lopt = LearnedAdamLOpt(beta2=0.9999, beta_range=top)
    theta = _with_output_bias(lopt, 2, 1e6)  # β2 at its upper bound
    beta2 = float(lopt.hyperparameters(theta, [], 0, 10)["beta2"][0])
    assert 0.999999 < beta2 < 1.0
    opt = lopt.optimizer(theta)
    params = {"w": np.ones(3, np.float32)}
    u, _ = opt.update({"w": np.full(3, 2.0, np.float32)}, opt.init(params, 10), params, 1.0)
    np.testing.assert_allclose(u["w"], -1e-3, rtol=1e-4)  # still the Adam step
    with pytest.raises(ValueError, match="beta_range"):
        LearnedAdamLOpt(beta2=0.9999, beta_range=top + 0.5)


@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_huge_gradients_give_adam_sized_steps(scale):
    # Beyond 1e19 a float32 square overflows: gradients are clipped there, so Adam's
    # normalised step stays about lr instead of becoming 0 (optax: g / inf) or huge.
    lopt = LearnedAdamLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    params = {"w": np.zeros((3, 4), np.float32)}
    state = opt.init(params, 100)
    for i in range(3):
        g = {"w": scale * jnp.sin(jnp.arange(12.0) + i).reshape(3, 4)}
        updates, state = opt.update(g, state, params, 1.0)
        assert np.all(np.isfinite(updates["w"])) and np.abs(updates["w"]).max() < 1e-2
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------- learned schedules


@pytest.mark.parametrize(
    "base, reference",
    [
        ("adam", optax.adam(1e-3)),
        ("sgd", optax.sgd(1e-3, momentum=0.9)),
        ("rmsprop", optax.rmsprop(1e-3)),
        ("adamw", optax.adamw(1e-3)),
        ("lion", optax.lion(1e-3)),
    ],
)
def test_default_schedule_is_the_optax_optimizer(base, reference):
    lopt = LearnedScheduleLOpt(base=base)
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(2)))
    params = ref_params = _params()
    state, ref_state = opt.init(params, LONG), reference.init(params)
    for grads in _grad_stream(5):
        updates, state = opt.update(grads, state, params, jnp.float32(1.0))
        ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
        # lr · (-1 · d) and (-lr) · d round alike: the same numbers bit for bit (op by op;
        # under jit XLA's fusion may round differently in the last bit).
        for k in SHAPES:
            np.testing.assert_array_equal(updates[k], ref_updates[k], err_msg=k)
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)


def test_learned_schedule_is_the_base_optimizer_with_that_schedule():
    # θ reading progress: lr(t) = base_lr · exp(3 tanh(-2 (t / N) / 3)), which optax
    # runs as a schedule function of its step count.
    lopt = LearnedScheduleLOpt(base="sgd", base_lr=0.1)
    theta = _reading_frac(lopt, 0, -2.0)
    num_steps = 6

    def schedule(count):
        return 0.1 * jnp.exp(3 * jnp.tanh(-2 * (count / num_steps) / 3))

    reference = optax.sgd(schedule, momentum=0.9)
    opt = lopt.optimizer(theta)
    params = ref_params = _params()
    state, ref_state = opt.init(params, num_steps), reference.init(params)
    for step, grads in enumerate(_grad_stream(num_steps)):
        expected = 0.1 * math.exp(3 * math.tanh(-2 * step / num_steps / 3))
        np.testing.assert_allclose(lopt.learning_rate(theta, step, num_steps), expected, 1e-6)
        updates, state = opt.update(grads, state, params, 1.0)
        ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
        for k in SHAPES:
            np.testing.assert_allclose(updates[k], ref_updates[k], rtol=1e-5, err_msg=k)
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    # Bounded: however large θ, lr stays within base_lr · [e^-3, e^3].
    for sign in (1.0, -1.0):
        huge = _with_output_bias(lopt, 0, sign * 1e30)
        lr = float(lopt.learning_rate(huge, 0, 10))
        np.testing.assert_allclose(lr, 0.1 * math.exp(sign * 3), rtol=1e-6)


def test_schedule_over_any_optax_transformation():
    # A bare scale_by_adam returns the ascent direction: chained with scale(-1) it is Adam.
    tx = optax.chain(optax.scale_by_adam(), optax.scale(-1.0))
    lopt = OptaxScheduleLOpt(transformation=tx, base_lr=3e-3)
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    reference = optax.adam(3e-3)
    params = _params()
    state, ref_state = opt.init(params, LONG), reference.init(params)
    for grads in _grad_stream(3):
        updates, state = opt.update(grads, state, params, 1.0)
        ref_updates, ref_state = reference.update(grads, ref_state, params)
        for k in SHAPES:
            np.testing.assert_array_equal(updates[k], ref_updates[k])
    # A transformation with factored (not parameter-shaped) state runs too.
    lopt = OptaxScheduleLOpt(transformation=optax.adafactor(1.0, min_dim_size_to_factor=2))
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    params = {"w": np.ones((4, 3), np.float32), "n": jnp.int32(2)}
    u, _ = opt.update({"w": np.ones((4, 3), np.float32), "n": jnp.int32(0)},
                      opt.init(params, 10), params, 1.0)  # fmt: skip
    assert np.all(np.isfinite(u["w"])) and np.all(u["w"] < 0) and int(u["n"]) == 0
    with pytest.raises(ValueError, match="OptaxScheduleLOpt: transformation"):
        OptaxScheduleLOpt(transformation="adam")


# ---------------------------------------------------------------- both: numerics contract

OPTIMIZERS = [
    LearnedAdamLOpt(),
    LearnedAdamLOpt(per_tensor=True),
    LearnedScheduleLOpt(base="adam"),
    LearnedScheduleLOpt(base="sgd"),
]
IDS = ["adam", "adam-per-tensor", "schedule-adam", "schedule-sgd"]


@functools.cache
@functools.cache
@functools.cache
@pytest.mark.parametrize("lopt", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("make_params", MODEL_TREES)
def test_nested_pytrees_with_integer_and_low_precision_leaves(lopt, make_params):
    net = make_params()
    params = {
        "net": net,
        "extra": [jnp.ones((2, 2), jnp.bfloat16), {"count": jnp.int32(5)}],
    }
    theta = perturbed(lopt.init_meta(jax.random.PRNGKey(1)), 0.3)
    opt = lopt.optimizer(theta)
    state = opt.init(params, 50)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    grads["extra"][1]["count"] = np.zeros((), jax.dtypes.float0)
    updates, state = jax.jit(opt.update)(grads, state, params, jnp.float32(2.0))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
    assert int(updates["extra"][1]["count"]) == 0
    for u in jax.tree.leaves(updates["net"]) + [updates["extra"][0]]:
        u = np.asarray(u, np.float32)
        assert np.all(np.isfinite(u)) and np.all(u < 0) and np.abs(u).max() < 0.1
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert int(state.step) == 1
    new = optax.apply_updates(params, updates)
    assert int(new["extra"][1]["count"]) == 5


@pytest.mark.parametrize("lopt", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params_get_the_float32_update_cast_once(lopt, dtype):
    opt = lopt.optimizer(perturbed(lopt.init_meta(jax.random.PRNGKey(0)), 0.3))
    low = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    up32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    p, grads = low(_params()), [low(g) for g in _grad_stream(2)]
    state, ref_state = opt.init(p, 100), opt.init(up32(p), 100)
    for g in grads:
        updates, state = opt.update(g, state, p, 1.0)
        ref, ref_state = opt.update(up32(g), ref_state, up32(p), 1.0)
        for k in SHAPES:
            assert updates[k].dtype == dtype
            np.testing.assert_array_equal(updates[k], ref[k].astype(dtype))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _per_param_state(lopt, state):
    """The per-parameter parts of the state: lists of arrays, one per float leaf."""
    if isinstance(lopt, LearnedAdamLOpt):
        return [state.mu, state.nu]
    if lopt.base == "adam":
        return [state.base[0].mu, state.base[0].nu]
    return [state.base[0].trace]


@pytest.mark.parametrize("lopt", OPTIMIZERS, ids=IDS)
def test_non_finite_gradient_entries_get_zero_update_and_stay_out_of_the_state(lopt):
    opt = lopt.optimizer(perturbed(lopt.init_meta(jax.random.PRNGKey(0)), 0.3))
    params = _params()
    first, second = _grad_stream(2)
    state = opt.init(params, 50)
    _, state = opt.update(first, state, params, 1.0)
    bad = {k: v.copy() for k, v in second.items()}
    bad["a"][1, 2], bad["a"][0, 0], bad["b"][4] = np.nan, np.inf, -np.inf
    mask = {k: ~np.isfinite(v) for k, v in bad.items()}
    updates, new_state = opt.update(bad, state, params, 1.0)
    # Elsewhere, the state and update are those of the same gradient with zeros there.
    zeroed = {k: np.where(mask[k], 0.0, v).astype(np.float32) for k, v in bad.items()}
    zero_updates, zero_state = opt.update(zeroed, state, params, 1.0)
    for i, k in enumerate(SHAPES):  # dict leaves flatten in key order
        assert np.all(np.isfinite(updates[k])) and np.all(updates[k][mask[k]] == 0)
        np.testing.assert_array_equal(updates[k][~mask[k]], zero_updates[k][~mask[k]])
        assert np.all(updates[k][~mask[k]] != 0)
        for new, old, zero in zip(
            *(_per_param_state(lopt, s) for s in (new_state, state, zero_state)), strict=True
        ):
            new, old, zero = np.asarray(new[i]), np.asarray(old[i]), np.asarray(zero[i])
            np.testing.assert_array_equal(new[mask[k]], old[mask[k]])
            np.testing.assert_array_equal(new[~mask[k]], zero[~mask[k]])
            assert np.any(new[mask[k]] != zero[mask[k]]) or not mask[k].any()
    updates, _ = opt.update(second, new_state, params, 1.0)
    assert all(np.all(np.isfinite(u)) and np.all(u != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("lopt", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize(
    "params", [{}, {"n": jnp.int32(3)}, {"a": [], "b": ()}], ids=["empty", "int", "containers"]
)
def test_trees_without_float_leaves_pass_through(lopt, params):
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    updates, state = opt.update(params, opt.init(params, 10), params, jnp.float32(1.0))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(int(u) == 0 for u in jax.tree.leaves(updates))
    assert int(state.step) == 1


@pytest.mark.parametrize("lopt", OPTIMIZERS, ids=IDS)
def test_jit_vmap_over_theta_and_determinism(lopt):
    base = lopt.init_meta(jax.random.PRNGKey(0))
    thetas = [perturbed(base, 0.5, seed=s) for s in range(3)]
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *thetas)
    params = _params()
    grads = _grad_stream(2)
    state = lopt.optimizer(base).init(params, 20)

    def two_steps(theta):
        opt = lopt.optimizer(theta)
        s = state
        for g in grads:
            u, s = opt.update(g, s, params, jnp.float32(1.0))
        return u, s

    batched_u, batched_s = jax.jit(jax.vmap(two_steps))(batch)
    singles = [two_steps(theta) for theta in thetas]
    for i, (u, s) in enumerate(singles):
        pairs = zip(jax.tree.leaves((u, s)), jax.tree.leaves((batched_u, batched_s)), strict=True)
        for a, b in pairs:
            np.testing.assert_allclose(b[i], a, rtol=1e-6, atol=1e-12)
    # Different θ give different updates (unless the base is fixed at θ's output bounds).
    assert not np.allclose(batched_u["a"][0], batched_u["a"][1], rtol=1e-4, atol=0)
    again = jax.jit(jax.vmap(two_steps))(batch)
    for a, b in zip(jax.tree.leaves((batched_u, batched_s)), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "lopt, reference, rtol",
    [
        (LearnedAdamLOpt(), optax.adam(1e-3), 3e-5),  # see test_default_theta_is_optax_adam
        (LearnedScheduleLOpt(base="sgd", base_lr=1e-2), optax.sgd(1e-2, momentum=0.9), 0),
    ],
    ids=["adam", "schedule-sgd"],
)
def test_through_as_optax_in_a_chain(lopt, reference, rtol):
    theta = lopt.init_meta(jax.random.PRNGKey(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(lopt, theta, num_steps=LONG))
    ref = optax.chain(optax.clip_by_global_norm(1.0), reference)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 5))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    model = nn.Dense(1)
    params = model.init(jax.random.PRNGKey(2), x)

    def loss_fn(p):
        return jnp.mean((model.apply(p, x) - y) ** 2)

    state, ref_state = tx.init(params), ref.init(params)
    tx_update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for _ in range(4):
        # The same gradients for both: only the transformations are compared.
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        updates, state = tx_update(grads, state, params, loss=loss)
        ref_updates, ref_state = ref_update(grads, ref_state, params)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0)
        params = optax.apply_updates(params, updates)
    assert loss_fn(params) < loss_fn(model.init(jax.random.PRNGKey(2), x))
    with pytest.raises(ValueError, match="loss"):
        tx.update(grads, state, params)


@pytest.mark.parametrize("lopt", OPTIMIZERS[::2], ids=IDS[::2])
def test_cosine_schedule_and_past_horizon_decay_scale_the_learning_rate(lopt):
    # Same θ and state: the cosine variant's update is the constant one times the schedule
    # (1, 0.5(1 + final) halfway, final at the horizon and after it, times 1/t past it).
    theta = perturbed(lopt.init_meta(jax.random.PRNGKey(0)), 0.3)
    const = lopt.optimizer(theta)
    cos = dataclasses.replace(lopt, step_schedule="cosine", step_schedule_final=0.1)
    cos = cos.optimizer(theta)
    params = _params()
    grads = _grad_stream(1)[0]
    state = const.init(params, 400)
    _, state = const.update(grads, state, params, 1.0)
    for step, mult in ((0, 1.0), (200, 0.55), (400, 0.1), (800, 0.1)):
        s = state._replace(step=jnp.int32(step))
        u_const = const.update(grads, s, params, 1.0)[0]["a"]
        u_cos = cos.update(grads, s, params, 1.0)[0]["a"]
        np.testing.assert_allclose(u_cos, mult * u_const, rtol=1e-5)
    # θ = 0: the learning rate is base_lr up to the horizon, then base_lr · N / t.
    zero = lopt.optimizer(jax.tree.map(jnp.zeros_like, theta))
    at = {t: zero.update(grads, state._replace(step=jnp.int32(t)), params, 1.0)[0]["a"]
          for t in (400, 1600)}  # fmt: skip
    np.testing.assert_allclose(at[1600], at[400] / 4, rtol=1e-5)


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (LearnedAdamLOpt, {"hidden_size": 0}, "hidden_size"),
        (LearnedAdamLOpt, {"hidden_layers": -1}, "hidden_layers"),
        (LearnedAdamLOpt, {"per_tensor": "yes"}, "per_tensor"),
        (LearnedAdamLOpt, {"base_lr": float("inf")}, "base_lr"),
        (LearnedAdamLOpt, {"beta1": 1.0}, "beta1"),
        (LearnedAdamLOpt, {"beta2": 0.0}, "beta2"),
        (LearnedAdamLOpt, {"eps": 0.0}, "eps"),
        (LearnedAdamLOpt, {"lr_range": -1.0}, "lr_range"),
        (LearnedAdamLOpt, {"beta_range": float("nan")}, "beta_range"),
        (LearnedAdamLOpt, {"eps_range": 100.0}, "eps_range"),
        (LearnedAdamLOpt, {"step_schedule": "linear"}, "step_schedule"),
        (LearnedAdamLOpt, {"step_schedule_final": 2.0}, "step_schedule_final"),
        (LearnedScheduleLOpt, {"base": "adagrad"}, "base"),
        (LearnedScheduleLOpt, {"base_lr": 0.0}, "base_lr"),
        (LearnedScheduleLOpt, {"lr_range": 50.0}, "lr_range"),
        (LearnedScheduleLOpt, {"step_schedule": "cos"}, "step_schedule"),
    ],
)
def test_meaningless_settings_are_refused_naming_the_setting(cls, kwargs, key):
    with pytest.raises(ValueError, match=f"{cls.__name__}: .*{key}"):
        cls(**kwargs)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        LearnedAdamLOpt(beta1=2.0, eps=-1.0, hidden_size=0)
    assert all(name in str(info.value) for name in ("beta1", "eps", "hidden_size"))
