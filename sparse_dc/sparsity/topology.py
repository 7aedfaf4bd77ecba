"""Pure topology decisions: random initial masks, the prune-rate schedule, and one drop/grow update of a mask.

Units are entries (B = 1) or blocks. All functions are deterministic given their inputs and the seed, so every
rank that calls them with the same (replicated) inputs decides the same topology.
"""
from __future__ import annotations

import math

import torch


def unit_generator(seed: int, step: int, layer: int) -> torch.Generator:
    """A CPU generator keyed by (seed, step, layer index): the RNG is a pure function of checkpointed integers,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + layer)


def random_mask(rows: int, cols: int, active: int, generator: torch.Generator) -> torch.Tensor:
    """bool [rows, cols] with exactly `active` True units chosen uniformly at random."""
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols, generator=generator)[:active]] = True
    return mask.view(rows, cols)


def prune_rate_at(step: int, prune_rate: float, stop_step: int, decay: str, floor: float = 0.0) -> float:
    """Fraction of live units to replace at `step`: prune_rate decayed to `floor` at `stop_step` (RigL's cosine
    schedule: floor + (prune_rate - floor) x (1 + cos(pi x step / stop_step)) / 2). With floor = 0 updates stop at
    `stop_step`; with a floor the rate stays there from `stop_step` on (the paper's code decays over all steps
    with a floor of 0.005: torch's CosineAnnealingLR(T_max = total steps, eta_min = 0.005), stepped once per
    optimizer step before the update)."""
    if step >= stop_step:
        return floor
    t = step / stop_step
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    elif decay == "linear":
        shape = 1.0 - t
    else:
        shape = 1.0
    return floor + (prune_rate - floor) * shape


def _lowest(values: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k smallest `values` among `candidates` (k <= number of candidates). topk, not a
    full sort: O(units) per layer; ties are broken by torch.topk, deterministic for a given input and device
    (and rank 0's decision is broadcast, so ranks never disagree)."""
    flat = torch.where(candidates.flatten(), values.flatten().float(), torch.tensor(math.inf))
    return torch.topk(flat, k, largest=False, sorted=False).indices


def drop_grow(mask: torch.Tensor, magnitude: torch.Tensor, grow_score: torch.Tensor, n: int,
              regrow_dropped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One update: drop the n live units of smallest `magnitude`, grow n dead units of largest `grow_score`.
    Candidates for growth are the units dead before the update (`regrow_dropped=False`: a just-dropped unit never
    comes back in the same update) or every unit dead after the drop (`regrow_dropped=True`: RigL's and the paper
    code's rule, where a just-dropped unit competes with the others and, if grown, restarts at 0 like any grown
    unit). Keeps the live count exactly. Returns (new mask, grown units), bool, same shape and device as `mask`."""
    live, dead = int(mask.sum()), int((~mask).sum())
    n = min(n, live if regrow_dropped else min(live, dead))
    new = mask.clone()
    grown = torch.zeros_like(mask)
    if n <= 0:
        return new, grown
    flat = new.view(-1)
    flat[_lowest(magnitude, mask, n).to(mask.device)] = False
    candidates = ~new if regrow_dropped else ~mask
    grown.view(-1)[_lowest(-grow_score, candidates, n).to(mask.device)] = True
    new |= grown
    return new, grown
