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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_dc.kernels import BlockLayout, block_sparse_linear, dense_grad_block_scores


def _layout_from_buffers(row_ptr: torch.Tensor, col_idx: torch.Tensor, slot: torch.Tensor,
                         shape: tuple[int, int], block_size: int) -> BlockLayout:
    # the buffers were written by this module (or a checkpoint of it): skip the index checks' host syncs
    return BlockLayout.from_state(shape, block_size, row_ptr, col_idx, slot, validate=False)


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
            layer._scores += grad.detach().float()  # signed sum over micro-batches; |.| taken by the engine
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
        self._scores: torch.Tensor | None = None  # RigL score accumulator, float32 unit-shaped, when armed
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
    def arm_scores(self, armed: bool) -> None:
        """Start (True) or stop (False) accumulating dense-gradient scores over the following backward passes."""
        self._scores = torch.zeros(self.unit_mask().shape, device=self.param.device) if armed else None

    def take_scores(self) -> torch.Tensor | None:
        """float32 [out / B, in / B] accumulated |dL/dW| (B = 1) or sum of per-backward block Frobenius norms."""
        scores, self._scores = self._scores, None
        return scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_size == 1:
            return F.linear(x, _MaskGrad.apply(self.weight, self))
        layout = self.layout
        x2 = x.reshape(-1, self.in_features)
        y = block_sparse_linear(x2, self.values, layout)
        if self._scores is not None and y.requires_grad:
            scores, x_saved = self._scores, x2.detach()

            def accumulate(dy: torch.Tensor) -> None:  # observes dy, leaves it unchanged
                scores.add_(dense_grad_block_scores(x_saved, dy, layout))

            y.register_hook(accumulate)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"density={self.active_numel / self.dense_numel:.4f}")
