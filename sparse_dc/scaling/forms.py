"""Scaling-law forms: small objects with named parameters, evaluated vectorised over numpy arrays.

Every form predicts log loss as logsumexp of three log-terms (Chinchilla-replication style, Besiroglu et al. 2024):

    log L = logsumexp(t1, t2, t3),   L = exp(t1) + exp(t2) + exp(t3)

Parameters may be floats, arrays that broadcast against the runs (a grid of starts: shape (G, 1) against runs
(n,) gives (G, n)), or `Dual`s (forward-mode derivatives for the fitter). Inputs are any object with the ledger's
array attributes `active_params` (N), `unique_tokens` (U), `tokens` (D) and `density` (S).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from sparse_dc.errors import SparseDCError
from sparse_dc.scaling.dual import value

Params = Mapping[str, Any]

_TINY = 1e-300  # floor for (1 - S) before a power: 0 ** mu has no derivative in mu
_F_FLOOR = 1e-9  # f(S) and R* are kept positive so their logs / ratios stay finite during a fit
_RSTAR_FLOOR = 1e-3


def logsumexp3(t1: Any, t2: Any, t3: Any) -> Any:
    """log(e^t1 + e^t2 + e^t3), stable; the shift is a constant so Dual derivatives stay exact."""
    m = np.maximum(np.maximum(value(t1), value(t2)), value(t3))
    return np.log(np.exp(t1 - m) + np.exp(t2 - m) + np.exp(t3 - m)) + m


def single_epoch(x: Any) -> np.ndarray:
    return np.asarray(x.tokens) <= np.asarray(x.unique_tokens) * (1 + 1e-6)  # one epoch, up to rounding


def dense(x: Any) -> np.ndarray:
    return np.asarray(x.density) >= 1.0 - 1e-12


@dataclass(frozen=True)
class Stage:
    """One step of a staged fit: which parameters move, on which runs, from which grid of initial points."""

    name: str
    free: tuple[str, ...]
    select: Callable[[Any], np.ndarray]
    grid: Mapping[str, tuple[float, ...]]
    """Initial values per free parameter (the cartesian product is evaluated); missing names start at the
    current value."""


@dataclass(frozen=True)
class LawForm:
    """Base form: named parameters, initial values, bounds for the fitter, published presets, fitting stages."""

    name: str
    param_names: tuple[str, ...]
    init: Mapping[str, float]
    bounds: Mapping[str, tuple[float, float]]
    presets: Mapping[str, Mapping[str, float]]
    stages: tuple[Stage, ...]
    fixed: Mapping[str, float] = field(default_factory=dict)
    """Parameters held at these values (a reduction of a larger form, e.g. Muennighoff from the sparse law)."""

    def log_terms(self, p: Params, x: Any) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def log_predict(self, p: Params, x: Any) -> Any:
        return logsumexp3(*self.log_terms({**self.fixed, **p}, x))

    def predict(self, p: Params, x: Any) -> Any:
        return np.exp(self.log_predict(p, x))

    def preset(self, name: str) -> dict[str, float]:
        if name not in self.presets:
            raise SparseDCError(f"preset {name!r} is not defined for the {self.name} law; "
                                f"expected one of {', '.join(self.presets) or '(none)'}")
        return dict(self.presets[name])

    def check_params(self, p: Mapping[str, float]) -> dict[str, float]:
        missing = [k for k in self.param_names if k not in p]
        if missing:
            raise SparseDCError(f"{self.name} law parameters are missing {', '.join(missing)}; "
                                f"expected all of {', '.join(self.param_names)}")
        return {k: float(p[k]) for k in self.param_names}


class SparseDataConstrained(LawForm):
    """The paper's law (scaling-law.md): L = E + A f(S) / N_eff^alpha + B / D_eff^beta with beta = alpha.

    f(S) = S^eps + c (1-S)^mu scales the parameter term; the repetition half-lives R_N*(S), R_D*(S) are
    quadratic in the sparsity 1-S; U_N (unique parameters) is the compute-optimal size for the U unique tokens.
    As in the official notebook, R_D = max(D/U - 1, 0): below one epoch (D < U) the law credits all U unique tokens
    (D_eff = U), so it is only meant for D >= U (`law predict` / `plan` warn otherwise).
    """

    def log_terms(self, p: Params, x: Any) -> tuple[Any, Any, Any]:
        a, b, e, alpha = p["a"], p["b"], p["e"], p["alpha"]
        beta = p.get("beta", alpha)
        S = np.asarray(x.density, dtype=float)
        s = 1.0 - S  # sparsity
        tokens, unique = np.asarray(x.tokens, float), np.asarray(x.unique_tokens, float)
        log_n, log_u = np.log(np.asarray(x.active_params, float)), np.log(unique)
        # f(S) = S^eps + c (1-S)^mu via exp(eps log S); the (1-S)^mu term is exactly 0 for dense runs
        log_s = np.log(np.maximum(s, _TINY))
        f = np.exp(p["eps"] * np.log(S)) + p["c"] * np.exp(p["mu"] * log_s) * (s > 0)
        log_f = np.log(np.maximum(f, _F_FLOOR))
        # G = (alpha A f / (beta B))^(1/(alpha+beta)); then N_opt(C_of_D(U)) = G^(1+beta/alpha) U^(beta/alpha)
        log_g = (np.log(alpha) - np.log(beta) + a - b + log_f) / (alpha + beta)
        log_un = np.minimum(log_n, (1 + beta / alpha) * log_g + (beta / alpha) * log_u)
        r_n = np.expm1(log_n - log_un)  # R_N = N / U_N - 1 >= 0
        r_d = np.maximum(tokens / unique - 1.0, 0.0)  # R_D = max(D / U - 1, 0), the official definition
        rn_star = np.maximum(p["g1"] * (1 + s * p["c11"] - p["c21"] * s ** 2), _RSTAR_FLOOR)
        rd_star = np.maximum(p["g2"] * (1 + s * p["c12"] - p["c22"] * s ** 2), _RSTAR_FLOOR)
        # N_eff = U_N (1 + R_N* (1 - exp(-R_N / R_N*))), likewise D_eff with U: in logs, via log1p / expm1
        log_neff = log_un + np.log1p(-rn_star * np.expm1(-r_n / rn_star))
        log_deff = log_u + np.log1p(-rd_star * np.expm1(-r_d / rd_star))
        return a + log_f - alpha * log_neff, b - beta * log_deff, e + 0.0 * log_u

    def repetition_half_lives(self, p: Params, density: Any) -> tuple[np.ndarray, np.ndarray]:
        """(R_N*(S), R_D*(S)): the epochs-beyond-the-first scale at which repeated parameters/data decay."""
        p = {**self.fixed, **p}
        s = 1.0 - np.asarray(density, float)
        return (p["g1"] * (1 + s * p["c11"] - p["c21"] * s ** 2), p["g2"] * (1 + s * p["c12"] - p["c22"] * s ** 2))


class Chinchilla(LawForm):
    """Hoffmann et al. 2022: L = E + A / N^alpha + B / D^beta (no sparsity, no repetition discount)."""

    def log_terms(self, p: Params, x: Any) -> tuple[Any, Any, Any]:
        log_n = np.log(np.asarray(x.active_params, float))
        log_d = np.log(np.asarray(x.tokens, float))
        return p["a"] - p["alpha"] * log_n, p["b"] - p["beta"] * log_d, p["e"] + 0.0 * log_d


# The paper's published coefficients (scaling-law.md); A = exp(a), B = exp(b), E = exp(e), beta = alpha.
PAPER = {"a": 5.24073718, "b": 6.10303089, "e": 0.85355013, "alpha": 0.32682177, "eps": -0.00968044,
         "mu": 0.84661793, "c": -0.27288932, "g1": 11.08763712, "g2": 4.40474882, "c11": 1.90420893,
         "c12": 1.82159486, "c21": 2.79936732, "c22": 1.36557887}
# Muennighoff et al. 2023 (datablations): A=521, B=1488, E=1.87, alpha=beta=0.3527, R_N*=5.31, R_D*=15.39.
MUENNIGHOFF = {"a": float(np.log(521.0)), "b": float(np.log(1488.0)), "e": float(np.log(1.87)), "alpha": 0.3527,
               "g1": 5.309743, "g2": 15.387756}
# Hoffmann et al. 2022, approach 3: A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28.
CHINCHILLA = {"a": float(np.log(406.4)), "b": float(np.log(410.7)), "e": float(np.log(1.69)), "alpha": 0.34,
              "beta": 0.28}

_AB_GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
            "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.1, 0.3, 0.5, 1.0, 1.5)}
_G_GRID = tuple(float(g) for g in range(1, 21))  # the paper's stage-3 grid for g1, g2: 1..20
_C_GRID = (-2.0, -1.0, 0.0, 1.0, 2.0)  # the paper's stage-4 grid for c11, c12, c21, c22: -2..2
# a, b, e are log-scales (A = e^a ...): wide bounds that no real law reaches, but that stop a local solver from
# walking an unidentified scale to ~1e12, where the law's cancelling terms lose all precision (see fit_anchored).
_LOG_SCALE_BOUNDS = {"a": (-20.0, 60.0), "b": (-20.0, 60.0), "e": (-20.0, 5.0)}
_SPARSE_BOUNDS = {**_LOG_SCALE_BOUNDS, "alpha": (0.01, 3.0), "mu": (0.01, 5.0), "eps": (-3.0, 3.0),
                  "g1": (1e-2, 1e3), "g2": (1e-2, 1e3)}
_SPARSE_INIT = {"a": 6.0, "b": 6.0, "e": 0.5, "alpha": 0.3, "eps": 0.0, "mu": 1.0, "c": 0.0, "g1": 5.0,
                "g2": 15.0, "c11": 0.0, "c12": 0.0, "c21": 0.0, "c22": 0.0}

PAPER_STAGES = (
    Stage("1-dense-single-epoch", ("a", "b", "e", "alpha"), lambda x: dense(x) & single_epoch(x), _AB_GRID),
    Stage("2-single-epoch", ("a", "b", "e", "alpha", "eps", "mu", "c"), single_epoch,
          {"eps": (-0.5, 0.0, 0.5), "mu": (0.5, 1.0, 2.0), "c": (-1.0, -0.5, 0.0, 0.5)}),
    Stage("3-dense-multi-epoch", ("g1", "g2"), lambda x: dense(x) & ~single_epoch(x), {"g1": _G_GRID, "g2": _G_GRID}),
    Stage("4-sparse-multi-epoch", ("c11", "c12", "c21", "c22"), lambda x: ~dense(x) & ~single_epoch(x),
          {k: _C_GRID for k in ("c11", "c12", "c21", "c22")}),
)

_FORMS: dict[str, LawForm] = {
    "paper": SparseDataConstrained(
        name="paper", param_names=tuple(PAPER), init=_SPARSE_INIT, bounds=_SPARSE_BOUNDS,
        presets={"paper": PAPER}, stages=PAPER_STAGES),
    "muennighoff": SparseDataConstrained(
        name="muennighoff", param_names=tuple(MUENNIGHOFF),
        init={k: _SPARSE_INIT[k] for k in MUENNIGHOFF}, bounds=_SPARSE_BOUNDS,
        presets={"muennighoff": MUENNIGHOFF},
        fixed={"eps": 0.0, "mu": 1.0, "c": 0.0, "c11": 0.0, "c12": 0.0, "c21": 0.0, "c22": 0.0},
        stages=(Stage("1-single-epoch", ("a", "b", "e", "alpha"), single_epoch, _AB_GRID),
                Stage("2-multi-epoch", ("g1", "g2"), lambda x: ~single_epoch(x), {"g1": _G_GRID, "g2": _G_GRID}))),
    "chinchilla": Chinchilla(
        name="chinchilla", param_names=tuple(CHINCHILLA),
        init={"a": 6.0, "b": 6.0, "e": 0.5, "alpha": 0.3, "beta": 0.3},
        bounds={**_LOG_SCALE_BOUNDS, "alpha": (0.01, 3.0), "beta": (0.01, 3.0)}, presets={"chinchilla": CHINCHILLA},
        stages=(Stage("1-all", tuple(CHINCHILLA), lambda x: np.ones(len(np.atleast_1d(x.tokens)), bool),
                      {**_AB_GRID, "beta": _AB_GRID["alpha"]}),)),
}


def get_form(name: str) -> LawForm:
    """The law form registered under `name` ('paper', 'muennighoff', 'chinchilla')."""
    if name not in _FORMS:
        raise SparseDCError(f"law form {name!r} is unknown; expected one of {', '.join(_FORMS)}")
    return _FORMS[name]


def register_form(form: LawForm) -> LawForm:
    """Make `form` reachable by name through `get_form` (bootstrap refits look forms up by name), e.g. a reduction
    of the paper's law with some coefficients fixed. Returns `form`."""
    _FORMS[form.name] = form
    return form


def find_preset(name: str) -> tuple[LawForm, dict[str, float]]:
    """(form, coefficients) for a published preset name ('paper', 'muennighoff', 'chinchilla')."""
    for form in _FORMS.values():
        if name in form.presets:
            return form, dict(form.presets[name])
    raise SparseDCError(f"preset {name!r} is unknown; expected one of {', '.join(_FORMS)}")
