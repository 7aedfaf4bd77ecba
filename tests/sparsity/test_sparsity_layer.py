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


def test_shape_and_dtype_errors_name_the_value_and_what_was_expected():
    with pytest.raises(ValueError) as err:
        sparse_linear(48, 64, 32, torch.ones(2, 1, dtype=torch.bool), 0.02)
    assert str(err.value) == "SparseLinear 64x48: expected block_size=32 to divide both dims"
    with pytest.raises(ValueError) as err:  # the other dim not a multiple
        sparse_linear(64, 48, 32, torch.ones(1, 2, dtype=torch.bool), 0.02)
    assert str(err.value) == "SparseLinear 48x64: expected block_size=32 to divide both dims"
    with pytest.raises(ValueError) as err:  # right shape, wrong dtype: a float {0, 1} mask is not accepted
        sparse_linear(64, 64, 32, torch.ones(2, 2), 0.02)
    assert str(err.value) == "Expected a bool mask of shape (2, 2). Got torch.float32 (2, 2)."
    with pytest.raises(ValueError) as err:
        sparse_linear(3, 2, 1, torch.ones(3, 2, dtype=torch.bool), 0.02)
    assert str(err.value) == "Expected a bool mask of shape (2, 3). Got torch.bool (3, 2)."
    layer = sparse_linear(3, 2, 1, torch.ones(2, 3, dtype=torch.bool), 0.02)
    with pytest.raises(ValueError) as err:
        layer.set_topology(torch.zeros(2, 3, dtype=torch.bool))
    assert str(err.value) == "Expected 6 live units in the new topology. Got 0."
    with pytest.raises(ValueError) as err:
        layer.arm_scores(True, "norms")
    assert str(err.value) == "mode='norms': expected one of ('exact', 'norm_sum')"


@pytest.mark.parametrize("block_size", [1, 16])
def test_repr_names_the_shape_block_size_and_density(block_size):
    b = block_size
    mask = torch.zeros(64 // b, 32 // b, dtype=torch.bool)
    mask.view(-1)[: mask.numel() * 3 // 8] = True  # density 0.375
    layer = sparse_linear(32, 64, b, mask, 0.02)
    assert layer.extra_repr() == f"in_features=32, out_features=64, block_size={b}, density=0.3750"
    assert layer.dense_numel == 64 * 32 and layer.active_numel == 64 * 32 * 3 // 8


@pytest.mark.parametrize("block_size", [1, 16])
def test_live_weights_start_normal_with_the_given_std_and_dead_ones_at_zero(block_size):
    torch.manual_seed(0)
    b = block_size
    mask = random_mask(256 // b, 128 // b, (256 * 128) // b ** 2 // 2, torch.Generator().manual_seed(1))
    layer = sparse_linear(128, 256, b, mask, std=0.05)
    assert layer.init_std == 0.05
    dense = layer.dense_weight().detach()
    live = mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    assert torch.count_nonzero(dense[~live]) == 0
    assert float(dense[live].std()) == pytest.approx(0.05, rel=0.03)
    assert abs(float(dense[live].mean())) < 0.002
    assert layer.param.numel() == (256 * 128 if b == 1 else int(live.sum()))  # B = 1 dense; blocks: live only


@pytest.mark.parametrize("block_size", [1, 16])
def test_unit_magnitude_is_the_absolute_weight_or_the_block_frobenius_norm(block_size):
    b = block_size
    mask = random_mask(64 // b, 32 // b, (64 * 32) // b ** 2 // 4, torch.Generator().manual_seed(2))
    layer = sparse_linear(32, 64, b, mask, std=1.0)
    param = layer.param.detach() * 3 - 1  # any full copy of the parameter, not only the layer's own values
    with torch.no_grad():
        layer.param.copy_(param)
    dense = layer.dense_weight().detach()
    expected = dense.abs() if b == 1 else dense.reshape(64 // b, b, 32 // b, b).pow(2).sum((1, 3)).sqrt()
    got = layer.unit_magnitude(param)
    assert got.dtype == torch.float32 and got.shape == mask.shape
    torch.testing.assert_close(got, expected)
    assert torch.count_nonzero(got[~mask]) == 0


def test_block_layout_is_cached_until_its_buffers_change():
    """The layout (host-side index checks, per-row tables) is built once per topology, not once per forward."""
    block, _, _ = _pair()
    layout = block.layout
    block(torch.randn(2, 64))
    assert block.layout is layout
    new_mask = block.unit_mask().clone()
    (r0, c0), (r1, c1) = new_mask.nonzero()[0].tolist(), (~new_mask).nonzero()[0].tolist()
    new_mask[r0, c0], new_mask[r1, c1] = False, True
    block.set_topology(new_mask)  # buffers written in place
    assert block.layout is not layout and torch.equal(block.layout.block_mask(), new_mask)


@pytest.mark.parametrize("block_size", [1, 16])
def test_regrown_values_are_normal_at_grown_units_and_zero_at_dropped_ones(block_size):
    b = block_size
    units = (128 // b) * (64 // b)
    mask = random_mask(128 // b, 64 // b, units // 2, torch.Generator().manual_seed(3))
    layer = sparse_linear(64, 128, b, mask, std=0.1)
    k = units // 8  # drop the first k live units, grow the last k dead ones
    dropped, grown = torch.zeros_like(mask), torch.zeros_like(mask)
    dropped.view(-1)[mask.flatten().nonzero().flatten()[:k]] = True
    grown.view(-1)[(~mask).flatten().nonzero().flatten()[-k:]] = True
    reset = layer.set_topology((mask & ~dropped) | grown)
    values = layer.regrown_values(grown, reset, torch.Generator().manual_seed(5), 0.3)
    again = layer.regrown_values(grown, reset, torch.Generator().manual_seed(5), 0.3)
    assert torch.equal(values, again)  # a function of the generator: the same on every rank
    if b == 1:  # one value per reset entry (row-major): normal at grown entries, 0 at dropped ones
        assert values.shape == (int(reset.sum()),)
        at_grown = grown[reset]
        assert torch.count_nonzero(values[~at_grown]) == 0 and torch.count_nonzero(values[at_grown]) == len(
            values[at_grown])
        sample = values[at_grown]
    else:  # one block per reset slot, all grown
        assert values.shape == (reset.numel(), b, b) and reset.numel() == int(grown.sum())
        sample = values.flatten()
    assert float(sample.std()) == pytest.approx(0.3, rel=0.1)
    assert abs(float(sample.mean())) < 0.05


@pytest.mark.parametrize("block_size", [1, 16])
def test_arm_and_take_scores(block_size):
    b = block_size
    layer = sparse_linear(32, 64, b, random_mask(64 // b, 32 // b, (64 * 32) // b ** 2 // 2,
                                                 torch.Generator().manual_seed(6)), std=0.1)
    assert layer.take_scores() is None  # never armed
    layer.arm_scores(True)
    layer(torch.randn(3, 32)).sum().backward()
    capture = layer.take_scores()
    assert capture is not None and capture.unit_shape == (64 // b, 32 // b)
    assert layer.take_scores() is None and layer._scores is None  # taking disarms
    layer.arm_scores(True)
    layer.arm_scores(False)
    assert layer.take_scores() is None
    layer(torch.randn(3, 32)).sum().backward()  # a disarmed backward captures nothing and does not fail


def test_unstructured_rigl_scores_sum_the_signed_gradient_over_micro_batches():
    """B = 1: the score of a dead entry is |Σ over micro-batches dL/dW|, not Σ |.| or the last micro-batch's."""
    _, flat, entry_mask = _pair(seed=7)
    g = torch.Generator().manual_seed(8)
    x1, dy1 = torch.randn(5, 64, generator=g), torch.randn(5, 96, generator=g)
    x2, dy2 = x1.clone(), -dy1 + 0.3 * torch.randn(5, 96, generator=g)  # nearly cancels micro-batch 1
    flat.arm_scores(True)
    for x, dy in ((x1, dy1), (x2, dy2)):
        flat(x).backward(dy)
    capture = flat.take_scores()
    summed = dy1.t() @ x1 + dy2.t() @ x2
    torch.testing.assert_close(capture.acc, summed)  # signed, dense: the all-reduce sums it over ranks
    torch.testing.assert_close(capture.scores(), summed.abs())
    assert capture.rows is None and capture.acc.dtype == torch.float32
    # the weight's own gradient is the masked sum
    torch.testing.assert_close(flat.weight.grad, summed * entry_mask)


@pytest.mark.parametrize("mode", ["exact", "norm_sum"])
def test_block_capture_lists_the_dead_blocks_when_armed(mode):
    block, _, _ = _pair(seed=9)
    mask = block.unit_mask()
    block.arm_scores(True, mode)
    capture = block._scores
    if mode == "exact":  # one fp32 B x B accumulator per dead block, row-major
        assert capture.acc.shape == (int((~mask).sum()), B, B) and capture.acc.dtype == torch.float32
        rows, cols = (~mask).nonzero(as_tuple=True)
        assert capture.rows.tolist() == rows.tolist() and capture.cols.tolist() == cols.tolist()
        assert capture.rows.dtype == capture.cols.dtype == torch.int32
    else:  # one float per block
        assert capture.acc.shape == mask.shape and capture.rows is None
    assert capture.unit_shape == tuple(mask.shape)
    x, dy = torch.randn(4, 64), torch.randn(4, 96)
    block(x).backward(dy)
    scores = block.take_scores().scores()
    dense_grad = dy.t() @ x
    norms = dense_grad.reshape(96 // B, B, 64 // B, B).pow(2).sum((1, 3)).sqrt()
    torch.testing.assert_close(scores[~mask], norms[~mask])
    if mode == "exact":
        assert torch.count_nonzero(scores[mask]) == 0  # live blocks are never grow candidates


@pytest.mark.parametrize("mode", ["exact", "norm_sum"])
def test_block_rigl_capture_under_bf16_autocast(mode):
    """Under autocast the layer's output (and so dY) is bf16 while the input is fp32: the capture scores the
    bf16 product, close to the fp32 norms of dYᵀX."""
    block, _, _ = _pair(seed=10)
    mask = block.unit_mask()
    x, dy = torch.randn(8, 64), torch.randn(8, 96)
    block.arm_scores(True, mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16
    y.backward(dy.to(torch.bfloat16))
    scores = block.take_scores().scores()
    norms = (dy.t() @ x).reshape(96 // B, B, 64 // B, B).pow(2).sum((1, 3)).sqrt()
    torch.testing.assert_close(scores[~mask], norms[~mask], rtol=2e-2, atol=0)


@pytest.mark.parametrize("block_size,mode", [(1, "exact"), (16, "exact"), (16, "norm_sum")])
def test_capture_and_reset_indices_live_on_the_devices_they_are_asked_for(block_size, mode):
    """The RigL accumulator (and its block indices) is allocated on the parameter's device even when the topology
    mask lives elsewhere; the reset-index helpers follow `reset`'s device. The meta device stands in for a GPU."""
    b, meta = block_size, torch.device("meta")
    layer = sparse_linear(32, 64, b, random_mask(64 // b, 32 // b, (64 * 32) // b ** 2 // 2,
                                                 torch.Generator().manual_seed(11)), std=0.1)
    capture = layer._new_capture(layer.unit_mask(), mode, meta)
    assert capture.acc.device == meta and capture.acc.dtype == torch.float32
    assert capture.scores().device == meta and capture.scores().shape == layer.unit_mask().shape
    if capture.rows is not None:
        assert capture.rows.device == capture.cols.device == meta
        assert capture.rows.dtype == capture.cols.dtype == torch.int32
    if b == 1:
        grown = torch.zeros(64, 32, dtype=torch.bool)
        grown[0, :4] = True
        reset = grown.clone()
        reset[1, :4] = True  # dropped entries
        assert layer.grown_entries(grown, reset.to(meta)).device == meta
        assert layer.with_revived(reset.to(meta), grown).device == meta
        layer.to(meta)  # a whole layer on another device: arming allocates there
        layer.arm_scores(True)
        assert layer.take_scores().acc.device == meta


def test_block_layout_follows_buffers_replaced_by_new_tensors():
    """Buffers replaced by other tensors (as `.to(device)` or an assignment does; their in-place version counters
    may well equal the old ones') give a layout over the new buffers, not the cached one."""
    from sparse_dc.kernels import BlockLayout

    block, _, _ = _pair()
    old = block.unit_mask().clone()
    assert torch.equal(block.layout.block_mask(), old)
    new_mask = ~old  # 3 of 6 blocks live, the other three
    for name, tensor in BlockLayout.from_block_mask(new_mask, B).state_tensors().items():
        tensor = tensor.clone()
        while tensor._version < getattr(block, name)._version:  # the same version as the buffer it replaces
            tensor.add_(0)
        setattr(block, name, tensor)
    assert torch.equal(block.layout.block_mask(), new_mask)
