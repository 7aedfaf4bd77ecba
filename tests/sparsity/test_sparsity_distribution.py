"""Initial density distributions: ERK on a hand-solved case, capping + re-solve, am_ratio, exact global counts."""
import pytest

from sparse_dc.sparsity.config import SparsityConfig
from sparse_dc.sparsity.distribution import LayerSpec, allocate, solve_densities

# A: 10x10 -> ERK raw (10+10)/100 = 0.2;  B: 100 out x 10 in -> raw 110/1000 = 0.11
LAYERS = [LayerSpec("a", "q", 10, 10), LayerSpec("b", "up", 100, 10)]


def test_erk_known_case():
    # density 0.5: eps (0.2 * 100 + 0.11 * 1000) = 550 -> eps = 550 / 130; dA = 0.8462, dB = 0.4654
    d = solve_densities([100, 1000], [0.2, 0.11], 0.5)
    assert d == pytest.approx([0.2 * 550 / 130, 0.11 * 550 / 130])
    # 84.6 + 465.4 -> floors 84 + 465 = 549; the larger remainder (a: .62) gets the last unit
    assert allocate(LAYERS, SparsityConfig(density=0.5, distribution="erk")) == {"a": 85, "b": 465}


def test_erk_caps_dense_layers_and_resolves_the_rest():
    # density 0.8: eps = 880 / 130 -> dA = 1.35 > 1, so A is dense (100) and B takes the remaining 780 units
    assert allocate(LAYERS, SparsityConfig(density=0.8, distribution="erk")) == {"a": 100, "b": 780}


def test_erk_power_scale_zero_is_uniform():
    cfg = SparsityConfig(density=0.3, distribution="erk", erk_power_scale=0.0)
    assert allocate(LAYERS, cfg) == allocate(LAYERS, SparsityConfig(density=0.3)) == {"a": 30, "b": 300}


def test_am_ratio():
    cfg = SparsityConfig(density=0.5, distribution="am_ratio", am_ratio=0.5)
    # attention density = 0.5 x MLP density: 0.5 dm 100 + dm 1000 = 550 -> dm = 0.5238, da = 0.2619
    assert allocate(LAYERS, cfg) == {"a": 26, "b": 524}
    counts = allocate(LAYERS, SparsityConfig(density=0.95, distribution="am_ratio", am_ratio=3.0))
    assert counts == {"a": 100, "b": 945}  # attention capped dense, MLP re-solved; global still exact


@pytest.mark.parametrize("distribution", ["uniform", "erk", "am_ratio"])
@pytest.mark.parametrize("density", [0.0625, 0.125, 0.37, 1.0])
def test_global_count_exact(distribution, density):
    layers = [LayerSpec(f"l{i}", k, o, n) for i, (k, o, n) in
              enumerate([("q", 64, 64), ("o", 64, 64), ("up", 176, 64), ("down", 64, 176), ("gate", 176, 64)])]
    cfg = SparsityConfig(density=density, distribution=distribution, am_ratio=0.7)
    counts = allocate(layers, cfg)
    total = sum(s.units(1) for s in layers)
    assert sum(counts.values()) == round(density * total)
    assert all(1 <= counts[s.name] <= s.units(1) for s in layers)
