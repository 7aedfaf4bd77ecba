"""Fit a law form to runs: a joint fit of every coefficient (the default), the official notebook's procedure, or
sparse-dc's staged fit.

Objective (the paper's, after Besiroglu et al. 2024): sum over runs of Huber_delta(log L_pred - log L_obs) with
delta = 1e-3 and log L_pred written as logsumexp of the form's three terms.

- 'joint' (default): the staged fit below, then all coefficients together on all runs from its result and from
  the form's generic initial point, best kept. It predicts held-out (larger) runs best: every coefficient is
  chosen against every run, instead of the early stages' coefficients being frozen on a subset.
- 'paper': the official notebook's four stages exactly (`notebook.py`: its forms, grids and L-BFGS from every
  start), for the paper form only.
- 'staged': sparse-dc's own four stages on the full law (the form's `stages`): each stage evaluates its whole grid
  of initial points in one vectorised numpy call (grid x runs), then polishes only the best few points with scipy
  (least_squares with the Huber loss, which is the same objective, or L-BFGS-B) using exact forward-mode
  Jacobians (`dual.Dual`), and keeps the best result.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import numpy as np
from scipy.optimize import least_squares, minimize
from tqdm import tqdm

from sparse_dc.errors import SparseDCError
from sparse_dc.scaling.dual import Dual
from sparse_dc.scaling.forms import LawForm, get_form
from sparse_dc.scaling.ledger import Runs
from sparse_dc.scaling.notebook import NotebookFitError, fit_notebook
from sparse_dc.scaling.objective import DELTA, huber

# Anchored fits: weight of the residuals pulling each free parameter to the anchor. A unit move costs Huber(1e-3)
# = 5e-7, far below a fit's data objective (~1e-4 and up), so it only decides directions the runs leave flat (e.g.
# `a` when every run's model is larger than the compute-optimal size for its data: A then cancels from the law).
PRIOR_WEIGHT = 1e-3
Procedure = Literal["joint", "paper", "staged"]
PROCEDURES = ("joint", "paper", "staged")


class FitError(SparseDCError):
    """The runs cannot support the requested fit (too few runs in a stage, unknown form, unreadable fit file)."""


def objective(form: LawForm, params: Mapping[str, Any], runs: Runs, delta: float = DELTA) -> np.ndarray:
    """The paper's objective: sum of Huber(log-loss residuals) over runs (last axis; vectorised over grids); inf
    where the law is undefined. Quiet whatever numpy's error state: the laws' terms underflow harmlessly."""
    with np.errstate(all="ignore"):
        r = form.log_predict(params, runs) - np.log(runs.val_loss)
        return np.where(np.isfinite(r), huber(r, delta), np.inf).sum(axis=-1)


def fit_metrics(form: LawForm, params: Mapping[str, float], runs: Runs) -> dict[str, float]:
    """R^2, RMSE and MAE of predicted vs observed loss (nats/token), and the mean absolute relative error."""
    with np.errstate(under="ignore"):
        pred = form.predict(params, runs)
    y = runs.val_loss
    res = pred - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"n_runs": int(len(y)), "r2": 1.0 - float((res ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "rmse": float(np.sqrt((res ** 2).mean())), "mae": float(np.abs(res).mean()),
            "mape": float(np.abs(res / y).mean())}


@dataclass
class FitResult:
    """A fitted law: coefficients, the objective, fit metrics, per-stage reports, and optional uncertainty."""

    form: str
    params: dict[str, float]
    objective: float
    metrics: dict[str, float]
    procedure: str = "joint"
    """joint, paper (the official notebook's procedure), staged or anchored."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    bootstrap: list[dict[str, float]] | None = None
    """Coefficient sets refitted on resampled runs (uncertainty.bootstrap); None without --bootstrap."""
    cv: dict[str, Any] | None = None
    holdout: dict[str, Any] | None = None

    @property
    def law(self) -> LawForm:
        return get_form(self.form)

    def predict(self, x: Any) -> np.ndarray:
        return self.law.predict(self.params, x)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str) -> None:
        from sparse_dc.config import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")


def load_fit(path: str) -> FitResult:
    """Read a FIT.json written by `FitResult.save` (or `sparse-dc law fit --out`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        result = FitResult(**data)
    except FileNotFoundError:
        raise FitError(f"fit file {path!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise FitError(f"fit file {path!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                       f"{exc.start}); expected a JSON fit written by `sparse-dc law fit`") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise FitError(f"fit file {path!r} is not a fit written by `sparse-dc law fit`: {exc}") from None
    result.params = result.law.check_params(result.params)
    return result


# ---------------------------------------------------------------------------------------------------- one stage
Solver = Literal["lsq", "lbfgs"]


# What a solver sees for a run whose prediction is undefined (NaN) or infinite: a large residual of the same sign,
# never 0, which would read as a perfect fit and draw the solver towards where the law breaks down.
NONFINITE_RESIDUAL = 1e3


def solver_residuals(r: np.ndarray) -> np.ndarray:
    """Log-loss residuals as the local solvers see them: finite ones unchanged, NaN and +inf as +NONFINITE_RESIDUAL,
    -inf as -NONFINITE_RESIDUAL."""
    return np.nan_to_num(r, nan=NONFINITE_RESIDUAL, posinf=NONFINITE_RESIDUAL, neginf=-NONFINITE_RESIDUAL)


def _local(form: LawForm, runs: Runs, free: tuple[str, ...], base: dict[str, float], x0: np.ndarray,
           delta: float, solver: Solver, prior: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Minimise the objective over the `free` parameters from x0 (others fixed at `base`): (theta, objective).

    'lsq': scipy least_squares (trust region) with loss='huber', f_scale=delta, whose cost
    0.5 f^2 sum rho((r/f)^2) equals the paper's Huber sum exactly; 'lbfgs': scipy L-BFGS-B on the same sum.
    Both use the exact Jacobian from forward-mode `Dual`s (residuals: shape (n,), Jacobian (n, K)).
    `prior` (centre of the free parameters) adds residuals PRIOR_WEIGHT x (theta - prior): negligible where the
    runs determine a parameter, it pins one they cannot determine instead of letting it drift without bound.
    The returned objective is the data objective alone.
    """
    log_y = np.log(runs.val_loss)
    lo = np.array([form.bounds.get(k, (-np.inf, np.inf))[0] for k in free])
    hi = np.array([form.bounds.get(k, (-np.inf, np.inf))[1] for k in free])
    cache: dict[bytes, Dual] = {}

    def residual(theta: np.ndarray) -> Dual:  # least_squares asks for r and J at the same theta: evaluate once
        key = theta.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = form.log_predict({**base, **dict(zip(free, Dual.seed(theta)))}, runs) - log_y
        return cache[key]

    def values(theta: np.ndarray) -> np.ndarray:  # data residuals, then the prior's (if any)
        r = solver_residuals(residual(theta).v)
        return r if prior is None else np.concatenate([r, PRIOR_WEIGHT * (theta - prior)])

    def jacobian(theta: np.ndarray) -> np.ndarray:  # (n [+ K], K)
        j = np.nan_to_num(residual(theta).jacobian().T)
        return j if prior is None else np.vstack([j, PRIOR_WEIGHT * np.eye(len(theta))])

    x0 = np.clip(x0, lo, hi)
    if solver == "lsq":
        res = least_squares(values, x0, jac=jacobian, bounds=(lo, hi), loss="huber",
                            f_scale=delta, method="trf", x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12,
                            max_nfev=200)
    else:
        def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
            if not np.all(np.isfinite(residual(theta).v)):
                return 1e30, np.zeros_like(theta)
            r, j = values(theta), jacobian(theta)
            # objective / delta keeps values O(n |r|), so L-BFGS-B's absolute tolerances are meaningful
            return float(huber(r, delta).sum()) / delta, (j.T @ np.clip(r, -delta, delta)) / delta

        res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi)),
                       options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10, "maxcor": 20})
    theta = res.x
    return theta, float(objective(form, {**base, **dict(zip(free, theta))}, runs, delta))


def grid_starts(stage_grid: Mapping[str, tuple[float, ...]], free: tuple[str, ...],
                current: Mapping[str, float]) -> np.ndarray:
    """Cartesian product of the stage grid, shape (G, len(free)); parameters without a grid keep `current`."""
    axes = [stage_grid.get(k, (current[k],)) for k in free]
    return np.array(list(itertools.product(*axes)), dtype=float).reshape(-1, len(free))


def grid_objective(form: LawForm, runs: Runs, free: tuple[str, ...], base: Mapping[str, float], starts: np.ndarray,
                   delta: float = DELTA, max_elements: int = 2_000_000) -> np.ndarray:
    """The objective at every start (G,) of the `free` parameters (others at `base`), evaluated a block of starts at
    a time: each (block x runs) temporary holds at most `max_elements` numbers (16 MB of float64) however large the
    grid. NaN-free: an undefined point's objective is inf."""
    values = np.empty(len(starts))
    block_rows = max(1, max_elements // max(len(runs), 1))
    for i in range(0, len(starts), block_rows):
        block = starts[i:i + block_rows]
        values[i:i + block_rows] = objective(form, {**base, **{k: block[:, j:j + 1] for j, k in enumerate(free)}},
                                             runs, delta)
    return values


def fit_stage(form: LawForm, runs: Runs, free: tuple[str, ...], current: Mapping[str, float],
              starts: np.ndarray, top_k: int = 3, delta: float = DELTA, solver: Solver = "lsq",
              prior: np.ndarray | None = None) -> tuple[dict[str, float], float]:
    """Evaluate every start at once (G x n array), polish the `top_k` best defined ones locally (ties in grid order),
    keep the best. `prior`: see `_local`."""
    base = {k: v for k, v in current.items() if k not in free}
    grid_obj = grid_objective(form, runs, free, base, starts, delta)
    best_theta, best_obj = None, np.inf
    ranked = np.argsort(grid_obj, kind="stable")  # stable: the same starts on every CPU, whatever sort numpy picks
    for i in ranked[np.isfinite(grid_obj[ranked])][:top_k]:
        with np.errstate(all="ignore"):
            theta, obj = _local(form, runs, free, base, starts[i], delta, solver, prior)
        if obj < best_obj:
            best_theta, best_obj = theta, obj
    if best_theta is None:
        raise FitError(f"{form.name} law: no finite starting point in the grid for {', '.join(free)}")
    return {**current, **dict(zip(free, map(float, best_theta)))}, best_obj


# ---------------------------------------------------------------------------------------------------- procedures
def stage_masks(form: LawForm, runs: Runs) -> list[np.ndarray]:
    return [np.asarray(stage.select(runs), dtype=bool) for stage in form.stages]


def fit_law(runs: Runs, form: str | LawForm = "paper", procedure: Procedure = "joint",
            start: Mapping[str, float] | None = None, top_k: int = 3, delta: float = DELTA,
            solver: Solver = "lsq", grids: list[Mapping[str, tuple[float, ...]]] | None = None,
            progress: bool = False) -> FitResult:
    """Fit `form` to `runs` with `procedure` ('joint', 'paper' or 'staged', see the module docstring).

    'staged': the form's stages in order, each on its own subset of runs from its own grid; 'joint': that result,
    then all coefficients together on all runs from it and from the form's generic initial point, keeping the
    best; 'paper': notebook.fit_notebook (paper form only). With `start` (a full coefficient set), every stage
    starts from it instead of a grid (warm start: bootstrap refits). `grids` replaces the stages' grids (one
    mapping per stage). `top_k`: grid points polished per stage ('staged', 'joint').
    """
    law = get_form(form) if isinstance(form, str) else form
    if procedure not in PROCEDURES:
        raise FitError(f"stages={procedure!r}: expected one of {', '.join(PROCEDURES)}")
    if procedure == "paper":
        return _fit_paper(runs, law, start, grids, delta, progress)
    current = {k: float(v) for k, v in (start or law.init).items() if k in law.param_names}
    reports: list[dict[str, Any]] = []
    bar = tqdm(total=len(law.stages) + (procedure == "joint"), desc=f"fit {law.name}", unit="stage",
               disable=not progress)
    for i, (stage, mask) in enumerate(zip(law.stages, stage_masks(law, runs))):
        need = len(stage.free) + 1
        if mask.sum() < need:
            raise FitError(f"stage {stage.name} of the {law.name} law needs at least {need} matching runs "
                           f"to fit {', '.join(stage.free)}; the ledger has {int(mask.sum())}")
        t0 = time.perf_counter()
        starts = (np.array([[current[k] for k in stage.free]]) if start is not None
                  else grid_starts(stage.grid if grids is None else grids[i], stage.free, current))
        current, obj = fit_stage(law, runs.subset(mask), stage.free, current, starts, top_k, delta, solver)
        reports.append({"name": stage.name, "free": list(stage.free), "n_runs": int(mask.sum()),
                        "starts": int(len(starts)), "objective": obj, "seconds": time.perf_counter() - t0})
        bar.update()
    if procedure == "joint":
        if len(runs) < len(law.param_names) + 1:
            raise FitError(f"a joint fit of the {law.name} law needs at least {len(law.param_names) + 1} runs; "
                           f"the ledger has {len(runs)}")
        t0 = time.perf_counter()
        free = law.param_names
        starts = np.array([[current[k] for k in free]] + ([] if start is not None else [[law.init[k] for k in free]]))
        current, obj = fit_stage(law, runs, free, current, starts, len(starts), delta, solver)
        reports.append({"name": "joint", "free": list(free), "n_runs": len(runs), "starts": int(len(starts)),
                        "objective": obj, "seconds": time.perf_counter() - t0})
        bar.update()
    bar.close()
    params = law.check_params(current)
    return FitResult(form=law.name, params=params, objective=float(objective(law, params, runs, delta)),
                     metrics=fit_metrics(law, params, runs), procedure=procedure, stages=reports)


def _fit_paper(runs: Runs, law: LawForm, start: Mapping[str, float] | None,
               grids: list[Mapping[str, tuple[float, ...]]] | None, delta: float, progress: bool) -> FitResult:
    if law.name != "paper":
        raise FitError(f"stages=paper: the official notebook's procedure fits the paper law only, not "
                       f"{law.name!r}; expected --stages joint or staged for this form")
    try:
        params, reports = fit_notebook(runs, start, grids, progress=progress)
    except NotebookFitError as exc:
        raise FitError(str(exc)) from None
    params = law.check_params(params)
    return FitResult(form=law.name, params=params, objective=float(objective(law, params, runs, delta)),
                     metrics=fit_metrics(law, params, runs), procedure="paper", stages=reports)


def fit_anchored(runs: Runs, form: str | LawForm, anchor: Mapping[str, float], free: tuple[str, ...],
                 delta: float = DELTA, solver: Solver = "lsq") -> FitResult:
    """Refit only `free` on all runs, the other coefficients held at `anchor` (a published preset).

    For ledgers too small for the staged fit (a handful of runs at one model size, e.g. the quickstart or a
    pilot sweep): it recalibrates the law's scale to a new tokenizer/corpus (free a, b, e: the parameter-term,
    data-term and irreducible-loss scales) and keeps the paper's exponents and sparsity/repetition shape. It
    says nothing about those shapes: fit them with procedure 'paper' once the ledger covers the paper's stages.
    A weak pull to the anchor (PRIOR_WEIGHT) keeps a coefficient the runs cannot determine at its anchor value.
    """
    law = get_form(form) if isinstance(form, str) else form
    unknown = [k for k in free if k not in law.param_names]
    if not free or unknown:
        raise FitError(f"free={','.join(free) or '(none)'}: expected some of {', '.join(law.param_names)}")
    if len(runs) < len(free) + 1:
        raise FitError(f"an anchored fit of {', '.join(free)} needs at least {len(free) + 1} runs; the ledger has "
                       f"{len(runs)}")
    t0 = time.perf_counter()
    current = law.check_params(anchor)
    starts = np.array([[current[k] for k in free]])
    current, obj = fit_stage(law, runs, free, current, starts, 1, delta, solver, prior=starts[0])
    params = law.check_params(current)
    report = {"name": "anchored", "free": list(free), "n_runs": len(runs), "starts": 1, "objective": obj,
              "seconds": time.perf_counter() - t0}
    return FitResult(form=law.name, params=params, objective=float(objective(law, params, runs, delta)),
                     metrics=fit_metrics(law, params, runs), procedure="anchored", stages=[report])
