"""The learned-optimizer cost benchmark measures real updates and reports state sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluate.measure.lopt_cost import (
    FLOOR,
    TARGETS,
    XLA_DEFAULTS_SUFFIX,
    format_table,
    measure,
    parse_variant,
    state_floor,
)
from lopt.mlp_lopt import MLPLOpt
from lopt.xla_options import CPU_OPTIONS


@pytest.mark.slow  # ~1M-parameter updates of two optimizers (~12 s); CI runs it
def test_measure_reports_ratios_and_exact_state_sizes():
    four = {"hidden_size": 4, "momentum_decays": [0.5, 0.9, 0.99, 0.999]}
    results = measure({"mlp": ("mlp", {}), "four": ("mlp", four)}, 1, 1)
    n = results["_meta"]["num_params"]
    assert n == 967_130  # the documented ~1M-parameter ConvNet
    assert results["adam"]["ratio"] == 1.0
    # Adam: two float32 moments; the MLP: 2 momenta (the default) or 4 and a mean square
    # (+ two int32 counters); the floor holds the default's accumulators.
    assert results["adam"]["state_bytes_per_param"] == pytest.approx(8.0, abs=1e-4)
    assert results["mlp"]["state_bytes_per_param"] == pytest.approx(12.0, abs=1e-4)
    assert results["four"]["state_bytes_per_param"] == pytest.approx(20.0, abs=1e-4)
    assert results[FLOOR]["state_bytes_per_param"] == pytest.approx(12.0, abs=1e-4)
    for name in ("mlp", "four"):
        r = results[name]
        assert r["seconds"] > 0 and r["ratio"] > 0
        assert r["target"] == TARGETS["mlp"] and r["holds"] == (r["ratio"] <= TARGETS["mlp"])
    table = format_table(results)
    assert "| four |" in table and "967,130 parameters" in table


def test_variant_specs_parse_and_bad_ones_fail():
    assert parse_variant("s=mlp:hidden_size=8,feature_norm=false,step_schedule=cosine") == (
        "s",
        "mlp",
        {"hidden_size": 8, "feature_norm": False, "step_schedule": "cosine"},
    )
    assert parse_variant("plain=adafac") == ("plain", "adafac", {})
    assert parse_variant("m2=mlp:momentum_decays=[0.9,0.99],hidden_layers=1") == (
        "m2",
        "mlp",
        {"momentum_decays": [0.9, 0.99], "hidden_layers": 1},
    )
    for bad in ("mlp", "=mlp", "x=mlp:hidden_size"):
        with pytest.raises(ValueError, match="--lopt"):
            parse_variant(bad)


def test_the_floor_advances_exactly_the_mlp_optimizers_accumulators():
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    grads = [
        jax.tree.map(lambda p, k=k: jnp.sin(k + jnp.arange(p.size).reshape(p.shape)), params)
        for k in range(3)
    ]
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    floor = state_floor(lopt.momentum_decays, lopt.rms_decay)
    s_mlp, s_floor = opt.init(params, 10), floor.init(params)
    for g in grads:
        _, s_mlp = opt.update(g, s_mlp, params)
        u, s_floor = floor.update(g, s_floor, params)
    leaves = jax.tree.leaves(params)
    for i, (m, v) in enumerate(jax.tree.leaves(s_floor, is_leaf=lambda x: isinstance(x, tuple))):
        np.testing.assert_allclose(m, s_mlp.momenta[i], rtol=1e-6)
        np.testing.assert_allclose(v, s_mlp.rms[i], rtol=1e-6)
        assert m.shape == (len(lopt.momentum_decays),) + leaves[i].shape
    assert all(np.all(np.isfinite(x)) and np.any(x != 0) for x in jax.tree.leaves(u))


@pytest.mark.slow  # ~1M-parameter updates under two option sets (~15 s); CI runs it
def test_both_option_sets_are_measured_each_against_its_own_adam():
    results = measure({"mlp": ("mlp", {})}, 1, 1, compiler="both")
    xla = XLA_DEFAULTS_SUFFIX
    assert results["_meta"]["compiler_options"] == CPU_OPTIONS
    for name in ("adam", "mlp", FLOOR):
        assert results[name]["seconds"] > 0 and results[f"{name} {xla}"]["seconds"] > 0
    assert results["adam"]["ratio"] == 1.0 and results[f"adam {xla}"]["ratio"] == 1.0
    assert results[f"mlp {xla}"]["target"] == TARGETS["mlp"]
    assert "alternating" in format_table(results)
    with pytest.raises(ValueError, match="compiler="):
        measure(["mlp"], 1, 1, compiler="fast")
