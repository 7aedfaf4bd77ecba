"""Figures of a law and its fit (matplotlib, headless). The file suffix picks the format: .png or .pdf.

- predicted vs observed loss (fit runs, and held-out runs when given);
- isoFLOP curves: loss vs active parameters along C = 6 N D, one panel per density;
- isoLoss contours over (active parameters, total tokens) at one density;
- optimal density vs the unique-data budget (compute-optimal, per compute budget);
- downstream accuracy vs validation loss over a ledger's runs (scores joined by `sparse-dc eval`).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from sparse_dc.scaling.forms import LawForm
from sparse_dc.scaling.ledger import Runs
from sparse_dc.scaling.optimize import compute_optimal, run_loss


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (clusters and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 130) -> str:
    """Write `fig` to `path` atomically (temporary file, then rename) and close it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.path.splitext(path)[1]}"  # keep the suffix: matplotlib picks the format from it
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    pyplot().close(fig)
    return path


def predicted_vs_observed(form: LawForm, params: Mapping[str, float], runs: Runs, path: str,
                          held_out: Runs | None = None) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    sets = [("fit", runs, "tab:blue")] + ([("held out", held_out, "tab:red")] if held_out is not None else [])
    for label, r, color in sets:
        ax.scatter(r.val_loss, form.predict(params, r), s=12, alpha=0.7, color=color, label=f"{label} ({len(r)})")
    lo = min(float(r.val_loss.min()) for _, r, _ in sets)
    hi = max(float(r.val_loss.max()) for _, r, _ in sets)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="observed validation loss", ylabel="predicted loss", title=f"{form.name} law")
    ax.legend()
    return save_figure(fig, path)


def isoflop(form: LawForm, params: Mapping[str, float], unique_tokens: float, path: str,
            computes: Sequence[float] = (1e18, 1e19, 1e20, 1e21),
            densities: Sequence[float] = (1.0, 0.5, 0.25, 0.0625)) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(densities), figsize=(4 * len(densities), 3.6), sharey=True)
    n = np.geomspace(1e6, 1e11, 300)
    for ax, s in zip(np.atleast_1d(axes), densities):
        for c in computes:
            d = c / (6 * n)
            keep = d >= 1e6
            loss = run_loss(form, params, n[keep], unique_tokens, d[keep], s)
            line, = ax.plot(n[keep], loss, label=f"C={c:.0e}")
            ax.plot(n[keep][np.argmin(loss)], loss.min(), "o", color=line.get_color())
        ax.set(xscale="log", xlabel="active parameters N", title=f"density {s:g}, U={unique_tokens:.2g}")
    np.atleast_1d(axes)[0].set_ylabel("predicted loss")
    np.atleast_1d(axes)[-1].legend(fontsize=8)
    return save_figure(fig, path)


def isoloss(form: LawForm, params: Mapping[str, float], unique_tokens: float, density: float, path: str) -> str:
    plt = pyplot()
    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 200), np.geomspace(1e8, 1e12, 200))
    loss = run_loss(form, params, n, unique_tokens, d, density)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    cs = ax.contour(n, d, loss, levels=14, cmap="viridis")
    ax.clabel(cs, fontsize=7, fmt="%.2f")
    for c in (1e18, 1e19, 1e20, 1e21):  # isoFLOP lines D = C / (6 N)
        ax.plot(n[0], c / (6 * n[0]), "k:", lw=0.8)
    ax.axhline(unique_tokens, color="tab:red", lw=1, label="U (one epoch)")
    ax.set(xscale="log", yscale="log", xlim=(n.min(), n.max()), ylim=(d.min(), d.max()),
           xlabel="active parameters N", ylabel="total tokens D", title=f"isoLoss, density {density:g}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def optimal_density_vs_data(form: LawForm, params: Mapping[str, float], path: str,
                            computes: Sequence[float] = (1e19, 1e20, 1e21),
                            unique_range: tuple[float, float] = (1e8, 1e11), min_density: float = 0.0625) -> str:
    plt = pyplot()
    budgets = np.geomspace(*unique_range, 13)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in computes:
        dens = [compute_optimal(form, params, c, u, min_density)["density"] for u in budgets]
        ax.plot(budgets, dens, "o-", label=f"C={c:.0e}")
    ax.set(xscale="log", ylim=(0, 1.05), xlabel="unique tokens U", ylabel="compute-optimal density",
           title=f"{form.name} law")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def all_plots(form: LawForm, params: Mapping[str, float], runs: Runs, out_dir: str, held_out: Runs | None = None,
              suffix: str = "png") -> list[str]:
    """Every figure for a fit, into `out_dir`; U for the law slices is the ledger's median unique budget."""
    u = float(np.median(runs.unique_tokens))
    return [predicted_vs_observed(form, params, runs, os.path.join(out_dir, f"pred_vs_obs.{suffix}"), held_out),
            isoflop(form, params, u, os.path.join(out_dir, f"isoflop.{suffix}")),
            isoloss(form, params, u, 0.5, os.path.join(out_dir, f"isoloss.{suffix}")),
            optimal_density_vs_data(form, params, os.path.join(out_dir, f"optimal_density.{suffix}"))]


def downstream_points(rows: Sequence[Mapping], metric: str = "acc", loss: str = "val_loss"
                      ) -> dict[str, list[tuple[str, float, float, float | None, float]]]:
    """{task: [(run, loss, score, stderr, density)]} over ledger rows holding both `loss` and the task's `metric`
    (rows' `downstream` field, written by `sparse-dc eval`), tasks in first-seen order."""
    out: dict[str, list[tuple[str, float, float, float | None, float]]] = {}
    for row in rows:
        for task, metrics in (row.get("downstream") or {}).items():
            score = metrics.get(metric)
            if score is not None and row.get(loss) is not None:
                out.setdefault(task, []).append((str(row.get("name")), float(row[loss]), float(score["value"]),
                                                 score.get("stderr"), float(row.get("density", 1.0))))
    return out


def downstream_vs_loss(points: Mapping[str, Sequence[tuple[str, float, float, float | None, float]]], path: str,
                       metric: str = "acc", loss: str = "val_loss") -> str:
    """One panel per task: downstream score (harness stderr as error bars) against validation loss, one point per
    run, coloured by density."""
    plt = pyplot()
    n = len(points)
    cols = min(n, 4)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.6 * cols, 3.2 * -(-n // cols)),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis")
    for ax, (task, pts) in zip(axes.flat, points.items()):
        x, y, err, dens = (np.array([p[i] if p[i] is not None else np.nan for p in pts], dtype=float)
                           for i in (1, 2, 3, 4))
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="none", ecolor="0.6", lw=0.8, zorder=1)
        sc = ax.scatter(x, y, c=dens, cmap=cmap, vmin=0, vmax=1, s=18, zorder=2)
        ax.set(title=task, xlabel=loss.replace("_", " "), ylabel=metric)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(sc, ax=axes, label="density", shrink=0.6)
    return save_figure(fig, path)
