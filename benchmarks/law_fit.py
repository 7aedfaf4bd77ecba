"""Benchmark: how well each fitting procedure extrapolates, and what it costs, side by side in one run.

The task: 270 runs drawn from the paper's law with 0.4% log-normal noise (sparse_dc.scaling.synthetic: sizes
3e7..2e9, densities 1..0.0625, 1..16 epochs), fitted on the 240 smallest dense-equivalent sizes; score the 10
largest against the noise-free law that generated them (and against their noisy losses). Several seeds.
Procedures (`sparse-dc law fit --stages ...`):
- joint (the default): sparse-dc's staged fit, then all 13 coefficients on all runs;
- paper: the official notebook's four stages exactly (its forms, grids, L-BFGS from every start; vectorised);
- staged: sparse-dc's own four stages on the full law (the joint fit's initialisation).
The notebook's loop run start by start in torch (tests/scaling/notebook_reference.py, the test oracle) is timed on a
few starts per stage and extrapolated to its full grids, for the speed of the vectorised paper procedure.

    python benchmarks/law_fit.py                  # 5 seeds, ~1 min on 2 idle cores; writes results/law_fit.{json,txt,png}
    python benchmarks/law_fit.py --seeds 1 --torch-starts 0
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import redirect_stdout

import numpy as np

from sparse_dc.config import write_text_atomic
from sparse_dc.scaling.fit import fit_law
from sparse_dc.scaling.forms import PAPER, get_form
from sparse_dc.scaling.notebook import GRIDS, STAGE_FREE, grid_points, stage_masks
from sparse_dc.scaling.synthetic import synthetic_runs

HERE = os.path.dirname(os.path.abspath(__file__))
PROCEDURES = ("joint", "paper", "staged")


def extrapolation(seed: int) -> dict[str, dict[str, float]]:
    runs = synthetic_runs(270, noise=0.004, seed=seed)  # sorted by dense-equivalent size
    fit_on, largest = runs.subset(np.arange(240)), runs.subset(np.arange(260, 270))
    truth = get_form("paper").predict(PAPER, largest)
    out = {}
    for procedure in PROCEDURES:
        t0 = time.perf_counter()
        fit = fit_law(fit_on, "paper", procedure)
        seconds = time.perf_counter() - t0
        pred = fit.predict(largest)
        out[procedure] = {"mae_vs_law": float(np.abs(pred - truth).mean()),
                          "mae_vs_observed": float(np.abs(pred - largest.val_loss).mean()),
                          "max_error_vs_law": float(np.abs(pred - truth).max()), "seconds": seconds,
                          "objective": fit.objective, "params": fit.params}
    out["noise_floor_mae_vs_observed"] = float(np.abs(truth - largest.val_loss).mean())  # the true law's own error
    return out


def torch_notebook_seconds(starts_per_stage: int) -> dict[str, float]:
    """Seconds per start of the notebook's torch loop (seed 0's fitting runs), extrapolated to its full grids."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "scaling"))  # the test oracle: the notebook's loop in torch
    import torch
    from notebook_reference import (best_of, loss_stage1, loss_stage2, loss_stage3, loss_stage4, repetition_rows,
                                    torch_2_1_line_search)

    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead on a shared machine
    runs = synthetic_runs(270, noise=0.004, seed=0).subset(np.arange(240))
    masks = stage_masks(runs)
    p = fit_law(runs, "paper", "paper").params  # coefficients the later stages hold fixed (values do not matter)
    col = lambda r, *names: torch.tensor(np.stack([getattr(r, n) for n in names], 1))  # noqa: E731
    r1, r2, r3, r4 = (runs.subset(m) for m in masks)
    p2 = [p[k] for k in STAGE_FREE[1]]
    rows = lambda r: zip(r.active_params, r.tokens, r.unique_tokens, r.val_loss, r.density)  # noqa: E731
    losses = [lambda th: loss_stage1(col(r1, "dense_params", "tokens", "val_loss"), th),
              lambda th: loss_stage2(col(r2, "dense_params", "tokens", "val_loss", "density"), th),
              lambda th: loss_stage3(repetition_rows(rows(r3), p2), th, p2),
              lambda th: loss_stage4(repetition_rows(rows(r4), p2), th, p2, [p["g1"], p["g2"]])]
    total_starts = full_seconds = 0.0
    per_stage = []
    for stage, loss in enumerate(losses):
        grid = grid_points(stage, GRIDS[stage])
        if stage == 1:
            grid[:, :4] = [p[k] for k in STAGE_FREE[0]]
        pick = grid[np.linspace(0, len(grid) - 1, starts_per_stage).astype(int)]
        with torch_2_1_line_search():
            t0 = time.perf_counter()
            best_of(loss, pick.tolist())
            per_start = (time.perf_counter() - t0) / len(pick)
        per_stage.append(per_start)
        total_starts += len(grid)
        full_seconds += per_start * len(grid)
    return {"seconds_per_start_by_stage": per_stage, "starts": total_starts, "extrapolated_seconds": full_seconds}


def plot(result: dict, path: str) -> None:
    from sparse_dc.scaling.plots import pyplot, save_figure

    plt = pyplot()
    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    seeds = result["seeds"]
    for i, procedure in enumerate(PROCEDURES):
        errs = [result["by_seed"][str(s)][procedure]["mae_vs_law"] for s in seeds]
        ax_err.scatter(np.arange(len(seeds)) + 0.2 * (i - 1), errs, label=procedure, s=30)
    ax_err.axhline(0.01, color="gray", ls="--", lw=1, label="0.01 nats")
    ax_err.set(yscale="log", xticks=range(len(seeds)), xticklabels=[str(s) for s in seeds], xlabel="seed",
               ylabel="MAE on the 10 largest vs the true law (nats)", title="extrapolation (fit on the 240 smallest)")
    ax_err.legend()
    labels = list(PROCEDURES) + (["paper in torch,\nstart by start\n(extrapolated)"] if "torch_notebook" in result else [])
    times = [result["summary"][p]["seconds_median"] for p in PROCEDURES]
    if "torch_notebook" in result:
        times.append(result["torch_notebook"]["extrapolated_seconds"])
    ax_time.bar(range(len(labels)), times, color=["C0", "C1", "C2", "gray"][:len(labels)])
    ax_time.set(yscale="log", xticks=range(len(labels)), ylabel="seconds per fit",
                title=f"time ({result['machine']['cpus']} CPUs, load {result['machine']['loadavg_start'][0]:.1f})")
    ax_time.set_xticklabels(labels, fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--torch-starts", type=int, default=4, help="notebook starts timed in torch per stage (0: skip)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "law_fit.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "loadavg_start": os.getloadavg()},
                    "task": "270 synthetic runs (paper law, 0.4% noise), fit on the 240 smallest, score the 10 largest",
                    "seeds": list(range(args.seeds)), "by_seed": {}}
    for seed in result["seeds"]:
        result["by_seed"][str(seed)] = extrapolation(seed)
        print(f"seed {seed}: " + "  ".join(f"{p} {result['by_seed'][str(seed)][p]['mae_vs_law']:.4f}"
                                           for p in PROCEDURES), file=sys.stderr, flush=True)
    result["summary"] = {p: {
        "mae_vs_law_median": statistics.median(r[p]["mae_vs_law"] for r in result["by_seed"].values()),
        "mae_vs_law_max": max(r[p]["mae_vs_law"] for r in result["by_seed"].values()),
        "mae_vs_observed_median": statistics.median(r[p]["mae_vs_observed"] for r in result["by_seed"].values()),
        "seconds_median": statistics.median(r[p]["seconds"] for r in result["by_seed"].values())}
        for p in PROCEDURES}
    if args.torch_starts:
        result["torch_notebook"] = torch_notebook_seconds(args.torch_starts)
    result["machine"]["loadavg_end"] = os.getloadavg()

    table = io.StringIO()
    with redirect_stdout(table):
        print(f"{result['task']}; seeds {result['seeds'][0]}..{result['seeds'][-1]}; "
              f"noise floor (true law vs noisy losses) ~{statistics.median(r['noise_floor_mae_vs_observed'] for r in result['by_seed'].values()):.4f}")
        print(f"{'procedure':<10}{'MAE vs law (median)':>21}{'(max)':>9}{'MAE vs observed':>17}{'seconds':>10}")
        for p, s in result["summary"].items():
            print(f"{p:<10}{s['mae_vs_law_median']:>21.4f}{s['mae_vs_law_max']:>9.4f}"
                  f"{s['mae_vs_observed_median']:>17.4f}{s['seconds_median']:>10.2f}")
        if "torch_notebook" in result:
            t = result["torch_notebook"]
            print(f"the notebook's loop in torch, start by start: ~{t['extrapolated_seconds']:.0f} s for its "
                  f"{t['starts']:.0f} starts (timed on {args.torch_starts} per stage); vectorised: "
                  f"{result['summary']['paper']['seconds_median']:.1f} s "
                  f"({t['extrapolated_seconds'] / result['summary']['paper']['seconds_median']:.0f}x)")
        print(f"machine: {result['machine']['cpus']} CPUs, load average {result['machine']['loadavg_start'][0]:.1f} "
              f"at start, {result['machine']['loadavg_end'][0]:.1f} at end")
    print(table.getvalue(), end="")
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    write_text_atomic(args.out[:-5] + ".txt", table.getvalue())
    plot(result, args.out[:-5] + ".png")
    print(f"wrote {args.out} (+ .txt, .png)")


if __name__ == "__main__":
    main()
