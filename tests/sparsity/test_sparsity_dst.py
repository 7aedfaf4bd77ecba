"""DST engine: SET drops exactly the smallest, RigL grows exactly the highest-scoring, density is exact after
many updates, regrown weights and moments are zero, the schedule, and bit-exact resume from state dicts."""
import math

import pytest
import torch
from torch import nn

from sparse_dc.model import ModelConfig, build_model
from sparse_dc.sparsity import DSTEngine, SparseLinear, SparsityConfig, optimizer_state, sparse_linear
from sparse_dc.sparsity.topology import prune_rate_at, random_mask


def _layer(block_size: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    units = (128 // block_size) * (64 // block_size)
    mask = random_mask(128 // block_size, 64 // block_size, units // 2, torch.Generator().manual_seed(seed))
    return nn.Sequential(sparse_linear(64, 128, block_size, mask, std=0.1))


def _cfg(method: str, **kw) -> SparsityConfig:
    cfg = SparsityConfig(density=0.5, method=method, update_frequency=10, prune_rate=0.25,
                         prune_rate_decay="constant", stop_fraction=1.0, **kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("block_size", [1, 32])
def test_set_drops_exactly_the_smallest_magnitudes(block_size):
    model = _layer(block_size)
    layer = model[0]
    engine = DSTEngine(model, _cfg("set", block_size=block_size), total_steps=100)
    old = layer.unit_mask().clone()
    magnitude = layer.unit_magnitude(layer.param.detach())
    n = round(0.25 * int(old.sum()))
    expected_dropped = set(torch.where(old.flatten(), magnitude.flatten(), math.inf).argsort()[:n].tolist())
    engine.end_step(10)
    new = layer.unit_mask()
    assert set((old & ~new).flatten().nonzero().flatten().tolist()) == expected_dropped
    assert int((new & ~old).sum()) == n and int(new.sum()) == int(old.sum())
    assert engine.stats()["changed_fraction"] == pytest.approx(n / int(old.sum()))


@pytest.mark.parametrize("block_size", [1, 32])
def test_rigl_grows_exactly_the_highest_dense_gradient_scores(block_size):
    model = _layer(block_size, seed=3)
    layer = model[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = DSTEngine(model, _cfg("rigl", block_size=block_size), total_steps=100, state=optimizer_state(opt))
    x, dy = torch.randn(16, 64), torch.randn(16, 128)
    engine.begin_step(10)
    layer(x).backward(dy)
    opt.step()
    # expected scores: |dY^T X| per entry, or its Frobenius norm per block
    dense_grad = dy.t() @ x
    b = block_size
    score = dense_grad.abs() if b == 1 else dense_grad.reshape(128 // b, b, 64 // b, b).pow(2).sum((1, 3)).sqrt()
    old = layer.unit_mask().clone()
    n = round(0.25 * int(old.sum()))
    expected_grown = set(torch.where(~old.flatten(), score.flatten(), -math.inf).argsort(descending=True)[:n]
                         .tolist())
    engine.end_step(10)
    new = layer.unit_mask()
    assert set((new & ~old).flatten().nonzero().flatten().tolist()) == expected_grown
    assert layer._scores is None  # capture disarmed after the update


@pytest.mark.parametrize("block_size", [1, 32])
def test_regrown_weights_and_moments_are_zero(block_size):
    model = _layer(block_size, seed=5)
    layer = model[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = DSTEngine(model, _cfg("set", block_size=block_size), total_steps=100, state=optimizer_state(opt))
    for step in range(1, 11):
        engine.begin_step(step)
        opt.zero_grad()
        layer(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
        engine.end_step(step)
    state = opt.state[layer.param]
    if block_size == 1:
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[key][~layer.mask]) == 0  # dropped and never-live entries
    # grown units: weight 0 and moments 0 (the last update was at step 10)
    b = block_size
    grown = engine.last_changed["0"] > 0
    assert grown
    dense = layer.dense_weight().detach()
    blocks = dense.reshape(128 // b, b, 64 // b, b).abs().sum((1, 3))
    live_zero = layer.unit_mask() & (blocks == 0)
    assert int(live_zero.sum()) == round(0.25 * int(layer.unit_mask().sum()))  # exactly the grown units
    if block_size > 1:
        zero_slots = (layer.values.detach().abs().sum((1, 2)) == 0)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[key][zero_slots]) == 0
    # one more step: grown units train, pruned entries stay exactly zero
    opt.zero_grad()
    layer(torch.randn(8, 64)).pow(2).mean().backward()
    opt.step()
    if block_size == 1:
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0


@pytest.mark.parametrize("method,block_size", [("set", 1), ("rigl", 1), ("set", 32), ("rigl", 32)])
def test_density_exact_per_layer_after_many_updates(method, block_size):
    torch.manual_seed(0)
    sparsity = SparsityConfig(density=0.25, block_size=block_size, method=method, distribution="erk",
                              update_frequency=2, prune_rate=0.3, stop_fraction=1.0)
    model = build_model(ModelConfig(n_layers=1), sparsity, vocab_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = DSTEngine(model, sparsity, total_steps=12, state=optimizer_state(opt))
    live0 = {n: int(m.unit_mask().sum()) for n, m in engine.layers.items()}
    tokens = torch.randint(0, 32, (2, 9))
    updates = 0
    for step in range(1, 13):
        engine.begin_step(step)
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        stats = engine.end_step(step)
        if stats is not None:
            updates += 1
            assert {n: int(m.unit_mask().sum()) for n, m in engine.layers.items()} == live0
    assert updates == 5  # steps 2, 4, ..., 10 (the rate reaches 0 at the stop step 12)
    stats = engine.stats()
    assert stats["density"] == pytest.approx(sum(live0.values()) / sum(m.unit_mask().numel()
                                                                      for m in engine.layers.values()))
    assert stats["ever_active_fraction"] > stats["density"]


def test_schedule():
    assert prune_rate_at(0, 0.1, 100, "cosine") == pytest.approx(0.1)
    assert prune_rate_at(50, 0.1, 100, "cosine") == pytest.approx(0.05)
    assert prune_rate_at(25, 0.1, 100, "linear") == pytest.approx(0.075)
    assert prune_rate_at(99, 0.1, 100, "constant") == 0.1
    assert prune_rate_at(100, 0.1, 100, "constant") == 0.0  # stop step: no more updates
    engine = DSTEngine(_layer(1), _cfg("set", block_size=1).with_overrides(["stop_fraction=0.75"]), 1000)
    assert [s for s in range(1, 1001) if engine.is_update_step(s)] == list(range(10, 750, 10))
    static = DSTEngine(_layer(1), _cfg("static", block_size=1), 1000)
    assert not any(static.is_update_step(s) for s in range(1, 1001))


def test_rigl_without_captured_scores_is_a_clear_error():
    engine = DSTEngine(_layer(32), _cfg("rigl", block_size=32), 100)
    with pytest.raises(ValueError, match="begin_step"):
        engine.end_step(10)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_resume_from_state_dicts_is_bit_exact(method):
    sparsity = SparsityConfig(density=0.5, block_size=32, method=method, update_frequency=2, prune_rate=0.3,
                              stop_fraction=1.0)
    data = torch.randint(0, 32, (8, 2, 9), generator=torch.Generator().manual_seed(0))

    def make():
        torch.manual_seed(0)
        model = build_model(ModelConfig(n_layers=1), sparsity, vocab_size=32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, DSTEngine(model, sparsity, total_steps=8, state=optimizer_state(opt))

    def run(model, opt, engine, steps):
        for step in steps:
            engine.begin_step(step)
            opt.zero_grad()
            tokens = data[step - 1]
            nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            engine.end_step(step)

    straight = make()
    run(*straight, range(1, 9))
    first = make()
    run(*first, range(1, 5))
    saved = [first[0].state_dict(), first[1].state_dict(), first[2].state_dict()]
    resumed = make()
    for obj, state in zip(resumed, saved):
        obj.load_state_dict(state)
    run(*resumed, range(5, 9))
    for (name, a), b in zip(straight[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert straight[2].stats() == resumed[2].stats()


def _dense_simulation(layer: SparseLinear, batches) -> torch.Tensor:
    """RigL's dense simulation: a dense weight with the layer's (masked) values, its torch-autograd gradient summed
    over the micro-batches."""
    w = layer.dense_weight().detach().clone().requires_grad_()
    for x, dy in batches:
        nn.functional.linear(x, w).backward(dy)
    return w.grad


@pytest.mark.parametrize("mode,backend", [("exact", "reference"), ("exact", "triton"), ("norm_sum", "reference")])
def test_rigl_block_scores_are_norms_of_the_gradient_summed_over_micro_batches(mode, backend, monkeypatch):
    monkeypatch.setenv("SPARSE_DC_KERNEL_BACKEND", backend)  # triton: the interpreter on CPU
    b = 16
    model = _layer(b, seed=11)  # 128 x 64: 8 x 4 blocks, 16 live; 4 grown per update
    layer = model[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = DSTEngine(model, _cfg("rigl", block_size=b, rigl_scores=mode), total_steps=100,
                       state=optimizer_state(opt))
    g = torch.Generator().manual_seed(0)
    x1, dy1 = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 128, generator=g)
    # micro-batch 2 nearly cancels micro-batch 1: the summed gradient is small and ranks blocks differently
    # from the sum of per-micro-batch norms
    x2, dy2 = x1.clone(), -dy1 + 0.2 * torch.randn(2, 6, 128, generator=g)
    batches = [(x1, dy1), (x2, dy2)]
    dense_grad = _dense_simulation(layer, batches)
    per_batch = [_dense_simulation(layer, [batch]) for batch in batches]
    old = layer.unit_mask().clone()
    engine.begin_step(10)
    for x, dy in batches:
        layer(x).backward(dy)
    opt.step()
    scores = layer._scores.scores()  # what the update will rank (one rank: nothing to all-reduce)
    engine.end_step(10)

    def block_norms(dw):
        return dw.reshape(128 // b, b, 64 // b, b).pow(2).sum((1, 3)).sqrt()

    exact = block_norms(dense_grad)
    norm_sum = sum(block_norms(dw) for dw in per_batch)
    expected = exact if mode == "exact" else norm_sum
    torch.testing.assert_close(scores[~old], expected[~old], rtol=1e-5, atol=1e-6)
    assert (norm_sum[~old] > 2 * exact[~old]).all()  # the two modes really differ on this data

    def top_dead(score):
        return set(torch.where(~old.flatten(), score.flatten(), -math.inf).argsort(descending=True)[:4].tolist())

    assert top_dead(exact) != top_dead(norm_sum)
    assert set((layer.unit_mask() & ~old).flatten().nonzero().flatten().tolist()) == top_dead(expected)
    assert layer._scores is None


def test_rigl_scores_config_is_validated():
    with pytest.raises(ValueError, match="rigl_scores='norms': expected 'exact' or 'norm_sum'"):
        SparsityConfig(rigl_scores="norms").validate()
    assert SparsityConfig.from_dict({"rigl_scores": "norm_sum"}).rigl_scores == "norm_sum"
