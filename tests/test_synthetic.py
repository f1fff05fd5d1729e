"""Synthetic problems and the `python -m meta_train.synthetic` command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_train import synthetic
from tasks.synthetic import InfluenceBalancing, LinearQuadratic, Toy2DRegression, toy_loss


def test_influence_balancing_steady_state_and_optimum():
    p = InfluenceBalancing()
    s = p.reset(jnp.float32(-1 / 6), None, None)
    for _ in range(2000):
        s, loss, finite = p.step(jnp.float32(-1 / 6), s, None)
    # 2,000 float32 steps converge geometrically (rate 1/2): round-off well below 1e-4.
    assert bool(finite) and float(s[0]) == pytest.approx(1.0, abs=1e-4)
    assert float(p.meta_objective(jnp.float32(-1 / 6))) < 1e-6
    assert float(p.meta_objective(jnp.float32(0.5))) > 1.0


def test_toy2d_meta_objective_at_the_papers_start():
    p = Toy2DRegression(horizon=100)
    # 100 × f(≈(1, 1)) with tiny learning rates: the paper's 2488 (a rounded figure: 1 %).
    assert float(p.meta_objective(jnp.array([-4.0, -4.0]))) == pytest.approx(2488, rel=0.01)
    f11 = np.sqrt(6) - np.sqrt(5) + np.sin(1) ** 2 * np.exp(-5) + 0.25 * 99
    # float32 sqrt, sin, exp and a sum ≈ 25: a few ulp, rel=1e-6 (~8 ulp).
    assert float(toy_loss(jnp.array([1.0, 1.0]))) == pytest.approx(f11, rel=1e-6)


def test_linear_quadratic_optimum():
    p = LinearQuadratic.random(jax.random.PRNGKey(0), 10, 3, curvature=2.0)
    g = jax.grad(p.meta_objective)(p.optimum)
    np.testing.assert_allclose(g, 0.0, atol=1e-5)  # float32 gradient of O(1) terms


@pytest.mark.slow  # ~5 s; the slow stage keeps the default stage under 10 minutes
def test_command_writes_json_and_png_and_separates_estimators(tmp_path, capsys):
    res = synthetic.main(
        [
            "--problem",
            "toy2d",
            "--estimators",
            "pes,tes",
            "--iterations",
            "600",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "pes" in out and "tes" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    pes, tes = data["runs"]["pes (K=10)"], data["runs"]["tes (K=10)"]
    assert len(pes["theta"]) == 600 and len(pes["meta_objective"]) == 600
    assert data["setting"]["sigma"] == 0.3 and data["setting"]["particles"] == 100
    # PES reaches the good basin of the chaotic meta-loss; truncated ES stalls far away.
    assert 2.5 < pes["final_theta"][0] < 3.0 and pes["final_meta_objective"] < 700
    assert tes["final_meta_objective"] > 2000
    assert res["runs"]["pes (K=10)"]["initial_meta_objective"] == pytest.approx(2488, rel=0.01)


def test_command_overrides_every_setting(tmp_path):
    res = synthetic.main(
        [
            "--problem",
            "linear",
            "--estimators",
            "es_single",
            "--window",
            "5",
            "--particles",
            "8",
            "--sigma",
            "0.05",
            "--outer-opt",
            "adam",
            "--lr",
            "0.05",
            "--iterations",
            "300",
            "--seed",
            "3",
            "--theta0",
            "1,1,1,1",
            "--episode",
            "20",
            "--out",
            str(tmp_path),
        ]
    )
    assert res["setting"]["window"] == 5 and res["setting"]["outer_opt"] == "adam"
    run = res["runs"]["es_single (K=5)"]
    optimum = np.asarray(res["optimum"])
    assert optimum.shape == (4,)
    # 300 noisy ES steps from θ₀ = 1 land near θ* (not on it): a convergence tolerance.
    np.testing.assert_allclose(run["final_theta"], optimum, atol=0.15)


def test_command_rejects_unknown_estimator():
    with pytest.raises(SystemExit):
        synthetic.main(["--estimators", "nope"])
