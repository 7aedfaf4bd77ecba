"""Training-step throughput, MFU and memory: dense vs block-sparse densities, side by side in one process.

    python benchmarks/train_step.py                      # GPU: 960m preset (1.17e9 dense params), seq 2048, bf16
    python benchmarks/train_step.py --cpu-smoke          # CPU: tiny preset, a few steps (checks the script runs)

Each configuration is a real DeepSpeed engine (ZeRO stage 1, one rank, AdamW via torch) stepping on random tokens
through the same loss as the trainer. Reported per configuration: tokens/s, MFU on dense-equivalent and on active
FLOPs (PaLM appendix-B FLOPs from sparse_dc.model.flops_per_token), peak allocated memory, and the model-state
memory (params + grads + fp32 master + Adam moments, from the engine's actual tensors). Writes a JSON file and a
Markdown table under benchmarks/results/.

Goals on H100 (issue 5): density 0.5 >= 1.5x dense tokens/s, 0.125 >= 3x; dense MFU >= 45%; model-state memory
at density d <= (d + 0.05) x dense.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

from sparse_dc.config.run import RunConfig
from sparse_dc.model import build_model, count_params, flops_per_token
from sparse_dc.train.dist import init_distributed, setup_env
from sparse_dc.train.metrics import device_peak_flops
from sparse_dc.train.trainer import build_engine, token_loss_sum


def model_state_bytes(engine) -> int:
    """Bytes of parameters, gradients, fp32 master weights and optimizer moments held by this (single) rank."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in engine.module.parameters():
        add(p.data)
        add(p.grad)
    opt = engine.optimizer
    for group in getattr(opt, "single_partition_of_fp32_groups", []):  # ZeRO 1/2 fp32 master partitions
        add(group)
        add(group.grad)
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        for value in state.values():
            add(value)
    return total


def bench_one(args, density: float, block: int, device: str) -> dict:
    overrides = [f"model.preset={args.preset}", f"data.seq_len={args.seq_len}",
                 f"model.max_seq_len={max(args.seq_len, 1024)}", f"sparsity.density={density}",
                 f"sparsity.block_size={block if density < 1 else 1}", "sparsity.method=static",
                 f"train.micro_batch={args.micro_batch}", f"train.global_batch={args.micro_batch}",
                 f"train.precision={args.precision}", "train.deepspeed.zero_stage=1", "train.grad_clip=1.0"]
    cfg = RunConfig().with_overrides(overrides)
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.sparsity, args.vocab)
    counts = count_params(model)
    engine = build_engine(cfg, model, 1, total_steps=args.steps + args.warmup)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            start = time.perf_counter()
        loss = token_loss_sum(engine, tokens) / tokens[:, 1:].numel()
        engine.backward(loss)
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    tps = args.steps * args.micro_batch * args.seq_len / elapsed
    peak = device_peak_flops(args.precision, args.peak_flops)
    shape = engine.module.shape
    row = {"density": density, "block_size": block if density < 1 else None, "tokens_per_s": tps,
           "step_ms": 1e3 * elapsed / args.steps, "dense_params": counts.dense, "active_params": counts.active,
           "model_state_gib": model_state_bytes(engine) / 2 ** 30, "loss": float(loss)}
    if peak:
        row["mfu_dense"] = tps * flops_per_token(counts, shape, args.seq_len, active=False) / peak
        row["mfu_active"] = tps * flops_per_token(counts, shape, args.seq_len, active=True) / peak
    if device.startswith("cuda"):
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del engine, model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["density"] == 1.0), rows[0])
    lines = ["| density | block | tokens/s | speedup | MFU dense | MFU active | model state GiB | ratio | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda k: f"{100 * r[k]:.1f}%" if k in r else "-"  # noqa: E731
        lines.append(f"| {r['density']} | {r['block_size'] or '-'} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x | {fmt('mfu_dense')} | {fmt('mfu_active')} | "
                     f"{r['model_state_gib']:.3f} | {r['model_state_gib'] / dense['model_state_gib']:.3f} | "
                     f"{r.get('peak_mem_gib', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU, a few steps")
    p.add_argument("--preset", default="960m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--densities", default="1.0,0.5,0.25,0.125")
    p.add_argument("--blocks", default="64,128")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s (default: lookup)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step[_cpu_smoke].json)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.preset, args.seq_len, args.micro_batch, args.vocab = "tiny", 64, 2, 512
        args.precision, args.blocks, args.densities, args.steps, args.warmup = "fp32", "32", "1.0,0.5", 3, 1
    device = init_distributed(setup_env())
    rows = []
    for density in map(float, args.densities.split(",")):
        for block in (map(int, args.blocks.split(",")) if density < 1 else [1]):
            rows.append(bench_one(args, density, block, device))
            print(json.dumps(rows[-1]), flush=True)
    name = "train_step_cpu_smoke" if args.cpu_smoke else f"train_step_{args.preset}_L{args.seq_len}"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "args": vars(args), "python": sys.version.split()[0]}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    text = table(rows)
    with open(out.replace(".json", ".md"), "w", encoding="utf-8") as fh:
        fh.write(f"# {name} on {meta['device']}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
