"""The paper's three findings, measured on a reproduction grid (observed losses) and read off the fitted law.

1. Sparse training delays the diminishing returns from repeated data: per density, the loss after R epochs
   normalised by that density's 1-epoch loss; saturation = how much the last doubling of epochs still gains.
2. With fixed data, the loss-optimal density is moderate (~0.5): per size and epoch count, which density gives the
   lowest observed loss (same dense-equivalent model, same tokens).
3. Compute-optimal density is lower (sparsity higher) than the loss-optimal one and falls as the unique-data budget
   grows: from the fit, at the grid's largest compute, for U from U/4 to 4U (an extrapolation in U: the grid has
   one U, so this part of the law is the paper's form, not a measurement).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_dc.reproduce.fit import BENIGN
from sparse_dc.reproduce.plan import size_of
from sparse_dc.scaling.fit import FitResult
from sparse_dc.scaling.forms import SparseDataConstrained
from sparse_dc.scaling.ledger import Runs
from sparse_dc.scaling.optimize import compute_optimal, diminishing_returns_epochs, loss_optimal_density

U_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class Grid:
    """Observed validation losses on the (size, density, epochs) grid; NaN where a run is missing."""

    sizes: list[str]  # smallest first
    dense_params: dict[str, float]
    densities: list[float]  # dense first
    epochs: list[float]
    loss: np.ndarray  # (sizes, densities, epochs)
    unique_tokens: float

    @classmethod
    def from_runs(cls, runs: Runs) -> "Grid":
        sizes = sorted({size_of(n) for n in runs.name}, key=lambda s: runs.dense_params[
            [size_of(n) == s for n in runs.name]].max())
        densities = sorted(set(runs.density.tolist()), reverse=True)
        epochs = sorted(set(np.round(runs.epochs, 6).tolist()))
        loss = np.full((len(sizes), len(densities), len(epochs)), np.nan)
        params = {}
        for i, name in enumerate(runs.name):
            s = sizes.index(size_of(name))
            params[sizes[s]] = float(runs.dense_params[i])
            loss[s, densities.index(runs.density[i]), epochs.index(round(float(runs.epochs[i]), 6))] = \
                runs.val_loss[i]
        return cls(sizes, params, densities, epochs, loss, float(np.median(runs.unique_tokens)))

    def normalised(self) -> np.ndarray:
        """loss / loss at the first epoch count, per (size, density): (sizes, densities, epochs)."""
        return self.loss / self.loss[:, :, :1]


def saturation(grid: Grid, fit: FitResult) -> dict[str, Any]:
    """Finding 1. `late_gain[d]`: (L(R_-2) - L(R_-1)) / L(R_0) averaged over sizes (what the last doubling of
    epochs still buys, as a fraction of the 1-epoch loss); `total_gain[d]`: 1 - L(R_-1) / L(R_0)."""
    norm = grid.normalised()
    late = np.nanmean(norm[:, :, -2] - norm[:, :, -1], axis=0) if len(grid.epochs) >= 2 else np.full(
        len(grid.densities), np.nan)
    total = np.nanmean(1 - norm[:, :, -1], axis=0)
    law: SparseDataConstrained = fit.law  # type: ignore[assignment]
    _, rd_star = law.repetition_half_lives(fit.params, np.array(grid.densities))
    mid = grid.sizes[len(grid.sizes) // 2]
    knee = [diminishing_returns_epochs(law, fit.params, grid.dense_params[mid] * d, grid.unique_tokens, d)
            for d in grid.densities]
    # per size: does each sparse density still gain more from the last doubling than dense does?
    per_size = norm[:, :, -2] - norm[:, :, -1] if len(grid.epochs) >= 2 else np.zeros(norm.shape[:2])
    pairs = per_size[:, 1:] > per_size[:, :1]
    rising = per_size < 0  # validation loss went up over the last doubling: the repeated data is being memorised
    return {"densities": grid.densities, "late_gain": late.tolist(), "total_gain": total.tolist(),
            "rd_star": np.atleast_1d(rd_star).tolist(), "knee_epochs": knee, "knee_size": mid,
            "sparse_later": int(pairs.sum()), "n_pairs": int(pairs.size),
            "rising": [f"{grid.sizes[i]} d{grid.densities[j]:g}" for i, j in zip(*np.nonzero(rising))],
            "best_epochs": [[grid.epochs[int(np.nanargmin(grid.loss[i, j]))] for j in range(len(grid.densities))]
                            for i in range(len(grid.sizes))]}


def loss_optimal(grid: Grid, fit: FitResult) -> dict[str, Any]:
    """Finding 2. Observed best density per (size, epochs), and the law's continuous optimum per size at the
    fewest and most epochs (search bounded by the grid's sparsest density)."""
    best = np.array([[grid.densities[int(np.nanargmin(grid.loss[s, :, e]))] if np.isfinite(grid.loss[s, :, e]).any()
                      else np.nan for e in range(len(grid.epochs))] for s in range(len(grid.sizes))])
    # how much the best density beats dense, relative to dense's loss: (sizes, epochs)
    gain = 1 - np.nanmin(grid.loss, axis=1) / grid.loss[:, 0, :]
    lo = min(grid.densities)
    law_opt = {size: [loss_optimal_density(fit.law, fit.params, grid.dense_params[size], grid.unique_tokens,
                                           grid.unique_tokens * r, lo)[0] for r in (grid.epochs[0], grid.epochs[-1])]
               for size in grid.sizes}
    values, counts = np.unique(best[np.isfinite(best)], return_counts=True)
    interior = float(np.mean((best < 1) & (best > lo))) if best.size else float("nan")
    sparse_wins = float(np.mean(best < 1)) if best.size else float("nan")
    return {"best": best.tolist(), "gain_vs_dense": gain.tolist(), "law_optimum": law_opt,
            "mode": float(values[np.argmax(counts)]) if len(values) else float("nan"),
            "counts": {float(v): int(c) for v, c in zip(values, counts)}, "interior_fraction": interior,
            "sparse_wins": sparse_wins, "sparsest": lo}


def compute_optimal_vs_data(grid: Grid, fit: FitResult, runs: Runs) -> dict[str, Any]:
    """Finding 3. Compute-optimal density at the grid's largest compute C = 6 N_active D, for U x U_FACTORS."""
    compute = float(np.max(6 * runs.active_params * runs.tokens))
    lo = min(grid.densities)
    budgets = [grid.unique_tokens * f for f in U_FACTORS]
    with np.errstate(**BENIGN):
        rows = [compute_optimal(fit.law, fit.params, compute, u, lo, 1.0,
                                min_active=0.01 * float(runs.active_params.min()), min_tokens=0.01 * grid.unique_tokens)
                for u in budgets]
    dens = np.array([r["density"] for r in rows])
    lopt = loss_optimal_density(fit.law, fit.params, rows[U_FACTORS.index(1.0)]["dense_params"], grid.unique_tokens,
                                rows[U_FACTORS.index(1.0)]["tokens"], lo)[0]
    return {"compute": compute, "unique_tokens": budgets, "optimum": rows, "density": dens.tolist(),
            "loss_optimal_at_optimum": lopt, "falls_with_u": bool(np.all(np.diff(dens) <= 1e-3)),
            "change": float(dens[-1] - dens[0])}
