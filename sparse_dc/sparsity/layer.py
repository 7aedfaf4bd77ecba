"""Sparse linear layers: a bias-free y = x Wᵀ whose W (out x in) is sparse at one of two granularities, one class
each behind the `SparseLinear` protocol (what the DST engine, export and the parameter counts use):

- `BlockSparseLinear` (B >= 16): the only parameter is `values[nnz, B, B]`; the topology is a BlockLayout whose
  int32 CSR tensors (row_ptr, col_idx, slot) are buffers, so checkpoints carry them. Forward goes through the kernels.
  Weight, gradient and optimizer memory scale with density. A topology change keeps nnz, so `values` never
  changes shape: surviving blocks keep their slot and only the slots of grown blocks are reset.
- `MaskedLinear` (B = 1, unstructured): a dense `weight` with a {0,1} `mask` buffer. Invariant: pruned entries of
  the weight are exactly 0. The forward masks the weight's *gradient* in backward (an identity autograd node on the
  weight), so Adam moments of pruned entries stay 0 and the optimizer never moves them: no `apply_masks()` call is
  needed after the optimizer step. A topology update zeroes dropped entries and their moments. The forward
  multiplies by the weight itself, so the gradient reaching that node is the dense one RigL scores.

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
    """What every sparse layer offers the DST engine, export and the parameter counts: a bias-free y = x Wᵀ with W
    (out x in) live on the units of `unit_mask()`. One subclass per granularity, `MaskedLinear` (B = 1) and
    `BlockSparseLinear` (B >= 16); `sparse_linear` builds the one a block size asks for.

    The parameter's reset index (what `set_topology`, `with_revived` and `grown_entries` return, and what the
    optimizer-state accessor's `zero_entries`/`fill_state` take) is the subclass's own: a bool mask over `weight`
    (B = 1) or long slot indices into `values`' first dim (blocks)."""

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

    # --- what each granularity defines --------------------------------------------------------------------
    @property
    def param(self) -> nn.Parameter:
        """The trainable tensor (`weight` or `values`)."""
        raise NotImplementedError

    @property
    def active_numel(self) -> int:
        """Live weights."""
        raise NotImplementedError

    def unit_mask(self) -> torch.Tensor:
        """bool [out / B, in / B]: which entries (B = 1) or blocks are live."""
        raise NotImplementedError

    def unit_magnitude(self, param: torch.Tensor) -> torch.Tensor:
        """float32 [out / B, in / B] magnitudes of a full copy of `param` (0 at dead units)."""
        raise NotImplementedError

    def set_topology(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Install `new_mask` (same number of live units); returns the reset index where the parameter and its
        moments must be reset. Does not touch the parameter itself."""
        raise NotImplementedError

    def with_revived(self, reset: torch.Tensor, revived: torch.Tensor) -> torch.Tensor:
        """`reset` plus the units dropped and grown back in the same update (bool [out / B, in / B]), which
        `set_topology` cannot see (live before and after) but which restart at 0 like any grown unit."""
        raise NotImplementedError

    def grown_entries(self, grown: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        """The reset index of the grown units alone (`grown`: bool [out / B, in / B]; `reset`: with_revived's)."""
        raise NotImplementedError

    def regrown_values(self, grown: torch.Tensor, reset: torch.Tensor, generator: torch.Generator,
                       std: float) -> torch.Tensor:
        """Values to write at `reset`: normal(0, std) at grown units, 0 at dropped ones (CPU, from `generator`)."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """[out, in] dense view of the weight (tests, export)."""
        raise NotImplementedError

    def _new_capture(self, mask: torch.Tensor, mode: RiglScores, device: torch.device) -> GrowCapture:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------
    @property
    def dense_numel(self) -> int:
        return self.out_features * self.in_features

    def arm_scores(self, armed: bool, mode: RiglScores = "exact") -> None:
        """Start (True) or stop (False) accumulating RigL growth evidence over the following backward passes.
        `mode` applies to blocks (module docstring); B = 1 is always exact. Call with the topology that the
        update will start from: the dead blocks are listed now."""
        if mode not in get_args(RiglScores):
            raise ValueError(f"mode={mode!r}: expected one of {get_args(RiglScores)}")
        self._scores = self._new_capture(self.unit_mask(), mode, self.param.device) if armed else None

    def take_scores(self) -> GrowCapture | None:
        """The evidence accumulated since `arm_scores(True)` (None if not armed), disarming capture. The caller
        sums `.acc` over ranks, then calls `.scores()`."""
        scores, self._scores = self._scores, None
        return scores

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"density={self.active_numel / self.dense_numel:.4f}")


class MaskedLinear(SparseLinear):
    """Unstructured sparsity (B = 1, the paper's): a dense `weight` times a {0, 1} `mask` buffer (module docstring)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, std: float):
        super().__init__(in_features, out_features, 1, mask, std)
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * std * mask)
        self.register_buffer("mask", mask.clone())

    @property
    def param(self) -> nn.Parameter:
        return self.weight

    @property
    def active_numel(self) -> int:
        return int(self.mask.sum())

    def unit_mask(self) -> torch.Tensor:
        return self.mask

    def unit_magnitude(self, param: torch.Tensor) -> torch.Tensor:
        return param.float().abs() * self.mask  # |w|

    @torch.no_grad()
    def set_topology(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Returns a bool mask over `weight`: the dropped and the grown entries."""
        new_mask = new_mask.to(self.mask.device)
        old = _checked_count(self.mask.clone(), new_mask)
        self.mask.copy_(new_mask)
        return old ^ new_mask

    def with_revived(self, reset: torch.Tensor, revived: torch.Tensor) -> torch.Tensor:
        return reset | revived.to(reset.device)

    def grown_entries(self, grown: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        return grown.to(reset.device)

    def regrown_values(self, grown: torch.Tensor, reset: torch.Tensor, generator: torch.Generator,
                       std: float) -> torch.Tensor:
        at_grown = grown[reset.to(grown.device)].cpu()  # reset = dropped | grown entries
        return torch.randn(at_grown.shape, generator=generator) * std * at_grown

    def dense_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def _new_capture(self, mask: torch.Tensor, mode: RiglScores, device: torch.device) -> GrowCapture:
        # always exact; the mask's shape is the weight's (the parameter is a placeholder under ZeRO 3)
        return GrowCapture(torch.zeros(mask.shape, device=device), tuple(mask.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _MaskGrad.apply(self.weight, self))


class BlockSparseLinear(SparseLinear):
    """Block sparsity (B >= 16): `values[nnz, B, B]` and a BlockLayout over int32 buffers (module docstring)."""

    def __init__(self, in_features: int, out_features: int, block_size: int, mask: torch.Tensor, std: float):
        super().__init__(in_features, out_features, block_size, mask, std)
        layout = BlockLayout.from_block_mask(mask, block_size)
        self.values = nn.Parameter(torch.randn(layout.nnz, block_size, block_size) * std)
        for name, tensor in layout.state_tensors().items():  # row_ptr, col_idx, slot: int32
            self.register_buffer(name, tensor)
        self._layout, self._layout_key = layout, self._buffer_key()

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

    @property
    def param(self) -> nn.Parameter:
        return self.values

    @property
    def active_numel(self) -> int:
        return int(self.col_idx.numel()) * self.block_size ** 2

    def unit_mask(self) -> torch.Tensor:
        return self.layout.block_mask()

    def unit_magnitude(self, param: torch.Tensor) -> torch.Tensor:
        norms = param.float().pow(2).sum((1, 2)).sqrt()  # per-block Frobenius norms [nnz], indexed by slot
        layout = self.layout
        out = torch.zeros(layout.block_shape, device=layout.device)
        norms = norms.to(layout.device)
        out[layout.row_idx.long(), layout.col_idx.long()] = norms[layout.slot.long()]
        return out

    @torch.no_grad()
    def set_topology(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Returns the grown slots: long indices into `values`' first dim (surviving blocks keep theirs)."""
        new_mask = new_mask.to(self.row_ptr.device)
        _checked_count(self.unit_mask(), new_mask)
        layout, grown_slots = self.layout.with_mask(new_mask)
        for name in ("row_ptr", "col_idx", "slot"):
            getattr(self, name).copy_(getattr(layout, name))  # in place: the nnz and so the shapes are unchanged
        return grown_slots.to(self.values.device).long()

    def with_revived(self, reset: torch.Tensor, revived: torch.Tensor) -> torch.Tensor:
        if not bool(revived.any()):
            return reset
        layout = self.layout  # a revived block keeps its slot: look it up in the new layout
        slots = torch.full(layout.block_shape, -1, dtype=torch.long, device=layout.device)
        slots[layout.row_idx.long(), layout.col_idx.long()] = layout.slot.long()
        return torch.cat([reset, slots[revived.to(layout.device)].to(reset.device)])

    def grown_entries(self, grown: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        return reset  # only grown (and revived) blocks are reset

    def regrown_values(self, grown: torch.Tensor, reset: torch.Tensor, generator: torch.Generator,
                       std: float) -> torch.Tensor:
        return torch.randn(reset.numel(), self.block_size, self.block_size, generator=generator) * std

    def dense_weight(self) -> torch.Tensor:
        return self.layout.to_dense(self.values)  # materialises the matrix

    def _new_capture(self, mask: torch.Tensor, mode: RiglScores, device: torch.device) -> GrowCapture:
        if mode != "exact":  # norm_sum: per-block norms of each backward
            return GrowCapture(torch.zeros(mask.shape, device=device), tuple(mask.shape))
        rows, cols = (~mask).nonzero(as_tuple=True)  # row-major: blocks of a row share dY in the kernel
        acc = torch.zeros(rows.numel(), self.block_size, self.block_size, device=device)
        return GrowCapture(acc, tuple(mask.shape), rows.to(device, torch.int32), cols.to(device, torch.int32))

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
        layout = self.layout
        x2 = x.reshape(-1, self.in_features)
        y = block_sparse_linear(x2, self.values, layout)
        if self._scores is not None and y.requires_grad:
            y.register_hook(self._capture_hook(x2, layout))
        return y.reshape(*x.shape[:-1], self.out_features)


def _checked_count(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`old`, after checking that `new` has as many live units (a topology update never changes the count)."""
    if int(new.sum()) != int(old.sum()):
        raise ValueError(f"Expected {int(old.sum())} live units in the new topology. Got {int(new.sum())}.")
    return old


def sparse_linear(in_features: int, out_features: int, block_size: int, mask: torch.Tensor,
                  std: float) -> SparseLinear:
    """The sparse layer for `block_size`: MaskedLinear (1) or BlockSparseLinear (16, 32, 64, 128)."""
    if block_size == 1:
        return MaskedLinear(in_features, out_features, mask, std)
    return BlockSparseLinear(in_features, out_features, block_size, mask, std)
