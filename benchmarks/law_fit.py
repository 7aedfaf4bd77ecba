"""Benchmark: our staged fit vs a faithful torch re-implementation of the paper's notebook procedure.

Same data (~300 synthetic runs from the paper's law, 0.4% noise), same stages, same grids of initial points:
- ours: sparse_dc.scaling.fit_law: each grid evaluated in one vectorised numpy call, then scipy least-squares
  (Huber, exact forward-mode Jacobian) from the 3 best points per stage;
- reference (law_fit_torch_ref.py): torch.optim.LBFGS (strong Wolfe, max_iter 20, history 10, lr 0.1) stepped 50
  times from *every* grid point, frozen coefficients' gradients zeroed, best kept.
Both final coefficient sets are scored with the same float64 objective (sum of Huber_1e-3 on log loss).

    python benchmarks/law_fit.py                 # the paper's grids (1961 starts; the reference takes ~15 min)
    python benchmarks/law_fit.py --grid coarse --out benchmarks/results/law_fit_coarse.json   # 74 starts, ~30 s

Torch is used only here (installed in the dev venv); sparse_dc.scaling itself never imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sparse_dc.config import write_text_atomic  # noqa: E402
from sparse_dc.scaling.fit import fit_law, fit_metrics, objective  # noqa: E402
from sparse_dc.scaling.forms import get_form  # noqa: E402
from sparse_dc.scaling.synthetic import synthetic_runs  # noqa: E402

# A coarse subset of the paper's grids (forms.PAPER_STAGES) so the reference finishes in minutes: 36+6+16+16 starts.
COARSE_GRIDS = [
    {"a": (0.0, 10.0, 20.0), "b": (0.0, 10.0, 20.0), "e": (-0.5, 0.5), "alpha": (0.3, 1.0)},
    {"eps": (0.0,), "mu": (0.5, 1.0, 2.0), "c": (-0.5, 0.0)},
    {"g1": (1.0, 5.0, 10.0, 20.0), "g2": (1.0, 5.0, 10.0, 20.0)},
    {k: (-1.0, 1.0) for k in ("c11", "c12", "c21", "c22")},
]


def n_starts(grid: dict, free: tuple[str, ...]) -> int:
    return int(np.prod([len(grid.get(k, (0,))) for k in free]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--grid", choices=("paper", "coarse"), default="paper")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of our fit (median reported)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "law_fit.json"))
    args = ap.parse_args()

    law = get_form("paper")
    runs = synthetic_runs(args.runs, noise=0.004, seed=0)
    grids = COARSE_GRIDS if args.grid == "coarse" else [dict(s.grid) for s in law.stages]
    masks = [np.asarray(s.select(runs)) for s in law.stages]
    starts = [n_starts(g, s.free) for g, s in zip(grids, law.stages)]

    fit_law(runs, law, grids=grids)  # warm-up: imports, first-call overheads
    times, ours = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = fit_law(runs, law, grids=grids)
        times.append(time.perf_counter() - t0)
    t_ours = statistics.median(times)
    t_full = time.perf_counter()
    ours_full_grid = fit_law(runs, law)  # the paper's full grids, for reference (cheap for us)
    t_full = time.perf_counter() - t_full

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "runs": args.runs, "grid": args.grid, "starts_per_stage": starts,
        "stage_runs": [int(m.sum()) for m in masks],
        "ours": {"seconds_median": t_ours, "seconds_all": times, "objective": ours.objective,
                 "stage_objectives": [s["objective"] for s in ours.stages],
                 "stage_seconds": [s["seconds"] for s in ours.stages], "params": ours.params,
                 "full_paper_grid": {"seconds": t_full, "objective": ours_full_grid.objective}},
    }
    # extrapolation check (not timed against torch): fit the smallest 90%, score the largest 10%
    cut = int(0.9 * args.runs)
    small, large = runs.subset(np.arange(cut)), runs.subset(np.arange(cut, args.runs))
    result["ours"]["extrapolation_mae"] = {
        p: fit_metrics(law, fit_law(small, law, p, grids=grids).params, large)["mae"] for p in ("paper", "joint")}

    if not args.skip_torch:
        import torch

        import law_fit_torch_ref as ref

        torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead (and the machine is shared)
        arrays = [runs.active_params, runs.unique_tokens, runs.tokens, runs.density, runs.val_loss]
        stages = [(s.free, m, g) for s, m, g in zip(law.stages, masks, grids)]
        t0 = time.perf_counter()
        params, info = ref.staged_fit(stages, arrays, dict(law.init))
        t_ref = time.perf_counter() - t0
        stage_obj = [float(objective(law, {**ours.params, **params}, runs.subset(m))) for m in masks]
        result["torch_reference"] = {
            "seconds": t_ref, "objective": float(objective(law, params, runs)), "params": params,
            "stage_objectives_own": [i["objective"] for i in info], "stage_objectives_final_params": stage_obj,
            "seconds_per_start": t_ref / sum(starts),
            "extrapolated_full_paper_grid_seconds": t_ref / sum(starts) * sum(
                n_starts(dict(s.grid), s.free) for s in law.stages)}
        result["speedup"] = t_ref / t_ours
        result["objective_ratio_ours_over_ref"] = ours.objective / result["torch_reference"]["objective"]

    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"{args.runs} synthetic runs, {args.grid} grids, starts per stage {starts} (runs per stage "
          f"{result['stage_runs']})")
    print(f"{'method':<34}{'seconds':>10}{'objective':>14}")
    print(f"{'ours (numpy grid + scipy lsq)':<34}{t_ours:>10.3f}{ours.objective:>14.6g}")
    if "torch_reference" in result:
        ref_r = result["torch_reference"]
        print(f"{'paper notebook (torch L-BFGS)':<34}{ref_r['seconds']:>10.1f}{ref_r['objective']:>14.6g}")
        print(f"speedup {result['speedup']:.0f}x; objective ours/ref {result['objective_ratio_ours_over_ref']:.4f}; "
              f"reference on the full paper grids ~{ref_r['extrapolated_full_paper_grid_seconds'] / 60:.0f} min "
              f"(extrapolated), ours {t_full:.2f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
