"""BlockLayout: CSR and transposed metadata, dense round trips, topology updates, state, validation."""
import pytest
import torch
from kernel_cases import random_case, random_mask

from sparse_dc.kernels import BlockLayout, BlockSparseError

MASK = torch.tensor([[1, 0, 1, 0],
                     [0, 0, 0, 0],
                     [1, 1, 0, 1]], dtype=torch.bool)


def test_csr_and_transposed_metadata():
    layout = BlockLayout.from_block_mask(MASK, 16)
    assert layout.shape == (48, 64) and layout.block_size == 16 and layout.nnz == 5
    assert layout.block_shape == (3, 4) and layout.density == pytest.approx(5 / 12)
    assert layout.row_ptr.tolist() == [0, 2, 2, 5]
    assert layout.col_idx.tolist() == [0, 2, 0, 1, 3]
    assert layout.row_idx.tolist() == [0, 0, 2, 2, 2]
    assert layout.slot.tolist() == [0, 1, 2, 3, 4]
    # Transposed view: columns ascending, rows ascending inside a column (stable sort).
    assert layout.col_ptr.tolist() == [0, 2, 3, 4, 5]
    assert layout.row_idx_t.tolist() == [0, 2, 2, 0, 2]
    assert layout.slot_t.tolist() == [0, 2, 3, 1, 4]
    assert layout.row_order.tolist() == [2, 0, 1]
    assert layout.col_order[0].item() == 0
    for t in (layout.row_ptr, layout.col_idx, layout.slot, layout.col_ptr, layout.row_idx_t, layout.slot_t):
        assert t.dtype == torch.int32
    assert torch.equal(layout.block_mask(), MASK)


def test_dense_round_trip_and_from_dense():
    layout, values, dense = random_case(64, 96, 32, 0.5)
    mask = layout.block_mask().repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.equal(dense == 0, ~mask | (dense == 0))
    assert torch.equal(layout.values_from_dense(dense), values)
    rebuilt = BlockLayout.from_dense(dense, 32)
    assert torch.equal(rebuilt.block_mask(), layout.block_mask())


def test_to_dense_is_differentiable():
    layout, values, _ = random_case(64, 64, 32, 0.5)
    values = values.clone().requires_grad_()
    (layout.to_dense(values) * 2).sum().backward()
    assert torch.equal(values.grad, torch.full_like(values, 2.0))


def test_with_mask_keeps_surviving_slots_and_reuses_freed_ones():
    layout, values, dense = random_case(128, 128, 32, 0.5, shuffle_slots=True)
    old_mask = layout.block_mask()
    new_mask = old_mask.clone().reshape(-1)
    live, dead = new_mask.nonzero()[:, 0], (~new_mask).nonzero()[:, 0]
    new_mask[live[[0, 3]]] = False
    new_mask[dead[[1, 2]]] = True
    new_mask = new_mask.reshape(old_mask.shape)
    new_layout, grown = new_layout_and_grown = layout.with_mask(new_mask)
    assert grown.dtype == torch.int64 and grown.numel() == 2
    assert torch.equal(new_layout.block_mask(), new_mask)
    # Surviving blocks read the same values through their (unchanged) slots; grown ones read the freed slots.
    new_dense = new_layout.to_dense(values)
    keep = (old_mask & new_mask).repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.equal(new_dense[keep], dense[keep])
    freed = {int(layout.slot[e]) for e in range(layout.nnz)
             if not new_mask[layout.row_idx[e], layout.col_idx[e]]}
    assert set(grown.tolist()) == freed
    zeroed = values.clone()
    zeroed[grown] = 0
    grown_dense = new_layout.to_dense(zeroed)
    assert torch.equal(grown_dense[~keep], torch.zeros_like(grown_dense[~keep]))
    assert new_layout_and_grown[0].nnz == layout.nnz


def test_with_mask_rejects_bad_masks():
    layout = BlockLayout.from_block_mask(MASK, 16)
    with pytest.raises(BlockSparseError, match="same number of live blocks"):
        layout.with_mask(torch.ones_like(MASK))
    with pytest.raises(BlockSparseError, match="torch.bool"):
        layout.with_mask(MASK.int())
    with pytest.raises(BlockSparseError, match=r"shape \(3, 4\)"):
        layout.with_mask(MASK[:2])


def test_state_round_trip():
    layout, values, dense = random_case(96, 64, 32, 0.5, shuffle_slots=True)
    state = layout.state_tensors()
    assert set(state) == {"row_ptr", "col_idx", "slot"}
    rebuilt = BlockLayout.from_state(layout.shape, 32, **{k: v.clone() for k, v in state.items()})
    assert torch.equal(rebuilt.to_dense(values), dense)
    assert torch.equal(rebuilt.slot_t, layout.slot_t)
    # int64 buffers (e.g. from an older checkpoint) are accepted and converted.
    rebuilt64 = BlockLayout.from_state(layout.shape, 32, **{k: v.long() for k, v in state.items()})
    assert rebuilt64.col_idx.dtype == torch.int32


@pytest.mark.parametrize("field,bad,match", [
    ("col_idx", [0, 2, 0, 1, 4], r"col_idx in \[0, 4\)"),
    ("col_idx", [0, 2, 0, 1, 1], "strictly increasing"),
    ("col_idx", [0, -1, 0, 1, 3], r"col_idx in \[0, 4\)"),
    ("row_ptr", [0, 2, 1, 5], "non-decreasing"),
    ("row_ptr", [0, 2, 2, 4], "from 0 to nnz"),
    ("slot", [0, 1, 2, 3, 5], r"slot in \[0, 5\)"),
    ("slot", [0, 1, 1, 3, 4], "permutation"),
])
def test_from_state_rejects_bad_indices(field, bad, match):
    state = {k: v.clone() for k, v in BlockLayout.from_block_mask(MASK, 16).state_tensors().items()}
    state[field] = torch.tensor(bad, dtype=torch.int32)
    with pytest.raises(BlockSparseError, match=match):
        BlockLayout.from_state((48, 64), 16, **state)


def test_constructor_validation():
    with pytest.raises(BlockSparseError, match=r"block_size in \(16, 32, 64, 128\)"):
        BlockLayout.from_block_mask(MASK, 8)
    with pytest.raises(BlockSparseError, match="block_size"):
        BlockLayout.from_dense(torch.zeros(64, 64), 48)
    with pytest.raises(BlockSparseError, match="multiples of block_size 32"):
        BlockLayout.from_dense(torch.zeros(48, 64), 32)
    with pytest.raises(BlockSparseError, match="torch.bool"):
        BlockLayout.from_block_mask(MASK.float(), 16)
    with pytest.raises(BlockSparseError, match="2-D"):
        BlockLayout.from_block_mask(MASK.reshape(-1), 16)
    state = BlockLayout.from_block_mask(MASK, 16).state_tensors()
    with pytest.raises(BlockSparseError, match="integer"):
        BlockLayout.from_state((48, 64), 16, state["row_ptr"].float(), state["col_idx"], state["slot"])
    with pytest.raises(BlockSparseError, match="length nbr"):
        BlockLayout.from_state((64, 64), 16, **state)
    layout = BlockLayout.from_block_mask(MASK, 16)
    with pytest.raises(BlockSparseError, match=r"shape \(nnz, B, B\)"):
        layout.to_dense(torch.zeros(5, 16, 8))
    with pytest.raises(BlockSparseError, match="weight of shape"):
        layout.values_from_dense(torch.zeros(48, 48))


def test_empty_and_full_layouts():
    empty = BlockLayout.from_block_mask(torch.zeros(2, 3, dtype=torch.bool), 32)
    assert empty.nnz == 0 and empty.row_ptr.tolist() == [0, 0, 0] and empty.col_ptr.tolist() == [0, 0, 0, 0]
    assert torch.equal(empty.to_dense(torch.zeros(0, 32, 32)), torch.zeros(64, 96))
    full = BlockLayout.from_block_mask(random_mask(2, 3, 1.0), 32)
    w = torch.randn(64, 96)
    assert full.nnz == 6 and torch.equal(full.to_dense(full.values_from_dense(w)), w)


def test_orders_break_ties_by_index_on_large_masks():
    """Within a block column rows ascend, and blocks rows/columns of equal length keep ascending index order: on
    masks large enough (> 100 entries) that an unstable sort would reorder ties."""
    mask = random_mask(112, 120, 0.5, seed=3)
    layout = BlockLayout.from_block_mask(mask, 16)
    entries = [(r, c) for r in range(112) for c in range(120) if mask[r, c]]
    slot = layout.slot.tolist()
    by_column = sorted(range(len(entries)), key=lambda e: (entries[e][1], entries[e][0]))
    assert layout.row_idx_t.tolist() == [entries[e][0] for e in by_column]
    assert layout.slot_t.tolist() == [slot[e] for e in by_column]
    row_len, col_len = mask.sum(1).tolist(), mask.sum(0).tolist()
    assert layout.row_order.tolist() == sorted(range(112), key=lambda r: -row_len[r])  # sorted() is stable
    assert layout.col_order.tolist() == sorted(range(120), key=lambda c: -col_len[c])
    for name in ("row_idx", "row_idx_t", "slot_t", "col_ptr", "row_order", "col_order"):
        assert getattr(layout, name).dtype == torch.int32, name


def test_the_constructor_validates_unless_told_not_to():
    state = BlockLayout.from_block_mask(MASK, 16).state_tensors()
    bad = {**state, "slot": torch.tensor([0, 1, 1, 3, 4], dtype=torch.int32)}
    with pytest.raises(BlockSparseError, match="permutation"):
        BlockLayout((48, 64), 16, bad["row_ptr"], bad["col_idx"], bad["slot"])
    assert BlockLayout((48, 64), 16, bad["row_ptr"], bad["col_idx"], bad["slot"], validate=False).nnz == 5
    listed = BlockLayout([48, 64], 16, state["row_ptr"], state["col_idx"], state["slot"])
    assert listed.shape == (48, 64) and isinstance(listed.shape, tuple)
