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


def prune_rate_at(step: int, prune_rate: float, stop_step: int, decay: str) -> float:
    """Fraction of live units to replace at `step`: prune_rate decayed to 0 at `stop_step` (RigL's cosine
    schedule: prune_rate x (1 + cos(pi x step / stop_step)) / 2)."""
    if step >= stop_step:
        return 0.0
    t = step / stop_step
    if decay == "cosine":
        return prune_rate * 0.5 * (1.0 + math.cos(math.pi * t))
    if decay == "linear":
        return prune_rate * (1.0 - t)
    return prune_rate


def _lowest(values: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k smallest `values` among `candidates` (k <= number of candidates). topk, not a
    full sort: O(units) per layer; ties are broken by torch.topk, deterministic for a given input and device
    (and rank 0's decision is broadcast, so ranks never disagree)."""
    flat = torch.where(candidates.flatten(), values.flatten().float(), torch.tensor(math.inf))
    return torch.topk(flat, k, largest=False, sorted=False).indices


def drop_grow(mask: torch.Tensor, magnitude: torch.Tensor, grow_score: torch.Tensor, n: int) -> torch.Tensor:
    """One update: drop the n live units of smallest `magnitude`, grow the n dead units (dead *before* the update,
    so a just-dropped unit is never regrown) of largest `grow_score`. Keeps the live count exactly.
    Returns the new bool mask (same shape and device as `mask`)."""
    n = min(n, int(mask.sum()), int((~mask).sum()))
    new = mask.clone()
    if n <= 0:
        return new
    flat = new.view(-1)
    flat[_lowest(magnitude, mask, n).to(mask.device)] = False
    flat[_lowest(-grow_score, ~mask, n).to(mask.device)] = True
    return new
