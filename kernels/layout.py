"""BlockLayout: the topology of a block-sparse weight W [N_out, K_in] (block size B), CSR over block rows.

Storage (all int32, on the layout's device):
  row_ptr [nbr+1], col_idx [nnz], slot [nnz]   CSR entries in row-major order; entry e is block
                                               (row_idx[e], col_idx[e]) and reads values[slot[e]]
  col_ptr [nbc+1], row_idx_t [nnz], slot_t [nnz]  the transposed view (CSC): a stable sort of col_idx, so
                                               within a block column rows ascend. No value is copied.
  row_order [nbr], col_order [nbc]             block rows / columns by descending length (heavy work first)

`slot` is an indirection so that a topology update (`with_mask`) keeps the values (and optimizer state) of
surviving blocks where they are: only freed slots are reassigned, to the newly grown blocks.
"""
from __future__ import annotations

import torch

from .errors import BlockSparseError, check

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def _check_block_size(block_size: object) -> None:
    check(isinstance(block_size, int) and block_size in SUPPORTED_BLOCK_SIZES,
          f"block_size in {SUPPORTED_BLOCK_SIZES}", repr(block_size))


def _as_index(t: object, name: str) -> torch.Tensor:
    check(isinstance(t, torch.Tensor), f"{name} to be a torch.Tensor", type(t).__name__)
    check(t.dim() == 1 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
          f"{name} to be a 1-D integer tensor", f"{t.dtype} of shape {tuple(t.shape)}")
    return t.to(torch.int32).contiguous()


class BlockLayout:
    """Topology of a block-sparse [N_out, K_in] weight with BxB blocks (see the module docstring).

    Build one with `from_block_mask`, `from_dense` or `from_state`; layouts are immutable (`with_mask` returns
    a new one)."""

    def __init__(self, shape: tuple[int, int], block_size: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 slot: torch.Tensor, *, validate: bool = True) -> None:
        _check_block_size(block_size)
        check(isinstance(shape, (tuple, list)) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape),
              "shape to be two positive ints (N_out, K_in)", repr(shape))
        n_out, k_in = tuple(shape)
        check(n_out % block_size == 0 and k_in % block_size == 0,
              f"both dims of shape to be multiples of block_size {block_size}", f"shape ({n_out}, {k_in})")
        self._shape = (n_out, k_in)
        self._block_size = block_size
        nbr, nbc = n_out // block_size, k_in // block_size
        row_ptr, col_idx, slot = (_as_index(t, n) for t, n in
                                  ((row_ptr, "row_ptr"), (col_idx, "col_idx"), (slot, "slot")))
        check(row_ptr.numel() == nbr + 1, f"row_ptr of length nbr+1 = {nbr + 1}", f"length {row_ptr.numel()}")
        check(slot.numel() == col_idx.numel(), f"slot of length nnz = {col_idx.numel()}", f"length {slot.numel()}")
        check(row_ptr.device == col_idx.device == slot.device, "row_ptr, col_idx and slot on one device",
              f"{row_ptr.device}, {col_idx.device}, {slot.device}")
        self._nnz = col_idx.numel()
        self._row_ptr, self._col_idx, self._slot = row_ptr, col_idx, slot
        if validate:
            self._validate_indices()

        dev = row_ptr.device
        row_len = row_ptr.diff()
        # output_size avoids a device->host sync: nnz is known from col_idx's shape.
        self._row_idx = torch.repeat_interleave(torch.arange(nbr, device=dev, dtype=torch.int32), row_len,
                                                output_size=self._nnz)
        # Transposed view: a stable sort keeps rows ascending inside each block column.
        perm = torch.sort(col_idx, stable=True).indices
        self._row_idx_t = self._row_idx[perm].contiguous()
        self._slot_t = slot[perm].contiguous()
        # scatter_add rather than bincount: bincount syncs with the host on CUDA to size its output.
        col_len = torch.zeros(nbc, dtype=torch.int64, device=dev).scatter_add_(
            0, col_idx.long(), torch.ones(self._nnz, dtype=torch.int64, device=dev))
        self._col_ptr = torch.zeros(nbc + 1, dtype=torch.int32, device=dev)
        self._col_ptr[1:] = torch.cumsum(col_len, 0)
        self._row_order = torch.sort(row_len, descending=True, stable=True).indices.to(torch.int32)
        self._col_order = torch.sort(col_len, descending=True, stable=True).indices.to(torch.int32)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block_size: int) -> "BlockLayout":
        """Layout whose live blocks are the True entries of `mask` (bool [N_out//B, K_in//B]); slots in
        row-major order."""
        _check_block_size(block_size)
        cls._check_mask(mask)
        nbr, nbc = mask.shape
        row_ptr = torch.zeros(nbr + 1, dtype=torch.int32, device=mask.device)
        row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
        col_idx = mask.nonzero()[:, 1].to(torch.int32)  # nonzero is row-major: CSR order
        slot = torch.arange(col_idx.numel(), dtype=torch.int32, device=mask.device)
        return cls((nbr * block_size, nbc * block_size), block_size, row_ptr, col_idx, slot, validate=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size: int) -> "BlockLayout":
        """Layout whose live blocks are the blocks of `weight` [N_out, K_in] holding any nonzero."""
        _check_block_size(block_size)
        check(isinstance(weight, torch.Tensor) and weight.dim() == 2, "weight to be a 2-D tensor",
              f"{type(weight).__name__} of shape {tuple(getattr(weight, 'shape', ()))}")
        n, k = weight.shape
        check(n % block_size == 0 and k % block_size == 0,
              f"both dims of weight to be multiples of block_size {block_size}", f"shape ({n}, {k})")
        blocks = weight.detach().reshape(n // block_size, block_size, k // block_size, block_size)
        return cls.from_block_mask((blocks != 0).any(dim=3).any(dim=1), block_size)

    @classmethod
    def from_state(cls, shape: tuple[int, int], block_size: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                   slot: torch.Tensor, *, validate: bool = True) -> "BlockLayout":
        """Rebuild a layout from `state_tensors()` (e.g. nn.Module buffers loaded from a checkpoint).
        `validate=False` skips the index checks (each costs a device->host sync)."""
        return cls(tuple(shape), block_size, row_ptr, col_idx, slot, validate=validate)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the layout (with shape and block_size): register them as buffers."""
        return {"row_ptr": self._row_ptr, "col_idx": self._col_idx, "slot": self._slot}

    @staticmethod
    def _check_mask(mask: object, shape: tuple[int, int] | None = None) -> None:
        check(isinstance(mask, torch.Tensor), "mask to be a torch.Tensor", type(mask).__name__)
        check(mask.dtype == torch.bool, "mask of dtype torch.bool", str(mask.dtype))
        check(mask.dim() == 2 and mask.numel() > 0, "mask to be a non-empty 2-D [N_out//B, K_in//B] tensor",
              f"shape {tuple(mask.shape)}")
        if shape is not None:
            check(tuple(mask.shape) == shape, f"mask of shape {shape}", f"shape {tuple(mask.shape)}")

    def _validate_indices(self) -> None:
        """Check CSR invariants on the device (several host syncs: only on untrusted input)."""
        nbr, nbc = self.block_shape
        rp, ci, sl = self._row_ptr, self._col_idx, self._slot
        check(int(rp[0]) == 0 and int(rp[-1]) == self._nnz, f"row_ptr to run from 0 to nnz = {self._nnz}",
              f"{int(rp[0])} to {int(rp[-1])}")
        check(bool((rp.diff() >= 0).all()), "row_ptr to be non-decreasing", "a decreasing step")
        if self._nnz == 0:
            return
        lo, hi = int(ci.min()), int(ci.max())
        check(lo >= 0 and hi < nbc, f"col_idx in [0, {nbc})", f"values in [{lo}, {hi}]")
        # Strictly increasing inside each row: no duplicate blocks and CSR order. The first entry of a row may
        # be smaller than the previous entry (a row boundary).
        row_start = torch.zeros(self._nnz, dtype=torch.bool, device=ci.device)
        row_start[rp[:-1][rp.diff() > 0].long()] = True
        bad = ((ci[1:] <= ci[:-1]) & ~row_start[1:]).nonzero()
        if bad.numel():
            raise BlockSparseError("Expected col_idx strictly increasing within each block row. "
                                   f"Got a repeated or unsorted column at entry {int(bad[0, 0]) + 1}.")
        lo, hi = int(sl.min()), int(sl.max())
        check(lo >= 0 and hi < self._nnz, f"slot in [0, {self._nnz})", f"values in [{lo}, {hi}]")
        check(bool((torch.bincount(sl.long(), minlength=self._nnz) == 1).all()),
              f"slot to be a permutation of 0..{self._nnz - 1}", "a repeated slot")

    # ------------------------------------------------------------------ read-only properties
    shape = property(lambda self: self._shape, doc="(N_out, K_in)")
    block_size = property(lambda self: self._block_size, doc="B")
    nnz = property(lambda self: self._nnz, doc="number of live blocks (python int)")
    device = property(lambda self: self._row_ptr.device)
    row_ptr = property(lambda self: self._row_ptr, doc="int32 [nbr+1]")
    col_idx = property(lambda self: self._col_idx, doc="int32 [nnz], CSR (row-major) order")
    slot = property(lambda self: self._slot, doc="int32 [nnz]: CSR entry e reads values[slot[e]]")
    row_idx = property(lambda self: self._row_idx, doc="int32 [nnz]: block row of CSR entry e")
    col_ptr = property(lambda self: self._col_ptr, doc="int32 [nbc+1], transposed view")
    row_idx_t = property(lambda self: self._row_idx_t, doc="int32 [nnz], transposed (column-major) order")
    slot_t = property(lambda self: self._slot_t, doc="int32 [nnz]: transposed entry e reads values[slot_t[e]]")
    row_order = property(lambda self: self._row_order, doc="int32 [nbr]: block rows, longest first")
    col_order = property(lambda self: self._col_order, doc="int32 [nbc]: block columns, longest first")

    @property
    def block_shape(self) -> tuple[int, int]:
        """(nbr, nbc) = (N_out // B, K_in // B)."""
        return self._shape[0] // self._block_size, self._shape[1] // self._block_size

    @property
    def density(self) -> float:
        """Fraction of live blocks."""
        nbr, nbc = self.block_shape
        return self._nnz / (nbr * nbc)

    def __repr__(self) -> str:
        return (f"BlockLayout(shape={self._shape}, block_size={self._block_size}, nnz={self._nnz}, "
                f"density={self.density:.4f}, device={self.device})")

    # ------------------------------------------------------------------ conversions
    def to(self, device: torch.device | str) -> "BlockLayout":
        """The same layout on another device (rebuilt from the state tensors, no validation)."""
        return BlockLayout(self._shape, self._block_size, self._row_ptr.to(device), self._col_idx.to(device),
                           self._slot.to(device), validate=False)

    def block_mask(self) -> torch.Tensor:
        """bool [nbr, nbc]: True at live blocks."""
        nbr, nbc = self.block_shape
        mask = torch.zeros(nbr, nbc, dtype=torch.bool, device=self.device)
        mask[self._row_idx.long(), self._col_idx.long()] = True
        return mask

    def check_values(self, values: torch.Tensor, name: str = "values") -> None:
        """Raise BlockSparseError unless `values` is a float [nnz, B, B] tensor on the layout's device."""
        b = self._block_size
        check(isinstance(values, torch.Tensor), f"{name} to be a torch.Tensor", type(values).__name__)
        check(tuple(values.shape) == (self._nnz, b, b), f"{name} of shape (nnz, B, B) = {(self._nnz, b, b)}",
              f"{tuple(values.shape)}")
        check(values.is_floating_point(), f"{name} of a floating dtype", str(values.dtype))
        check(values.device == self.device, f"{name} on the layout's device {self.device}", str(values.device))

    def values_from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """[nnz, B, B] in slot order: the live blocks of `weight` [N_out, K_in] (differentiable)."""
        check(isinstance(weight, torch.Tensor) and tuple(weight.shape) == self._shape,
              f"weight of shape {self._shape}", f"{tuple(getattr(weight, 'shape', ()))}")
        check(weight.device == self.device, f"weight on the layout's device {self.device}", str(weight.device))
        nbr, nbc = self.block_shape
        b = self._block_size
        blocks = weight.reshape(nbr, b, nbc, b).permute(0, 2, 1, 3)[self._row_idx.long(), self._col_idx.long()]
        return blocks.index_copy(0, self._slot.long(), blocks)  # entry order -> slot order

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """[N_out, K_in] with `values` at live blocks and zeros elsewhere (differentiable w.r.t. values)."""
        self.check_values(values)
        nbr, nbc = self.block_shape
        b = self._block_size
        blocks = values.new_zeros(nbr, nbc, b, b)
        blocks = blocks.index_put((self._row_idx.long(), self._col_idx.long()), values[self._slot.long()])
        return blocks.permute(0, 2, 1, 3).reshape(self._shape)

    # ------------------------------------------------------------------ topology update
    def with_mask(self, new_mask: torch.Tensor) -> tuple["BlockLayout", torch.Tensor]:
        """A layout with the live blocks of `new_mask` (same nnz) and the int64 slots that now hold a newly
        grown block. Blocks live in both masks keep their slot; grown blocks (row-major order) take the freed
        slots in ascending order. The caller zeroes values[grown_slots] and resets their optimizer moments.
        O(nnz + nbr*nbc) tensor ops on the device; one host sync (nonzero)."""
        nbr, nbc = self.block_shape
        self._check_mask(new_mask, (nbr, nbc))
        new_mask = new_mask.to(self.device)
        rows, cols = new_mask.nonzero(as_tuple=True)
        check(rows.numel() == self._nnz, f"new_mask with the same number of live blocks ({self._nnz})",
              f"{rows.numel()}")
        old_flat = self._row_idx.long() * nbc + self._col_idx.long()
        slot_of_block = torch.full((nbr * nbc,), -1, dtype=torch.int64, device=self.device)
        slot_of_block[old_flat] = self._slot.long()
        new_slot = slot_of_block[rows * nbc + cols]
        freed = torch.sort(self._slot.long()[~new_mask.reshape(-1)[old_flat]]).values
        new_slot[new_slot < 0] = freed  # |grown| == |freed| because nnz is unchanged
        row_ptr = torch.zeros(nbr + 1, dtype=torch.int32, device=self.device)
        row_ptr[1:] = torch.cumsum(new_mask.sum(1), 0)
        layout = BlockLayout(self._shape, self._block_size, row_ptr, cols.to(torch.int32),
                             new_slot.to(torch.int32), validate=False)
        return layout, freed


__all__ = ["BlockLayout", "BlockSparseError", "SUPPORTED_BLOCK_SIZES"]
