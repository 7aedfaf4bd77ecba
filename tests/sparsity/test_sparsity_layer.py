"""SparseLinear: block path == unstructured path on block-aligned masks; masked weights stay exactly zero;
layout buffers round-trip through state_dict."""
import pytest
import torch

from sparse_dc.sparsity.layer import SparseLinear, sparse_linear
from sparse_dc.sparsity.topology import random_mask

B = 32


def _pair(seed: int = 0) -> tuple[SparseLinear, SparseLinear, torch.Tensor]:
    """A block layer (B = 32) and an unstructured layer with the block mask expanded to entries, same weights."""
    g = torch.Generator().manual_seed(seed)
    block_mask = random_mask(3, 2, 3, g)  # 96 out x 64 in, 3 of 6 blocks live
    block = sparse_linear(64, 96, B, block_mask, std=0.1)
    entry_mask = block_mask.repeat_interleave(B, 0).repeat_interleave(B, 1)
    flat = sparse_linear(64, 96, 1, entry_mask, std=0.1)
    with torch.no_grad():
        flat.weight.copy_(block.dense_weight())
    return block, flat, entry_mask


@pytest.mark.parametrize("backend", ["reference", "triton"])  # triton: the interpreter on CPU
def test_block_and_unstructured_paths_agree(backend, monkeypatch):
    monkeypatch.setenv("SPARSE_DC_KERNEL_BACKEND", backend)
    block, flat, entry_mask = _pair()
    x = torch.randn(2, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 5, 96)
    y_block, y_flat = block(x), flat(x2)
    torch.testing.assert_close(y_block, y_flat)
    y_block.backward(dy)
    y_flat.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    # the unstructured weight's gradient is masked by the hook; the block gradient lives at live blocks only
    assert torch.equal(flat.weight.grad == 0, ~entry_mask | (flat.weight.grad == 0))
    torch.testing.assert_close(block.layout.to_dense(block.values.grad), flat.weight.grad)
    assert block.active_numel == flat.active_numel == 3 * B * B


@pytest.mark.parametrize("block_size", [1, B])
def test_masked_weights_stay_zero_after_optimizer_steps(block_size):
    torch.manual_seed(0)
    mask = random_mask(96 // block_size, 64 // block_size, (96 * 64) // block_size ** 2 // 4, torch.Generator())
    layer = sparse_linear(64, 96, block_size, mask, std=0.1)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    dead = ~layer.unit_mask().repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
    weight = layer.dense_weight()
    assert torch.count_nonzero(weight[dead]) == 0
    assert torch.count_nonzero(weight[~dead]) == (~dead).sum()  # live weights trained and non-zero
    if block_size == 1:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(opt.state[layer.weight][key][dead]) == 0
    else:
        assert tuple(layer.values.shape) == (int(mask.sum()), B, B)  # memory scales with density


def test_state_dict_round_trip_carries_layout_and_rebuilds_it():
    block, _, _ = _pair(seed=1)
    other, _, _ = _pair(seed=2)
    assert not torch.equal(block.unit_mask(), other.unit_mask())
    other.load_state_dict(block.state_dict())
    assert set(block.state_dict()) == {"values", "row_ptr", "col_idx", "slot"}
    assert torch.equal(other.unit_mask(), block.unit_mask())  # the cached layout was rebuilt from the buffers
    x = torch.randn(4, 64)
    torch.testing.assert_close(other(x), block(x))


def test_set_topology_keeps_surviving_slots_and_reports_grown():
    block, _, _ = _pair()
    old_mask, values = block.unit_mask().clone(), block.values.detach().clone()
    old_dense = block.dense_weight().detach().clone()
    new_mask = old_mask.clone()
    (r0, c0), (r1, c1) = old_mask.nonzero()[0].tolist(), (~old_mask).nonzero()[0].tolist()
    new_mask[r0, c0], new_mask[r1, c1] = False, True
    grown = block.set_topology(new_mask)
    assert torch.equal(block.unit_mask(), new_mask)
    assert grown.tolist() == [0]  # (r0, c0) held slot 0 (row-major init); the grown block reuses it
    assert torch.equal(block.values.detach(), values)  # set_topology never moves values
    keep = new_mask & old_mask
    dense = block.dense_weight().detach()
    for r, c in keep.nonzero().tolist():
        torch.testing.assert_close(dense[r * B:(r + 1) * B, c * B:(c + 1) * B],
                                   old_dense[r * B:(r + 1) * B, c * B:(c + 1) * B])
    with pytest.raises(ValueError, match="live units"):
        block.set_topology(torch.ones_like(new_mask))


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="block_size=32 to divide"):
        sparse_linear(48, 64, 32, torch.ones(2, 1, dtype=torch.bool), 0.02)
    with pytest.raises(ValueError, match=r"Expected a bool mask of shape \(2, 2\)"):
        sparse_linear(64, 64, 32, torch.ones(2, 3, dtype=torch.bool), 0.02)


def test_gradient_masking_survives_deepcopy():
    import copy

    _, flat, entry_mask = _pair()
    clone = copy.deepcopy(flat)
    clone(torch.randn(3, 64)).sum().backward()
    assert torch.count_nonzero(clone.weight.grad[~entry_mask]) == 0
    assert torch.count_nonzero(clone.weight.grad[entry_mask]) > 0


def test_both_layers_implement_the_whole_protocol():
    """Every method the protocol leaves to a granularity is defined by both classes; the factory picks by B."""
    import inspect

    from sparse_dc.sparsity.layer import BlockSparseLinear, MaskedLinear

    required = [name for name, member in vars(SparseLinear).items()
                if (inspect.isfunction(member) or isinstance(member, property))
                and "raise NotImplementedError" in inspect.getsource(member.fget if isinstance(member, property)
                                                                      else member)]
    assert set(required) == {"param", "active_numel", "unit_mask", "unit_magnitude", "set_topology", "with_revived",
                             "grown_entries", "regrown_values", "dense_weight", "_new_capture"}
    for cls in (MaskedLinear, BlockSparseLinear):
        assert [n for n in required if vars(SparseLinear)[n] is getattr(cls, n)] == [], cls
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert type(sparse_linear(96, 64, 32, mask, 0.1)) is BlockSparseLinear
    assert type(sparse_linear(3, 2, 1, mask, 0.1)) is MaskedLinear
