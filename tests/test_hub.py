"""`lopt.pretrained`: the shipped optimizers by name, checked against their hashes."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
import lopt.hub
from lopt import hub as shipped
from lopt.hub import PretrainedError, describe, load_pretrained, weights_sha256

# The generalist's training checks run in the default stage; the orthogonalised variant's
# and the superseded optimizer's in the slow stage, to shorten the default stage (over 10
# minutes on a slow day); loading and hashing every one, and the variant's own tests below,
# stay in the default stage.
DEFAULT_STAGE = ("generalist",)
NAMES = [
    pytest.param(n, marks=() if n in DEFAULT_STAGE else pytest.mark.slow) for n in lopt.pretrained()
]


def test_lists_what_ships_and_every_index_hash_matches_its_weights():
    names = lopt.pretrained()
    assert "mnist1d-mlp-pes" in names and names == sorted(names)
    folder = shipped.shipped_dir()
    for name in names:
        # Updating shipped weights without their index entry fails here, not at a user's load.
        entry = shipped._index()[name]
        weights = folder / entry.get("weights", name)  # its own, or those it shares
        assert weights_sha256(weights) == entry["sha256"], name
        assert (folder / name / "README.md").is_file(), f"{name} has no model card"
    assert set(describe()) == set(names)


@pytest.mark.slow  # the horizon and gradient-scale tests train every one in the default stage
def test_every_shipped_optimizer_is_an_optax_transformation_that_trains():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    for name in lopt.pretrained():
        tx = lopt.pretrained(name, num_steps=20)
        assert isinstance(tx, optax.GradientTransformationExtraArgs)
        state = tx.init(params)
        p = params
        for _ in range(20):  # minimise |p|^2 / 2: the gradient is p
            loss = sum(jnp.sum(x * x) for x in p.values()) / 2
            updates, state = tx.update(p, state, p, loss=loss)
            p = optax.apply_updates(p, updates)
        assert float(jnp.sum(p["w"] ** 2)) < float(jnp.sum(params["w"] ** 2)), name


def test_default_horizon_comes_from_the_index():
    _, _, lopt_ = load_pretrained("mnist1d-mlp-pes")
    assert lopt_.hidden_size == 32  # the first slice's network, loadable by name


def test_unknown_names_and_bad_horizons_fail_clearly():
    with pytest.raises(PretrainedError, match="shipped: .*mnist1d-mlp-pes"):
        lopt.pretrained("adam")
    with pytest.raises(ValueError, match="num_steps"):
        lopt.pretrained("mnist1d-mlp-pes", num_steps=0).init({"w": jnp.ones(2)})


def test_edited_weights_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "checkpoints"
    shutil.copytree(shipped.shipped_dir(), copy)
    monkeypatch.setattr(shipped, "_WHEEL_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(shipped, "_REPO_DIR", copy)
    assert lopt.pretrained("mnist1d-mlp-pes", num_steps=5) is not None  # the copy loads
    weights = sorted(p for p in (copy / "mnist1d-mlp-pes").rglob("*") if p.is_file())
    target = next(p for p in weights if p.parts[-3:-1][0].isdigit() or "theta" in p.parts)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="do not match their hash"):
        lopt.pretrained("mnist1d-mlp-pes")
    shutil.rmtree(copy / "mnist1d-mlp-pes")
    with pytest.raises(PretrainedError, match="missing"):
        lopt.pretrained("mnist1d-mlp-pes")
    assert "mnist1d-mlp-pes" in lopt.pretrained()  # the index still lists it


def _regression(scale: float):
    """A small 2-layer regression task whose loss (and gradients) are multiplied by `scale`."""
    import jax  # noqa: PLC0415

    x = jax.random.normal(jax.random.PRNGKey(0), (256, 8))
    y = jnp.sin(x @ jax.random.normal(jax.random.PRNGKey(1), (8, 1)))
    params = {
        "w1": jax.random.normal(jax.random.PRNGKey(2), (8, 32)) / jnp.sqrt(8.0),
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(jax.random.PRNGKey(3), (32, 1)) / jnp.sqrt(32.0),
    }

    def loss_fn(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return scale * jnp.mean(jnp.square(h @ p["w2"] - y))

    return params, loss_fn


def _train(tx, params, loss_fn, steps: int):
    """Losses of `steps` steps of `tx` on `loss_fn`, in one scan."""
    import jax  # noqa: PLC0415

    def body(carry, _):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p, loss=loss)
        return (optax.apply_updates(p, updates), s), loss

    (p, _), losses = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))(
        (params, tx.init(params))
    )
    return np.asarray(losses), p


@pytest.mark.parametrize("name", NAMES)
def test_gradient_scales_from_1e_minus_8_to_1e8_never_give_nan(name):
    for scale in (1e-8, 1e-7, 1e-4, 1.0, 1e4, 1e8):
        params, loss_fn = _regression(scale)
        losses, p = _train(lopt.pretrained(name, num_steps=200), params, loss_fn, 200)
        assert np.all(np.isfinite(losses)), (name, scale)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in p.values()), (name, scale)
        if scale < 1e-7:
            # Known limit (docs/numerics.md): gradients of 1e-8 sink below the feature
            # normalisation's eps (1e-8 on mean squares), the network sees near-zero
            # features and its bias drifts the parameters: mnist1d-mlp-pes ends at 1.8x its
            # starting loss here. Finite, but not a stall.
            continue
        # Progress, or at worst a stall: never worse than where it started.
        assert losses[-10:].mean() <= losses[0] * 1.01, (name, scale, losses[0], losses[-1])


HORIZONS = [
    100,
    1000,
    pytest.param(20_000, marks=pytest.mark.slow),
    pytest.param(100_000, marks=pytest.mark.slow),  # 200,000 steps in one scan: ~15 s
]


@pytest.mark.parametrize("num_steps", HORIZONS)
@pytest.mark.parametrize("name", NAMES)
def test_every_declared_horizon_trains_stably_and_past_it(name, num_steps):
    params, loss_fn = _regression(1.0)
    # Twice the declared horizon: the second half is past it, where the update decays.
    losses, _ = _train(lopt.pretrained(name, num_steps=num_steps), params, loss_fn, 2 * num_steps)
    assert np.all(np.isfinite(losses))
    at_horizon = losses[num_steps - 10 : num_steps].mean()
    assert at_horizon < 0.5 * losses[0], (name, num_steps, losses[0], at_horizon)
    assert losses[-10:].mean() <= 1.05 * at_horizon, "blew up past the declared horizon"


def test_the_harness_of_optax_parts_trains_with_and_without_orthogonalisation():
    params, loss_fn = _regression(1.0)
    for orthogonalise in (True, False):
        tx = lopt.hub.harness("mnist1d-mlp-pes", 300, 3e-3, orthogonalise=orthogonalise)
        losses, p = _train(tx, params, loss_fn, 300)
        assert np.all(np.isfinite(losses))
        assert losses[-10:].mean() < 0.8 * losses[0], (orthogonalise, losses[0], losses[-1])


def test_the_orthogonalised_rule_keeps_each_steps_size_and_evens_its_singular_values():
    import jax  # noqa: PLC0415

    params, loss_fn = _regression(1.0)
    params = {**params, "step": jnp.int32(0)}  # a non-float leaf passes through
    loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(params)
    plain = lopt.pretrained("generalist", 100, weight_decay=0.0)
    ortho = lopt.hub.orthogonalised("generalist", 100, weight_decay=0.0)

    def first_update(tx):  # jitted: op by op, the iterations' matmuls took seconds
        return jax.jit(lambda g, p: tx.update(g, tx.init(p), p, loss=loss)[0])(grads, params)

    u, o = first_update(plain), first_update(ortho)
    for key in ("w1", "w2"):  # 2-D: the plain step's size, its singular values evened out
        rms = float(jnp.sqrt(jnp.mean(jnp.square(u[key]))))
        np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(jnp.square(o[key])))), rms, rtol=1e-5)
        s_plain = np.linalg.svd(np.asarray(u[key]), compute_uv=False)
        s_ortho = np.linalg.svd(np.asarray(o[key]), compute_uv=False)
        if len(s_plain) > 1:
            assert s_plain[0] / s_plain[-1] > 3.0, s_plain
            assert s_ortho[0] / s_ortho[-1] < 2.0, s_ortho
    np.testing.assert_array_equal(np.asarray(o["b1"]), np.asarray(u["b1"]))  # 1-D: the rule's
    assert o["step"] == 0
    # The decay is added after, -rate * p on the rule's schedule: equal to the plain rule's
    # own decay term, which is not orthogonalised.
    rate = 1e-2
    d = first_update(lopt.hub.orthogonalised("generalist", 100, weight_decay=rate))
    pd = first_update(lopt.pretrained("generalist", 100, weight_decay=rate))
    for key in ("w1", "b1", "w2"):  # differences of steps ~1e-3: float32 rounding ~1e-9
        np.testing.assert_allclose(d[key] - o[key], pd[key] - u[key], rtol=1e-4, atol=1e-8)


def test_the_orthogonalised_rule_trains():
    params, loss_fn = _regression(1.0)
    losses, _ = _train(lopt.hub.orthogonalised("generalist", 300), params, loss_fn, 300)
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.5 * losses[0], (losses[0], losses[-1])


def test_weight_decay_comes_from_the_index_and_a_caller_can_override_it():
    index = shipped._index()
    for name in lopt.pretrained():
        _, _, rule = load_pretrained(name)
        assert rule.weight_decay == index[name].get("weight_decay", 0.0), name
    _, _, rule = load_pretrained("generalist", weight_decay=0.0)
    assert rule.weight_decay == 0.0  # the rule exactly as meta-trained
    with pytest.raises(ValueError, match="weight_decay"):
        lopt.pretrained("generalist", weight_decay=-1e-3)


def test_index_options_set_the_rule_and_unknown_ones_fail_clearly(tmp_path, monkeypatch):
    index = shipped._index()
    for name in lopt.pretrained():
        _, _, rule = load_pretrained(name)
        for key, value in index[name].get("options", {}).items():
            assert getattr(rule, key) == value, (name, key)
    # the generalist's fan-in cap was chosen on meta-validation after meta-training
    assert load_pretrained("generalist")[2].width_scale_max == 3.0
    copy = tmp_path / "checkpoints"
    shutil.copytree(shipped.shipped_dir() / "mnist1d-mlp-pes", copy / "mnist1d-mlp-pes")
    entry = {**index["mnist1d-mlp-pes"], "options": {"nope": 1.0}}
    (copy / "shipped.json").write_text(json.dumps({"mnist1d-mlp-pes": entry}))
    monkeypatch.setattr(shipped, "_WHEEL_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(shipped, "_REPO_DIR", copy)
    with pytest.raises(PretrainedError, match="has no option.s. nope"):
        lopt.pretrained("mnist1d-mlp-pes")


def test_a_decay_per_epoch_follows_the_callers_steps_per_epoch():
    entry = shipped._index()["generalist"]
    per_epoch = entry["weight_decay_per_epoch"]
    # a small dataset seen often decays more per step than a large one
    _, _, small = load_pretrained("generalist", 100, steps_per_epoch=28.0)
    _, _, large = load_pretrained("generalist", 100, steps_per_epoch=420.0)
    assert small.weight_decay == pytest.approx(per_epoch / 28.0)
    assert large.weight_decay == pytest.approx(per_epoch / 420.0)
    # full batch (1 step per epoch) is below the fewest steps per epoch it was chosen on:
    # the decay stays at its value there, not c / 1
    fewest = entry["min_steps_per_epoch"]
    _, _, full_batch = load_pretrained("generalist", 100, steps_per_epoch=1.0)
    assert full_batch.weight_decay == pytest.approx(per_epoch / fewest)
    assert full_batch.weight_decay < 0.02
    # without it the fixed decay of the index; an explicit weight_decay wins over it
    assert load_pretrained("generalist", 100)[2].weight_decay == entry["weight_decay"]
    explicit = load_pretrained("generalist", 100, weight_decay=0.0, steps_per_epoch=28.0)
    assert explicit[2].weight_decay == 0.0
    # an optimizer shipped without a per-epoch decay keeps its own
    _, _, first = load_pretrained("mnist1d-mlp-pes", 100, steps_per_epoch=28.0)
    assert first.weight_decay == shipped._index()["mnist1d-mlp-pes"].get("weight_decay", 0.0)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="steps_per_epoch"):
            lopt.pretrained("generalist", 100, steps_per_epoch=bad)


def test_a_decay_per_step_from_a_decay_per_epoch_and_its_exponent():
    per_step = lopt.hub.per_step_decay
    # exponent 1: the same decay per pass over the data, whatever its size
    assert per_step(0.45, 420.0) == pytest.approx(0.45 / 420.0)
    assert per_step(0.45, 420.0, fewest=28.0) == pytest.approx(0.45 / 420.0)
    assert per_step(0.45, 10.0, fewest=28.0) == pytest.approx(0.45 / 28.0)  # held below
    # below 1 it falls more slowly with the data's size, from the same value at `fewest`
    assert per_step(0.45, 28.0, fewest=28.0, exponent=0.5) == pytest.approx(0.45 / 28.0)
    half = per_step(0.45, 28.0 * 16, fewest=28.0, exponent=0.5)
    assert half == pytest.approx(0.45 / 28.0 / 4.0)  # sqrt(16)
    assert half > per_step(0.45, 28.0 * 16, fewest=28.0)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="exponent"):
            per_step(0.45, 100.0, fewest=28.0, exponent=bad)
    for steps, fewest in ((0.0, 1.0), (-1.0, 1.0), (float("nan"), 1.0), (10.0, 0.0)):
        with pytest.raises(ValueError, match="steps per epoch"):
            per_step(0.45, steps, fewest=fewest)


def _mixed_tree():
    """A user's tree: a 4-D conv kernel, float16 and bfloat16 matrices, a scalar and an
    integer counter, beside a flax linen, a flax nnx and a haiku model's params."""
    import jax  # noqa: PLC0415
    from lopt_cases import MODEL_TREES  # noqa: PLC0415

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "conv": jax.random.normal(keys[0], (3, 3, 2, 4)) / 4.0,
        "half": (jax.random.normal(keys[1], (6, 5)) / 3.0).astype(jnp.float16),
        "brain": (jax.random.normal(keys[2], (5, 6)) / 3.0).astype(jnp.bfloat16),
        "scale": jnp.float32(0.5),
        "count": jnp.int32(7),
        "models": [make() for make in MODEL_TREES],
    }


@pytest.mark.parametrize("name", NAMES)
def test_any_float_pytree_gets_finite_updates_of_its_dtypes_at_any_gradient_scale(name):
    import jax  # noqa: PLC0415

    params = _mixed_tree()
    tx = lopt.pretrained(name, num_steps=10)
    leaves, treedef = jax.tree.flatten(params)

    @jax.jit
    def step(p, s, scale, seed):
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        grads = [
            (scale * jax.random.normal(k, jnp.shape(x))).astype(jnp.asarray(x).dtype)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
            else jnp.zeros_like(x)
            for k, x in zip(keys, jax.tree.leaves(p), strict=True)
        ]
        u, s = tx.update(jax.tree.unflatten(treedef, grads), s, p, loss=jnp.float32(1.0))
        return optax.apply_updates(p, u), s, u

    for scale in (1e-8, 1.0, 1e8):
        p, s = params, tx.init(params)
        for seed in range(3):
            p, s, u = step(p, s, jnp.float32(scale), seed)
            for x, y in zip(jax.tree.leaves(u), leaves, strict=True):
                y = jnp.asarray(y)
                assert x.shape == y.shape and x.dtype == y.dtype, (name, scale)
                assert np.all(np.isfinite(np.asarray(x, np.float64))), (name, scale, seed)
        assert int(p["count"]) == 7  # integer leaves are left alone
        # the state keeps its dtypes, as a lax.scan carry must
        init = tx.init(params)
        assert jax.tree.structure(s) == jax.tree.structure(init)
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(init), strict=True):
            assert jnp.asarray(a).dtype == jnp.asarray(b).dtype, name


def test_an_orthogonalised_entry_is_the_shared_weights_orthogonalised_with_its_own_decay():
    import jax  # noqa: PLC0415

    index = shipped._index()
    entry = index["generalist-ortho"]
    assert entry["orthogonalised"] and entry["weights"] == "generalist"
    assert entry["sha256"] == index["generalist"]["sha256"]
    # its decay per epoch falls as S^-exponent from its value at the fewest steps per epoch
    for steps in (28.0, 420.0, 1700.0):
        _, _, rule = load_pretrained("generalist-ortho", 100, steps_per_epoch=steps)
        expected = lopt.hub.per_step_decay(
            entry["weight_decay_per_epoch"],
            steps,
            entry["min_steps_per_epoch"],
            entry["weight_decay_epoch_exponent"],
        )
        assert rule.weight_decay == pytest.approx(expected)
    assert entry["weight_decay_epoch_exponent"] < 1.0
    assert rule.weight_decay > entry["weight_decay_per_epoch"] / 1700.0
    # the same transformation as orthogonalising the generalist with the same settings
    params, loss_fn = _regression(1.0)
    loss, grads = jax.value_and_grad(loss_fn)(params)

    def first_update(tx):
        return jax.jit(lambda g, p: tx.update(g, tx.init(p), p, loss=loss)[0])(grads, params)

    shipped_tx = lopt.pretrained("generalist-ortho", 100, weight_decay=1e-2)
    by_hand = lopt.hub.orthogonalised("generalist", 100, weight_decay=1e-2)
    plain = lopt.pretrained("generalist", 100, weight_decay=1e-2)
    a, b, c = first_update(shipped_tx), first_update(by_hand), first_update(plain)
    for key in params:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    assert not np.allclose(np.asarray(a["w1"]), np.asarray(c["w1"]))


def test_an_entry_sharing_missing_weights_fails_clearly(tmp_path, monkeypatch):
    copy = tmp_path / "checkpoints"
    copy.mkdir()
    entry = {**shipped._index()["generalist-ortho"], "weights": "gone"}
    (copy / "shipped.json").write_text(json.dumps({"generalist-ortho": entry}))
    monkeypatch.setattr(shipped, "_WHEEL_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(shipped, "_REPO_DIR", copy)
    with pytest.raises(PretrainedError, match="missing"):
        lopt.pretrained("generalist-ortho")


def test_a_rule_without_weight_decay_cannot_be_orthogonalised(tmp_path, monkeypatch):
    import jax  # noqa: PLC0415

    import lopt.export  # noqa: PLC0415
    from lopt.registry import make_lopt  # noqa: PLC0415

    adafac = make_lopt("adafac")
    theta = adafac.init_meta(jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="AdaFacLOpt has no weight_decay"):
        shipped.orthogonalised_rule(adafac, theta, 10)
    # An index entry marked orthogonalised whose weights load as such a rule.
    keep = ("description", "weights", "orthogonalised", "num_steps", "step", "sha256")
    entry = {k: v for k, v in shipped._index()["generalist-ortho"].items() if k in keep}
    copy = tmp_path / "checkpoints"
    shutil.copytree(shipped.shipped_dir() / "generalist", copy / "generalist")
    (copy / "shipped.json").write_text(json.dumps({"generalist-ortho": entry}))
    monkeypatch.setattr(shipped, "_WHEEL_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(shipped, "_REPO_DIR", copy)
    monkeypatch.setattr(lopt.export, "load_rule", lambda folder, step: (adafac, theta, {}))
    with pytest.raises(PretrainedError, match="'generalist-ortho': AdaFacLOpt has no weight"):
        lopt.pretrained("generalist-ortho")
