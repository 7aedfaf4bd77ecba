"""The local solvers under a stage: bounds, undefined predictions, the Huber threshold, which grid points are
polished, and independence from the caller's numpy settings."""
import warnings
from dataclasses import replace

import numpy as np
import pytest

from sparse_dc.scaling import fit as fit_module
from sparse_dc.scaling.fit import (NONFINITE_RESIDUAL, PROCEDURES, FitError, fit_law, fit_stage, grid_objective,
                                   objective, solver_residuals)
from sparse_dc.scaling.forms import CHINCHILLA, PAPER, get_form
from sparse_dc.scaling.synthetic import synthetic_runs


@pytest.fixture(scope="module")
def chinchilla_runs():
    return synthetic_runs(30, CHINCHILLA, "chinchilla", noise=0.01, seed=4)


@pytest.fixture
def polishes(monkeypatch):
    """Every local polish a fit makes, in order: (start, solver), recorded around the real solver."""
    calls = []
    real = fit_module._local

    def recording(form, runs, free, base, x0, delta, solver, prior=None):
        calls.append((tuple(float(v) for v in x0), solver))
        return real(form, runs, free, base, x0, delta, solver, prior)

    monkeypatch.setattr(fit_module, "_local", recording)
    return calls


def test_undefined_predictions_are_a_large_residual_of_their_sign_never_a_perfect_fit():
    r = np.array([np.nan, np.inf, -np.inf, 0.25, -0.5, 0.0])
    assert solver_residuals(r).tolist() == [NONFINITE_RESIDUAL, NONFINITE_RESIDUAL, -NONFINITE_RESIDUAL,
                                            0.25, -0.5, 0.0]
    assert NONFINITE_RESIDUAL >= 1e3  # far beyond any real log-loss residual (|log 2| = 0.69 is a 2x miss)


@pytest.mark.parametrize("max_elements", [1, 30, 75, 2_000_000])
def test_grid_objective_is_the_objective_at_each_start_whatever_the_block_size(chinchilla_runs, max_elements):
    law, runs = get_form("chinchilla"), chinchilla_runs
    base = {k: v for k, v in CHINCHILLA.items() if k not in ("alpha", "beta")}
    starts = np.array([[0.3, 0.3], [0.34, 0.28], [np.nan, 0.3], [0.5, 0.1], [0.2, 0.6], [1.0, 1.0], [0.34, 0.29]])
    got = grid_objective(law, runs, ("alpha", "beta"), base, starts, delta=0.01, max_elements=max_elements)
    one_by_one = [objective(law, {**base, "alpha": a, "beta": b}, runs, 0.01) for a, b in starts]
    assert got.tolist() == pytest.approx(one_by_one, rel=1e-12)
    assert got[2] == np.inf and np.isfinite(np.delete(got, 2)).all()  # undefined: inf, never NaN
    assert got.tolist() != pytest.approx(grid_objective(law, runs, ("alpha", "beta"), base, starts).tolist(),
                                         rel=1e-3)  # the caller's threshold, not the default one


@pytest.mark.parametrize("solver", ["lsq", "lbfgs"])
@pytest.mark.parametrize("bound, start", [((0.4, 3.0), 0.2), ((0.01, 0.3), 0.5)])
def test_a_polish_starts_inside_the_bounds_and_stops_at_them(chinchilla_runs, solver, bound, start):
    """The runs' best alpha (0.34) lies outside the form's bounds: the fit ends on the nearer bound, from a start
    outside them (clipped in), without a warning."""
    law = replace(get_form("chinchilla"), bounds={**get_form("chinchilla").bounds, "alpha": bound})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, obj = fit_stage(law, chinchilla_runs, ("alpha",), CHINCHILLA, np.array([[start]]), top_k=1,
                                solver=solver)
    nearer = bound[0] if start < bound[0] else bound[1]
    assert bound[0] <= params["alpha"] <= bound[1] and params["alpha"] == pytest.approx(nearer, rel=1e-12)
    assert obj == objective(law, params, chinchilla_runs)


def test_both_solvers_reach_the_same_optimum_for_any_huber_threshold(chinchilla_runs):
    """Least squares and L-BFGS-B minimise the same Huber sum: at a threshold in the middle of the residuals (some
    runs quadratic, some linear) they agree to 1e-9 and report the objective at the caller's threshold."""
    law, runs, free = get_form("chinchilla"), chinchilla_runs, ("a", "b", "e", "alpha", "beta")
    start = np.array([[CHINCHILLA[k] * 1.05 for k in free]])
    found = {}
    for solver in ("lsq", "lbfgs"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. an option scipy does not know
            found[solver] = fit_stage(law, runs, free, CHINCHILLA, start, top_k=1, delta=0.01, solver=solver)
    (lsq, lsq_obj), (lbfgs, lbfgs_obj) = found["lsq"], found["lbfgs"]
    assert lsq_obj == pytest.approx(lbfgs_obj, rel=1e-9)
    assert [lsq[k] for k in free] == pytest.approx([lbfgs[k] for k in free], rel=1e-6)
    assert lsq_obj == objective(law, lsq, runs, 0.01) and lbfgs_obj == objective(law, lbfgs, runs, 0.01)
    r = np.abs(np.log(law.predict(lsq, runs) / runs.val_loss))
    assert (r < 0.01).any() and (r > 0.01).any()  # the threshold splits the runs


def test_a_stage_polishes_the_best_defined_points_ties_in_grid_order(polishes):
    """On dense runs the law does not depend on c (its term is multiplied by the sparsity, 0): grid points that
    differ only in c tie exactly, and the best three are polished in grid order (a stable sort: the same points on
    every CPU, whatever sort numpy picks for the machine). Undefined points (alpha = 0) are never polished."""
    runs = synthetic_runs(60, noise=0.0, seed=3)
    runs, free = runs.subset(runs.density == 1.0), ("alpha", "c")
    cs = np.linspace(-1.0, 1.0, 20)
    starts = np.array([[0.6, c] for c in cs[:8]] + [[0.0, 0.5]] + [[0.3, c] for c in cs] + [[0.0, -0.5]])
    grid = grid_objective(get_form("paper"), runs, free, {k: v for k, v in PAPER.items() if k not in free}, starts)
    assert len(set(grid[9:29])) == 1 and np.isinf(grid[[8, 29]]).all()
    fit_stage(get_form("paper"), runs, free, PAPER, starts)
    assert [x0 for x0, _ in polishes] == [(0.3, c) for c in cs[:3]]
    polishes.clear()
    fit_stage(get_form("paper"), runs, free, PAPER, starts[[8, 0, 29, 9]], top_k=5)
    assert [x0 for x0, _ in polishes] == [(0.3, cs[0]), (0.6, cs[0])]


def test_a_fit_passes_its_solver_grid_and_polish_count_to_every_stage(two_coefficient_form, polishes):
    runs = synthetic_runs(20, CHINCHILLA, "chinchilla", noise=0.01, seed=4)
    grid = {"a": (5.0, 5.5, 6.0, 6.5, 7.0), "b": (6.0,)}  # 5 points where the form's own grid has 4
    for solver in ("lsq", "lbfgs"):
        polishes.clear()
        fit = fit_law(runs, two_coefficient_form, solver=solver, grids=[grid], top_k=2)
        assert [s["starts"] for s in fit.stages] == [5, 2]  # the given grid; staged + generic points
        assert {s for _, s in polishes} == {solver} and len(polishes) == 2 + 2
        assert {x0[1] for x0, _ in polishes[:2]} == {6.0}  # b from the given grid
    polishes.clear()
    fit_law(runs, two_coefficient_form, grids=[grid])
    assert len(polishes) == 3 + 2  # three of the stage's grid points by default, then both joint starts


def test_a_stage_ranks_its_grid_by_the_callers_huber_threshold(polishes):
    """Three of 30 runs 1 nat off (corrupted losses): under the paper's threshold (Huber ~ absolute error) the
    generating coefficients rank first (3.0e-3 against 5.4e-3); under a wide one (squared error) a start 0.1 nat off
    on every run ranks first (1.35 against 1.5)."""
    law, free = get_form("chinchilla"), ("a", "b", "e")
    runs = synthetic_runs(30, CHINCHILLA, "chinchilla", noise=0.0, seed=4)
    runs.val_loss[:3] *= np.e
    exact = tuple(CHINCHILLA[k] for k in free)
    shifted = tuple(v + 0.1 for v in exact)  # logsumexp of three terms each +0.1: every log prediction +0.1
    starts = np.array([exact, shifted])
    fit_stage(law, runs, free, CHINCHILLA, starts, top_k=1)
    fit_stage(law, runs, free, CHINCHILLA, starts, top_k=1, delta=10.0)
    assert [x0 for x0, _ in polishes] == [exact, shifted]


def test_the_paper_form_is_the_default(train_runs):
    fit = fit_law(train_runs, start=PAPER)
    assert fit.form == "paper" and fit.procedure == "joint"


def test_a_grid_without_a_defined_point_is_a_one_line_error(chinchilla_runs):
    with pytest.raises(FitError, match=r"^chinchilla law: no finite starting point in the grid for alpha, beta$"):
        fit_stage(get_form("chinchilla"), chinchilla_runs, ("alpha", "beta"), CHINCHILLA,
                  np.array([[np.nan, 0.3], [0.3, np.nan]]))


@pytest.mark.parametrize("procedure", PROCEDURES)
def test_a_fit_does_not_depend_on_the_callers_numpy_error_state(procedure, train_runs):
    """The laws underflow harmlessly (exp of large negatives) inside the solvers: a caller running with
    np.errstate(all='raise') gets the same fit, not a FloatingPointError."""
    quiet = fit_law(train_runs, "paper", procedure)
    with np.errstate(all="raise"):
        strict = fit_law(train_runs, "paper", procedure)
    assert strict.params == quiet.params and strict.objective == quiet.objective


@pytest.mark.parametrize("solver", ["lsq", "lbfgs"])
def test_a_polish_ends_at_a_stationary_point(chinchilla_runs, solver):
    """Every coefficient's derivative of the Huber objective is ~0 where a polish stops (1e-9; it stops at 2e-10
    and below: a loose tolerance or a mis-scaled gradient stops at 4e-9 and beyond)."""
    from sparse_dc.scaling.dual import Dual
    from sparse_dc.scaling.objective import DELTA

    law, runs, free = get_form("chinchilla"), chinchilla_runs, ("a", "b", "e", "alpha", "beta")
    start = np.array([[CHINCHILLA[k] * 1.05 for k in free]])
    params, _ = fit_stage(law, runs, free, CHINCHILLA, start, top_k=1, solver=solver)
    r = law.log_predict({**params, **dict(zip(free, Dual.seed(np.array([params[k] for k in free]))))},
                        runs) - np.log(runs.val_loss)
    gradient = np.clip(r.v, -DELTA, DELTA) @ r.jacobian().T  # d/dtheta of sum Huber(r) = sum psi(r) dr/dtheta
    assert np.abs(gradient).max() < 1e-9


def test_the_least_squares_polish_takes_exact_jacobians_not_finite_differences(chinchilla_runs):
    """The Jacobian comes with the residuals (forward-mode duals): one law evaluation per trial point. Finite
    differences would add one per coefficient per step (208 evaluations here instead of 41)."""
    import dataclasses

    law = get_form("chinchilla")
    evaluations = []

    class Counted(type(law)):
        def log_predict(self, params, x):
            evaluations.append(1)
            return super().log_predict(params, x)

    counted = Counted(**{f.name: getattr(law, f.name) for f in dataclasses.fields(law)})
    free = ("a", "b", "e", "alpha", "beta")
    start = np.array([[CHINCHILLA[k] * 1.05 for k in free]])
    params, _ = fit_stage(counted, chinchilla_runs, free, CHINCHILLA, start, top_k=1)
    assert params == fit_stage(law, chinchilla_runs, free, CHINCHILLA, start, top_k=1)[0]
    assert len(evaluations) <= 100
