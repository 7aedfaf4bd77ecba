"""Public ops: `block_sparse_linear` (autograd), and the two RigL growth probes on gradients that are never
materialised densely: `dense_grad_block_scores` (per-block norms of one backward's dYᵀX) and
`sampled_block_grad` (dYᵀX at a list of blocks, accumulated in fp32 over backwards).

Backend choice, per call: `backend="auto"` (default) runs the Triton kernels on CUDA tensors and the torch
reference on CPU tensors; `"triton"` forces the kernels (on CPU this needs TRITON_INTERPRET=1 set before
sparse_dc.kernels' Triton module is first imported, as tests/conftest.py does); `"reference"` forces torch.
The environment variable SPARSE_DC_KERNEL_BACKEND (auto | triton | reference) replaces "auto" process-wide; a run
sets it from its config (`sparsity.kernel_backend`, through `set_default_backend`).
"""
from __future__ import annotations

import os

import torch

from . import reference
from .errors import check
from .layout import SUPPORTED_BLOCK_SIZES, BlockLayout

BACKENDS = ("auto", "triton", "reference")
BACKEND_ENV = "SPARSE_DC_KERNEL_BACKEND"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def set_default_backend(backend: str) -> None:
    """Make "auto" mean `backend` in this process and the processes it starts (it sets SPARSE_DC_KERNEL_BACKEND): how
    a run's config (sparsity.kernel_backend) chooses the kernels of every sparse layer. "auto" changes nothing."""
    check(backend in BACKENDS, f"backend in {BACKENDS}", repr(backend))
    if backend != "auto":
        os.environ[BACKEND_ENV] = backend


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


def _check_x_dy(x: torch.Tensor, dy: torch.Tensor, n_out: int, k_in: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the operands of a dW = dyᵀ·x probe and flatten them to x [M, K_in], dy [M, N_out]."""
    check(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == k_in,
          f"x of shape [..., K_in={k_in}]", f"shape {tuple(getattr(x, 'shape', ()))}")
    check(isinstance(dy, torch.Tensor) and tuple(dy.shape) == (*x.shape[:-1], n_out),
          f"dy of shape {(*x.shape[:-1], n_out)}", f"shape {tuple(getattr(dy, 'shape', ()))}")
    check(dy.dtype == x.dtype and x.is_floating_point(), "x and dy of one floating dtype",
          f"{x.dtype} and {dy.dtype}")
    check(x.device == dy.device == device, f"x and dy on the device {device}", f"{x.device} and {dy.device}")
    return x.reshape(-1, k_in), dy.reshape(-1, n_out)


@torch.no_grad()
def dense_grad_block_scores(x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout, *,
                            backend: str = "auto") -> torch.Tensor:
    """RigL growth probe: float32 [nbr, nbc] with the Frobenius norm of (dyᵀ·x) restricted to each block.

    x [..., K_in] and dy [..., N_out] (same leading dims, dtype, device). Every block is scored, live ones
    included (mask with `~layout.block_mask()` to rank growth candidates). The dense dW is never
    materialised: the Triton path reduces each block to its norm in-kernel, the reference path works on
    block-row chunks. A norm per call: summing it over micro-batches is not the norm of the summed gradient
    (`sampled_block_grad` accumulates the blocks themselves)."""
    check(isinstance(layout, BlockLayout), "layout to be a BlockLayout", type(layout).__name__)
    n_out, k_in = layout.shape
    x2, dy2 = _check_x_dy(x, dy, n_out, k_in, layout.device)
    if resolve_backend(backend, x.device) == "reference":
        return reference.block_scores(x2, dy2, layout)
    from . import triton_ops

    return triton_ops.block_scores(x2, dy2, layout)


@torch.no_grad()
def sampled_block_grad(x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       block_size: int, *, out: torch.Tensor | None = None, check_indices: bool = True,
                       backend: str = "auto") -> torch.Tensor:
    """dW = dyᵀ·x at a list of B x B blocks, added in fp32 into `out`: float32 [n, B, B], entry e is block
    (rows[e], cols[e]) of the [N_out, K_in] gradient.

    x [..., K_in] and dy [..., N_out] (same leading dims, dtype and device; B divides N_out and K_in); rows and
    cols are 1-D integer tensors of one length n on that device (row-major order is fastest on the GPU). With
    `out` (float32 [n, B, B], contiguous) the blocks are added to it and it is returned: call once per
    backward to sum a gradient over micro-batches exactly; otherwise a new zero-initialised tensor is used.
    One kernel program per listed block (the same sdd kernel as dW); the dense dW is never materialised.
    `check_indices=False` skips the range check of rows/cols (a device->host sync) for trusted indices."""
    check(block_size in SUPPORTED_BLOCK_SIZES, f"block_size in {SUPPORTED_BLOCK_SIZES}", repr(block_size))
    b = block_size
    check(isinstance(x, torch.Tensor) and isinstance(dy, torch.Tensor), "x and dy to be torch.Tensors",
          f"{type(x).__name__} and {type(dy).__name__}")
    n_out, k_in = dy.shape[-1] if dy.dim() else 0, x.shape[-1] if x.dim() else 0
    check(n_out % b == 0 and k_in % b == 0 and n_out > 0 and k_in > 0,
          f"dy [..., N_out] and x [..., K_in] with block_size={b} dividing N_out and K_in",
          f"N_out={n_out}, K_in={k_in}")
    x2, dy2 = _check_x_dy(x, dy, n_out, k_in, x.device)
    for name, t in (("rows", rows), ("cols", cols)):
        check(isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype in (torch.int32, torch.int64),
              f"{name} to be a 1-D int32/int64 tensor", f"{getattr(t, 'dtype', type(t).__name__)} of shape "
              f"{tuple(getattr(t, 'shape', ()))}")
        check(t.device == x.device, f"{name} on x's device {x.device}", str(t.device))
    n = rows.numel()
    check(cols.numel() == n, f"cols of the length of rows ({n})", str(cols.numel()))
    if check_indices and n:
        lo_r, hi_r, lo_c, hi_c = (int(v) for v in (rows.min(), rows.max(), cols.min(), cols.max()))
        check(lo_r >= 0 and hi_r < n_out // b and lo_c >= 0 and hi_c < k_in // b,
              f"rows in [0, {n_out // b}) and cols in [0, {k_in // b})",
              f"rows in [{lo_r}, {hi_r}], cols in [{lo_c}, {hi_c}]")
    if out is None:
        out = torch.zeros(n, b, b, dtype=torch.float32, device=x.device)
    check(isinstance(out, torch.Tensor) and tuple(out.shape) == (n, b, b) and out.dtype == torch.float32
          and out.is_contiguous() and out.device == x.device,
          f"out to be a contiguous float32 tensor of shape {(n, b, b)} on {x.device}",
          f"{getattr(out, 'dtype', type(out).__name__)} of shape {tuple(getattr(out, 'shape', ()))}")
    if resolve_backend(backend, x.device) == "reference":
        return reference.sampled_block_grad(x2, dy2, rows, cols, out)
    check(x.dtype in _TRITON_DTYPES, f"a dtype in {_TRITON_DTYPES} for the Triton backend", str(x.dtype))
    from . import triton_ops

    return triton_ops.sampled_block_grad(x2, dy2, rows.to(torch.int32).contiguous(),
                                         cols.to(torch.int32).contiguous(), out)
