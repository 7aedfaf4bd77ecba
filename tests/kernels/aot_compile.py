"""Compile the Triton kernels for sm80 and sm90 without a GPU (ptxas ships with the triton wheel).

Run with TRITON_INTERPRET unset (the interpreter does no compilation). Catches what the interpreter cannot:
type errors in compiled code, shared-memory overflow of the configs, and whether the K loop is software-
pipelined (cp.async) and uses wgmma on Hopper. Prints one JSON line per kernel; exit code 77 when this
Triton's ahead-of-time API differs from the one used here.
"""
import json
import sys

import triton
import triton.language as tl

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)

from sparse_dc.kernels.triton_kernels import (
    OUT_ACCUMULATE,
    OUT_PARTIALS,
    OUT_SQUARED_NORM,
    OUT_VALUES,
    _dds_kernel,
    _sdd_kernel,
)

ACC = {"bf16": tl.float32, "fp16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}


def compile_kernel(fn, ptr_types: dict, consts: dict, aligned: list, cc: int, warps: int, stages: int):
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(ptr_types)
    sig.update({k: "constexpr" for k in consts})
    # What the runtime infers at launch for contiguous, 16-aligned operands: unit strides become constants,
    # pointers and leading strides are divisible by 16.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    try:
        src = ASTSource(fn, sig, consts, attrs)
    except TypeError:
        sys.exit(77)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=warps, num_stages=stages))
    ir = k.asm["ttgir"]
    return dict(kernel=fn.__name__, cc=cc, shared=k.metadata.shared,
                pipelined="async_copy_global_to_local" in ir, wgmma="warp_group_dot" in ir,
                **{k_: str(v) for k_, v in consts.items() if k_ in ("B", "BLOCK_M", "BLOCK_K", "OUT_MODE")})


def dds(cc, dt, b, bm, bk, transpose, warps=8, stages=3):
    consts = dict(B=b, BLOCK_M=bm, BLOCK_K=bk, GROUP_M=8, HAS_BIAS=True, UPCAST=False, ACC_DTYPE=ACC[dt],
                  INPUT_PRECISION="ieee" if dt in ("fp32", "fp64") else "tf32", stride_ak=1, stride_cn=1,
                  **(dict(stride_wk=b, stride_wn=1) if transpose else dict(stride_wk=1, stride_wn=b)))
    ptrs = {n: f"*{dt}" for n in ("a_ptr", "w_ptr", "bias_ptr", "c_ptr")}
    ptrs.update({n: "*i32" for n in ("ptr_ptr", "idx_ptr", "slot_ptr", "order_ptr")})
    return dict(dtype=dt, **compile_kernel(_dds_kernel, ptrs, consts, [*ptrs, "stride_am", "stride_cm"], cc,
                                           warps, stages))


def sdd(cc, dt, b, bm, mode, warps=8, stages=3):
    consts = dict(B=b, BLOCK_M=bm, OUT_MODE=mode.value, UPCAST=False, ACC_DTYPE=ACC[dt],
                  INPUT_PRECISION="ieee" if dt in ("fp32", "fp64") else "tf32", stride_dyn=1, stride_xk=1)
    ptrs = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "out_ptr": f"*{dt}" if mode is OUT_VALUES else "*fp32"}
    ptrs.update({n: "*i32" for n in ("row_ptr", "col_ptr", "slot_ptr")})
    return dict(dtype=dt, **compile_kernel(_sdd_kernel, ptrs, consts, [*ptrs, "stride_dym", "stride_xm",
                                                                        "m_per_split"], cc, warps, stages))


if __name__ == "__main__":
    jobs = [lambda: dds(90, "bf16", 128, 128, 64, False), lambda: dds(90, "bf16", 64, 128, 64, True),
            lambda: dds(80, "fp16", 32, 128, 32, False, warps=4),
            lambda: dds(90, "fp32", 64, 64, 32, True, warps=4), lambda: dds(80, "fp64", 16, 32, 16, False, 4, 2),
            lambda: sdd(90, "bf16", 128, 64, OUT_VALUES), lambda: sdd(90, "bf16", 64, 64, OUT_PARTIALS, warps=4),
            lambda: sdd(80, "bf16", 32, 64, OUT_SQUARED_NORM, warps=4),
            lambda: sdd(80, "fp64", 16, 32, OUT_VALUES, 4, 2),
            lambda: sdd(90, "bf16", 128, 64, OUT_ACCUMULATE)]  # RigL's fp32 accumulate (read-add-write) mode
    for job in jobs:
        print(json.dumps(job()), flush=True)
