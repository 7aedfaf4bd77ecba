"""The paper recipe's DST rows against the official formulas, each computed here independently of sparse-dc:

- the prune-rate schedule: the official code's torch CosineAnnealingLR(T_max = T, eta_min = 0.005) stepped once per
  optimizer step, and the rates its run printed (reference: official-behaviour measurements, T = 30);
- regrowth among the units dead after the drop: a just-dropped unit can come back, restarting at 0 with zeroed
  moments (RigL's and the official rule); the default never regrows it;
- AdamDST's update sizes over the 20 steps after regrowth: the official optimizer's recurrence written out per
  weight (step restarted at 5, first moment scaled by min(step / 20, 1) every step), against plain Adam whose
  global step continues (`regrow_optimizer: reset`).
"""
import math

import pytest
import torch
from torch import nn

from sparse_dc.config.base import ConfigError
from sparse_dc.sparsity import AdamDST, DSTEngine, SparseLinear, SparsityConfig, optimizer_state, sparse_linear
from sparse_dc.sparsity.adamdst import ELEMENT_STEP
from sparse_dc.sparsity.topology import drop_grow, random_mask, unit_generator

PAPER = dict(method="set", update_frequency=5, prune_rate=0.1, prune_rate_decay="cosine", min_prune_rate=0.005,
             stop_fraction=1.0, grow_candidates="dead_after_drop")


def test_prune_rate_follows_the_official_cosine_annealing_to_its_floor_over_all_steps():
    total = 30
    engine = DSTEngine(nn.Sequential(), SparsityConfig(density=0.25, **PAPER), total_steps=total)
    # the official CosineDecay: an SGD "lr" annealed by torch's scheduler, stepped before each update check
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=total, eta_min=0.005)
    official = {}
    for step in range(1, total + 1):
        sgd.step()  # (no gradient: a no-op that keeps torch's scheduler-order check quiet)
        annealing.step()
        official[step] = sgd.param_groups[0]["lr"]
    for step in range(1, total + 1):
        assert engine.prune_rate(step) == pytest.approx(official[step], abs=1e-12), step
    # what the official run printed at its updates (every 5 steps of 30)
    printed = [0.09364, 0.07625, 0.05250, 0.02875, 0.01136, 0.00500]
    assert [round(engine.prune_rate(s), 5) for s in range(5, 31, 5)] == printed
    engine.layers = {"x": None}  # is_update_step needs a sparse layer; never stops: the last step updates too
    assert engine.is_update_step(total) and engine.prune_rate(total) == 0.005
    # the default schedule is unchanged: RigL's cosine to 0, updates stop at 75% of the steps
    default = DSTEngine(nn.Sequential(), SparsityConfig(density=0.25, update_frequency=5), total_steps=total)
    assert default.prune_rate(21) > 0 and default.prune_rate(22) == 0.0  # stop step int(0.75 x 30)


@pytest.mark.parametrize("kw, message", [
    (dict(min_prune_rate=0.005), "stop_fraction=0.75: expected 1.0 with min_prune_rate=0.005"),
    (dict(min_prune_rate=0.2, stop_fraction=1.0), "min_prune_rate=0.2: expected a number in [0, prune_rate=0.1]"),
    (dict(grow_candidates="after"), "grow_candidates='after': expected one of"),
    (dict(regrow_optimizer="sgd"), "regrow_optimizer='sgd': expected one of"),
    (dict(method="rigl", block_size=32, grow_candidates="dead_after_drop"),
     "grow_candidates='dead_after_drop': expected 'dead_before_drop' for block RigL"),
    (dict(regrow_step=-1), "regrow_step=-1: expected an integer >= 0"),
    (dict(momentum_ramp_steps=0), "momentum_ramp_steps=0: expected an integer >= 1"),
])
def test_recipe_options_are_validated_with_one_line_errors(kw, message):
    with pytest.raises(ConfigError) as err:
        SparsityConfig.from_dict({"density": 0.5, **kw}, "sparsity").validate("sparsity")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_grow_candidates_decide_whether_a_just_dropped_unit_can_regrow():
    mask = torch.tensor([True, True, True, True, False, False])
    magnitude = torch.tensor([0.1, 0.2, 3.0, 4.0, 0.0, 0.0])
    score = torch.tensor([9.0, 8.0, 0.0, 0.0, 1.0, 2.0])  # the two just-dropped units score highest
    new, grown = drop_grow(mask, magnitude, score, 2, regrow_dropped=True)
    assert new.tolist() == mask.tolist() and grown.tolist() == [True, True, False, False, False, False]
    new, grown = drop_grow(mask, magnitude, score, 2, regrow_dropped=False)
    assert new.tolist() == [False, False, True, True, True, True] and grown.tolist() == [False] * 4 + [True] * 2


def test_a_just_dropped_unit_stays_dead_unless_asked():
    """drop_grow's default is the conservative rule (dead_before_drop); regrowing just-dropped units is opt-in."""
    mask = torch.tensor([True, True, True, True, False, False])
    magnitude = torch.tensor([0.1, 0.2, 3.0, 4.0, 0.0, 0.0])
    score = torch.tensor([9.0, 8.0, 0.0, 0.0, 1.0, 2.0])
    new, grown = drop_grow(mask, magnitude, score, 2)
    assert new.tolist() == [False, False, True, True, True, True] and grown.tolist() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("block_size", [1, 32])
def test_a_regrown_just_dropped_unit_restarts_at_zero_with_zeroed_moments(block_size):
    """SET at density 0.75 replacing half the live units: most candidates after the drop were just dropped, so some
    come back. The expected topology is computed here from SET's definition and its (seed, step, layer) draw."""
    b = block_size
    torch.manual_seed(1)
    units = (128 // b) * (64 // b)
    layer = sparse_linear(64, 128, b, random_mask(128 // b, 64 // b, units * 3 // 4, torch.Generator().manual_seed(2)),
                         std=0.1)
    model = nn.Sequential(layer)
    cfg = SparsityConfig(density=0.75, block_size=b, method="set", update_frequency=3, prune_rate=0.5,
                         prune_rate_decay="constant", stop_fraction=1.0, grow_candidates="dead_after_drop",
                         regrow_optimizer="adamdst", seed=4)
    opt = AdamDST(model.parameters(), lr=1e-2)
    engine = DSTEngine(model, cfg, total_steps=10, state=optimizer_state(opt))
    for step in (1, 2, 3):
        opt.zero_grad()
        layer(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
    old = layer.unit_mask().clone()
    magnitude = layer.unit_magnitude(layer.param.detach()).flatten()
    n = round(0.5 * int(old.sum()))
    dropped = torch.where(old.flatten(), magnitude, math.inf).argsort()[:n]
    after_drop = old.flatten().clone()
    after_drop[dropped] = False
    score = torch.rand(old.shape, generator=unit_generator(4, 3, 0)).flatten()
    grown = torch.where(~after_drop, score, -math.inf).argsort(descending=True)[:n]
    revived = [i for i in grown.tolist() if old.flatten()[i]]
    assert revived, "no just-dropped unit came back: the case does not test the rule"
    engine.end_step(3)
    expected = after_drop.clone()
    expected[grown] = True
    assert torch.equal(layer.unit_mask().flatten(), expected)
    state = opt.state[layer.param]
    for unit in grown.tolist():  # every grown unit, revived ones included: weight 0, moments 0, step restarted
        where = _unit_entries(layer, unit)
        for tensor in (layer.param.detach(), state["exp_avg"], state["exp_avg_sq"]):
            assert int(tensor[where].count_nonzero()) == 0, unit
        assert bool((state[ELEMENT_STEP][where] == 5).all()), unit
    kept = [u for u in range(units) if expected[u] and u not in set(grown.tolist())]
    assert all(bool((state[ELEMENT_STEP][_unit_entries(layer, u)] == 3).all()) for u in kept)


def _unit_entries(layer: SparseLinear, unit: int):
    """Index into the layer's parameter of unit `unit` (flat index into the unit mask)."""
    if layer.block_size == 1:
        return divmod(unit, layer.in_features)
    cols = layer.in_features // layer.block_size
    row, col = divmod(unit, cols)
    slots = layer.layout.slot[(layer.layout.row_idx == row) & (layer.layout.col_idx == col)]
    return int(slots[0])


def official_update_sizes(restart: int | None, global_step: int, steps: int = 20) -> list[float]:
    """|update| / lr of a weight regrown with zeroed moments under a constant gradient, step by step: the official
    adamdst recurrence (its step count restarted at `restart`, first moment x min(step / 20, 1) in place every
    step), or with restart=None plain Adam, whose step count is the global one."""
    beta1, beta2, m, v, out = 0.9, 0.999, 0.0, 0.0, []
    t = restart if restart is not None else global_step
    for _ in range(steps):
        t += 1
        m, v = beta1 * m + (1 - beta1), beta2 * v + (1 - beta2)
        if restart is not None:
            m *= min(t / 20, 1.0)
        out.append((m / (1 - beta1 ** t)) / math.sqrt(v / (1 - beta2 ** t)))
    return out


@pytest.mark.parametrize("regrow_optimizer", ["adamdst", "reset"])
def test_regrown_weights_move_as_the_official_optimizer_moves_them(regrow_optimizer):
    """A SET update at step 10, then 20 steps of a constant gradient G (loss = <W, G>, through the layer's own
    forward): the regrown weights' update sizes follow the official recurrence to float precision."""
    torch.manual_seed(0)
    mask = random_mask(32, 16, 256, torch.Generator().manual_seed(3))
    layer = sparse_linear(16, 32, 1, mask, std=0.1)
    model = nn.Sequential(layer)
    cfg = SparsityConfig(density=0.5, method="set", update_frequency=10, prune_rate=0.2, prune_rate_decay="constant",
                         stop_fraction=0.15, regrow_optimizer=regrow_optimizer)  # one update: step 10 of 100
    lr = 1e-3
    opt = AdamDST(model.parameters(), lr=lr, eps=1e-12) if regrow_optimizer == "adamdst" else \
        torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-12, weight_decay=0.0)
    engine = DSTEngine(model, cfg, total_steps=100, state=optimizer_state(opt))
    gradient = torch.rand(32, 16) + 0.5  # > 0 everywhere: |update| = lr x the recurrence's value

    def step(s: int) -> None:
        opt.zero_grad()
        (layer(torch.eye(16)).t() * gradient).sum().backward()  # y = I W^T, so dL/dW = G
        opt.step()
        engine.end_step(s)

    for s in range(1, 11):
        before = layer.unit_mask().clone()
        step(s)
    grown = layer.unit_mask() & ~before
    assert int(grown.sum()) == round(0.2 * 256)
    sizes = []
    for s in range(11, 31):
        w = layer.weight.detach().clone()
        step(s)
        sizes.append(((w - layer.weight.detach()).abs() / lr)[grown])
    expected = official_update_sizes(5 if regrow_optimizer == "adamdst" else None, global_step=10)
    for k, (got, want) in enumerate(zip(sizes, expected), start=1):
        torch.testing.assert_close(got, torch.full_like(got, want), rtol=2e-5, atol=0, msg=f"step {k}")
    if regrow_optimizer == "adamdst":  # the published sizes: 0.16 / 0.17 / 0.27 / 0.78 x lr at steps 1/5/10/20
        assert [round(expected[k - 1], 2) for k in (1, 5, 10, 20)] == [0.16, 0.17, 0.27, 0.78]
    else:  # plain Adam with its global step moves a regrown weight 3x as far from the first step on
        damped = official_update_sizes(5, global_step=10)
        assert all(r > 2.5 * d for r, d in zip(expected[:10], damped))


def test_adamdst_damps_every_weight_while_its_count_ramps():
    """Without DST, AdamDST is Adam whose first moment is scaled in place by min(t / 20, 1) every step: a dense
    parameter's updates follow the recurrence with the global count (the official optimizer's hidden warmup)."""
    p = nn.Parameter(torch.zeros(5))
    opt = AdamDST([p], lr=1.0, eps=1e-12)
    expected = official_update_sizes(restart=0, global_step=0, steps=25)
    for k in range(25):
        before = p.detach().clone()
        p.grad = torch.full((5,), 0.3)
        opt.step()
        torch.testing.assert_close(before - p.detach(), torch.full((5,), expected[k]), rtol=2e-5, atol=0)
    assert float(opt.state[p]["step"]) == 25 and bool((opt.state[p][ELEMENT_STEP] == 25).all())
