"""Optimisation on the law: optima agree with brute-force grids; delayed saturation; the plan and its config."""
import numpy as np
import pytest

from sparse_dc.data.config import DataConfig
from sparse_dc.scaling.forms import CHINCHILLA, PAPER, get_form
from sparse_dc.scaling.optimize import (
    MODEL_SIZES,
    NOTEBOOK_SIZES,
    PlanError,
    compute_optimal,
    diminishing_returns_epochs,
    loss_optimal_density,
    plan,
    predict_loss,
    range_warnings,
    run_loss,
    training_config,
)

LAW = get_form("paper")


@pytest.mark.parametrize("compute,unique", [(1e19, 1e9), (1e20, 2.6e9), (3e18, 1e8)])
def test_compute_optimum_equals_brute_force_argmin(compute, unique):
    best = compute_optimal(LAW, PAPER, compute, unique)
    n = np.geomspace(1e6, compute / 6 / 1e6, 3000)[:, None]
    s = np.geomspace(0.0625, 1.0, 300)[None, :]
    brute = run_loss(LAW, PAPER, n, unique, compute / (6 * n), s)
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
    cfg = training_config(p, "planned", recipe="fast")
    data = DataConfig.from_dict(cfg["data"])
    data.validate("data")
    assert cfg["model"] == {"preset": p.preset} and cfg["sparsity"]["density"] == pytest.approx(p.density, abs=1e-6)
    with pytest.raises(PlanError, match="compute"):
        plan(LAW, PAPER, 1e9, 1e10)


def test_density_blind_law_plans_dense():
    """Chinchilla ignores density: every density ties, and the planner must then keep the model dense."""
    p = plan(get_form("chinchilla"), CHINCHILLA, 1e9, 1e20)
    assert p.density == 1.0 and p.optimum["density"] == 1.0


def test_model_sizes_are_what_train_builds():
    """The planner's N per size is the model's own count (law_dense at the paper's vocabulary), not a label."""
    from sparse_dc.model.build import param_counts
    from sparse_dc.model.config import ModelConfig
    from sparse_dc.sparsity.config import SparsityConfig

    for name, n in MODEL_SIZES.items():
        assert param_counts(ModelConfig(preset=name, vocab_size=32000), SparsityConfig()).law_dense == n, name
    assert NOTEBOOK_SIZES["960m"] == 1.17e9 and abs(MODEL_SIZES["960m"] / 1.17e9 - 1) > 0.1


def test_plan_sizes_a_preset_by_its_built_count_or_the_notebooks_label():
    built = plan(LAW, PAPER, 1e9, 3e19)
    label = plan(LAW, PAPER, 1e9, 3e19, sizes="notebook")
    assert built.preset == label.preset == "960m"
    assert built.preset_dense_params == MODEL_SIZES["960m"] and label.preset_dense_params == 1.17e9
    # the plan's own accounting: C = 6 N_active D with the model's N
    for p in (built, label):
        assert 6 * p.preset_dense_params * p.density * p.tokens == pytest.approx(3e19, rel=1e-6)
    with pytest.raises(PlanError, match="sizes='labels'"):
        plan(LAW, PAPER, 2.6e9, 1e20, sizes="labels")


def test_range_warnings_name_each_extrapolation():
    assert range_warnings(1e9, 4e9, 0.5, 1e21) == []
    lines = range_warnings(1e9, 5e5, 1e-4, 1e31)
    assert len(lines) == 4 and "D_eff = U" in lines[0] and "tokens=5e+05" in lines[1]
    assert "density=0.0001" in lines[2] and "compute=1e+31" in lines[3]


def test_the_planner_scores_a_sub_epoch_run_at_the_unique_tokens_it_sees():
    """Below one epoch the law (as the official one) credits the whole pool U; a planned run sees only D of it.
    With a pool far beyond the budget, the plan must not buy a huge model for a sliver of an epoch."""
    assert run_loss(LAW, PAPER, 1e9, 1e10, 1e9, 1.0) == predict_loss(LAW, PAPER, 1e9, 1e9, 1e9, 1.0)
    assert predict_loss(LAW, PAPER, 1e9, 1e10, 1e9, 1.0) < run_loss(LAW, PAPER, 1e9, 1e10, 1e9, 1.0)
    p = plan(LAW, PAPER, 1e10, 1e19)  # scored at U = 1e10 whatever D, it chose 3b84 at density 0.87 for 0.05 epochs
    assert p.density < 0.1 and p.epochs > 0.5
    assert p.loss == pytest.approx(float(run_loss(LAW, PAPER, p.preset_dense_params * p.density, 1e10, p.tokens,
                                                  p.density)))
