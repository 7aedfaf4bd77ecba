"""Launchers for the Triton kernels (check, allocate, launch) and their autotuning.

`autotune_configs(kind, block_size)` is the one place configs are defined. `_tune` picks the fastest per key
(kind, dtype, device, M bucket, N, K, B, density bucket) with triton.testing.do_bench on the first call and
caches it; under the CPU interpreter there is a single small config and nothing is timed.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from .layout import BlockLayout
from .triton_kernels import OUT_ACCUMULATE, OUT_PARTIALS, OUT_SQUARED_NORM, OUT_VALUES, _dds_kernel, _sdd_kernel

INTERPRET = type(_dds_kernel).__name__ == "InterpretedFunction"  # decided by TRITON_INTERPRET at import
_ACC = {torch.float64: tl.float64}  # everything else accumulates in fp32
_TUNED: dict[tuple, dict] = {}  # key -> chosen config (read by benchmarks/kernels.py)


def autotune_configs(kind: str, block_size: int) -> list[dict]:
    """Candidate launch configs for `kind` ("dds": forward/dX, "sdd": dW/probe) at block size B.

    dds tiles are [BLOCK_M, B] (the output block width is the block size), stepping K by BLOCK_K <= B.
    sdd tiles are the whole BxB block, reducing over M in BLOCK_M steps. Hopper-leaning choices (128-256
    row tiles, 3-4 stages); Ampere runs them too."""
    b = block_size
    if INTERPRET:  # few, large steps: the interpreter costs ~1.5 ms per loop iteration
        return [dict(BLOCK_M=64, BLOCK_K=b, GROUP_M=8, num_warps=4, num_stages=1)] if kind == "dds" else \
            [dict(BLOCK_M=64, num_warps=4, num_stages=1)]
    smem = 160 * 1024  # bytes of shared memory per block on A100 (H100: 228 KiB); estimated for 16-bit operands
    if kind == "dds":
        cands = [(bm, bk, w, s) for bm in (64, 128, 256) for bk in (16, 32, 64, 128) for w in (4, 8)
                 for s in (3, 4)
                 if bk <= b and (bk >= 32 or b == 16) and bm * b <= 256 * 128 and not (bm == 256 and w == 4)
                 and s * (bm * bk + bk * b) * 2 <= smem]
        return [dict(BLOCK_M=bm, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s) for bm, bk, w, s in cands]
    cands = [(bm, w, s) for bm in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
             if bm * b <= 128 * 128 and not (b == 128 and w == 4 and bm == 128) and s * 2 * bm * b * 2 <= smem]
    return [dict(BLOCK_M=bm, num_warps=w, num_stages=s) for bm, w, s in cands]


def _density_bucket(density: float) -> int:
    """0 for dense, 1 for ~1/2, 2 for ~1/4, ... (log2 buckets)."""
    return 0 if density <= 0 else min(10, max(0, round(-math.log2(density))))


def _tune(key: tuple, configs: list[dict], launch: Callable[[dict], None]) -> dict:
    """The cached config for `key`, timing each candidate with `launch(config)` on a miss."""
    best = _TUNED.get(key)
    if best is None:
        if len(configs) == 1:
            best = configs[0]
        else:
            times = []
            for cfg in configs:
                try:
                    times.append(triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20))
                except triton.runtime.errors.OutOfResources:  # too much shared memory for this GPU
                    times.append(float("inf"))
            best = configs[min(range(len(configs)), key=times.__getitem__)]
        _TUNED[key] = best
    return best


def _dtype_meta(dtype: torch.dtype) -> dict:
    """Constexprs that depend on the operand dtype."""
    fp32_exact = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(UPCAST=INTERPRET and dtype in (torch.float16, torch.bfloat16), ACC_DTYPE=_ACC.get(dtype, tl.float32),
                INPUT_PRECISION="ieee" if fp32_exact or dtype == torch.float64 else "tf32")


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def dds(a: torch.Tensor, values: torch.Tensor, layout: BlockLayout, *, transpose: bool,
        bias: torch.Tensor | None = None) -> torch.Tensor:
    """C = A · Wᵀ (+ bias) (transpose=False: A = X [M, K_in] -> [M, N_out]) or C = A · W (transpose=True:
    A = dY [M, N_out] -> dX [M, K_in]). Operands are checked by the public op."""
    n_out, k_in = layout.shape
    b = layout.block_size
    m = a.shape[0]
    if transpose:
        n_c, meta = k_in, (layout.col_ptr, layout.row_idx_t, layout.slot_t, layout.col_order)
        stride_wk, stride_wn = b, 1
    else:
        n_c, meta = n_out, (layout.row_ptr, layout.col_idx, layout.slot, layout.row_order)
        stride_wk, stride_wn = 1, b
    c = torch.empty(m, n_c, dtype=a.dtype, device=a.device)
    if m == 0:
        return c
    values = values.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n_out_blocks = n_c // b
    consts = _dtype_meta(a.dtype)

    def launch(cfg: dict) -> None:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * n_out_blocks,)
        _dds_kernel[grid](
            a, values, bias if bias is not None else c, c, *meta,
            m, n_out_blocks,
            a.stride(0), a.stride(1), c.stride(0), c.stride(1), stride_wk, stride_wn,
            B=b, HAS_BIAS=bias is not None, **consts, **cfg)

    key = ("dds", transpose, a.dtype, str(a.device), triton.next_power_of_2(m), n_c, a.shape[1], b,
           _density_bucket(layout.density))
    launch(_tune(key, autotune_configs("dds", b), launch))
    return c


def _split_m(n_programs: int, m: int, block_m: int, device: torch.device) -> int:
    """M splits for the dW kernel: enough programs to fill the GPU twice over when live blocks are few,
    but every split keeps at least 4 BLOCK_M steps of reduction."""
    want = max(1, math.ceil(2 * _num_sms(device) / max(n_programs, 1)))
    return max(1, min(want, m // (4 * block_m)))


class SddResult(enum.Enum):
    """What a caller of the sdd kernel gets for the listed blocks dW_e = dYᵀ·X at (rows[e], cols[e])."""

    VALUES = "values"  # [n, B, B] in dy's dtype, block e at row slots[e] (dW of the live blocks)
    NORMS = "norms"  # float32 [n]: ||dW_e||_F, in entry order (the RigL probe)
    ACCUMULATE = "accumulate"  # acc[slots[e]] += dW_e in fp32; returns acc (exact RigL over micro-batches)


@dataclass(frozen=True)
class SddBlocks:
    """The operands of one sdd launch: dy [M, N_out], x [M, K_in], and the listed blocks (int32 [n] each)."""

    dy: torch.Tensor
    x: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    slots: torch.Tensor
    block_size: int


def _sdd(blocks: SddBlocks, key: tuple, *, result: SddResult, split_m: int | None,
         acc: torch.Tensor | None = None) -> torch.Tensor:
    """dW_e for the listed blocks as `result` asks (acc: the float32 accumulator of SddResult.ACCUMULATE)."""
    consts = _dtype_meta(blocks.dy.dtype)
    # ACCUMULATE is timed as VALUES (same M loop, plain store) so tuning never writes into `acc`
    tuned = SddResult.VALUES if result is SddResult.ACCUMULATE else result
    cfg = _tune(key, autotune_configs("sdd", blocks.block_size),
                lambda c: _launch_sdd(blocks, c, consts, result=tuned, split=1))
    split = split_m or _split_m(blocks.rows.numel(), blocks.dy.shape[0], cfg["BLOCK_M"], blocks.dy.device)
    return _launch_sdd(blocks, cfg, consts, result=result, split=split, acc=acc)


def _launch_sdd(blocks: SddBlocks, cfg: dict, consts: dict, *, result: SddResult, split: int,
                acc: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of _sdd_kernel with `split` M splits (fewer if M is short); splits are summed here, in order."""
    dy, b = blocks.dy, blocks.block_size
    n, m = blocks.rows.numel(), dy.shape[0]
    acc_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    m_per_split = triton.cdiv(triton.cdiv(max(m, 1), split), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    split = triton.cdiv(max(m, 1), m_per_split)
    if n == 0:
        return {SddResult.NORMS: torch.empty(0, dtype=torch.float32, device=dy.device),
                SddResult.VALUES: torch.empty(0, b, b, dtype=dy.dtype, device=dy.device),
                SddResult.ACCUMULATE: acc}[result]
    if split > 1:
        out, mode = torch.empty(split, n, b, b, dtype=acc_dtype, device=dy.device), OUT_PARTIALS
    elif result is SddResult.NORMS:
        out, mode = torch.empty(n, dtype=torch.float32, device=dy.device), OUT_SQUARED_NORM
    elif result is SddResult.ACCUMULATE:
        out, mode = acc, OUT_ACCUMULATE
    else:
        out, mode = torch.empty(n, b, b, dtype=dy.dtype, device=dy.device), OUT_VALUES
    _sdd_kernel[(n, split)](
        dy, blocks.x, out, blocks.rows, blocks.cols, blocks.slots,
        m, n, m_per_split,
        dy.stride(0), dy.stride(1), blocks.x.stride(0), blocks.x.stride(1),
        B=b, OUT_MODE=mode.value, **consts, **cfg)
    if mode is OUT_SQUARED_NORM:
        return out.sqrt()
    if mode is OUT_PARTIALS:
        out = out.sum(0)  # fixed-order combine of the M splits: deterministic, unlike atomics
        if result is SddResult.NORMS:
            return out.float().square().sum(dim=(1, 2)).sqrt()
        if result is SddResult.ACCUMULATE:  # the partials are already in slot order
            return acc.add_(out.float())
        return out.to(dy.dtype)
    return out


def sdd(dy: torch.Tensor, x: torch.Tensor, layout: BlockLayout, *, split_m: int | None = None) -> torch.Tensor:
    """dvalues [nnz, B, B] (slot order) = dYᵀ · X at the live blocks; dy [M, N_out], x [M, K_in].
    `split_m` overrides the number of M splits (default: `_split_m`)."""
    key = ("sdd", dy.dtype, str(dy.device), triton.next_power_of_2(max(dy.shape[0], 1)), *layout.shape,
           layout.block_size, _density_bucket(layout.density))
    blocks = SddBlocks(dy, x, layout.row_idx, layout.col_idx, layout.slot, layout.block_size)
    return _sdd(blocks, key, result=SddResult.VALUES, split_m=split_m)


def block_scores(x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout, *,
                 split_m: int | None = None) -> torch.Tensor:
    """float32 [nbr, nbc]: ||dYᵀ·X||_F per block, every block scored by the sdd kernel; each program reduces
    its block to one number, so the dense dW never exists in memory (unless M is split: then fp32 partial
    blocks [split, nbr*nbc, B, B] do)."""
    nbr, nbc = layout.block_shape
    idx = torch.arange(nbr * nbc, dtype=torch.int32, device=x.device)
    key = ("probe", dy.dtype, str(dy.device), triton.next_power_of_2(max(dy.shape[0], 1)), *layout.shape,
           layout.block_size)
    blocks = SddBlocks(dy, x, idx // nbc, idx % nbc, idx, layout.block_size)
    scores = _sdd(blocks, key, result=SddResult.NORMS, split_m=split_m)
    return scores.reshape(nbr, nbc)


def sampled_block_grad(x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       out: torch.Tensor, *, split_m: int | None = None) -> torch.Tensor:
    """out[e] += (dYᵀ·X) block (rows[e], cols[e]) for every listed block, in fp32; x [M, K_in], dy [M, N_out],
    rows/cols int32 [n], out float32 [n, B, B] (contiguous). Returns `out`. Blocks of one block row should be
    adjacent in the list (row-major, as `nonzero` gives) so that their programs share dY in L2."""
    b = out.shape[-1]
    slots = torch.arange(rows.numel(), dtype=torch.int32, device=out.device)
    key = ("sampled", dy.dtype, str(dy.device), triton.next_power_of_2(max(dy.shape[0], 1)), dy.shape[1],
           x.shape[1], b, _density_bucket(rows.numel() / ((dy.shape[1] // b) * (x.shape[1] // b))))
    return _sdd(SddBlocks(dy, x, rows, cols, slots, b), key, result=SddResult.ACCUMULATE, split_m=split_m, acc=out)
