"""SparseLinear: a bias-free linear layer y = x Wᵀ whose W (out x in) is sparse at one of two granularities.

- block (B >= 16): the only parameter is `values[nnz, B, B]`; the topology is a BlockLayout whose int32 CSR
  tensors (row_ptr, col_idx, slot) are buffers, so checkpoints carry them. Forward goes through the kernels.
  Weight, gradient and optimizer memory scale with density. A topology change keeps nnz, so `values` never
  changes shape: surviving blocks keep their slot and only the slots of grown blocks are reset.
- unstructured (B = 1): a dense `weight` with a {0,1} `mask` buffer. Invariant: pruned entries of the weight are
  exactly 0. The forward masks the weight's *gradient* in backward (an identity autograd node on the weight), so
  Adam moments of pruned entries stay 0 and the optimizer never moves them: no `apply_masks()` call is needed
  after the optimizer step. A topology update zeroes dropped entries and their moments. The forward multiplies by
  the weight itself, so the gradient reaching that node is the dense one RigL scores.

A "unit" is one entry (B = 1) or one B x B block; `unit_mask()` is the bool [out / B, in / B] topology.

RigL growth evidence (`arm_scores` at an update step, `take_scores` after its backwards). RigL ranks dead units
by |dL/dW| of the step's whole gradient, i.e. summed over micro-batches and ranks (Evci et al. 2020):
- B = 1: the signed dense gradient is summed in fp32 over backwards ([out, in], the size of the weight).
- blocks, "exact" (default): the dead blocks' gradient Σ dYᵀX is summed in fp32 over backwards by the
  sampled-dW kernel; the engine all-reduces it, then scores are per-block Frobenius norms. Exact, at the cost of
  an fp32 accumulator of (1 - density) x out x in x 4 bytes per rank (not sharded by ZeRO), held only from
  `arm_scores` to `take_scores` of an update step. Summed over the projections of the 120m preset (124M
  dense-equivalent weights): 236 MiB at density 0.5, 443 MiB at 0.0625; 1b92 (1.91B): 3.6 GiB and 6.7 GiB.
  Below density 0.5 that exceeds the fp32 `values` themselves (e.g. 30 MiB for 120m at 0.0625); still less
  than B = 1's accumulator, which is the full dense size.
- blocks, "norm_sum" (opt-in low memory): each backward adds the per-block norms of that micro-batch's dYᵀX
  ([out / B, in / B] floats), and ranks sum those: a sum of norms, not the norm of the sum, so it equals RigL
  only with one micro-batch on one rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, get_args

import torch
import torch.nn.functional as F
from torch import nn

from sparse_dc.kernels import BlockLayout, block_sparse_linear, dense_grad_block_scores, sampled_block_grad
from sparse_dc.sparsity.config import RiglScores


def _layout_from_buffers(row_ptr: torch.Tensor, col_idx: torch.Tensor, slot: torch.Tensor,
                         shape: tuple[int, int], block_size: int) -> BlockLayout:
    # the buffers were written by this module (or a checkpoint of it): skip the index checks' host syncs
    return BlockLayout.from_state(shape, block_size, row_ptr, col_idx, slot, validate=False)


@dataclass
class GrowCapture:
    """One layer's RigL growth evidence over an update step's backwards; `acc` is what ranks sum.

    acc: float32, B = 1: signed Σ dL/dW [out, in]; blocks, exact: Σ dYᵀX at the dead blocks [n_dead, B, B]
    (entry e is block (rows[e], cols[e])); blocks, norm_sum: Σ per-backward block norms [out / B, in / B]."""
    acc: torch.Tensor
    unit_shape: tuple[int, int]
    rows: torch.Tensor | None = None  # int32 [n_dead], exact block mode only
    cols: torch.Tensor | None = None

    def scores(self) -> torch.Tensor:
        """float32 [out / B, in / B] grow scores from the (rank-summed) accumulator; 0 at live blocks (exact),
        which are never grow candidates."""
        if self.rows is None:
            return self.acc.abs()
        out = torch.zeros(self.unit_shape, dtype=torch.float32, device=self.acc.device)
        out[self.rows.long(), self.cols.long()] = self.acc.square().sum((1, 2)).sqrt()
        return out


class _MaskGrad(torch.autograd.Function):
    """Identity on the weight whose backward masks the weight's gradient (B = 1), after adding the dense
    gradient to the layer's RigL score accumulator when armed. An autograd node rather than a tensor hook, so it
    survives deepcopy/pickling of the module and is independent of how DeepSpeed wraps the parameter."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, layer: "SparseLinear") -> torch.Tensor:
        ctx.layer = layer
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        if layer._scores is not None:
            layer._scores.acc += grad.detach().float()  # signed sum over micro-batches; |.| after the all-reduce
        return grad * layer.mask, None


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, block_size: int, mask: torch.Tensor, std: float):
        """`mask`: bool [out / B, in / B] initial topology; live weights are drawn from normal(0, std)."""
        super().__init__()
        b = block_size
        if out_features % b or in_features % b:
            raise ValueError(f"SparseLinear {out_features}x{in_features}: expected block_size={b} to divide "
                             "both dims")
        if tuple(mask.shape) != (out_features // b, in_features // b) or mask.dtype != torch.bool:
            raise ValueError(f"Expected a bool mask of shape {(out_features // b, in_features // b)}. "
                             f"Got {mask.dtype} {tuple(mask.shape)}.")
        self.in_features, self.out_features, self.block_size = in_features, out_features, b
        self.init_std = std  # regrow_init=normal draws regrown weights at a fraction of it
        self._scores: GrowCapture | None = None  # RigL growth evidence, only while armed
        if b == 1:
            weight = torch.randn(out_features, in_features) * std
            self.weight = nn.Parameter(weight * mask)
            self.register_buffer("mask", mask.clone())
        else:
            layout = BlockLayout.from_block_mask(mask, b)
            self.values = nn.Parameter(torch.randn(layout.nnz, b, b) * std)
            for name, tensor in layout.state_tensors().items():  # row_ptr, col_idx, slot: int32
                self.register_buffer(name, tensor)
            self._layout, self._layout_key = layout, self._buffer_key()

    # --- topology ---------------------------------------------------------------------------------------
    @property
    def param(self) -> nn.Parameter:
        """The trainable tensor: `weight` (B = 1) or `values` (block)."""
        return self.weight if self.block_size == 1 else self.values

    def _buffer_key(self) -> tuple[int, ...]:
        # identity + in-place version of the layout buffers: changes on .to(), load_state_dict and copy_()
        bufs = (self.row_ptr, self.col_idx, self.slot)
        return tuple(id(b) for b in bufs) + tuple(b._version for b in bufs)

    @property
    def layout(self) -> BlockLayout:
        """The BlockLayout over the current buffers (rebuilt when they were replaced or written in place)."""
        key = self._buffer_key()
        if key != self._layout_key:
            self._layout = _layout_from_buffers(self.row_ptr, self.col_idx, self.slot,
                                                (self.out_features, self.in_features), self.block_size)
            self._layout_key = key
        return self._layout

    def unit_mask(self) -> torch.Tensor:
        """bool [out / B, in / B]: which entries (B = 1) or blocks are live."""
        return self.mask if self.block_size == 1 else self.layout.block_mask()

    @property
    def dense_numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def active_numel(self) -> int:
        if self.block_size == 1:
            return int(self.mask.sum())
        return int(self.col_idx.numel()) * self.block_size ** 2

    def unit_magnitude(self, param: torch.Tensor) -> torch.Tensor:
        """float32 [out / B, in / B] magnitudes of a full copy of `param`: |w| or per-block Frobenius norms
        (0 at dead units)."""
        if self.block_size == 1:
            return param.float().abs() * self.mask
        norms = param.float().pow(2).sum((1, 2)).sqrt()  # [nnz], indexed by slot
        layout = self.layout
        out = torch.zeros(layout.block_shape, device=layout.device)
        norms = norms.to(layout.device)
        out[layout.row_idx.long(), layout.col_idx.long()] = norms[layout.slot.long()]
        return out

    @torch.no_grad()
    def set_topology(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Install `new_mask` (same number of live units). Returns where the parameter and its moments must be
        reset to 0: a bool mask over `weight` (dropped | grown entries) for B = 1, or the grown slots (long
        indices into `values`' first dim) for blocks. Does not touch the parameter itself."""
        new_mask = new_mask.to(self.unit_mask().device)
        old = self.unit_mask().clone()  # B = 1: the mask buffer itself, overwritten below
        if int(new_mask.sum()) != int(old.sum()):
            raise ValueError(f"Expected {int(old.sum())} live units in the new topology. Got {int(new_mask.sum())}.")
        if self.block_size == 1:
            self.mask.copy_(new_mask)
            return old ^ new_mask
        layout, grown_slots = self.layout.with_mask(new_mask)
        for name in ("row_ptr", "col_idx", "slot"):
            getattr(self, name).copy_(getattr(layout, name))  # in place: the nnz and so the shapes are unchanged
        return grown_slots.to(self.values.device).long()

    def dense_weight(self) -> torch.Tensor:
        """[out, in] dense view of the weight (tests, export); for blocks this materialises the matrix."""
        return self.weight * self.mask if self.block_size == 1 else self.layout.to_dense(self.values)

    # --- RigL score capture -----------------------------------------------------------------------------
    def arm_scores(self, armed: bool, mode: RiglScores = "exact") -> None:
        """Start (True) or stop (False) accumulating RigL growth evidence over the following backward passes.
        `mode` applies to blocks (module docstring); B = 1 is always exact. Call with the topology that the
        update will start from: the dead blocks are listed now."""
        if mode not in get_args(RiglScores):
            raise ValueError(f"mode={mode!r}: expected one of {get_args(RiglScores)}")
        self._scores = None
        if not armed:
            return
        mask, dev = self.unit_mask(), self.param.device
        if self.block_size > 1 and mode == "exact":
            rows, cols = (~mask).nonzero(as_tuple=True)  # row-major: blocks of a row share dY in the kernel
            acc = torch.zeros(rows.numel(), self.block_size, self.block_size, device=dev)
            self._scores = GrowCapture(acc, tuple(mask.shape), rows.to(dev, torch.int32), cols.to(dev, torch.int32))
        else:  # B = 1: the mask's shape is the weight's (the parameter is a placeholder under ZeRO 3)
            self._scores = GrowCapture(torch.zeros(mask.shape, device=dev), tuple(mask.shape))

    def take_scores(self) -> GrowCapture | None:
        """The evidence accumulated since `arm_scores(True)` (None if not armed), disarming capture. The caller
        sums `.acc` over ranks, then calls `.scores()`."""
        scores, self._scores = self._scores, None
        return scores

    def _capture_hook(self, x: torch.Tensor, layout: BlockLayout) -> Callable[[torch.Tensor], None]:
        """A hook on y that adds this backward's evidence into the armed capture; it observes dy only."""
        capture, x_saved, b = self._scores, x.detach(), self.block_size

        def accumulate(dy: torch.Tensor) -> None:
            xs = x_saved if x_saved.dtype == dy.dtype else x_saved.to(dy.dtype)  # autocast ran y in dy's dtype
            if capture.rows is None:
                capture.acc.add_(dense_grad_block_scores(xs, dy, layout))
            else:  # indices were built by arm_scores from this layout: no range check (a host sync)
                sampled_block_grad(xs, dy, capture.rows, capture.cols, b, out=capture.acc, check_indices=False)

        return accumulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_size == 1:
            return F.linear(x, _MaskGrad.apply(self.weight, self))
        layout = self.layout
        x2 = x.reshape(-1, self.in_features)
        y = block_sparse_linear(x2, self.values, layout)
        if self._scores is not None and y.requires_grad:
            y.register_hook(self._capture_hook(x2, layout))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"density={self.active_numel / self.dense_numel:.4f}")
