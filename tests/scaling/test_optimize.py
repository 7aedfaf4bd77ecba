"""Optimisation on the law: optima agree with brute-force grids; delayed saturation; the plan and its config."""
import numpy as np
import pytest

from sparse_dc.data.config import DataConfig
from sparse_dc.scaling.forms import CHINCHILLA, PAPER, get_form
from sparse_dc.scaling.optimize import (
    MODEL_SIZES,
    PlanError,
    compute_optimal,
    diminishing_returns_epochs,
    loss_optimal_density,
    plan,
    predict_loss,
    training_config,
)

LAW = get_form("paper")


@pytest.mark.parametrize("compute,unique", [(1e19, 1e9), (1e20, 2.6e9), (3e18, 1e8)])
def test_compute_optimum_equals_brute_force_argmin(compute, unique):
    best = compute_optimal(LAW, PAPER, compute, unique)
    n = np.geomspace(1e6, compute / 6 / 1e6, 3000)[:, None]
    s = np.geomspace(0.0625, 1.0, 300)[None, :]
    brute = predict_loss(LAW, PAPER, n, unique, compute / (6 * n), s)
    i, j = np.unravel_index(np.argmin(brute), brute.shape)
    assert best["loss"] <= brute[i, j] + 1e-9
    assert best["loss"] == pytest.approx(brute[i, j], abs=1e-5)
    assert best["active_params"] == pytest.approx(n[i, 0], rel=0.02)
    assert best["density"] == pytest.approx(s[0, j], rel=0.02)
    assert 6 * best["active_params"] * best["tokens"] == pytest.approx(compute)


def test_loss_optimal_density_equals_brute_force_argmin():
    dense, unique, tokens = 5.21e8, 1e9, 4e9
    s, loss = loss_optimal_density(LAW, PAPER, dense, unique, tokens)
    grid = np.geomspace(0.0625, 1.0, 20001)
    brute = predict_loss(LAW, PAPER, dense * grid, unique, tokens, grid)
    assert loss <= brute.min() + 1e-12 and s == pytest.approx(grid[np.argmin(brute)], rel=1e-3)
    assert 0.0625 < s < 1.0  # moderate: neither dense nor the sparsest


def test_sparsity_delays_diminishing_returns():
    dense = diminishing_returns_epochs(LAW, PAPER, 2e8, 1e9, 1.0)
    sparse = diminishing_returns_epochs(LAW, PAPER, 1e8, 1e9, 0.5)
    assert 1 < dense < sparse < 100
    assert diminishing_returns_epochs(get_form("chinchilla"), CHINCHILLA, 1e8, 1e9, 1.0) == float("inf")


def test_plan_snaps_to_a_paper_size_and_writes_a_valid_data_section():
    samples = [{**PAPER, "e": PAPER["e"] - 0.01}, PAPER, {**PAPER, "e": PAPER["e"] + 0.01}]
    p = plan(LAW, PAPER, 2.6e9, 1e20, samples=samples)
    assert p.preset in MODEL_SIZES
    ratio = abs(np.log(MODEL_SIZES[p.preset] / p.optimum["dense_params"]))
    assert all(ratio <= abs(np.log(v / p.optimum["dense_params"])) for v in MODEL_SIZES.values())
    assert 6 * MODEL_SIZES[p.preset] * p.density * p.tokens <= 1e20 and p.tokens % 256 == 0
    assert p.loss_interval[0] <= p.loss <= p.loss_interval[1]
    cfg = training_config(p, "planned")
    data = DataConfig.from_dict(cfg["data"])
    data.validate("data")
    assert cfg["model"] == {"preset": p.preset} and cfg["sparsity"]["density"] == pytest.approx(p.density, abs=1e-6)
    with pytest.raises(PlanError, match="compute"):
        plan(LAW, PAPER, 1e9, 1e10)


def test_density_blind_law_plans_dense():
    """Chinchilla ignores density: every density ties, and the planner must then keep the model dense."""
    p = plan(get_form("chinchilla"), CHINCHILLA, 1e9, 1e20)
    assert p.density == 1.0 and p.optimum["density"] == 1.0
