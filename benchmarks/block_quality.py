"""Block-sparse quality: does a block-sparse model train as well as an unstructured one at the same density?

    python benchmarks/block_quality.py                                   # 58 runs: 47 min on a shared 2-core CPU
    python benchmarks/block_quality.py --smoke --seeds 1 --out /tmp/bq   # 11 short runs (checks the script)

One small Llama where blocks matter (hidden 128 = 4 heads of 32, SwiGLU 384, 2 layers, B = 32: 4 blocks per
attention line, 4 per SwiGLU gate/up row), the built-in corpus (vocab 512), a fixed unique budget U = 262K tokens
trained for 2 epochs. Grid: {unstructured (B = 1), independent 32x32 blocks, path-aware 32x32 blocks} x densities
{0.5, 0.25, 0.125, 0.0625} x {SET, RigL} x 2 seeds (topology and weights: at densities 0.25-0.5 seeds differ by
up to 0.16 in loss, more than the effects), plus regrowth at small normal values (sparsity.regrow_init=normal) for
both block topologies at densities 0.25 and 0.0625 (seed 0), plus a dense run per seed: 58 runs. Every run is
a real `sparse-dc train` (DeepSpeed ZeRO-1, one rank, fp32) launched by the sweep runner, `--jobs` at a time, one
torch thread each; all append to one ledger, which is re-read for the table (a re-run skips finished runs).
Reported per run: final validation loss, the measured density, the effective density (live weights on a live
gradient path / dense weights of the sparse layers, at the end of training), and the share of live weights on
dead paths of the initial topology.

Writes OUT/ledger.jsonl, OUT/logs/, and RESULTS/block_quality.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import logging
import os
import platform
import sys
import threading
import time
from typing import Any

import yaml

from sparse_dc.config.base import write_text_atomic
from sparse_dc.launch.sweep import Run, expand, run_sweep
from sparse_dc.train.ledger import git_commit, read_ledger

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DENSITIES = (0.5, 0.25, 0.125, 0.0625)
REGROW_DENSITIES = (0.25, 0.0625)  # where regrow_init=normal is also run, for both block topologies (seed 0)
METHODS = ("set", "rigl")
# name -> sparsity overrides of a topology
TOPOLOGIES = {
    "unstructured": {"sparsity.block_size": 1},
    "independent": {"sparsity.block_size": 32, "sparsity.block_topology": "independent"},
    "path_aware": {"sparsity.block_size": 32, "sparsity.block_topology": "path_aware"},
}
SHAPE = {"preset": "tiny", "hidden_size": 128, "intermediate_size": 384, "n_heads": 4, "n_layers": 2}
# 2 epochs: with more, the multi-epoch regime rewards the sparser models for overfitting less (the paper's
# effect), which a 4-epoch trial showed swamping the topology comparison
FULL = {"unique_tokens": 262_144, "epochs": 2, "seq_len": 128, "val_tokens": 32_768, "global_batch": 16,
        "update_frequency": 16}
SMOKE = {"unique_tokens": 8192, "epochs": 2, "seq_len": 64, "val_tokens": 4096, "global_batch": 8,
         "update_frequency": 4}


def base_config(out: str, data_dir: str, size: dict[str, int]) -> dict[str, Any]:
    return {
        "name": "block-quality", "output_dir": os.path.join(out, "runs"),
        "data": {"dir": data_dir, "unique_tokens": size["unique_tokens"], "epochs": size["epochs"],
                 "seq_len": size["seq_len"], "val_tokens": size["val_tokens"], "seed": 1234, "verify": "size"},
        "model": dict(SHAPE),
        "sparsity": {"method": "set", "prune_rate": 0.3, "prune_rate_decay": "cosine", "stop_fraction": 0.75,
                     "update_frequency": size["update_frequency"], "seed": 0},
        "train": {"micro_batch": size["global_batch"], "global_batch": size["global_batch"], "precision": "fp32",
                  "optimizer": {"lr": 2e-3, "weight_decay": 0.1},
                  "schedule": {"warmup_steps": 10, "decay": "cosine", "min_lr_ratio": 0.1},
                  "deepspeed": {"zero_stage": 1}, "log_interval": 10, "eval_interval": 0, "checkpoint_interval": 0,
                  "save_final": False, "tensorboard": False, "progress": False,
                  "ledger": os.path.join(out, "ledger.jsonl")},
    }


def plan(base: str, densities: tuple[float, ...], seeds: int) -> list[Run]:
    """Every run of the grid (validated before any starts): topology x method x density for each seed (topology
    and weights; seed s > 0 is named `<topology>-seed<s>-...`), the regrowth variants (seed 0) and the dense
    reference (each seed)."""
    grid = {"sparsity.method": list(METHODS), "sparsity.density": list(densities)}
    regrow = {"sparsity.method": list(METHODS),
              "sparsity.density": [d for d in densities if d in REGROW_DENSITIES] or [densities[-1]]}
    runs = []
    for seed in range(seeds):
        tag, seeded = (f"-seed{seed}", [f"sparsity.seed={seed}", f"train.seed={seed}"]) if seed else ("", [])
        for topology, overrides in TOPOLOGIES.items():
            extra = [f"{k}={v}" for k, v in overrides.items()] + seeded
            runs += expand(base, grid, prefix=topology + tag, extra=extra)
            if topology != "unstructured" and seed == 0:
                runs += expand(base, regrow, prefix=f"{topology}-normal",
                               extra=extra + ["sparsity.regrow_init=normal"])
        runs += expand(base, {"sparsity.density": [1.0]}, prefix="dense" + tag, extra=seeded)
    return runs


def run_all(runs: list[Run], base: str, ledger: str, log_dir: str, jobs: int) -> None:
    """Run the grid `jobs` runs at a time (each a one-thread process; the ledger append is locked)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    shares = [runs[i::jobs] for i in range(jobs)]
    threads = [threading.Thread(target=run_sweep, args=(share, base, ledger, log_dir), kwargs={"env": env})
               for share in shares if share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def initial_dead_fraction(run: Run) -> float:
    """Share of live sparse-layer weights on a dead gradient path in the run's initial topology (masks only)."""
    from sparse_dc.model.build import model_shape, sparse_layers
    from sparse_dc.sparsity.distribution import allocate
    from sparse_dc.sparsity.paths import Projection, dead_path_params, initial_masks, parse_projection

    sparsity = run.config.sparsity
    shape = model_shape(run.config.model, sparsity)
    specs = sparse_layers(shape, sparsity)
    if not specs:
        return 0.0
    counts = allocate(specs, sparsity)
    masks = initial_masks(specs, counts, shape.n_heads, shape.hidden_size, sparsity)
    blocks: dict[int, dict[str, Projection]] = {}
    for spec in specs:
        block, kind = parse_projection(spec.name)
        blocks.setdefault(block, {})[kind] = Projection(kind, spec.out_features, spec.in_features, masks[spec.name])
    dead = sum(sum(dead_path_params(b, shape.n_heads).values()) for b in blocks.values())
    return dead / (sum(counts.values()) * sparsity.block_size ** 2)


def table_rows(ledger: str, runs: list[Run]) -> list[dict[str, Any]]:
    by_name = {r["name"]: r for r in read_ledger(ledger)} if os.path.exists(ledger) else {}
    rows = []
    for run in runs:
        row = by_name.get(run.name)
        if row is None:
            continue
        # live weights on dead paths (rows written before the count had its own column: active - effective)
        dead = row.get("dead_path_params", row["active_params"] - row["effective_active_params"])
        rows.append({"name": run.name, "topology": run.name.split("-")[0], "seed": run.config.train.seed,
                     "regrow_init": row.get("regrow_init", "zero"), "method": row["dst_method"],
                     "density": row["density"], "val_loss": row["val_loss"],
                     "density_measured": row["density_measured"],
                     "effective_density": (row["active_params_non_embedding"] - dead)
                     / row["dense_params_non_embedding"],
                     "dead_share_init": initial_dead_fraction(run), "wall_time_s": row["wall_time_s"]})
    return rows


TOPOLOGY_NAMES = tuple(TOPOLOGIES)


def cell(rows: list[dict[str, Any]], topology: str, regrow: str, method: str, density: float) -> list[dict]:
    """The runs (one per seed) of one grid cell."""
    return [r for r in rows if r["topology"] == topology and r["regrow_init"] == regrow and r["method"] == method
            and r["density"] == density]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    dense = [r["val_loss"] for r in rows if r["method"] == "dense"]
    lines = [f"# Block-sparse quality ({meta['mode']})", "",
             f"Model {meta['shape']}, B = 32 for blocks; U = {meta['size']['unique_tokens']:,} tokens x "
             f"{meta['size']['epochs']} epochs, seq {meta['size']['seq_len']}, batch {meta['size']['global_batch']}; "
             f"DST prune rate 0.3 (cosine to 0 at 75% of the run), update every {meta['size']['update_frequency']} "
             f"steps. Dense val loss {mean(dense):.4f} (seeds: {', '.join(f'{v:.4f}' for v in dense)}). "
             f"{meta['runs']} runs, {meta['jobs']} at a time, wall time {meta['wall_time_s'] / 60:.0f} min on "
             f"{meta['host']}" + (", shared with other jobs" if meta.get("shared") else "") + f" ({meta['load']}); "
             f"code {meta.get('git_commit')}.", "",
             f"Final validation loss, mean over {meta['seeds']} seeds [min, max], regrowth at zero; in parentheses "
             "the effective density at the end (live weights on a live gradient path / dense weights of the sparse "
             "layers) and the share of live weights on dead paths at initialisation:", ""]
    lines += ["| method | density | " + " | ".join(TOPOLOGY_NAMES) + " |", "|" + "---|" * (2 + len(TOPOLOGY_NAMES))]
    for method in METHODS:
        for density in meta["densities"]:
            cells = []
            for topology in TOPOLOGY_NAMES:
                hit = cell(rows, topology, "zero", method, density)
                losses = [r["val_loss"] for r in hit]
                cells.append(f"{mean(losses):.4f} [{min(losses):.3f}, {max(losses):.3f}] "
                             f"({mean([r['effective_density'] for r in hit]):.3f} / "
                             f"{mean([r['dead_share_init'] for r in hit]):.0%})" if hit else "-")
            lines.append(f"| {method} | {density} | " + " | ".join(cells) + " |")
    lines += ["", "Blocks minus unstructured, per seed (the same seed draws the same dense weights; negative: blocks "
              "better):", "", "| method | density | independent - unstructured | path_aware - unstructured |",
              "|---|---|---|---|"]
    for method in METHODS:
        for density in meta["densities"]:
            base = {r["seed"]: r["val_loss"] for r in cell(rows, "unstructured", "zero", method, density)}
            diffs = []
            for topology in ("independent", "path_aware"):
                other = {r["seed"]: r["val_loss"] for r in cell(rows, topology, "zero", method, density)}
                diffs.append(", ".join(f"{other[s] - base[s]:+.4f}" for s in sorted(base) if s in other) or "-")
            lines.append(f"| {method} | {density} | {diffs[0]} | {diffs[1]} |")
    lines += ["", "Regrowth at small normal values (regrow_init=normal, 0.1 x init std) vs at zero, seed 0:", "",
              "| topology | method | density | zero | normal | normal - zero |", "|---|---|---|---|---|---|"]
    for topology in ("independent", "path_aware"):
        for method in METHODS:
            for density in meta["densities"]:
                zero = [r["val_loss"] for r in cell(rows, topology, "zero", method, density) if r["seed"] == 0]
                normal = [r["val_loss"] for r in cell(rows, topology, "normal", method, density)]
                if zero and normal:
                    lines.append(f"| {topology} | {method} | {density} | {zero[0]:.4f} | {normal[0]:.4f} | "
                                 f"{normal[0] - zero[0]:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], densities: tuple[float, ...], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    dense = [r["val_loss"] for r in rows if r["method"] == "dense"]
    styles = {"unstructured": ("k", "o"), "independent": ("tab:red", "s"), "path_aware": ("tab:blue", "^")}
    for ax, method in zip(axes, METHODS):
        for topology, (color, marker) in styles.items():
            pts = [(d, [r["val_loss"] for r in cell(rows, topology, "zero", method, d)]) for d in densities]
            pts = [(d, v) for d, v in pts if v]
            if not pts:
                continue
            x, ys = [d for d, _ in pts], [v for _, v in pts]
            mid = [mean(v) for v in ys]
            err = [[m - min(v) for m, v in zip(mid, ys)], [max(v) - m for m, v in zip(mid, ys)]]
            label = topology if topology == "unstructured" else f"{topology.replace('_', '-')} 32x32 blocks"
            ax.errorbar(x, mid, yerr=err, color=color, marker=marker, capsize=3, label=label)
        if dense:
            ax.axhline(mean(dense), color="grey", linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(densities), [str(d) for d in densities])
        ax.set_xlabel("density")
        ax.set_title(f"{method.upper()}: final validation loss (mean, min-max over seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def prepare_data(out: str) -> str:
    from sparse_dc.data.prepare import PrepareConfig, prepare

    data_dir = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        prepare(PrepareConfig(builtin=True, out=data_dir, vocab_size=512, workers=1))
    return data_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/block-quality", help="data, runs, logs and the ledger")
    p.add_argument("--results", default=RESULTS, help="where the table, JSON and plot go")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--seeds", type=int, default=2, help="seeds (topology and weights) of the main grid")
    p.add_argument("--smoke", action="store_true", help="short runs at density 0.0625 only (development)")
    args = p.parse_args(argv)
    for name in ("jobs", "seeds"):
        if getattr(args, name) < 1:
            print(f"--{name}={getattr(args, name)}: expected an integer >= 1", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    size, densities = (SMOKE, (0.0625,)) if args.smoke else (FULL, DENSITIES)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data_dir = prepare_data(out)
    base = os.path.join(out, "base.yaml")
    write_text_atomic(base, yaml.safe_dump(base_config(out, data_dir, size), sort_keys=False))
    runs = plan(base, densities, args.seeds)
    ledger = os.path.join(out, "ledger.jsonl")
    start, load_before = time.time(), os.getloadavg()
    run_all(runs, base, ledger, os.path.join(out, "logs"), args.jobs)
    rows = table_rows(ledger, runs)
    meta = {"mode": "smoke" if args.smoke else "full", "shape": SHAPE, "size": size, "densities": densities,
            "seeds": args.seeds,
            "jobs": args.jobs, "runs": len(runs), "finished": len(rows), "wall_time_s": time.time() - start,
            "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "load": f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end",
            "shared": load_before[0] > 1.5, "git_commit": git_commit(), "python": sys.version.split()[0]}
    stem = os.path.join(args.results, "block_quality" + ("_smoke" if args.smoke else ""))
    os.makedirs(args.results, exist_ok=True)
    text = markdown(rows, meta)
    write_text_atomic(stem + ".md", text)
    write_text_atomic(stem + ".json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, densities, stem + ".png")
    print(text)
    print(f"wrote {stem}.md, .json, .png ({len(rows)} of {len(runs)} runs finished)")
    return 0 if len(rows) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
