"""The official notebook's four-stage fit (fitting/fitting.ipynb), reproduced: its forms, its grids, its optimiser.

Each stage minimises the sum of Huber_1e-3 residuals of log loss with torch LBFGS (lr 0.1, history 10, 20
iterations per step, strong Wolfe, 50 steps) from every point of its grid and keeps the start with the lowest
final objective. `lbfgs.minimize_starts` runs all starts of a stage together (same algorithm, vectorised).

1. dense single-epoch runs, the plain form  log L = LSE(a - alpha log N, b - alpha log D, e)  (beta = alpha);
   grid a, b in linspace(0, 10, 5), e in linspace(-1, 1, 4), alpha in linspace(0, 1, 4).
2. all single-epoch runs, a, b, e, alpha from stage 1 plus f(S) = S^eps + c (1-S)^mu on the parameter term, no
   unique-parameter cap:  LSE(a - alpha log(N_dense S) + log f(S), b - alpha log D, e);  grid eps, mu, c in
   linspace(-2, 2, 5).
3. dense multi-epoch runs, R_N* = g1 and R_D* = g2 free, everything else from stage 2; U_N, R_N, R_D precomputed
   once from the stage-2 coefficients (the full law's definitions); grid linspace(1, 20, 10) for both.
4. sparse multi-epoch runs, c11, c12, c21, c22 free (R_N*(S), R_D*(S)); grid linspace(-2, 2, 5) for each.

As in the notebook, the stage losses clamp the density to [1e-8, 1 - 1e-8] (a dense run gets f = (1-1e-8)^eps +
c 1e-8^mu) and floor N_eff, D_eff and R* at 1e-8 and f at 1e-12; the fitted law itself uses the exact density.
Column conventions: N_dense = the ledger's dense_params (stages 1-2), N = active_params (stages 3-4, = N_dense x S).
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from sparse_dc.errors import SparseDCError
from sparse_dc.scaling.forms import dense, single_epoch
from sparse_dc.scaling.lbfgs import MAX_LS_TORCH_2_1, minimize_starts
from sparse_dc.scaling.ledger import Runs
from sparse_dc.scaling.objective import huber_objective

STAGE_NAMES = ("1-dense-single-epoch", "2-single-epoch", "3-dense-multi-epoch", "4-sparse-multi-epoch")
STAGE_FREE = (("a", "b", "e", "alpha"), ("a", "b", "e", "alpha", "eps", "mu", "c"), ("g1", "g2"),
              ("c11", "c12", "c21", "c22"))
_PM2 = tuple(np.linspace(-2, 2, 5))
GRIDS: tuple[dict[str, tuple[float, ...]], ...] = (
    {"a": tuple(np.linspace(0, 10, 5)), "b": tuple(np.linspace(0, 10, 5)), "e": tuple(np.linspace(-1, 1, 4)),
     "alpha": tuple(np.linspace(0, 1, 4))},
    {"eps": _PM2, "mu": _PM2, "c": _PM2},
    {"g1": tuple(np.linspace(1, 20, 10)), "g2": tuple(np.linspace(1, 20, 10))},
    {k: _PM2 for k in ("c11", "c12", "c21", "c22")},
)
"""The notebook's grids of initial points, in its loop order (the first start wins a tie)."""
_S_LO, _S_HI = 1e-8, 1 - 1e-8  # the notebook's clamp of the density inside its stage losses
_FLOOR, _F_FLOOR = 1e-8, 1e-12


class NotebookFitError(SparseDCError):
    """The runs cannot support a stage of the notebook's fit."""


# ---------------------------------------------------------------------------------------------- the stage forms
# Each returns the three log-terms (m starts, n runs) and their partials in the stage's free parameters (what
# torch's autograd computes; a clamp passes no gradient where it binds, as torch.clamp's backward).
def _clamped(x: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(torch.clamp(x, min=floor), where the gradient passes)."""
    return np.maximum(x, floor), x >= floor


def _plain_terms(theta: list[np.ndarray], x: dict[str, np.ndarray]):
    """Stage 1: LSE(a - alpha log N, b - alpha log D, e)."""
    a, b, e, alpha = theta
    t = (a - alpha * x["log_n"], b - alpha * x["log_d"], e + 0.0 * x["log_d"])
    return t, ((1.0, None, None, -x["log_n"]), (None, 1.0, None, -x["log_d"]), (None, None, 1.0, None))


def _sparse_terms(theta: list[np.ndarray], x: dict[str, np.ndarray]):
    """Stage 2: LSE(a - alpha log(N_dense S) + log f(S), b - alpha log D, e), f = S^eps + c (1-S)^mu."""
    a, b, e, alpha, eps, mu, c = theta
    s_eps, oms_mu = x["s"] ** eps, (1 - x["s"]) ** mu
    f, live = _clamped(s_eps + c * oms_mu, _F_FLOOR)
    t = (a - alpha * x["log_n"] + np.log(f), b - alpha * x["log_d"], e + 0.0 * x["log_d"])
    d_f = (live * s_eps * np.log(x["s"]) / f, live * c * oms_mu * np.log(1 - x["s"]) / f, live * oms_mu / f)
    return t, ((1.0, None, None, -x["log_n"], *d_f), (None, 1.0, None, -x["log_d"], None, None, None),
               (None, None, 1.0, None, None, None, None))


def _effective(base: np.ndarray, r: np.ndarray, r_star: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clamp(base + base R* (1 - exp(-R / R*)), 1e-8), its derivative in R*)."""
    decay = np.exp(-r / r_star)
    value, live = _clamped(base + base * r_star * (1 - decay), _FLOOR)
    return value, live * (base * (1 - decay) - base * r_star * decay * (r / r_star ** 2))


def _repeated_terms(p: Mapping[str, float], x: dict[str, np.ndarray], rn_star: np.ndarray, rd_star: np.ndarray):
    """Stages 3-4: the log-terms with repetition-discounted N_eff, D_eff (stage-2 coefficients fixed), and their
    derivatives in R_N* and R_D*."""
    n_eff, dn = _effective(x["n_star"], x["rn"], rn_star)
    d_eff, dd = _effective(x["u"], x["rd"], rd_star)
    t = (p["a"] - p["alpha"] * np.log(n_eff) + x["log_f"], p["b"] - p["alpha"] * np.log(d_eff), p["e"] + 0.0 * d_eff)
    return t, -p["alpha"] * dn / n_eff, -p["alpha"] * dd / d_eff


def _stage_terms(stage: int, fixed: Mapping[str, float], x: dict[str, np.ndarray]):
    """The log-terms function of `stage` (0-based) for objective.huber_objective, theta in STAGE_FREE order."""
    if stage == 0:
        return lambda theta: _plain_terms(theta, x)
    if stage == 1:
        return lambda theta: _sparse_terms(theta, x)
    if stage == 2:
        def terms(theta: list[np.ndarray]):
            t, d_rn, d_rd = _repeated_terms(fixed, x, theta[0], theta[1])
            return t, ((d_rn, None), (None, d_rd), (None, None))
        return terms
    oms = 1 - x["s"]

    def terms(theta: list[np.ndarray]):
        c11, c12, c21, c22 = theta
        rn_star, rn_live = _clamped(fixed["g1"] * (1 + oms * c11 - c21 * oms ** 2), _FLOOR)
        rd_star, rd_live = _clamped(fixed["g2"] * (1 + oms * c12 - c22 * oms ** 2), _FLOOR)
        t, d_rn, d_rd = _repeated_terms(fixed, x, rn_star, rd_star)
        d_rn, d_rd = d_rn * rn_live * fixed["g1"], d_rd * rd_live * fixed["g2"]
        return t, ((d_rn * oms, None, -d_rn * oms ** 2, None), (None, d_rd * oms, None, -d_rd * oms ** 2),
                   (None,) * 4)
    return terms


def _stage_inputs(stage: int, runs: Runs, p: Mapping[str, float]) -> dict[str, np.ndarray]:
    """The columns a stage's loss reads; stages 3-4 precompute U_N, R_N, R_D from the stage-2 coefficients with
    the exact density, as the notebook does (numpy, before its torch loop)."""
    s = np.clip(runs.density, _S_LO, _S_HI)
    if stage < 2:
        n = runs.dense_params * (s if stage == 1 else 1.0)
        return {"log_n": np.log(np.maximum(n, _FLOOR)), "log_d": np.log(runs.tokens), "s": s}
    n, u, d, S = runs.active_params, runs.unique_tokens, runs.tokens, runs.density
    A, B, alpha = np.exp(p["a"]), np.exp(p["b"]), p["alpha"]
    beta = alpha
    with np.errstate(all="ignore"):
        a_t = (S ** p["eps"] + p["c"] * (1 - S) ** p["mu"]) * A
        G = ((alpha * a_t) / (beta * B)) ** (1 / (alpha + beta))
        compute = ((G * u) ** (1 / (alpha / (alpha + beta)))) * 6  # C at which U tokens are compute-optimal
        n_opt = G * (compute / 6) ** (beta / (alpha + beta))
        n_star = np.where(n < n_opt, n, n_opt)  # Python's min(n_opt, n)
        rn, rd = n / n_star - 1, d / u - 1
    log_f = np.log(np.maximum(s ** p["eps"] + p["c"] * (1 - s) ** p["mu"], _F_FLOOR))  # fixed in stages 3-4
    return {"n_star": n_star, "u": u, "rn": np.where(0 > rn, 0.0, rn), "rd": np.where(0 > rd, 0.0, rd), "s": s,
            "log_f": log_f}


# ---------------------------------------------------------------------------------------------- the procedure
def stage_masks(runs: Runs) -> list[np.ndarray]:
    one, den = single_epoch(runs), dense(runs)
    return [den & one, one, den & ~one, ~den & ~one]


def fit_stage(stage: int, runs: Runs, current: Mapping[str, float], starts: np.ndarray,
              max_ls: int | None = MAX_LS_TORCH_2_1) -> tuple[dict[str, float], float, np.ndarray]:
    """Minimise stage `stage` (0-based) on `runs` from every row of `starts`; (params, objective, per-start
    final objectives). The winner is the first start with the lowest final objective (the notebook's `<`)."""
    free = STAGE_FREE[stage]
    fun = huber_objective(_stage_terms(stage, current, _stage_inputs(stage, runs, current)),
                          np.log(np.maximum(runs.val_loss, _FLOOR)), len(free))
    final, _ = minimize_starts(fun, starts, max_ls=max_ls)
    values, _ = fun(final)
    if not np.isfinite(values).any():
        raise NotebookFitError(f"stage {STAGE_NAMES[stage]}: no start reached a finite objective")
    best = int(np.nanargmin(np.where(np.isfinite(values), values, np.nan)))
    return {**current, **dict(zip(free, map(float, final[best])))}, float(values[best]), values


def grid_points(stage: int, grid: Mapping[str, Sequence[float]]) -> np.ndarray:
    """The grid's cartesian product in the notebook's loop order, as full rows of the stage's free parameters
    (stage 2 starts a, b, e, alpha from stage 1: those columns are filled in by `fit_notebook`)."""
    free = STAGE_FREE[stage]
    axes = [tuple(grid.get(k, (np.nan,))) for k in free]
    return np.array(list(itertools.product(*axes)), dtype=float).reshape(-1, len(free))


def fit_notebook(runs: Runs, start: Mapping[str, float] | None = None,
                 grids: Sequence[Mapping[str, Sequence[float]]] | None = None,
                 max_ls: int | None = MAX_LS_TORCH_2_1, progress: bool = False
                 ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The notebook's four stages on `runs`: (13 coefficients, one report per stage).

    `start`: a full coefficient set every stage starts from instead of its grid (bootstrap warm starts).
    `grids`: replaces GRIDS (one mapping per stage). `max_ls`: see lbfgs.minimize_starts.
    """
    grids = GRIDS if grids is None else grids
    masks = stage_masks(runs)
    for name, free, mask in zip(STAGE_NAMES, STAGE_FREE, masks):  # before any work
        if mask.sum() < len(free) + 1:
            raise NotebookFitError(f"stage {name} of the paper law needs at least {len(free) + 1} matching runs to "
                                   f"fit {', '.join(free)}; the ledger has {int(mask.sum())}")
    current: dict[str, float] = {}
    reports = []
    for stage, mask in enumerate(tqdm(masks, desc="fit (notebook stages)", unit="stage", disable=not progress)):
        free = STAGE_FREE[stage]
        t0 = time.perf_counter()
        if start is not None:
            starts = np.array([[start[k] for k in free]], dtype=float)
        else:
            starts = grid_points(stage, grids[stage])
            for j, k in enumerate(free):  # parameters without a grid start from the previous stage (stage 2)
                if k not in grids[stage]:
                    starts[:, j] = current[k]
        current, obj, _ = fit_stage(stage, runs.subset(mask), current, starts, max_ls)
        reports.append({"name": STAGE_NAMES[stage], "free": list(free), "n_runs": int(mask.sum()),
                        "starts": int(len(starts)), "objective": obj, "seconds": time.perf_counter() - t0})
    return current, reports
