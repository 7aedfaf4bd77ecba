"""Property tests of BlockLayout against oracles written with loops here: CSR and transposed metadata of any mask,
dense <-> values round trips, state round trips, and topology updates that keep surviving blocks' slots."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dc.kernels import BlockLayout

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)
B = 16


@st.composite
def masks(draw, min_live=0):
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    mask = torch.tensor(bits, dtype=torch.bool).view(rows, cols)
    if int(mask.sum()) < min_live:
        mask.view(-1)[:min_live] = True
    return mask


def dense_of(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A random weight that is zero exactly outside the live blocks (no exact zeros inside them)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(mask.shape[0] * B, mask.shape[1] * B, generator=g) + 0.5
    return w * mask.repeat_interleave(B, 0).repeat_interleave(B, 1)


@PROPERTY
@given(mask=masks())
def test_csr_and_transposed_metadata_of_any_mask(mask):
    layout = BlockLayout.from_block_mask(mask, B)
    rows, cols = mask.shape
    entries = [(r, c) for r in range(rows) for c in range(cols) if mask[r, c]]  # row-major, as CSR stores them
    assert layout.nnz == len(entries) and layout.block_shape == (rows, cols)
    assert list(zip(layout.row_idx.tolist(), layout.col_idx.tolist())) == entries
    assert layout.row_ptr.tolist() == [sum(1 for r, _ in entries if r < k) for k in range(rows + 1)]
    assert sorted(layout.slot.tolist()) == list(range(len(entries)))
    by_column = sorted(range(len(entries)), key=lambda e: (entries[e][1], entries[e][0]))  # CSC, rows ascending
    assert layout.row_idx_t.tolist() == [entries[e][0] for e in by_column]
    assert layout.slot_t.tolist() == [layout.slot[e].item() for e in by_column]
    assert layout.col_ptr.tolist() == [sum(1 for _, c in entries if c < k) for k in range(cols + 1)]
    row_len, col_len = mask.sum(1).tolist(), mask.sum(0).tolist()
    assert [row_len[r] for r in layout.row_order.tolist()] == sorted(row_len, reverse=True)
    assert [col_len[c] for c in layout.col_order.tolist()] == sorted(col_len, reverse=True)
    assert torch.equal(layout.block_mask(), mask) and layout.density == len(entries) / mask.numel()


@PROPERTY
@given(mask=masks(), seed=st.integers(0, 1000))
def test_dense_values_and_state_round_trips(mask, seed):
    dense = dense_of(mask, seed)
    layout = BlockLayout.from_dense(dense, B)
    assert torch.equal(layout.block_mask(), mask)
    values = layout.values_from_dense(dense)
    for e, (r, c) in enumerate(zip(layout.row_idx.tolist(), layout.col_idx.tolist())):
        assert torch.equal(values[layout.slot[e]], dense[r * B:(r + 1) * B, c * B:(c + 1) * B])
    assert torch.equal(layout.to_dense(values), dense)
    rebuilt = BlockLayout.from_state(layout.shape, B, **layout.state_tensors())
    for name in ("row_ptr", "col_idx", "slot", "col_ptr", "row_idx_t", "slot_t", "row_order", "col_order"):
        assert torch.equal(getattr(rebuilt, name), getattr(layout, name)), name
    assert torch.equal(rebuilt.to_dense(values), dense)


@PROPERTY
@given(mask=masks(min_live=1), swaps=st.integers(0, 6), seed=st.integers(0, 1000))
def test_with_mask_keeps_survivors_in_place_and_gives_grown_blocks_the_freed_slots(mask, swaps, seed):
    layout = BlockLayout.from_block_mask(mask, B)
    g = torch.Generator().manual_seed(seed)
    new = mask.clone().view(-1)
    for _ in range(swaps):  # move live blocks to dead places: the live count stays
        live, dead = new.nonzero().flatten(), (~new).nonzero().flatten()
        if len(dead) == 0:
            break
        new[live[torch.randint(len(live), (1,), generator=g)]] = False
        new[dead[torch.randint(len(dead), (1,), generator=g)]] = True
    new = new.view(mask.shape)
    updated, grown = layout.with_mask(new)
    assert torch.equal(updated.block_mask(), new) and updated.nnz == layout.nnz
    old_slot = {(r, c): s for r, c, s in zip(layout.row_idx.tolist(), layout.col_idx.tolist(), layout.slot.tolist())}
    new_slot = {(r, c): s for r, c, s in zip(updated.row_idx.tolist(), updated.col_idx.tolist(),
                                             updated.slot.tolist())}
    freed = sorted(s for block, s in old_slot.items() if block not in new_slot)
    assert grown.tolist() == freed  # freed slots, ascending ...
    born = [block for block in sorted(new_slot) if block not in old_slot]  # ... to grown blocks in row-major order
    assert [new_slot[block] for block in born] == freed
    assert all(new_slot[block] == s for block, s in old_slot.items() if block in new_slot)
