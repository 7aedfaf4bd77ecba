"""Initial per-layer densities: uniform, ERK and attention/MLP ratio, all solved so the global count is exact.

Every distribution is "density_l = eps x raw_l, capped at 1": uniform has raw_l = 1, ERK raw_l =
((in + out) / (in x out)) ** power_scale (RigL, Evci et al. 2020, `sparse_utils.get_mask_random`), am_ratio
raw_l = am_ratio for attention projections and 1 for MLP ones. Layers whose density would exceed 1 become dense
and eps is re-solved over the rest, so the *global* density stays exact. Counts are in units (entries for B = 1,
B x B blocks otherwise); fractional counts are rounded by largest remainder so that
sum(units_l) == round(density x total units) exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sparse_dc.sparsity.config import SparsityConfig

_ATTENTION = ("q", "k", "v", "o")


@dataclass(frozen=True)
class LayerSpec:
    """A sparse projection: module name, kind (q, k, ..., down), out and in features."""

    name: str
    kind: str
    out_features: int
    in_features: int

    def units(self, block_size: int) -> int:
        return (self.out_features // block_size) * (self.in_features // block_size)


def raw_weights(layers: list[LayerSpec], cfg: SparsityConfig) -> list[float]:
    if cfg.distribution == "uniform":
        return [1.0] * len(layers)
    if cfg.distribution == "erk":
        return [((s.in_features + s.out_features) / (s.in_features * s.out_features)) ** cfg.erk_power_scale
                for s in layers]
    return [cfg.am_ratio if s.kind in _ATTENTION else 1.0 for s in layers]


def solve_densities(units: list[int], raw: list[float], density: float) -> list[float]:
    """Densities d_l = min(1, eps x raw_l) with sum(d_l x units_l) == density x sum(units_l)."""
    target = density * sum(units)
    dense: set[int] = set()
    while True:
        budget = target - sum(units[i] for i in dense)
        free = [i for i in range(len(units)) if i not in dense]
        if not free:
            return [1.0] * len(units)
        eps = budget / sum(raw[i] * units[i] for i in free)
        over = {i for i in free if eps * raw[i] > 1.0 + 1e-12}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(units))]
        dense |= over


def allocate(layers: list[LayerSpec], cfg: SparsityConfig) -> dict[str, int]:
    """Live units per layer (>= 1 each); their sum is exactly round(density x total units)."""
    units = [s.units(cfg.block_size) for s in layers]
    densities = solve_densities(units, raw_weights(layers, cfg), cfg.density)
    ideal = [d * u for d, u in zip(densities, units)]
    counts = [min(u, max(1, math.floor(x))) for x, u in zip(ideal, units)]
    total = min(sum(units), max(len(units), round(cfg.density * sum(units))))
    # largest remainder: give the missing units to the layers that lost the most to flooring (ties: model order)
    order = sorted(range(len(units)), key=lambda i: (-(ideal[i] - counts[i]), i))
    i = 0
    while sum(counts) < total:
        j = order[i % len(order)]
        if counts[j] < units[j]:
            counts[j] += 1
        i += 1
    return {s.name: c for s, c in zip(layers, counts)}
