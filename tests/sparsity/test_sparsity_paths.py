"""Path-aware block topology: no live block on a dead gradient path at initialisation and after many SET/RigL
updates, on every preset shape (masks only, no weights), with exact per-layer counts; the dead-path count equals
the live weights whose gradient is exactly zero; every live block of a small model trains after updates; regrowth
at small normal values."""
import math

import pytest
import torch
from torch import nn

from sparse_dc.model import ModelConfig, build_model
from sparse_dc.model.build import model_shape, sparse_layers
from sparse_dc.model.config import PRESETS
from sparse_dc.sparsity import DSTEngine, SparseLinear, SparsityConfig, optimizer_state, sparse_linear
from sparse_dc.sparsity.distribution import allocate
from sparse_dc.sparsity.paths import PathAwareUpdate, dead_path_warning, initial_masks, parse_projection
from sparse_dc.sparsity.topology import random_mask, unit_generator

SIZES = [p for p in PRESETS if p != "tiny"]  # 20m .. 3b84
BLOCKS = (16, 32, 64, 128)
DENSITIES = (0.5, 0.25, 0.125, 0.0625)


def preset_masks(preset: str, block: int, density: float, seed: int, topology: str = "path_aware"):
    """One transformer block of a preset (every block has the same shapes): (shape, {kind: spec}, counts, masks)."""
    sparsity = SparsityConfig(density=density, block_size=block, seed=seed, block_topology=topology)
    sparsity.validate()
    shape = model_shape(ModelConfig(preset=preset, n_layers=1), sparsity)
    specs = sparse_layers(shape, sparsity)
    counts = allocate(specs, sparsity)
    masks = initial_masks(specs, counts, shape.n_heads, shape.hidden_size, sparsity)
    return shape, {s.name: s for s in specs}, counts, masks


def blocks_on_dead_paths(masks: dict[str, torch.Tensor], hidden: int, n_heads: int, b: int) -> int:
    """Oracle, block by block: a live block is on a dead path when a partner line it needs is empty (SwiGLU:
    gate/up rows and the down column of its group; v row <-> o column; q/k: the other's row and an open value
    line somewhere in one of the block's heads). Written without sparse_dc.sparsity.paths."""
    m = {name.rsplit(".", 1)[1]: mask for name, mask in masks.items()}
    rows = {k: m[k].any(1) for k in ("q", "k", "v", "gate", "up")}
    cols = {k: m[k].any(0) for k in ("o", "down")}
    head_dim, lines = hidden // n_heads, hidden // b
    value = rows["v"] & cols["o"]

    def heads(line):
        return {f // head_dim for f in range(line * b, (line + 1) * b)}

    live_heads = {h for r in range(lines) if value[r] for h in heads(r)}
    scored = torch.tensor([bool(heads(r) & live_heads) for r in range(lines)])
    need = {"v": lambda r, c: cols["o"][r], "o": lambda r, c: rows["v"][c],
            "q": lambda r, c: rows["k"][r] & scored[r], "k": lambda r, c: rows["q"][r] & scored[r],
            "gate": lambda r, c: rows["up"][r] & cols["down"][r], "up": lambda r, c: rows["gate"][r] & cols["down"][r],
            "down": lambda r, c: rows["gate"][c] & rows["up"][c]}
    dead = 0
    for kind, mask in m.items():
        r, c = mask.nonzero(as_tuple=True)
        dead += int((~need[kind](r, c)).sum())
    return dead


def simulate_updates(masks, method: str, updates: int, seed: int) -> dict[str, torch.Tensor]:
    """`updates` path-aware updates on masks alone (random magnitudes; SET: uniform grow scores, RigL: |normal|
    ones), through the same PathAwareUpdate the DST engine uses, prune rate 0.3."""
    gen = torch.Generator().manual_seed(seed)
    sites = {name: parse_projection(name) for name in masks}
    for _ in range(updates):
        plan = PathAwareUpdate(sites)
        for name, old in list(masks.items()):
            magnitude = torch.rand(old.shape, generator=gen)
            score = torch.rand(old.shape, generator=gen) if method == "set" else torch.randn(old.shape,
                                                                                              generator=gen).abs()
            new, grown = plan.decide(name, old, magnitude, score, round(0.3 * int(old.sum())),
                                     regrow_dropped=method == "set")  # SET: the paper's dead_after_drop too
            assert bool((grown <= new).all()) and bool((new & ~old <= grown).all())
            plan.record(name, old, new, grown)
            masks[name] = new
    return masks


@pytest.mark.parametrize("preset", SIZES)
def test_initial_topology_puts_every_live_block_on_a_live_path(preset):
    for block in BLOCKS:
        for density in DENSITIES:
            for seed in (0, 1):
                shape, specs, counts, masks = preset_masks(preset, block, density, seed)
                assert {n: int(m.sum()) for n, m in masks.items()} == counts  # allocate's exact counts
                assert blocks_on_dead_paths(masks, shape.hidden_size, shape.n_heads, block) == 0, \
                    (preset, block, density, seed)


def test_independent_masks_do_put_blocks_on_dead_paths():
    """The oracle can fail: the independent draw (kept for comparison) leaves blocks on dead paths."""
    shape, _, _, masks = preset_masks("120m", 64, 0.0625, 0, topology="independent")
    assert blocks_on_dead_paths(masks, shape.hidden_size, shape.n_heads, 64) > 0


def test_independent_topology_is_the_per_layer_uniform_draw():
    _, specs, counts, masks = preset_masks("20m", 64, 0.25, 3, topology="independent")
    for index, (name, spec) in enumerate(specs.items()):
        expected = random_mask(spec.out_features // 64, spec.in_features // 64, counts[name],
                               unit_generator(3, 0, index))
        assert torch.equal(masks[name], expected), name


# Every preset, every block size, every density with every block size, three seeds; large shapes at large blocks
# only (at most ~6K blocks per layer, so 700 masked top-k updates per case stay fast).
UPDATE_SHAPES = [("20m", 16), ("20m", 32), ("20m", 64), ("20m", 128), ("40m", 16), ("40m", 32), ("60m", 16),
                 ("60m", 64), ("120m", 32), ("120m", 128), ("240m", 64), ("480m", 128), ("960m", 64),
                 ("960m", 128), ("1b92", 128), ("3b84", 64)]
UPDATE_CASES = [(p, b, DENSITIES[i % 4], i % 3) for i, (p, b) in enumerate(UPDATE_SHAPES)]


@pytest.mark.parametrize("preset,block,density,seed", UPDATE_CASES)
def test_fifty_set_and_fifty_rigl_updates_keep_every_block_on_a_live_path(preset, block, density, seed):
    shape, _, counts, masks = preset_masks(preset, block, density, seed)
    for method in ("set", "rigl"):
        masks = simulate_updates(masks, method, 50, seed)
        assert {n: int(m.sum()) for n, m in masks.items()} == counts
        assert blocks_on_dead_paths(masks, shape.hidden_size, shape.n_heads, block) == 0, method


def test_updates_move_single_block_lines():
    """At one block per line a line swaps its block for another of the same line (the topology is not frozen),
    and never two partners of one family in the same update."""
    _, _, _, masks = preset_masks("120m", 64, 0.0625, 0)  # 30 of 40 SwiGLU lines open, one block each
    before = {n: m.clone() for n, m in masks.items()}
    sites = {name: parse_projection(name) for name in masks}
    plan = PathAwareUpdate(sites)
    gen = torch.Generator().manual_seed(0)
    replaced = {}
    for name, old in before.items():
        new, grown = plan.decide(name, old, torch.rand(old.shape, generator=gen),
                                 torch.rand(old.shape, generator=gen), round(0.3 * int(old.sum())))
        plan.record(name, old, new, grown)
        lines = (old.any(1) & ~(old & new).any(1)) if sites[name][1] != "down" else (old.any(0) & ~(old & new).any(0))
        replaced[sites[name][1]] = lines
        assert int(new.sum()) == int(old.sum()) and not torch.equal(new, old), name
    assert replaced["gate"].any() and replaced["up"].any() and replaced["down"].any()
    assert not (replaced["gate"] & replaced["up"]).any() and not (replaced["down"] & (replaced["gate"]
                                                                                      | replaced["up"])).any()


# --- small real models -----------------------------------------------------------------------------------
def small_model(block: int, density: float, method: str, topology: str = "path_aware", regrow: str = "zero",
                hidden: int = 96, heads: int = 2, ffn: int = 192, **kw):
    sparsity = SparsityConfig(density=density, block_size=block, method=method, block_topology=topology,
                              regrow_init=regrow, update_frequency=2, prune_rate=0.5, prune_rate_decay="constant",
                              stop_fraction=1.0, **kw)
    sparsity.validate()
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=hidden, n_heads=heads, intermediate_size=ffn, n_layers=2),
                        sparsity, vocab_size=64)
    return model, sparsity


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def zero_grad_live_params(model: nn.Module, seed: int = 123) -> tuple[int, int]:
    """(live weights of the sparse layers whose gradient is exactly 0, live blocks/entries with an all-zero
    gradient) on one random batch."""
    model.zero_grad()
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    lm_loss(model, tokens).backward()
    params = units = 0
    for layer in model.modules():
        if isinstance(layer, SparseLinear):
            grad = layer.param.grad
            if layer.block_size == 1:
                params += int(((grad == 0) & layer.mask).sum())
                units += int(((grad == 0) & layer.mask).sum())
            else:
                params += int((grad == 0).sum())
                units += int((grad.abs().sum((1, 2)) == 0).sum())
    return params, units


@pytest.mark.parametrize("block,hidden,heads,ffn,density", [(1, 32, 2, 64, 0.0625), (16, 64, 4, 128, 0.0625),
                                                             (32, 96, 2, 192, 0.125)])
def test_dead_path_params_are_exactly_the_live_weights_without_gradient(block, hidden, heads, ffn, density):
    """Oracle: autograd. Independent masks at a low density leave live weights on dead paths (32x32 blocks over
    heads of 48 also split a block between a live and a dead head); the engine's count equals the number of
    live weights whose gradient is exactly zero."""
    model, sparsity = small_model(block, density, "set", "independent", hidden=hidden, heads=heads, ffn=ffn)
    engine = DSTEngine(model, sparsity, total_steps=10, active_params=1000)
    zero_params, _ = zero_grad_live_params(model)
    assert zero_params > 0
    stats = engine.stats()
    assert stats["dead_path_params"] == zero_params
    live = sum(layer.active_numel for layer in engine.layers.values())  # active_params scaled by the live share
    assert stats["effective_active_params"] == round(1000 * (live - zero_params) / live)


def train_with_updates(model, sparsity, steps: int) -> DSTEngine:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = DSTEngine(model, sparsity, total_steps=steps + 1, state=optimizer_state(opt))
    data = torch.randint(0, 64, (steps + 1, 4, 12), generator=torch.Generator().manual_seed(1))
    for step in range(1, steps + 1):
        engine.begin_step(step)
        opt.zero_grad()
        lm_loss(model, data[step]).backward()
        opt.step()
        engine.end_step(step)
    return engine


@pytest.mark.parametrize("method,candidates", [("set", "dead_before_drop"), ("rigl", "dead_before_drop"),
                                              ("set", "dead_after_drop")])
@pytest.mark.parametrize("block,hidden,heads,ffn,density", [(16, 64, 4, 128, 0.0625), (32, 96, 2, 192, 0.125)])
def test_every_live_block_trains_after_updates(method, candidates, block, hidden, heads, ffn, density):
    """6 updates (prune rate 0.5), then one more training step: no live block has an all-zero gradient, where
    the independent topology under the same schedule has some. dead_after_drop (just-dropped blocks may grow back,
    restarting at zero) exercises the family lock with regrown blocks that were live before."""
    zero_blocks = {}
    for topology in ("path_aware", "independent"):
        model, sparsity = small_model(block, density, method, topology, hidden=hidden, heads=heads, ffn=ffn,
                                      grow_candidates=candidates)
        engine = train_with_updates(model, sparsity, 13)  # updates at 2, 4, ..., 12; step 13 trains
        assert engine.last_update_step == 12 and engine.stats()["ever_active_fraction"] > engine.stats()["density"]
        zero_blocks[topology] = zero_grad_live_params(model)[1]
        if topology == "path_aware":
            assert engine.stats()["dead_path_params"] == 0
    assert zero_blocks["path_aware"] == 0 and zero_blocks["independent"] > 0, zero_blocks


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_with_normal_regrowth_every_live_block_has_a_gradient_right_after_an_update(method):
    model, sparsity = small_model(32, 0.125, method, regrow="normal")
    engine = train_with_updates(model, sparsity, 12)  # the last step is an update
    assert engine.last_update_step == 12
    assert zero_grad_live_params(model)[1] == 0


@pytest.mark.parametrize("block", [1, 32])
def test_normal_regrowth_values(block):
    """Grown units get N(0, (scale x init std)^2) values from a keyed generator (same seed: same values),
    dropped entries and every reset moment are zero."""
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        b = block
        mask = random_mask(256 // b, 128 // b, (256 // b) * (128 // b) // 2, torch.Generator().manual_seed(0))
        model = nn.Sequential(sparse_linear(128, 256, b, mask, std=0.5))
        cfg = SparsityConfig(density=0.5, block_size=b, method="set", update_frequency=1, prune_rate=0.5,
                             prune_rate_decay="constant", stop_fraction=1.0, regrow_init="normal",
                             regrow_init_scale=0.2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model[0](torch.randn(4, 128)).sum().backward()
        opt.step()
        engine = DSTEngine(model, cfg, total_steps=10, state=optimizer_state(opt))
        old = model[0].unit_mask().clone()
        engine.end_step(1)
        layers.append((model[0], old, opt))
    (layer, old, opt), (twin, _, _) = layers
    assert torch.equal(layer.param, twin.param)
    new = layer.unit_mask()
    grown = (new & ~old).repeat_interleave(block, 0).repeat_interleave(block, 1)
    weight = layer.dense_weight().detach()
    values = weight[grown]
    assert values.numel() > 1000 and bool((values != 0).all())
    assert values.std().item() == pytest.approx(0.2 * 0.5, rel=0.1) and abs(values.mean().item()) < 0.01
    state = opt.state[layer.param]
    moments = [state[k] for k in ("exp_avg", "exp_avg_sq")]
    if block == 1:
        assert int(weight[old & ~new].count_nonzero()) == 0  # dropped entries
        assert all(int(m[old ^ new].count_nonzero()) == 0 for m in moments)
    else:
        slots = (layer.values.detach() - 0).abs().sum((1, 2)) < 10 * 0.1 * block  # grown slots: small values
        assert all(int(m[slots].count_nonzero()) == 0 for m in moments)


def test_dead_path_warning():
    assert dead_path_warning({"step": 0, "dead_path_params": 4, "effective_active_params": 95}, 100) is None
    line = dead_path_warning({"step": 5, "dead_path_params": 6, "effective_active_params": 94}, 100)
    assert line.startswith("WARNING: step 5: effective_active_params=94 is 94.0% of active_params=100: 6 live")
    assert "\n" not in line
    assert dead_path_warning({"step": 5, "dead_path_params": 6}, 100) is None  # no active count known


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="block_topology='coupled': expected 'path_aware' or 'independent'"):
        SparsityConfig(block_topology="coupled").validate()
    with pytest.raises(ValueError, match="regrow_init_scale=0.0: expected a number > 0"):
        SparsityConfig(regrow_init_scale=0.0).validate()
    assert SparsityConfig.from_dict({"regrow_init": "normal"}).regrow_init == "normal"
    assert SparsityConfig().block_topology == "path_aware" and SparsityConfig().regrow_init == "zero"


@pytest.mark.parametrize("block,topology,path_aware_layers", [(32, "path_aware", 14), (32, "independent", 0),
                                                              (1, "path_aware", 0)])
def test_only_path_aware_block_runs_update_along_paths(block, topology, path_aware_layers):
    """The engine takes path-aware decisions for every Llama projection of a path-aware block run (2 blocks x 7),
    and for none of an independent-block or unstructured (B = 1) run, whatever block_topology says."""
    model, sparsity = small_model(block, 0.25, "set", topology)
    engine = DSTEngine(model, sparsity, total_steps=10)
    assert len(engine.sites) == path_aware_layers and len(engine.layers) == 14


@pytest.mark.parametrize("candidates", ["dead_after_drop", "dead_before_drop"])
def test_path_aware_updates_follow_the_runs_grow_candidates(monkeypatch, candidates):
    """dead_after_drop lets a just-dropped block grow back in a path-aware update too, as in an independent one."""
    seen = []
    real = PathAwareUpdate.decide

    def recording(self, name, mask, magnitude, grow_score, n, regrow_dropped=False):
        seen.append(regrow_dropped)
        return real(self, name, mask, magnitude, grow_score, n, regrow_dropped)

    monkeypatch.setattr(PathAwareUpdate, "decide", recording)
    model, sparsity = small_model(32, 0.25, "set", grow_candidates=candidates)
    DSTEngine(model, sparsity, total_steps=10).update(2)
    assert seen == [candidates == "dead_after_drop"] * 14
