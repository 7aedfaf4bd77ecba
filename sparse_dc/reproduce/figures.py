"""The report's PNG figures (matplotlib, headless; written via scaling.plots' atomic save)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparse_dc.reproduce.findings import Grid
from sparse_dc.scaling.fit import FitResult
from sparse_dc.scaling.ledger import Runs
from sparse_dc.scaling.optimize import predict_loss
from sparse_dc.scaling.plots import predicted_vs_observed, pyplot, save_figure


def _panels(n: int, width: float = 4.0, height: float = 3.4):
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), sharey=True, squeeze=False)
    return fig, axes[0]


def saturation(grid: Grid, path: str) -> str:
    """Validation loss / the same density's 1-epoch loss vs epochs, one line per density, one panel per size."""
    fig, axes = _panels(len(grid.sizes))
    norm = grid.normalised()
    for ax, s, size in zip(axes, range(len(grid.sizes)), grid.sizes):
        for d, density in enumerate(grid.densities):
            ax.plot(grid.epochs, norm[s, d], "o-", label=f"density {density:g}")
        ax.set(xscale="log", xlabel="epochs over U", title=f"{size} ({grid.dense_params[size]:.3g} dense params)")
        ax.set_xticks(grid.epochs, [f"{e:g}" for e in grid.epochs])
        ax.minorticks_off()
    axes[0].set_ylabel(f"val loss / loss at {grid.epochs[0]:g} epoch")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"Repeated data at U = {grid.unique_tokens:.3g} tokens (flatter late = saturated)", fontsize=10)
    return save_figure(fig, path)


def loss_vs_density(grid: Grid, fit: FitResult, path: str) -> str:
    """Observed loss vs density at fixed data (one line per epoch count), the fitted law dashed, best marked."""
    fig, axes = _panels(len(grid.sizes))
    dens = np.array(grid.densities)
    smooth = np.geomspace(dens.min(), 1.0, 60)
    for ax, s, size in zip(axes, range(len(grid.sizes)), grid.sizes):
        for e, epochs in enumerate(grid.epochs):
            line, = ax.plot(dens, grid.loss[s, :, e], "o-", label=f"{epochs:g} ep")
            n = grid.dense_params[size]
            pred = predict_loss(fit.law, fit.params, n * smooth, grid.unique_tokens, grid.unique_tokens * epochs,
                                smooth)
            ax.plot(smooth, pred, "--", lw=0.8, color=line.get_color())
            if np.isfinite(grid.loss[s, :, e]).any():
                best = int(np.nanargmin(grid.loss[s, :, e]))
                ax.plot(dens[best], grid.loss[s, best, e], "*", ms=12, color=line.get_color())
        ax.set(xscale="log", xlabel="density (1 = dense)", title=f"{size}: fixed model, fixed data")
        ax.set_xticks(dens, [f"{d:g}" for d in dens])
        ax.minorticks_off()
    axes[0].set_ylabel("validation loss (dashed: law, *: best)")
    axes[-1].legend(fontsize=8)
    return save_figure(fig, path)


def compute_optimal_density(result: dict[str, Any], path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(result["unique_tokens"], result["density"], "o-", label=f"compute-optimal, C = {result['compute']:.2g}")
    ax.axhline(result["loss_optimal_at_optimum"], color="gray", ls=":", label="loss-optimal at U (same N, D)")
    ax.set(xscale="log", ylim=(0, 1.05), xlabel="unique tokens U", ylabel="density",
           title="Fitted law: optimal density vs data budget")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def all_figures(grid: Grid, fit: FitResult, holdout_fit: FitResult | None, train: Runs, test: Runs | None,
                finding3: dict[str, Any], out_dir: str) -> dict[str, str]:
    """name -> path of every figure; predicted-vs-observed uses the fit that did not see the held-out runs."""
    pv = holdout_fit if holdout_fit is not None else fit
    return {"saturation": saturation(grid, os.path.join(out_dir, "saturation.png")),
            "loss_vs_density": loss_vs_density(grid, fit, os.path.join(out_dir, "loss_vs_density.png")),
            "pred_vs_obs": predicted_vs_observed(pv.law, pv.params, train, os.path.join(out_dir, "pred_vs_obs.png"),
                                                 test),
            "optimal_density": compute_optimal_density(finding3, os.path.join(out_dir, "optimal_density.png"))}
