"""Fit the paper's law to a fixed-U grid: only the coefficients the grid identifies move, the rest keep the
paper's published values.

Why not the paper's four-stage procedure: its stage 1 fits (a, b, e, alpha) to dense single-epoch runs, which at
one U all share D = U, so B / U^alpha is a constant that cannot be told apart from E (b and e are separable only
through the multi-epoch curves), and a grid has one dense single-epoch run per size (stage 1 needs 5). So this
module fits one joint stage over all runs, and fixes what the grid cannot determine:

- alpha (= beta) is free only with >= 4 model sizes in the fit (with fewer, it trades off against a and f(S));
- R_N*(S) (g1, c11, c21) stays fixed: it acts only when N exceeds U_N, and at one U it mimics R_D*(S);
- f(S) gets eps, c, mu for 1, 2, 3+ sparse densities; R_D*(S) gets g2 with multi-epoch runs, c12 and c22 with
  multi-epoch runs at 1 and 2+ sparse densities; b is free only with multi-epoch runs;
- if that still leaves as many free coefficients as runs, the least identifiable are fixed too (PRIORITY order).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparse_dc.scaling.fit import FitResult, fit_law
from sparse_dc.scaling.forms import PAPER, SparseDataConstrained, Stage, dense, get_form, register_form, single_epoch
from sparse_dc.scaling.ledger import Runs
from sparse_dc.scaling.uncertainty import bootstrap, holdout_report, holdout_split, intervals
from sparse_dc.reproduce.scales import ReproduceError

# Most to least identifiable on a fixed-U grid: coefficients are freed in this order while runs allow
PRIORITY = ("e", "a", "b", "g2", "eps", "c12", "c", "mu", "c22", "alpha")
# Starting grid of the joint stage (losses of toy models are 3..6 nats: E, A, B span a wide range of logs)
GRID = {"a": (0.0, 2.0, 4.0, 6.0, 8.0, 10.0), "b": (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0),
        "e": (-1.0, 0.0, 0.5, 1.0, 1.5), "g2": (1.0, 3.0, 10.0, 30.0), "eps": (-0.5, 0.0, 0.5)}


# Far from the data R_N = N / U_N - 1 overflows to inf, which the law maps to its finite limit N_eff = U_N (1 + R_N*):
# that overflow is silenced (only that one) around law evaluations
BENIGN = {"over": "ignore"}


@dataclass
class Analysis:
    """Everything the report states about the fit."""

    form: str
    free: list[str]
    fixed: dict[str, str]
    """Fixed coefficient -> why (its value is the paper's, PAPER[name])."""
    fit: FitResult
    """All runs."""
    intervals: dict[str, tuple[float, float]]
    holdout_fit: FitResult | None = None
    """The same form fitted on all sizes but the largest."""
    holdout: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _n_sizes(runs: Runs) -> int:
    return len(np.unique(np.round(runs.dense_params)))


def choose_free(runs: Runs) -> tuple[list[str], dict[str, str]]:
    """(free coefficients in PRIORITY order, {fixed coefficient: reason}) for this set of runs."""
    multi = ~single_epoch(runs)
    sparse_all = np.unique(runs.density[~dense(runs)])
    sparse_multi = np.unique(runs.density[~dense(runs) & multi])
    sizes = _n_sizes(runs)
    why: dict[str, str] = {k: "R_N*(S) acts only when N > U_N; at one U it is confounded with R_D*(S)"
                           for k in ("g1", "c11", "c21")}
    rules = {"b": (multi.any(), "no multi-epoch runs: at one U the data term is a constant absorbed by E"),
             "g2": (multi.any(), "no multi-epoch runs"),
             "eps": (len(sparse_all) >= 1, "no sparse runs"),
             "c": (len(sparse_all) >= 2, f"f(S) needs 2+ sparse densities for c (grid: {len(sparse_all)})"),
             "mu": (len(sparse_all) >= 3, f"f(S) needs 3+ sparse densities for mu (grid: {len(sparse_all)})"),
             "c12": (len(sparse_multi) >= 1, "no sparse multi-epoch runs"),
             "c22": (len(sparse_multi) >= 2, f"R_D*(S) needs 2+ sparse multi-epoch densities for c22 "
                                            f"(grid: {len(sparse_multi)})"),
             "alpha": (sizes >= 4, f"{sizes} model size(s) in the fit: alpha needs 4+ (it trades off against a, "
                                   "f(S) and E)")}
    free = []
    for name in PRIORITY:
        ok, reason = rules.get(name, (True, ""))
        if not ok:
            why[name] = reason
        elif len(free) + 1 < len(runs):  # keep at least one more run than free coefficients
            free.append(name)
        else:
            why[name] = f"only {len(runs)} runs in the fit"
    if len(free) < 3:
        raise ReproduceError(f"{len(runs)} runs in the fit: expected at least 4 to fit E, A and B")
    return free, why


def reduced_form(free: list[str]) -> SparseDataConstrained:
    """The paper's law with every coefficient outside `free` fixed at its published value, fitted in one stage
    on all runs from a grid of starts; registered under a name that lists the fixed coefficients."""
    paper = get_form("paper")
    fixed = {k: PAPER[k] for k in paper.param_names if k not in free}
    name = "paper-fixed-" + ",".join(k for k in paper.param_names if k in fixed)
    stage = Stage("joint-all-runs", tuple(free), lambda x: np.ones(len(np.atleast_1d(x.tokens)), bool),
                  {k: v for k, v in GRID.items() if k in free})
    form = SparseDataConstrained(name=name, param_names=tuple(free), init={k: paper.init[k] for k in free},
                                 bounds=paper.bounds, presets={}, stages=(stage,), fixed=fixed)
    return register_form(form)  # bootstrap refits look the form up by name


def analyse(runs: Runs, n_bootstrap: int, seed: int = 0) -> Analysis:
    """Fit on all runs (with bootstrap intervals) and on all but the largest size (scored on the largest)."""
    sizes = np.unique(runs.dense_params)
    notes: list[str] = []
    if len(sizes) >= 2:
        above = float(sizes[-2])  # hold out every run of the largest size
        train, test = holdout_split(runs, above)
    else:
        train, test, above = runs, None, None
        notes.append("one model size: no held-out evaluation")
    free, why = choose_free(train)  # chosen on the smaller set so both fits use the same form
    form = reduced_form(free)
    holdout_fit = holdout = None
    with np.errstate(**BENIGN):
        fit = fit_law(runs, form, "staged", top_k=5)
        samples = bootstrap(runs, fit, n_bootstrap, seed=seed) if n_bootstrap > 0 else []
        if test is not None:
            holdout_fit = fit_law(train, form, "staged", top_k=5)
            holdout = holdout_report(holdout_fit, test, above)
    fit.bootstrap, fit.holdout = samples or None, holdout
    ci = intervals(samples) if samples else {}
    return Analysis(form=form.name, free=free, fixed=why, fit=fit, intervals=ci, holdout_fit=holdout_fit,
                    holdout=holdout, notes=notes)
