"""Decisions from a law: loss-optimal density, compute-optimal (N, D, density), diminishing returns, a plan.

Compute is C = 6 * N_active * D FLOPs (the paper's accounting: sparse weights cost nothing). Each optimum is a
vectorised grid argmin followed by a bounded scipy polish, so it is at least as good as the grid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
from scipy.optimize import brentq, minimize, minimize_scalar

from sparse_dc.errors import SparseDCError
from sparse_dc.scaling.forms import LawForm

# Dense-equivalent N of each preset as `sparse-dc train` builds it at the paper's vocabulary (32000): every parameter
# but the input embedding table, LM head included (sparse_dc/model/params.py `law_dense`, what the ledger records;
# `sparse-dc model` prints them; pinned by tests/scaling/test_optimize.py against the model's own count).
MODEL_SIZES = {"20m": 11_356_416, "40m": 37_364_224, "60m": 79_067_520, "120m": 148_462_848, "240m": 259_916_160,
               "480m": 519_264_000, "960m": 1_026_316_032, "1b92": 1_984_898_304, "3b84": 3_948_887_040}
# The labels the official notebook's fit used (its PARAMS_MAP; 3b84 from its validation table). Within 3% of the
# built counts except 960m, labelled 1.17e9 while its shape (hidden 1792, 24 layers) has 1.03e9. 20m and 40m were not
# in its fit: built counts. `--sizes notebook` plans with these (the paper's coefficients were fitted on them).
NOTEBOOK_SIZES = {**MODEL_SIZES, "60m": 8.0e7, "120m": 1.45e8, "240m": 2.68e8, "480m": 5.21e8, "960m": 1.17e9,
                  "1b92": 1.99e9, "3b84": 3.84e9}
SIZE_TABLES = {"built": MODEL_SIZES, "notebook": NOTEBOOK_SIZES}
MIN_DENSITY = 0.0625  # the sparsest density the paper trained: the planner does not extrapolate beyond it
# Far outside what any fit of the law has seen (the paper's runs: 1e7..8e9 parameters, 1e8..4e10 tokens, densities
# down to 0.0625): predictions there are extrapolations of the functional form, not of data.
RANGE_LIMITS = {"min_tokens": 1e6, "min_density": 1e-3, "max_compute": 1e30}


class PlanError(SparseDCError):
    """A planning request the law cannot answer (budget too small, bounds empty)."""


def _inputs(n: Any, u: Any, d: Any, s: Any) -> SimpleNamespace:
    n, u, d, s = np.broadcast_arrays(*(np.asarray(v, float) for v in (n, u, d, s)))
    return SimpleNamespace(active_params=n, unique_tokens=u, tokens=d, density=s)


def predict_loss(form: LawForm, params: Mapping[str, float], active_params: Any, unique_tokens: Any, tokens: Any,
                 density: Any) -> np.ndarray:
    """Loss at (N_active, U, D, S), all broadcast together."""
    return form.predict(params, _inputs(active_params, unique_tokens, tokens, density))


def run_loss(form: LawForm, params: Mapping[str, float], active_params: Any, pool: Any, tokens: Any,
             density: Any) -> np.ndarray:
    """Loss of a run training on D tokens drawn from a pool of U unique tokens: the law at U = min(U, D), the
    unique tokens the run sees. The official figure notebooks (isoFLOP, optimal sparsity) evaluate candidate runs
    this way; the law itself, like the official one, credits all of U below one epoch, where it was never fitted."""
    return predict_loss(form, params, active_params, np.minimum(pool, tokens), tokens, density)


def _best_log_density(loss: Any, min_density: float) -> tuple[float, float]:
    """(log S, loss) minimising a vectorised loss(log S) over [log min_density, 0]: grid, then bounded polish."""
    grid = np.linspace(0.0, np.log(min_density), 401)  # dense first: ties (density-blind forms) stay dense
    values = loss(grid)
    i = int(np.nanargmin(values))
    lo, hi = sorted((grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]))
    res = minimize_scalar(lambda t: float(loss(t)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    return (float(res.x), float(res.fun)) if res.fun < values[i] else (float(grid[i]), float(values[i]))


def loss_optimal_density(form: LawForm, params: Mapping[str, float], dense_params: float, unique_tokens: float,
                         tokens: float, min_density: float = MIN_DENSITY) -> tuple[float, float]:
    """(density, loss) minimising loss for a fixed dense-equivalent model and data (N_active = dense x S)."""
    log_s, loss = _best_log_density(
        lambda t: run_loss(form, params, dense_params * np.exp(t), unique_tokens, tokens, np.exp(t)), min_density)
    return float(np.exp(log_s)), loss


def compute_optimal(form: LawForm, params: Mapping[str, float], compute: float, unique_tokens: float,
                    min_density: float = MIN_DENSITY, max_density: float = 1.0, min_active: float = 1e5,
                    min_tokens: float = 1e6) -> dict[str, float]:
    """Minimise loss over (N_active, S) with D = C / (6 N_active) and U unique tokens.

    The search keeps N_active >= min_active and D >= min_tokens (lower both for toy-scale laws).
    Returns active_params, density, dense_params (= N_active / S), tokens, epochs (= D / U) and loss.
    """
    lo_n, hi_n = np.log(min_active), np.log(compute / 6 / min_tokens)
    if hi_n <= lo_n:
        raise PlanError(f"compute={compute:.3g}: expected at least {6 * min_active * min_tokens * 10:.0e} FLOPs "
                        f"({min_active:.0e} parameters x {10 * min_tokens:.0e} tokens)")
    if not 0 < min_density <= max_density <= 1:
        raise PlanError(f"density bounds [{min_density}, {max_density}]: expected 0 < min <= max <= 1")
    log_c6 = np.log(compute / 6)

    def loss(log_n: Any, log_s: Any) -> Any:
        return run_loss(form, params, np.exp(log_n), unique_tokens, np.exp(log_c6 - log_n), np.exp(log_s))

    g_n = np.linspace(lo_n, hi_n, 481)[:, None]
    g_s = np.linspace(np.log(max_density), np.log(min_density), 61)[None, :]  # dense first: ties stay dense
    with np.errstate(all="ignore"):
        surface = loss(g_n, g_s)  # (481, 61)
    i, j = np.unravel_index(np.nanargmin(surface), surface.shape)
    x0 = np.array([g_n[i, 0], g_s[0, j]])
    res = minimize(lambda x: float(loss(x[0], x[1])), x0, method="L-BFGS-B",
                   bounds=[(lo_n, hi_n), (np.log(min_density), np.log(max_density))],
                   options={"ftol": 1e-15, "gtol": 1e-12})
    log_n, log_s = (res.x if res.fun <= surface[i, j] else x0)
    n, s = float(np.exp(log_n)), float(np.exp(log_s))
    d = compute / 6 / n
    return {"active_params": n, "density": s, "dense_params": n / s, "tokens": d, "epochs": d / unique_tokens,
            "loss": float(loss(log_n, log_s))}


def diminishing_returns_epochs(form: LawForm, params: Mapping[str, float], active_params: float,
                               unique_tokens: float, density: float, fraction: float = 0.5,
                               max_epochs: float = 1e3) -> float:
    """Epochs after which one more repeated token lowers the loss by less than `fraction` of what a unique token
    would at the same total (dL/dD at U fixed vs at U = D). Larger = saturation delayed; inf if never."""
    h = 1e-4

    def ratio(epochs: Any) -> Any:
        d = unique_tokens * np.asarray(epochs, float)
        repeated = (predict_loss(form, params, active_params, unique_tokens, d * np.exp(-h), density)
                    - predict_loss(form, params, active_params, unique_tokens, d * np.exp(h), density))
        fresh = (predict_loss(form, params, active_params, d, d, density)
                 - predict_loss(form, params, active_params, d, d * np.exp(2 * h), density))
        return repeated / fresh - fraction

    grid = np.geomspace(1.0 + 2 * h, max_epochs, 400)
    below = np.flatnonzero(ratio(grid) < 0)
    if len(below) == 0:
        return float("inf")
    k = below[0]
    return float(grid[0]) if k == 0 else float(brentq(lambda e: float(ratio(e)), grid[k - 1], grid[k], xtol=1e-6))


def range_warnings(unique_tokens: float, tokens: float | None = None, density: float | None = None,
                   compute: float | None = None) -> list[str]:
    """One line per way a query lies far outside the law's fitted range (empty when inside)."""
    lines = []
    if tokens is not None and tokens < unique_tokens:
        lines.append(f"tokens={tokens:.3g} < unique_tokens={unique_tokens:.3g} (less than one epoch): the law, like "
                     "the official one, credits all U unique tokens (D_eff = U); a run that sees only D of them is "
                     "the law at unique_tokens = tokens (what `law plan` and the official figures use)")
    for name, value in (("tokens", tokens), ("unique_tokens", unique_tokens)):
        if value is not None and value < RANGE_LIMITS["min_tokens"]:
            lines.append(f"{name}={value:.3g}: below {RANGE_LIMITS['min_tokens']:.0e} tokens, far outside the "
                         "fitted range (the paper's runs used 1e8 and more)")
    if density is not None and density < RANGE_LIMITS["min_density"]:
        lines.append(f"density={density:.3g}: below {RANGE_LIMITS['min_density']:g}, far outside the fitted range "
                     "(the paper's sparsest runs: 0.0625)")
    if compute is not None and compute > RANGE_LIMITS["max_compute"]:
        lines.append(f"compute={compute:.3g} FLOPs: beyond {RANGE_LIMITS['max_compute']:.0e}, far outside the "
                     "fitted range (the paper's largest runs: ~1e21)")
    return lines


def nearest_model_size(dense_params: float, sizes: Mapping[str, float] = MODEL_SIZES) -> str:
    """The paper size name (model-sizes.md) closest to `dense_params` in log scale."""
    return min(sizes, key=lambda name: abs(np.log(sizes[name] / dense_params)))


@dataclass
class Plan:
    """What to train for a compute budget C and U unique tokens, from the law's optimum."""

    compute: float
    unique_tokens: float
    optimum: dict[str, float]
    """The continuous compute-optimal point: active_params, density, dense_params, tokens, epochs, loss."""
    preset: str
    """The paper model size nearest to the optimum's dense-equivalent size (what `train` can build)."""
    preset_dense_params: float
    """Its N (dense-equivalent): the built count, or the notebook's label with sizes='notebook'."""
    density: float
    """Best density for the preset under the same C and U."""
    tokens: float
    """Total tokens for the preset: C / (6 N_active), rounded down to a multiple of 256 (sequence length)."""
    epochs: float
    loss: float
    loss_interval: tuple[float, float] | None
    """95% bootstrap interval of the preset's predicted loss; None without bootstrap samples."""
    saturation_epochs: float
    """diminishing_returns_epochs at the preset's size and density (half the value of a unique token)."""
    loss_optimal_density: float
    """For contrast: the density minimising loss for the preset at the same tokens, ignoring compute."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(form: LawForm, params: Mapping[str, float], unique_tokens: float, compute: float,
         samples: list[Mapping[str, float]] | None = None, min_density: float = MIN_DENSITY,
         seq_len: int = 256, sizes: str = "built") -> Plan:
    """Compute-optimal plan, snapped to the nearest paper model size, with the density re-optimised for it.

    `sizes`: 'built' (each preset's N as `train` builds it) or 'notebook' (the official fit's labels,
    NOTEBOOK_SIZES)."""
    if unique_tokens <= 0 or compute <= 0:
        raise PlanError(f"unique_tokens={unique_tokens:.3g}, compute={compute:.3g}: expected positive values")
    if sizes not in SIZE_TABLES:
        raise PlanError(f"sizes={sizes!r}: expected one of {', '.join(SIZE_TABLES)}")
    table = SIZE_TABLES[sizes]
    optimum = compute_optimal(form, params, compute, unique_tokens, min_density)
    name = nearest_model_size(optimum["dense_params"], table)
    n_dense = table[name]

    log_s, _ = _best_log_density(lambda t: run_loss(form, params, n_dense * np.exp(t), unique_tokens,
                                                    compute / (6 * n_dense * np.exp(t)), np.exp(t)), min_density)
    density = float(np.exp(log_s))
    tokens = float(np.floor(compute / (6 * n_dense * density) / seq_len) * seq_len)
    if tokens < seq_len:
        raise PlanError(f"compute={compute:.3g}: too small to train the {name} model for one sequence")
    point = (n_dense * density, unique_tokens, tokens, density)
    interval = None
    if samples:
        stacked = {k: np.array([s[k] for s in samples]) for k in samples[0]}
        preds = run_loss(form, stacked, *point)
        interval = (float(np.percentile(preds, 2.5)), float(np.percentile(preds, 97.5)))
    return Plan(compute=compute, unique_tokens=unique_tokens, optimum=optimum, preset=name,
                preset_dense_params=n_dense, density=density, tokens=tokens, epochs=tokens / unique_tokens,
                loss=float(run_loss(form, params, *point)), loss_interval=interval,
                saturation_epochs=diminishing_returns_epochs(form, params, n_dense * density, unique_tokens, density),
                loss_optimal_density=loss_optimal_density(form, params, n_dense, unique_tokens, tokens, min_density)[0])


def training_config(p: Plan, name: str, data_dir: str = "runs/data/corpus", seq_len: int = 256,
                    recipe: str = "paper") -> dict[str, Any]:
    """The `sparse-dc train` config for a plan: the `recipe` preset of its model size (sparse_dc/launch/presets.py:
    "paper", the setup the paper's law was fitted on, or "fast") at the planned density, trained for exactly the
    planned tokens on the planned unique budget."""
    from sparse_dc.launch.presets import RECIPES, recipe_preset

    if seq_len != 256:
        raise PlanError(f"seq_len={seq_len}: the presets (and the paper's runs) use 256")
    if recipe not in RECIPES:
        raise PlanError(f"recipe={recipe!r}: expected one of {', '.join(RECIPES)}")
    return recipe_preset(recipe, p.preset, round(p.density, 6), data_dir=data_dir, unique_tokens=int(p.unique_tokens),
                         epochs=None, total_tokens=int(p.tokens), name=name)
