"""Public ops: `block_sparse_linear` (autograd) and `dense_grad_block_scores` (RigL probe).

Backend choice, per call: `backend="auto"` (default) runs the Triton kernels on CUDA tensors and the torch
reference on CPU tensors; `"triton"` forces the kernels (on CPU this needs TRITON_INTERPRET=1 set before
sparse_dc.kernels' Triton module is first imported, as tests/conftest.py does); `"reference"` forces torch.
The environment variable SPARSE_DC_KERNEL_BACKEND (auto | triton | reference) replaces "auto" process-wide.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .errors import check
from .layout import BlockLayout

BACKENDS = ("auto", "triton", "reference")
BACKEND_ENV = "SPARSE_DC_KERNEL_BACKEND"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def resolve_backend(backend: str, device: torch.device) -> str:
    """"triton" or "reference" for tensors on `device` (see the module docstring)."""
    check(backend in BACKENDS, f"backend in {BACKENDS}", repr(backend))
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        check(backend in BACKENDS, f"{BACKEND_ENV} in {BACKENDS}", repr(backend))
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton":
        check(device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
              "CUDA tensors, or TRITON_INTERPRET=1 set before import, for backend 'triton'",
              f"tensors on {device} without TRITON_INTERPRET=1")
    return backend


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under torch.autocast, cast floating operands to the autocast dtype like F.linear does."""
    dev = next(t for t in tensors if t is not None).device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _check_operands(x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                    bias: torch.Tensor | None) -> None:
    check(isinstance(layout, BlockLayout), "layout to be a BlockLayout", type(layout).__name__)
    layout.check_values(values)
    n_out, k_in = layout.shape
    check(isinstance(x, torch.Tensor), "x to be a torch.Tensor", type(x).__name__)
    check(x.dim() >= 1 and x.shape[-1] == k_in, f"x of shape [..., K_in={k_in}]", f"shape {tuple(x.shape)}")
    check(x.dtype == values.dtype, f"x of the values' dtype {values.dtype}", str(x.dtype))
    check(x.device == values.device, f"x on the values' device {values.device}", str(x.device))
    if bias is not None:
        check(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (n_out,), f"bias of shape ({n_out},)",
              f"{tuple(getattr(bias, 'shape', ()))}")
        check(bias.dtype == values.dtype, f"bias of the values' dtype {values.dtype}", str(bias.dtype))
        check(bias.device == values.device, f"bias on the values' device {values.device}", str(bias.device))


class BlockSparseLinearFn(torch.autograd.Function):
    """y = x · Wᵀ + bias on 2-D x [M, K_in]; backward: dX by the transposed-metadata kernel, dW at live
    blocks only, d(bias) by a column sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                layout: BlockLayout) -> torch.Tensor:
        from . import triton_ops  # imported on first use: TRITON_INTERPRET must be set before it loads

        ctx.layout = layout
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values)
        return triton_ops.dds(x, values, layout, transpose=False, bias=bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from . import triton_ops

        x, values = ctx.saved_tensors
        layout = ctx.layout
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0]:
            dx = triton_ops.dds(dy, values, layout, transpose=True)
        if ctx.needs_input_grad[1]:
            dvalues = triton_ops.sdd(dy, x, layout)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(dy.dtype)
        return dx, dvalues, dbias, None


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                        bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """y = x · Wᵀ + bias where W [N_out, K_in] is block-sparse (`values` [nnz, B, B] in slot order + `layout`).

    x [..., K_in] -> y [..., N_out]; differentiable w.r.t. x, values and bias. x, values and bias share one
    dtype (float32/float16/bfloat16, float64 too) and device; under torch.autocast they are cast to its dtype.
    `backend`: "auto" | "triton" | "reference" (module docstring)."""
    x, values, bias = _autocast(x, values, bias)
    _check_operands(x, values, layout, bias)
    if resolve_backend(backend, x.device) == "reference":
        return reference.linear(x, values, layout, bias)
    check(x.dtype in _TRITON_DTYPES, f"a dtype in {_TRITON_DTYPES} for the Triton backend", str(x.dtype))
    n_out, k_in = layout.shape
    lead = x.shape[:-1]
    y = BlockSparseLinearFn.apply(x.reshape(-1, k_in), values, bias, layout)
    return y.reshape(*lead, n_out)


@torch.no_grad()
def dense_grad_block_scores(x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout, *,
                            backend: str = "auto") -> torch.Tensor:
    """RigL growth probe: float32 [nbr, nbc] with the Frobenius norm of (dyᵀ·x) restricted to each block.

    x [..., K_in] and dy [..., N_out] (same leading dims, dtype, device). Every block is scored, live ones
    included (mask with `~layout.block_mask()` to rank growth candidates). The dense dW is never
    materialised: the Triton path reduces each block to its norm in-kernel, the reference path works on
    block-row chunks."""
    check(isinstance(layout, BlockLayout), "layout to be a BlockLayout", type(layout).__name__)
    n_out, k_in = layout.shape
    check(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == k_in,
          f"x of shape [..., K_in={k_in}]", f"shape {tuple(getattr(x, 'shape', ()))}")
    check(isinstance(dy, torch.Tensor) and tuple(dy.shape) == (*x.shape[:-1], n_out),
          f"dy of shape {(*x.shape[:-1], n_out)}", f"shape {tuple(getattr(dy, 'shape', ()))}")
    check(dy.dtype == x.dtype and x.is_floating_point(), f"x and dy of one floating dtype",
          f"{x.dtype} and {dy.dtype}")
    check(x.device == dy.device == layout.device, f"x and dy on the layout's device {layout.device}",
          f"{x.device} and {dy.device}")
    x2, dy2 = x.reshape(-1, k_in), dy.reshape(-1, n_out)
    if resolve_backend(backend, x.device) == "reference":
        return reference.block_scores(x2, dy2, layout)
    from . import triton_ops

    return triton_ops.block_scores(x2, dy2, layout)
