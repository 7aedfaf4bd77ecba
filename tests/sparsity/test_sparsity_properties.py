"""Property tests of the topology decisions, against oracles written here: drop/grow keeps the live count and
replaces exactly the n smallest-magnitude live units by the n best-scoring candidates; random masks have the asked
number of live units; the prune-rate schedule is its formula; the RNG key is a pure function of its integers."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dc.sparsity.topology import drop_grow, prune_rate_at, random_mask, unit_generator

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def topologies(draw):
    """(mask, magnitude, grow_score, n): distinct magnitudes and scores, so the right answer is unique."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    units = rows * cols
    live = draw(st.integers(0, units))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(units, dtype=torch.bool)
    mask[torch.randperm(units, generator=g)[:live]] = True
    magnitude = (torch.randperm(units, generator=g).float() + 1) * mask  # 0 at dead units, as the layer gives them
    score = torch.randperm(units, generator=g).float()
    return mask.view(rows, cols), magnitude.view(rows, cols), score.view(rows, cols), draw(st.integers(0, units + 2))


@PROPERTY
@given(case=topologies(), regrow=st.booleans())
def test_drop_grow_keeps_the_count_and_swaps_the_right_units(case, regrow):
    mask, magnitude, score, n = case
    live, dead = int(mask.sum()), int((~mask).sum())
    new, grown = drop_grow(mask, magnitude, score, n, regrow_dropped=regrow)
    assert new.dtype == grown.dtype == torch.bool and new.shape == grown.shape == mask.shape
    assert int(new.sum()) == live  # the live count never changes
    k = min(n, live) if regrow else min(n, live, dead)
    # oracle: the k live units of smallest magnitude go ...
    live_units = sorted(mask.flatten().nonzero().flatten().tolist(), key=lambda u: magnitude.flatten()[u].item())
    dropped = set(live_units[:k])
    # ... and the k best-scoring candidates (dead before the update, or also just dropped) come in
    candidates = [u for u in range(mask.numel()) if not mask.flatten()[u] or (regrow and u in dropped)]
    best = set(sorted(candidates, key=lambda u: -score.flatten()[u].item())[:k])
    assert set(grown.flatten().nonzero().flatten().tolist()) == best
    expect = mask.flatten().clone()
    expect[list(dropped)] = False
    expect[list(best)] = True
    assert torch.equal(new.flatten(), expect)
    assert int(grown.sum()) == k  # a dropped unit grown back (regrow) counts as grown: it restarts at 0
    assert torch.equal(mask, case[0])  # the input mask is not modified
    if not regrow:  # the default: units dead before the update are the only candidates
        default = drop_grow(mask, magnitude, score, n)
        assert torch.equal(default[0], new) and torch.equal(default[1], grown)


@PROPERTY
@given(rows=st.integers(1, 8), cols=st.integers(1, 8), fraction=st.floats(0, 1), seed=st.integers(0, 2 ** 16))
def test_random_masks_have_exactly_the_asked_live_units(rows, cols, fraction, seed):
    active = round(fraction * rows * cols)
    mask = random_mask(rows, cols, active, unit_generator(seed, 0, 0))
    assert mask.shape == (rows, cols) and mask.dtype == torch.bool and int(mask.sum()) == active
    again = random_mask(rows, cols, active, unit_generator(seed, 0, 0))
    assert torch.equal(mask, again)  # a pure function of the generator's key


@PROPERTY
@given(step=st.integers(0, 300), stop=st.integers(1, 200), rate=st.floats(0, 1), floor=st.sampled_from([0.0, 0.005]),
       decay=st.sampled_from(["cosine", "linear", "constant"]))
def test_prune_rate_is_its_formula(step, stop, rate, floor, decay):
    t = step / stop
    shape = {"cosine": (1 + math.cos(math.pi * t)) / 2, "linear": 1 - t, "constant": 1.0}[decay]
    want = floor if step >= stop else floor + (rate - floor) * shape
    assert prune_rate_at(step, rate, stop, decay, floor) == pytest.approx(want, abs=1e-12)


def test_generator_keys_are_distinct_and_reproducible():
    draws = {}
    for seed in (0, 1):
        for step in (0, 1, 2):
            for layer in (0, 1, 2):
                draws[seed, step, layer] = torch.randint(0, 2 ** 30, (4,), generator=unit_generator(seed, step, layer))
    assert len({tuple(v.tolist()) for v in draws.values()}) == len(draws)
    assert torch.equal(draws[1, 2, 0], torch.randint(0, 2 ** 30, (4,), generator=unit_generator(1, 2, 0)))
    # the key itself, so that checkpoints written by earlier versions keep drawing the same topologies
    assert unit_generator(3, 5, 7).initial_seed() == (3 * 1_000_003 + 5) * 10_007 + 7
