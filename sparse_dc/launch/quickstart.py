"""`sparse-dc quickstart [--out DIR] [--nproc 2]`: the whole pipeline on the built-in corpus, on CPU, in minutes.

    1. prepare the built-in corpus (Python's own docstrings; no download) with a small vocabulary
    2. train a tiny dense and a tiny 50%-sparse (32x32 blocks, SET) Llama on one small unique budget for a few
       epochs, each with `--nproc` DeepSpeed ZeRO-2 ranks, through the sweep runner (both append to one ledger)
    3. compare them: validation loss, tokens/s, active parameters
    4. predict with the paper's law what the same comparison gives at a realistic size
    5. plot the training curves

Re-running it with the same --out reuses the prepared data and skips finished runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any

import yaml

from sparse_dc.config.base import write_text_atomic
from sparse_dc.launch.sweep import SweepError, expand, run_sweep, unfinished

# Tiny-model budget: U = 16,384 unique tokens (256 sequences of 64), global batch 16 sequences (1,024 tokens).
BASE = {
    "model": {"preset": "tiny"},
    "sparsity": {"block_size": 32, "method": "set", "update_frequency": 8, "prune_rate": 0.3},
    "data": {"unique_tokens": 16_384, "seq_len": 64, "val_tokens": 8192, "seed": 1234, "verify": "size"},
    "train": {"micro_batch": 8, "global_batch": 16, "precision": "fp32",
              "optimizer": {"lr": 2.0e-3, "weight_decay": 0.1},
              "schedule": {"warmup_steps": 5, "decay": "cosine", "min_lr_ratio": 0.1},
              "deepspeed": {"zero_stage": 2}, "log_interval": 2, "eval_interval": 16, "checkpoint_interval": 0,
              "tensorboard": False, "progress": False},
}
DENSITIES = (1.0, 0.5)
# The larger configuration the paper's law is asked about: its 120m model on 100M unique tokens for 4 epochs.
PREDICT = {"size": "120m", "unique_tokens": 100e6, "epochs": 4.0}


def stage(index: int, text: str) -> None:
    print(f"[{index}/5] {text}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-dc quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="folder for data, runs, ledger, table and plot")
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed ranks per run (torchrun when > 1)")
    p.add_argument("--epochs", type=float, default=4.0, help="passes over the unique tokens")
    p.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary of the prepared corpus")
    return p


def prepare_data(out: str, vocab_size: int) -> str:
    from sparse_dc.data.prepare import PrepareConfig, prepare

    data_dir = os.path.join(out, "data")
    if os.path.exists(os.path.join(data_dir, "manifest.json")):
        print(f"      reusing {data_dir}", flush=True)
        return data_dir
    manifest = prepare(PrepareConfig(inputs=[], builtin=True, out=data_dir, vocab_size=vocab_size,
                                     workers=os.cpu_count() or 1))
    print(f"      {manifest['total_documents']} documents, {manifest['total_tokens']:,} tokens, vocab "
          f"{manifest['tokenizer']['vocab_size']} ({manifest['seconds']} s)", flush=True)
    return data_dir


def write_base_config(out: str, data_dir: str, epochs: float) -> str:
    cfg = json.loads(json.dumps(BASE))
    cfg.update(name="quickstart", output_dir=os.path.join(out, "runs"))
    cfg["data"].update(dir=data_dir, epochs=epochs)
    cfg["train"]["ledger"] = os.path.join(out, "ledger.jsonl")
    path = os.path.join(out, "quickstart.yaml")
    write_text_atomic(path, "# written by `sparse-dc quickstart`; the sweep varies sparsity.density\n"
                      + yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_runs(config: str, nproc: int) -> tuple[list[Any], str]:
    runs = expand(config, {"sparsity.density": list(DENSITIES)}, prefix="tiny")
    ledger = runs[0].config.train.ledger
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    status = run_sweep(runs, config, ledger, os.path.join(os.path.dirname(config), "logs"), nproc=nproc, env=env)
    failed = unfinished(status)
    if failed:
        raise SweepError(f"quickstart run(s) {', '.join(failed)} did not finish; see their logs under "
                         f"{os.path.join(os.path.dirname(config), 'logs')}")
    return runs, ledger


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summary_header(rows: list[dict[str, Any]], data_dir: str, config: str, nproc: int) -> str:
    """What ran: when, on which data, which model and budget, how many ranks."""
    first = rows[0]
    return "\n".join([
        f"sparse-dc quickstart, {time.strftime('%Y-%m-%d %H:%M')}: {len(rows)} runs of the {first['model_preset']} "
        f"Llama preset (dense and block-sparse), {nproc} DeepSpeed ZeRO-{first['zero_stage']} rank(s) each",
        f"data: {data_dir} (built-in corpus); U = {first['unique_tokens']:,} unique tokens x {first['epochs']:g} "
        f"epochs = {first['tokens']:,} training tokens per run; config {config}"])


def comparison_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'run':<12} {'density':>7} {'block':>5} {'active params':>13} {'dense params':>12} {'val loss':>8} " \
           f"{'val ppl':>8} {'tokens/s':>9} {'tokens':>8} {'epochs':>6} {'loop s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        block = r["block_size"] if r["density"] < 1 else "-"
        lines.append(f"{r['name']:<12} {r['density']:>7g} {block:>5} {r['active_params']:>13,} "
                     f"{r['dense_params']:>12,} {r['val_loss']:>8.4f} {_ppl(r['val_loss']):>8.2f} "
                     f"{r['tokens_per_s']:>9,.0f} {r['tokens']:>8,} {r['epochs']:>6.2f} {r['wall_time_s']:>6.1f}")
    dense, sparse = rows[0], rows[-1]
    speed = sparse["tokens_per_s"] / dense["tokens_per_s"]
    lines.append(f"tokens/s: training steps only; loop s: the training loop with evaluation and checkpoints (the "
                 f"sweep log's time also counts start-up). Here sparse trains at {speed:.2f}x dense's speed. On CPU "
                 "the block-sparse layers run the pure-torch reference path, whose speed says little about the "
                 "Triton kernels of the GPU path (benchmarks/).")
    return "\n".join(lines)


def conclusion(rows: list[dict[str, Any]]) -> str:
    """One sentence on what the two runs show (and what they cannot)."""
    dense, sparse = rows[0], rows[-1]
    diff = sparse["val_loss"] - dense["val_loss"]
    verdict = "lower" if diff < 0 else "higher"
    return (f"conclusion: on the same {dense['tokens']:,} tokens ({dense['epochs']:g} epochs of "
            f"{dense['unique_tokens']:,} unique ones), the {sparse['density']:g}-density model with "
            f"{sparse['active_params'] / dense['active_params']:.0%} of the dense model's active parameters reached "
            f"a {verdict} validation loss ({sparse['val_loss']:.4f} vs {dense['val_loss']:.4f}, {diff:+.4f}). "
            "Two tiny runs on one seed show the pipeline works; a scaling claim needs a sweep (below).")


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def law_prediction() -> str:
    """What the paper's law says about dense vs 50% sparse at PREDICT's size and budget (no torch involved)."""
    from sparse_dc.scaling.forms import find_preset
    from sparse_dc.scaling.optimize import MODEL_SIZES, loss_optimal_density, predict_loss

    form, params = find_preset("paper")
    size, u, epochs = PREDICT["size"], PREDICT["unique_tokens"], PREDICT["epochs"]
    n, d = MODEL_SIZES[size], u * epochs
    lines = [f"paper law, {size} model ({n:.3g} dense params), U={u:.3g} unique tokens x {epochs:g} epochs "
             f"(D={d:.3g}):"]
    for density in DENSITIES:
        loss = float(predict_loss(form, params, n * density, u, d, density))
        lines.append(f"  density {density:<4g} ({n * density:.3g} active params): predicted val loss {loss:.4f}")
    best, best_loss = loss_optimal_density(form, params, n, u, d)
    lines.append(f"  loss-optimal density at this size and budget: {best:.3f} (predicted {best_loss:.4f})")
    once, often = (loss_optimal_density(form, params, n, u, u * r)[0] for r in (1, 16))
    lines.append(f"  density is the live fraction (sparsity = 1 - density), so {best:.3f} is {1 - best:.0%} sparse. "
                 "The paper's \"moderate (~50%) sparsity\" is where its data-starved runs sit: the optimum moves "
                 f"toward sparser models as data repeats (here {once:.3f} at 1 epoch, {often:.3f} at 16).")
    # the law was fitted on the paper's setup, so the run it predicts is the paper recipe's (launch/configs/paper)
    lines.append(f"  train what it predicts: sparse-dc train --config launch/configs/paper/{size}-d0.5.yaml "
                 f"data.dir=<your data> data.unique_tokens={int(u)} data.epochs={epochs:g}")
    return "\n".join(lines)


def plot_curves(run_dirs: dict[str, str], path: str) -> str:
    """Training loss vs tokens (lines) and validation loss (markers) of every run, from their metrics.jsonl."""
    from sparse_dc.scaling.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for (name, run_dir), color in zip(run_dirs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        train = [r for r in records if r["kind"] == "train"]
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color, lw=1.2,
                label=f"{name} train")
        tokens_at = {r["step"]: r["tokens"] for r in train}
        evals = [r for r in records if r["kind"] == "eval" and r["step"] in tokens_at]
        ax.plot([tokens_at[r["step"]] for r in evals], [r["val_loss"] for r in evals], "o--", color=color, ms=4,
                label=f"{name} val")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("sparse-dc quickstart: tiny Llama, dense vs 50% block-sparse")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc < 1:
        raise SweepError(f"--nproc={args.nproc}: expected an integer >= 1")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.time()

    stage(1, f"preparing the built-in corpus (vocab {args.vocab_size}) -> {os.path.join(out, 'data')}")
    data_dir = prepare_data(out, args.vocab_size)

    config = write_base_config(out, data_dir, args.epochs)
    stage(2, f"training tiny dense and 50%-sparse models, {args.nproc} DeepSpeed rank(s) each "
             f"(config {config}; logs in {os.path.join(out, 'logs')})")
    logging.basicConfig(level=logging.INFO, format="      %(message)s")
    runs, ledger = train_runs(config, args.nproc)

    stage(3, "comparing the runs (final validation loss on held-out tokens)")
    from sparse_dc.train.ledger import read_ledger

    latest = {row["name"]: row for row in read_ledger(ledger)}
    rows = [latest[r.name] for r in runs]
    table = comparison_table(rows) + "\n" + conclusion(rows)
    print(table, flush=True)

    stage(4, "asking the paper's scaling law about a larger configuration")
    prediction = law_prediction()
    print(prediction, flush=True)
    summary = os.path.join(out, "summary.txt")
    write_text_atomic(summary, "\n\n".join([summary_header(rows, data_dir, config, args.nproc), table, prediction,
                                             next_steps(config, ledger)]) + "\n")

    stage(5, "plotting the training curves")
    png = plot_curves({r.name: os.path.join(r.config.output_dir, r.name) for r in runs},
                      os.path.join(out, "curves.png"))

    print(f"\ndone in {time.time() - started:.0f} s. Outputs:")
    for label, path in (("data", data_dir), ("config", config), ("runs", os.path.join(out, "runs")),
                        ("ledger", ledger), ("table", summary), ("curves", png)):
        print(f"  {label:<7} {path}")
    print("\n" + next_steps(config, ledger))
    return 0


def next_steps(config: str, ledger: str) -> str:
    """Commands that work from here: a law prediction now, a sweep whose ledger `law fit --anchor paper` can fit."""
    return "\n".join([
        "next steps:",
        "  sparse-dc law predict --preset paper --dense-params 1.45e8 --density 0.5 --unique-tokens 100M --tokens 400M",
        f"  sparse-dc sweep --config {config} --grid sparsity.density=1,0.5,0.25 --grid data.epochs=1,2,4 --nproc 2",
        f"  sparse-dc law fit {ledger} --anchor paper --out {os.path.join(os.path.dirname(ledger), 'fit.json')}"
        "   (after the sweep: an anchored fit needs 4+ runs)"])
