"""`lopt.pretrained`: the shipped optimizers by name, checked against their hashes."""

import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from lopt import hub as shipped
from lopt.hub import PretrainedError, describe, load_pretrained, weights_sha256


def test_lists_what_ships_and_every_index_hash_matches_its_weights():
    names = lopt.pretrained()
    assert "mnist1d-mlp-pes" in names and names == sorted(names)
    folder = shipped.shipped_dir()
    for name in names:
        # Updating shipped weights without their index entry fails here, not at a user's load.
        assert weights_sha256(folder / name) == shipped._index()[name]["sha256"], name
        assert (folder / name / "README.md").is_file(), f"{name} has no model card"
    assert set(describe()) == set(names)


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
    np.testing.assert_equal(lopt.pretrained(), ["mnist1d-mlp-pes"])  # the index still lists it
