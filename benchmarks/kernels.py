"""Benchmark the block-sparse kernels against dense cuBLAS and torch's BSR ops on identical operands.

GPU sweep (defaults = issue 3): bf16, Llama MLP shapes, M in {8192, 16384} tokens, densities
{1, 1/2, 1/4, 1/8, 1/16}, B in {32, 64, 128}; ops forward (Y = X·Wᵀ), dX (= dY·W), dW (= dYᵀ·X at live
blocks) and fwd+bwd (autograd). Throughput is per *useful* FLOP (2·M·N·K·density); efficiency is
(dense time x density) / sparse time, so 1.0 means the ideal 1/density speedup.

    python benchmarks/kernels.py                        # full sweep on the GPU -> benchmarks/results/
    python benchmarks/kernels.py --m 8192 --block-sizes 128 --densities 0.5 0.0625
    python benchmarks/kernels.py --cpu-smoke            # tiny case, reference + Triton interpreter, JSON only

Writes kernels_<device>.json and a .png plot with device name and torch/triton versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import warnings
from typing import Callable

import torch

SHAPES = [(2048, 5632), (5632, 2048), (4096, 4096)]  # (K_in, N_out): MLP up/gate, MLP down, square
OPS = ("forward", "dX", "dW", "fwd+bwd")


def make_case(m: int, k: int, n: int, b: int, density: float, dtype: torch.dtype, device: str, seed: int = 0):
    """Operands for one case: x [M, K], dy [M, N], a random layout with round(density·blocks) live blocks."""
    from sparse_dc.kernels import BlockLayout

    g = torch.Generator(device="cpu").manual_seed(seed)
    nbr, nbc = n // b, k // b
    live = max(1, round(density * nbr * nbc))
    mask = torch.zeros(nbr * nbc, dtype=torch.bool)
    mask[torch.randperm(nbr * nbc, generator=g)[:live]] = True
    layout = BlockLayout.from_block_mask(mask.reshape(nbr, nbc).to(device), b)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    values = (torch.randn(layout.nnz, b, b, generator=g) / k ** 0.5).to(device, dtype)
    return x, dy, layout, values


def _timer(device: str, reps: int) -> Callable[[Callable[[], object]], float]:
    """ms per call: triton's do_bench (CUDA events, L2 flushed) on GPU, perf_counter median on CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    return cpu_time


def sparse_fns(x, dy, layout, values, backend: str) -> dict[str, Callable[[], object]]:
    """Our ops. backend "triton" calls the launchers directly (forward/dX/dW), "reference" the torch path."""
    from sparse_dc.kernels import block_sparse_linear, reference

    xr, vr = x.clone().requires_grad_(), values.clone().requires_grad_()

    def fwd_bwd():
        block_sparse_linear(xr, vr, layout, backend=backend).backward(dy)
        xr.grad = vr.grad = None

    if backend == "triton":
        from sparse_dc.kernels import triton_ops

        ops = {"forward": lambda: triton_ops.dds(x, values, layout, transpose=False),
               "dX": lambda: triton_ops.dds(dy, values, layout, transpose=True),
               "dW": lambda: triton_ops.sdd(dy, x, layout)}
    else:
        ops = {"forward": lambda: reference.linear(x, values, layout),
               "dX": lambda: reference.grad_input(dy, values, layout),
               "dW": lambda: reference.grad_values(dy, x, layout)}
    return {**ops, "fwd+bwd": fwd_bwd}


def dense_fns(x, dy, w) -> dict[str, Callable[[], object]]:
    """cuBLAS on the full dense weight (the baseline every speedup is relative to)."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd_bwd():
        torch.nn.functional.linear(xr, wr).backward(dy)
        xr.grad = wr.grad = None

    return {"forward": lambda: torch.nn.functional.linear(x, w), "dX": lambda: dy @ w,
            "dW": lambda: dy.t() @ x, "fwd+bwd": fwd_bwd}


def bsr_fns(x, dy, layout, values) -> dict[str, Callable[[], object]]:
    """torch.sparse BSR (its Triton kernels on CUDA): Y = (W·Xᵀ)ᵀ and dX = (Wᵀ·dYᵀ)ᵀ by bsr_dense_mm,
    dW by sampled_addmm at W's blocks. No autograd exists for it, so no fwd+bwd. Ops it refuses are skipped."""
    from torch.sparse._triton_ops import bsr_dense_mm  # None where torch has no Triton (CPU builds)

    mm = bsr_dense_mm if bsr_dense_mm is not None else torch.matmul  # CPU smoke: torch's generic BSR matmul
    b = layout.block_size
    w = layout.to_dense(values)
    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        w_bsr, wt_bsr = w.to_sparse_bsr((b, b)), w.t().contiguous().to_sparse_bsr((b, b))
    xt, dyt = x.t().contiguous(), dy.t().contiguous()
    return {"forward": lambda: mm(w_bsr, xt), "dX": lambda: mm(wt_bsr, dyt),
            "dW": lambda: torch.sparse.sampled_addmm(w_bsr, dyt, x, beta=0.0)}


def run_case(m, k, n, b, density, dtype, device, backend, timer, with_bsr) -> dict:
    x, dy, layout, values = make_case(m, k, n, b, density, dtype, device)
    w = layout.to_dense(values)
    useful = 2.0 * m * n * k * layout.density  # FLOPs of one matmul at live blocks
    row = dict(M=m, K=k, N=n, B=b, density=layout.density, nnz=layout.nnz, dtype=str(dtype).split(".")[-1])
    families = {"sparse": sparse_fns(x, dy, layout, values, backend), "dense": dense_fns(x, dy, w)}
    if with_bsr:
        try:
            families["bsr"] = bsr_fns(x, dy, layout, values)
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as exc:
            row["bsr_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    for family, fns in families.items():
        for op, fn in fns.items():
            try:
                row[f"{family}_{op}_ms"] = timer(fn)
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:  # e.g. BSR op refused
                row[f"{family}_{op}_ms"] = None
                row[f"{family}_{op}_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    # Correctness of the timed kernels on these very operands (relative to max|dense result|).
    from sparse_dc.kernels import block_sparse_linear

    ref = torch.nn.functional.linear(x.float(), w.float())
    got = block_sparse_linear(x, values, layout, backend=backend).float()
    row["forward_max_rel_err"] = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    for op in OPS:
        mult = 3.0 if op == "fwd+bwd" else 1.0
        sp, de, bsr = (row.get(f"{f}_{op}_ms") for f in ("sparse", "dense", "bsr"))
        if sp:
            row[f"{op}_tflops"] = mult * useful / (sp * 1e-3) / 1e12
            if de:
                row[f"{op}_speedup_vs_dense"] = de / sp
                row[f"{op}_efficiency"] = de * layout.density / sp
            if bsr:
                row[f"{op}_speedup_vs_bsr"] = bsr / sp
    return row


def print_table(rows: list[dict]) -> None:
    head = f"{'backend':>9} {'M':>6} {'K':>5} {'N':>5} {'B':>4} {'dens':>6} {'op':>8} {'ms':>8} {'TFLOP/s':>8} {'xDense':>7} " \
           f"{'eff':>6} {'xBSR':>6}"
    print(head)
    print("-" * len(head))
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else format("-", ">" + spec.split(".")[0])
    for r in rows:
        for op in OPS:
            print(f"{r.get('backend', ''):>9} {r['M']:>6} {r['K']:>5} {r['N']:>5} {r['B']:>4} {r['density']:>6.4f} {op:>8} "
                  f"{fmt(r.get(f'sparse_{op}_ms'), '8.3f')} {fmt(r.get(f'{op}_tflops'), '8.1f')} "
                  f"{fmt(r.get(f'{op}_speedup_vs_dense'), '7.2f')} {fmt(r.get(f'{op}_efficiency'), '6.2f')} "
                  f"{fmt(r.get(f'{op}_speedup_vs_bsr'), '6.2f')}")


def plot(rows: list[dict], path: str) -> None:
    """Efficiency vs density, one panel per op, one line per (backend, B, shape) averaged over M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPS), figsize=(5 * len(OPS), 4), sharey=True)
    for ax, op in zip(axes, OPS):
        series: dict[tuple, dict[float, list[float]]] = {}
        for r in rows:
            if r.get(f"{op}_efficiency") is not None:
                key = (r.get("backend", ""), r["B"], r["K"], r["N"])
                series.setdefault(key, {}).setdefault(r["density"], []).append(r[f"{op}_efficiency"])
        for (backend, b, k, n), pts in sorted(series.items()):
            d = sorted(pts)
            ax.plot(d, [sum(pts[x]) / len(pts[x]) for x in d], marker="o", label=f"{backend} B={b} {k}x{n}")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(op)
        ax.set_xlabel("density")
    axes[0].set_ylabel("efficiency vs ideal (dense time x density / time)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 case on CPU: reference + interpreter")
    p.add_argument("--m", type=int, nargs="+", default=[8192, 16384], help="tokens (rows of X)")
    p.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="K_inxN_out")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125, 0.0625])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--no-bsr", action="store_true", help="skip torch BSR")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before sparse_dc.kernels.triton_ops is imported
        cases = [(m, k, n, b, d) for m in (64,) for k, n in ((128, 96),) for b in (32,) for d in (1.0, 0.5)]
        device, dtype, backends, with_bsr = "cpu", torch.float32, ("reference", "triton"), True
    else:
        if not torch.cuda.is_available():
            print("No CUDA device: run with --cpu-smoke, or on a GPU machine.", file=sys.stderr)
            return 2
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        cases = [(m, k, n, b, d) for m in args.m for k, n in shapes for b in args.block_sizes
                 for d in args.densities]
        device, dtype, backends, with_bsr = "cuda", getattr(torch, args.dtype), ("triton",), not args.no_bsr

    timer = _timer(device, reps=5)
    rows = []
    for backend in backends:
        for m, k, n, b, d in cases:
            row = run_case(m, k, n, b, d, dtype, device, backend, timer, with_bsr)
            row["backend"] = backend
            rows.append(row)
    print_table(rows)

    import triton

    from sparse_dc.config.base import write_text_atomic

    name = "cpu_smoke" if args.cpu_smoke else re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower())
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=sys.argv[1:] if argv is None else argv)
    if device == "cuda":
        from sparse_dc.kernels import triton_ops

        meta["tuned_configs"] = {repr(k): v for k, v in triton_ops._TUNED.items()}
    out = os.path.join(args.out_dir, f"kernels_{name}.json")
    write_text_atomic(out, json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")
    plot(rows, out[:-5] + ".png")
    print(f"wrote {out[:-5]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
