"""`lopt.xla_options`: the XLA:CPU options that vectorise the learned optimizers' sums and
widen their vectors change nothing but the order of additions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt
from evaluate.bench.runner import _probe
from evaluate.suite import train_seeds, tune_adam
from lopt.adafac import AdaFacLOpt
from lopt.hierarchical import HierarchicalLOpt
from lopt.mlp_lopt import MLPLOpt
from lopt.xla_options import CPU_OPTIONS, CPU_REASSOCIATE_SUMS, CPU_WIDE_VECTORS
from meta_train.jit import CPU_COMPILER_OPTIONS
from tests.lopt_cases import perturbed_theta
from tests.test_fused import _assert_close, _grads, _tree


def test_the_options_are_the_cpus_only():
    assert lopt.compiler_options("cpu") == CPU_OPTIONS
    assert CPU_OPTIONS == {**CPU_REASSOCIATE_SUMS, **CPU_WIDE_VECTORS}
    assert lopt.compiler_options("gpu") == {} and lopt.compiler_options("tpu") == {}
    assert lopt.compiler_options() == CPU_OPTIONS  # these tests run on the CPU
    # The benchmark trains and times as a user is advised to; meta-training keeps XLA's
    # order of additions (its guard against a non-finite estimate was tested with it).
    for program in (_probe, train_seeds, tune_adam):
        assert CPU_OPTIONS.items() <= program._cpu_options.items()
    assert "xla_cpu_enable_fast_math" not in CPU_COMPILER_OPTIONS


def _updates(lopt_, theta, params, options, steps=2):
    opt = lopt_.optimizer(theta)
    state = opt.init(params, 50)
    update = jax.jit(opt.update, compiler_options=options)
    out = []
    for i in range(steps):
        grads = _grads(params, jax.random.PRNGKey(20 + i), non_finite=True)
        updates, state = update(grads, state, params, jnp.float32(1.0))
        out.append((grads, updates, state))
    return out


@pytest.mark.parametrize(
    "make",
    [
        # 7-12 s each: the slow stage (the contract above stays in the default stage).
        pytest.param(lambda: MLPLOpt(), id="mlp-4x2", marks=pytest.mark.slow),
        pytest.param(
            lambda: MLPLOpt(output_norm="rms", width_scaling="fan_in"),
            id="mlp-rms",
            marks=pytest.mark.slow,
        ),
        pytest.param(lambda: AdaFacLOpt(), id="adafac", marks=pytest.mark.slow),
        pytest.param(lambda: HierarchicalLOpt(), id="hierarchical", marks=pytest.mark.slow),
    ],
)
def test_reassociated_sums_give_the_same_updates_and_keep_non_finite_masking(make):
    lopt_ = make()
    theta = perturbed_theta(lopt_)
    params = _tree(jax.random.PRNGKey(4))
    # A tensor long enough for the sums to be split into vector lanes.
    params["long"] = jax.random.normal(jax.random.PRNGKey(5), (600, 70)) * 0.05
    fast = _updates(lopt_, theta, params, CPU_OPTIONS)
    plain = _updates(lopt_, theta, params, {})
    for (grads, u1, s1), (_, u2, s2) in zip(fast, plain, strict=True):
        _assert_close(u1, u2)
        _assert_close(s1, s2)
        for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(u1), strict=True):
            u = np.asarray(u, np.float32)
            assert np.all(np.isfinite(u))
            if jnp.issubdtype(g.dtype, jnp.floating):
                # The contract the options must keep: a non-finite entry moves nothing.
                bad = ~np.isfinite(np.asarray(g, np.float32))
                assert np.all(u[bad] == 0.0)
