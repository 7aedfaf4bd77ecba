"""DST engine: SET drops exactly the smallest, RigL grows exactly the highest-scoring, density is exact after
many updates, regrown weights and moments are zero, the schedule, and bit-exact resume from state dicts."""
import math

import pytest
import torch
from torch import nn

from sparse_dc.errors import SparseDCError
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


def test_engine_arguments_and_checkpoint_mismatches_are_one_line_errors():
    with pytest.raises(SparseDCError) as err:
        DSTEngine(_layer(1), _cfg("set", block_size=1), total_steps=0)
    assert str(err.value) == "total_steps=0: expected an integer >= 1"
    one = DSTEngine(_layer(1), _cfg("set", block_size=1).with_overrides(["stop_fraction=0.5"]), total_steps=1)
    assert one.stop_step == 0 and not one.is_update_step(1)
    assert DSTEngine(_layer(1), _cfg("set", block_size=1).with_overrides(["stop_fraction=0.75"]), 30).stop_step == 22
    engine = DSTEngine(_layer(1), _cfg("set", block_size=1, seed=3), total_steps=100)
    state = engine.state_dict()
    for change, message in [
        (dict(seed=4), "DST checkpoint has seed=4, method='set'; the config has seed=3, method='set': expected "
                       "them to match"),
        (dict(method="rigl"), "DST checkpoint has seed=3, method='rigl'; the config has seed=3, method='set': "
                              "expected them to match"),
        (dict(ever_active={"1": torch.ones(1)}), "DST checkpoint's sparse layers differ from the model's: expected "
                                                 "the same model/sparsity config")]:
        with pytest.raises(SparseDCError) as err:
            engine.load_state_dict({**state, **change})
        assert str(err.value) == message
    with pytest.raises(SparseDCError) as err:
        DSTEngine(_layer(32), _cfg("rigl", block_size=32), 100).end_step(10)
    assert str(err.value) == ("RigL update at step 10 found no captured gradients for a layer: call "
                              "dst.begin_step(step) before that step's forward/backward")


def test_checkpoint_state_round_trips_into_a_fresh_engine():
    model = _layer(1, seed=2)
    engine = DSTEngine(model, _cfg("set", block_size=1), total_steps=100)
    engine.end_step(10)
    engine.end_step(20)
    state = engine.state_dict()
    assert state["seed"] == 0 and state["method"] == "set" and state["last_update_step"] == 20
    state["ever_active"]["0"] = state["ever_active"]["0"].to(torch.uint8)  # as a serialiser may hand it back
    state["last_update_step"] = torch.tensor(20)
    fresh = DSTEngine(model, _cfg("set", block_size=1), total_steps=100)
    fresh.load_state_dict(state)
    assert fresh.last_update_step == 20 and type(fresh.last_update_step) is int
    assert fresh.ever_active["0"].dtype == torch.bool and torch.equal(fresh.ever_active["0"],
                                                                      engine.ever_active["0"])
    assert fresh.last_changed == engine.last_changed and fresh.stats() == engine.stats()
    state["ever_active"]["0"].zero_()  # the engine holds its own copy
    assert torch.equal(fresh.ever_active["0"], engine.ever_active["0"])


def test_only_rigl_update_steps_arm_gradient_capture():
    set_model, rigl_model = _layer(1), _layer(1)
    set_engine = DSTEngine(set_model, _cfg("set", block_size=1), 100)
    rigl_engine = DSTEngine(rigl_model, _cfg("rigl", block_size=1), 100)
    set_engine.begin_step(10)
    rigl_engine.begin_step(9)
    assert set_model[0]._scores is None and rigl_model[0]._scores is None  # no capture cost off update steps
    rigl_engine.begin_step(10)
    assert rigl_model[0]._scores is not None


def test_stats_count_density_changes_and_ever_active_units_over_layers():
    """Two layers of different sizes (an 8 x 4 unit layer with 16 live, a 1 x 2 one with 1 live) after one SET update
    at a constant rate 0.6: the small layer's only unit is replaced (round(0.6) = 1), the big one's 10 of 16."""
    torch.manual_seed(0)
    big = sparse_linear(64, 128, 16, random_mask(8, 4, 16, torch.Generator().manual_seed(0)), std=0.1)
    small = sparse_linear(2, 1, 1, torch.tensor([[True, False]]), std=0.1)
    model = nn.ModuleDict({"big": big, "small": small})
    cfg = _cfg("set", block_size=16).with_overrides(["prune_rate=0.6"])
    engine = DSTEngine(model, cfg, total_steps=100, active_params=10_000)
    before = engine.stats()
    assert before["step"] == 0 and before["changed_fraction"] == 0 and before["dead_path_params"] == 0
    assert before["density"] == 17 / 34 and before["ever_active_fraction"] == 17 / 34
    assert before["effective_active_params"] == 10_000  # no Llama blocks: no dead paths known
    assert before["layer_density"] == {"big": 0.5, "small": 0.5}
    stats = engine.end_step(10)
    assert stats == engine.stats() == engine.stats(10)
    assert stats["step"] == 10 and stats["prune_rate"] == pytest.approx(0.6)
    assert engine.last_changed == {"big": 10 / 16, "small": 1.0}
    assert small.unit_mask().tolist() == [[False, True]]
    assert stats["changed_fraction"] == pytest.approx(11 / 17)  # weighted by each layer's live units
    assert stats["density"] == 17 / 34 and stats["layer_density"] == {"big": 0.5, "small": 0.5}
    assert stats["ever_active_fraction"] == (17 + 11) / 34
    assert engine.stats(30)["step"] == 30 and engine.stats(30)["prune_rate"] == pytest.approx(0.6)
    # the effective count: active x (1 - dead / live sparse weights), floored at 0
    live = 16 * 16 * 16 + 1
    assert engine.effective_active_params(live // 4) == round(10_000 * (1 - (live // 4) / live))
    assert engine.effective_active_params(2 * live) == 0
    assert engine.effective_active_params(0) == 10_000
    dense = DSTEngine(nn.Linear(2, 2), cfg, total_steps=100, active_params=6)
    assert dense.stats()["density"] == 1.0 and dense.effective_active_params(5) == 6  # nothing sparse
    assert not dense.is_update_step(10)


def test_dead_path_params_are_counted_over_the_llama_blocks():
    from sparse_dc.sparsity.paths import dead_path_params, model_projections

    torch.manual_seed(0)
    sparsity = SparsityConfig(density=0.1, block_size=16, method="set", block_topology="independent",
                              update_frequency=2, prune_rate=0.3, stop_fraction=1.0)
    shape = ModelConfig(n_layers=2, hidden_size=64, n_heads=2)
    model = build_model(shape, sparsity, vocab_size=32)
    engine = DSTEngine(model, sparsity, total_steps=10, active_params=50_000)
    expected = sum(sum(dead_path_params(block, 2).values()) for block in model_projections(model).values())
    assert expected > 0, "independent masks this sparse leave some live block on a dead path"
    stats = engine.stats()
    assert stats["dead_path_params"] == engine.dead_path_params() == expected
    live = sum(m.active_numel for m in engine.layers.values())
    assert stats["effective_active_params"] == round(50_000 * (1 - expected / live))


@pytest.mark.parametrize("block_size", [1, 16])
def test_normal_regrowth_draws_from_the_step_and_layer_keyed_stream(block_size):
    """regrow_init=normal: grown units start at N(0, (regrow_init_scale x init std)^2) drawn from a stream keyed
    by (seed, step, layer) -- the same values on every rank and on a resumed run whatever the global RNG did,
    different per layer, step and seed; zero regrowth leaves them at 0. RigL with the
    same gradient into two identical layers grows the same units whatever the seed: only the key tells the
    regrown values apart."""
    b = block_size

    def run(seed=0, step=10, regrow_init="normal", global_seed=0):
        torch.manual_seed(0)
        mask = random_mask(256 // b, 128 // b, (256 * 128) // b ** 2 // 2, torch.Generator().manual_seed(1))
        layers = nn.ModuleList([sparse_linear(128, 256, b, mask, std=0.2) for _ in range(2)])
        with torch.no_grad():
            layers[1].param.copy_(layers[0].param)
        cfg = _cfg("rigl", block_size=b, seed=seed, regrow_init=regrow_init, regrow_init_scale=0.5)
        engine = DSTEngine(layers, cfg, total_steps=100)
        engine.begin_step(step)
        x, dy = torch.randn(4, 128, generator=torch.Generator().manual_seed(2)), torch.randn(4, 256)
        for layer in layers:
            layer(x).backward(dy)
        torch.manual_seed(global_seed)
        engine.end_step(step)
        grown = [(layer.unit_mask() & ~mask).repeat_interleave(b, 0).repeat_interleave(b, 1) for layer in layers]
        assert torch.equal(grown[0], grown[1]) and int(grown[0].sum()) > 0
        return [layer.dense_weight().detach()[grown[0]] for layer in layers]

    values = run()
    for v in values:
        assert float(v.std()) == pytest.approx(0.5 * 0.2, rel=0.1)
        assert torch.count_nonzero(v) == v.numel()
    assert not torch.equal(values[0], values[1])  # keyed by the layer
    assert all(torch.equal(a, c) for a, c in zip(values, run(global_seed=1)))  # not the global RNG
    assert not torch.equal(values[0], run(seed=1)[0])
    assert not torch.equal(values[0], run(step=20)[0])
    assert all(torch.count_nonzero(v) == 0 for v in run(regrow_init="zero"))


def _two_layer_update(method: str, weight_rank: int, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """One update at step 10 of a block (B = 16) and an unstructured layer, normal regrowth; the weights scaled by
    rank `weight_rank`'s random factors (each rank's magnitudes rank units differently) and the RigL gradient
    summed over `batches`. Returns each layer's (mask before, mask after, dense weight after) the update."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(sparse_linear(64, 128, 16, random_mask(8, 4, 16, g), std=0.1),
                          sparse_linear(128, 64, 1, random_mask(64, 128, 4096, g), std=0.1))
    factors = torch.Generator().manual_seed(100 + weight_rank)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape, generator=factors) + 0.5)
    old = [layer.unit_mask().clone() for layer in model]
    engine = DSTEngine(model, _cfg(method, block_size=16, regrow_init="normal"), total_steps=100)
    engine.begin_step(10)
    for x, dy in batches:
        model(x).backward(dy)
    engine.end_step(10)
    return [(before, layer.unit_mask().clone(), layer.dense_weight().detach().clone())
            for before, layer in zip(old, model)]


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + rank)
    return torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:  # SET: own weights (rank 0's decision wins); RigL: the same weights, own micro-batch (the sum decides)
        torch.save({"set": _two_layer_update("set", rank, [_rank_batch(rank)]),
                    "rigl": _two_layer_update("rigl", 0, [_rank_batch(rank)])}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_install_rank_zeros_decision_and_rigl_ranks_by_the_gradient_summed_over_ranks(tmp_path):
    """Two gloo ranks spawned from this process (its sys.path and environment: the same package). SET with different
    weights per rank: both install what rank 0 alone decides, its grown units at the same regrown values. RigL with
    a different micro-batch per rank: both install what one process seeing both micro-batches decides."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")  # a fork of a process whose thread pools hold locks can hang
    procs = [ctx.Process(target=_rank_main, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    batches = [_rank_batch(0), _rank_batch(1)]
    expected = {"set": _two_layer_update("set", 0, batches[:1]), "rigl": _two_layer_update("rigl", 0, batches)}
    alone = {"set": _two_layer_update("set", 1, batches[1:]), "rigl": _two_layer_update("rigl", 0, batches[:1])}
    for method in ("set", "rigl"):
        for layer, ((old, mask, weight), (_, alone_mask, _)) in enumerate(zip(expected[method], alone[method])):
            assert not torch.equal(mask, alone_mask), f"{method} layer {layer}: the ranks would disagree alone"
            b = 16 if layer == 0 else 1
            grown, dead = ((m.repeat_interleave(b, 0).repeat_interleave(b, 1)) for m in (mask & ~old, ~mask))
            for rank in (0, 1):
                _, got_mask, got_weight = ranks[rank][method][layer]
                assert torch.equal(got_mask, mask), f"{method} layer {layer} rank {rank}"
                if rank == 0 or method == "rigl":
                    torch.testing.assert_close(got_weight, weight, rtol=0, atol=0)
                else:  # rank 1's SET weights are its own, except the regrown values and the zeros
                    assert torch.equal(got_weight[grown], weight[grown])
                    assert torch.count_nonzero(got_weight[dead]) == 0


def test_stats_of_a_one_unit_layer_and_at_a_given_step():
    """A layer with one live unit replaced at an update changed all of it; stats(step) reports that step's rate."""
    layer = sparse_linear(2, 1, 1, torch.tensor([[True, False]]), std=0.1)
    cfg = SparsityConfig(density=0.5, method="set", update_frequency=10, prune_rate=0.9, prune_rate_decay="cosine",
                         stop_fraction=1.0)
    engine = DSTEngine(nn.Sequential(layer), cfg, total_steps=100)
    stats = engine.end_step(10)
    assert layer.unit_mask().tolist() == [[False, True]] and stats["changed_fraction"] == 1.0
    assert engine.stats(30)["prune_rate"] == pytest.approx(prune_rate_at(30, 0.9, 100, "cosine"))
    assert engine.stats()["prune_rate"] == pytest.approx(prune_rate_at(10, 0.9, 100, "cosine"))
