"""Every BlockLayout check, with its whole one-line message ("Expected X. Got Y."), and the device move."""
import re

import pytest
import torch

from sparse_dc.kernels import BlockLayout, BlockSparseError

MASK = torch.tensor([[1, 0, 1, 0],
                     [0, 0, 0, 0],
                     [1, 1, 0, 1]], dtype=torch.bool)
LAYOUT = BlockLayout.from_block_mask(MASK, 16)
STATE = LAYOUT.state_tensors()
# torch registers its meta-device kernels on first use (~5 s for sort and diff); doing it at import lets processes
# forked after collection (mutation testing runs one per mutant) share them instead of each paying it again
torch.sort(torch.zeros(2, dtype=torch.int32, device="meta"), stable=True)
torch.zeros(2, dtype=torch.int32, device="meta").diff()


def state(**changed):
    out = {k: v.clone() for k, v in STATE.items()}
    out.update({k: torch.tensor(v, dtype=torch.int32) for k, v in changed.items()})
    return out


CASES = [
    (lambda: BlockLayout.from_block_mask(MASK, 8), "Expected block_size in (16, 32, 64, 128). Got 8."),
    (lambda: BlockLayout.from_state((48, 64), "16", **STATE), "Expected block_size in (16, 32, 64, 128). Got '16'."),
    (lambda: BlockLayout.from_state((48,), 16, **STATE),
     "Expected shape to be two positive ints (N_out, K_in). Got (48,)."),
    (lambda: BlockLayout.from_state((48, -64), 16, **STATE),
     "Expected shape to be two positive ints (N_out, K_in). Got (48, -64)."),
    (lambda: BlockLayout.from_state((40, 64), 16, **STATE),
     "Expected both dims of shape to be multiples of block_size 16. Got shape (40, 64)."),
    (lambda: BlockLayout.from_state((48, 64), 16, [0, 1], STATE["col_idx"], STATE["slot"]),
     "Expected row_ptr to be a torch.Tensor. Got list."),
    (lambda: BlockLayout.from_state((48, 64), 16, STATE["row_ptr"].float(), STATE["col_idx"], STATE["slot"]),
     "Expected row_ptr to be a 1-D integer tensor. Got torch.float32 of shape (4,)."),
    (lambda: BlockLayout.from_state((48, 64), 16, STATE["row_ptr"][None], STATE["col_idx"], STATE["slot"]),
     "Expected row_ptr to be a 1-D integer tensor. Got torch.int32 of shape (1, 4)."),
    (lambda: BlockLayout.from_state((48, 64), 16, STATE["row_ptr"].bool(), STATE["col_idx"], STATE["slot"]),
     "Expected row_ptr to be a 1-D integer tensor. Got torch.bool of shape (4,)."),
    (lambda: BlockLayout.from_state((48, 64), 16, STATE["row_ptr"], [0, 2], STATE["slot"]),
     "Expected col_idx to be a torch.Tensor. Got list."),
    (lambda: BlockLayout.from_state((48, 64), 16, STATE["row_ptr"], STATE["col_idx"], STATE["slot"].float()),
     "Expected slot to be a 1-D integer tensor. Got torch.float32 of shape (5,)."),
    (lambda: BlockLayout.from_state((64, 64), 16, **STATE), "Expected row_ptr of length nbr+1 = 5. Got length 4."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(slot=[0, 1, 2, 3])),
     "Expected slot of length nnz = 5. Got length 4."),
    (lambda: BlockLayout.from_state((48, 64), 16, STATE["row_ptr"], STATE["col_idx"], STATE["slot"].to("meta")),
     "Expected row_ptr, col_idx and slot on one device. Got cpu, cpu, meta."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(row_ptr=[0, 2, 2, 4])),
     "Expected row_ptr to run from 0 to nnz = 5. Got 0 to 4."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(row_ptr=[1, 2, 2, 5])),
     "Expected row_ptr to run from 0 to nnz = 5. Got 1 to 5."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(row_ptr=[0, 2, 1, 5])),
     "Expected row_ptr to be non-decreasing. Got a decreasing step."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(col_idx=[0, 2, 0, 1, 4])),
     "Expected col_idx in [0, 4). Got values in [0, 4]."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(col_idx=[0, -1, 0, 1, 3])),
     "Expected col_idx in [0, 4). Got values in [-1, 3]."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(col_idx=[0, 2, 0, 1, 1])),
     "Expected col_idx strictly increasing within each block row. Got a repeated or unsorted column at entry 4."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(col_idx=[2, 0, 0, 1, 3])),
     "Expected col_idx strictly increasing within each block row. Got a repeated or unsorted column at entry 1."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(slot=[0, 1, 2, 3, 5])),
     "Expected slot in [0, 5). Got values in [0, 5]."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(slot=[0, 1, 2, 3, -1])),
     "Expected slot in [0, 5). Got values in [-1, 3]."),
    (lambda: BlockLayout.from_state((48, 64), 16, **state(slot=[0, 1, 1, 3, 4])),
     "Expected slot to be a permutation of 0..4. Got a repeated slot."),
    (lambda: BlockLayout.from_block_mask([[True]], 16), "Expected mask to be a torch.Tensor. Got list."),
    (lambda: BlockLayout.from_block_mask(MASK.float(), 16), "Expected mask of dtype torch.bool. Got torch.float32."),
    (lambda: BlockLayout.from_block_mask(MASK.reshape(-1), 16),
     "Expected mask to be a non-empty 2-D [N_out//B, K_in//B] tensor. Got shape (12,)."),
    (lambda: BlockLayout.from_block_mask(torch.zeros(0, 3, dtype=torch.bool), 16),
     "Expected mask to be a non-empty 2-D [N_out//B, K_in//B] tensor. Got shape (0, 3)."),
    (lambda: BlockLayout.from_dense([[0.0]], 16), "Expected weight to be a 2-D tensor. Got list of shape ()."),
    (lambda: BlockLayout.from_dense(torch.zeros(64), 16),
     "Expected weight to be a 2-D tensor. Got Tensor of shape (64,)."),
    (lambda: BlockLayout.from_dense(torch.zeros(48, 64), 32),
     "Expected both dims of weight to be multiples of block_size 32. Got shape (48, 64)."),
    (lambda: BlockLayout.from_dense(torch.zeros(64, 64), 48), "Expected block_size in (16, 32, 64, 128). Got 48."),
    (lambda: LAYOUT.to_dense([1.0]), "Expected values to be a torch.Tensor. Got list."),
    (lambda: LAYOUT.to_dense(torch.zeros(5, 16, 8)),
     "Expected values of shape (nnz, B, B) = (5, 16, 16). Got (5, 16, 8)."),
    (lambda: LAYOUT.to_dense(torch.zeros(5, 16, 16, dtype=torch.int32)),
     "Expected values of a floating dtype. Got torch.int32."),
    (lambda: LAYOUT.to_dense(torch.zeros(5, 16, 16, device="meta")),
     "Expected values on the layout's device cpu. Got meta."),
    (lambda: LAYOUT.values_from_dense(torch.zeros(48, 48)), "Expected weight of shape (48, 64). Got (48, 48)."),
    (lambda: LAYOUT.values_from_dense([1]), "Expected weight of shape (48, 64). Got ()."),
    (lambda: LAYOUT.values_from_dense(torch.zeros(48, 64, device="meta")),
     "Expected weight on the layout's device cpu. Got meta."),
    (lambda: LAYOUT.with_mask(torch.ones(2, 2, dtype=torch.bool)), "Expected mask of shape (3, 4). Got shape (2, 2)."),
    (lambda: LAYOUT.with_mask(torch.ones(3, 4, dtype=torch.bool)),
     "Expected new_mask with the same number of live blocks (5). Got 12."),
]


@pytest.mark.parametrize("call,message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_each_check_says_what_it_expected_and_what_it_got(call, message):
    with pytest.raises(BlockSparseError, match=f"^{re.escape(message)}$"):
        call()


def test_validation_can_be_skipped_for_trusted_buffers():
    layout = BlockLayout.from_state((48, 64), 16, **state(slot=[0, 1, 1, 3, 4]), validate=False)
    assert layout.slot.tolist() == [0, 1, 1, 3, 4]


def test_a_layout_moves_between_devices_unchanged():
    moved = LAYOUT.to("meta")
    assert moved.device.type == "meta" and moved.shape == LAYOUT.shape and moved.block_size == 16
    assert moved.nnz == LAYOUT.nnz and moved.row_ptr.dtype == torch.int32
    back = LAYOUT.to("cpu")
    for name in ("row_ptr", "col_idx", "slot", "col_ptr", "row_idx_t", "slot_t", "row_order", "col_order"):
        assert torch.equal(getattr(back, name), getattr(LAYOUT, name)), name
    assert repr(LAYOUT) == "BlockLayout(shape=(48, 64), block_size=16, nnz=5, density=0.4167, device=cpu)"


@pytest.mark.parametrize("shape,message", [
    ((48, 64.0), "Expected shape to be two positive ints (N_out, K_in). Got (48, 64.0)."),
    ((0, 64), "Expected shape to be two positive ints (N_out, K_in). Got (0, 64)."),
    ((48, 64, 16), "Expected shape to be two positive ints (N_out, K_in). Got (48, 64, 16)."),
    ("48x64", "Expected shape to be two positive ints (N_out, K_in). Got '48x64'."),
    ((1, 64), "Expected both dims of shape to be multiples of block_size 16. Got shape (1, 64)."),
    ((48, 40), "Expected both dims of shape to be multiples of block_size 16. Got shape (48, 40)."),
])
def test_shapes_that_are_not_two_positive_multiples_of_the_block_size(shape, message):
    with pytest.raises(BlockSparseError, match=f"^{re.escape(message)}$"):
        BlockLayout(shape, 16, STATE["row_ptr"], STATE["col_idx"], STATE["slot"])


def test_a_moved_layout_builds_everything_on_its_device():
    moved = LAYOUT.to("meta")
    for name in ("row_ptr", "col_idx", "slot", "row_idx", "col_ptr", "row_idx_t", "slot_t", "row_order", "col_order"):
        assert getattr(moved, name).device.type == "meta", name
    assert moved.block_mask().device.type == "meta" and moved.block_mask().shape == (3, 4)
