"""Gradient paths through a Llama block's projections: which live weights can learn, and a block topology that
keeps every live block on a live path.

A projection's weight has `lines`: output rows (q, k, v, gate, up) or input columns (o, down) that carry one
feature of the attention or SwiGLU inner dimension. A line is *open* when it holds a live unit. A feature is on a
live path only when every partner line it needs is open:

  SwiGLU feature j       gate row j, up row j and down column j   (h_j = silu(g_j) u_j: silu(0) = 0 and u = 0
                                                                    both stop it; an empty down column sees no dL/dh)
  value feature j        v row j and o column j                   (attention mixes tokens, never features)
  score feature i        q row i, k row i or i^1 (its RoPE pair),  (scores are q.k; a head whose v/o lines are all
                         and an open value feature in i's head     closed outputs 0, so dL/dscores = 0)

A live unit whose feature is not on a live path gets exactly zero gradient on every batch. Counting them is
`dead_path_params`; the DST stats' `effective_active_params` is active_params over the live sparse weights that
are on a live path only.

Path-aware topology (sparsity.block_topology=path_aware, B > 1). The unit of a line is a block row/column, B
features. Lines are coupled in families (SwiGLU: gate/up rows + down columns; value: v rows + o columns; score:
q + k rows), and within a family a line index is open in every sparse member or in none:
- Initialisation opens, per family, as many line indices as the layer budgets allow (min(lines, live blocks);
  value lines reach as many heads as they can; score lines lie in heads with an open value line), puts one
  block in each open line of each member, and draws the rest uniformly in the open lines. Per-layer live counts
  are `allocate`'s, so layer and global densities stay exact.
- A SET/RigL update keeps the set of open lines (`path_drop_grow`): drop the smallest blocks as usual, refill
  every open line the drop emptied with its best candidate block (random for SET, the highest dense-gradient score
  for RigL; candidates per sparsity.grow_candidates), grow the rest among the candidates of open lines, so drop
  and grow counts, and densities, stay exact.
  A line that holds only blocks grown at zero (regrow_init=zero) silences its partners for one step (silu(0) = 0,
  a zero v row gives o nothing) while itself receiving a non-zero gradient from them; two such partners would be
  a saddle no gradient leaves. So, within one update, a line index emptied and refilled in one member of a family
  is locked in the members that follow (in model order): there its largest block is kept.
Why the open lines are fixed: RigL scores a dead block by its dense gradient, which is exactly 0 when a partner
line is closed (a gate block of a closed SwiGLU feature, a v block whose o column is empty), so RigL can neither
see nor rank the value of opening a line; SET would open one blindly, and a family whose lines are all regrown at
zero is a saddle (every partner 0, every gradient 0) no update leaves. Within the open lines RigL's scores are
informative. At a layer density >= B / line length every line is open, so the rule costs nothing but the refill;
below it some features stay unused, the price of a block budget smaller than one block per line.
Heads whose size is not a multiple of B: a block line may span two heads. Value lines are chosen to reach as
many heads as possible, and score lines are taken from lines whose heads all have an open value line while the
budget fits in them. Otherwise a score line may span a head without one: its block is on a live path, but its
features in that head are not, and they are counted in `dead_path_params`.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from sparse_dc.sparsity.config import SparsityConfig
from sparse_dc.sparsity.distribution import LayerSpec
from sparse_dc.sparsity.topology import random_mask, unit_generator

# The axis of a projection's [out / B, in / B] unit mask along which its lines run: 0 = rows, 1 = columns.
LINE_AXIS = {"q": 0, "k": 0, "v": 0, "gate": 0, "up": 0, "o": 1, "down": 1}
# Coupled families, in the order initialisation decides them (score lines depend on the open value lines).
FAMILIES = (("value", ("v", "o")), ("score", ("q", "k")), ("mlp", ("gate", "up", "down")))
FAMILY_OF = {kind: family for family, kinds in FAMILIES for kind in kinds}
DEAD_PATH_WARNING = 0.95  # warn when effective active params fall below this fraction of active params
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:attn|mlp)\.(q|k|v|o|gate|up|down)$")


def parse_projection(name: str) -> tuple[int, str] | None:
    """(transformer block index, kind) of a Llama projection's module name ("layers.3.mlp.up"), else None."""
    match = _NAME.search(name)
    return (int(match.group(1)), match.group(2)) if match else None


def path_aware(cfg: SparsityConfig) -> bool:
    """Whether the run uses the path-aware block topology (B = 1 always keeps the paper's independent masks)."""
    return cfg.block_size > 1 and cfg.block_topology == "path_aware"


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `key`: a stream independent of every other keyed or unit generator."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# --- accounting ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """One projection of a transformer block: `mask` is its bool [out / B, in / B] unit mask (None = dense)."""

    kind: str
    out_features: int
    in_features: int
    mask: torch.Tensor | None

    def line_params(self) -> torch.Tensor:
        """int64 [features]: live parameters in the line of each inner-dimension feature (LINE_AXIS)."""
        axis = LINE_AXIS[self.kind]
        if self.mask is None:
            features, length = ((self.out_features, self.in_features) if axis == 0
                                else (self.in_features, self.out_features))
            return torch.full((features,), length, dtype=torch.int64)
        b = self.out_features // self.mask.shape[0]
        per_line = self.mask.sum(dim=1 - axis).cpu().to(torch.int64) * b  # live units x B params per feature
        return per_line.repeat_interleave(b)


def dead_path_params(block: dict[str, Projection], n_heads: int) -> dict[str, int]:
    """Live parameters on a dead path, per kind, in one transformer block (module docstring). Kinds missing from
    `block` are treated as absent, not dense."""
    params = {kind: p.line_params() for kind, p in block.items()}
    open_ = {kind: c > 0 for kind, c in params.items()}
    live: dict[str, torch.Tensor] = {}
    if "v" in open_ and "o" in open_:
        value = open_["v"] & open_["o"]
        live["v"] = live["o"] = value
        if "q" in open_ and "k" in open_:
            heads = value.view(n_heads, -1).any(dim=1).repeat_interleave(value.numel() // n_heads)
            pair = torch.arange(value.numel()) ^ 1  # RoPE rotates features (2i, 2i + 1) together
            live["q"] = open_["q"] & (open_["k"] | open_["k"][pair]) & heads
            live["k"] = open_["k"] & (open_["q"] | open_["q"][pair]) & heads
    if all(kind in open_ for kind in ("gate", "up", "down")):
        live["gate"] = live["up"] = live["down"] = open_["gate"] & open_["up"] & open_["down"]
    return {kind: int(params[kind][~live[kind]].sum()) if kind in live else 0 for kind in params}


def model_projections(model: nn.Module) -> dict[int, dict[str, Projection]]:
    """The Llama projections of `model` by transformer block: sparse ones (with `unit_mask()`) and dense
    nn.Linear ones. Modules not named like a Llama projection are left out."""
    blocks: dict[int, dict[str, Projection]] = {}
    for name, module in model.named_modules():
        site = parse_projection(name)
        if site is None:
            continue
        if hasattr(module, "unit_mask"):
            mask = module.unit_mask()
        elif isinstance(module, nn.Linear):
            mask = None
        else:
            continue
        blocks.setdefault(site[0], {})[site[1]] = Projection(site[1], module.out_features, module.in_features,
                                                             mask)
    return blocks


def dead_path_warning(stats: dict, active_params: int) -> str | None:
    """One line when the DST stats' effective active params are below DEAD_PATH_WARNING of `active_params`."""
    effective = stats.get("effective_active_params")
    if effective is None or effective >= DEAD_PATH_WARNING * active_params:
        return None
    return (f"WARNING: step {stats['step']}: effective_active_params={effective:,} is "
            f"{effective / active_params:.1%} of active_params={active_params:,}: {stats['dead_path_params']:,} "
            "live weights lie on a dead gradient path and never train (sparsity.block_topology=path_aware keeps "
            "block topologies on live paths)")


# --- initial topology --------------------------------------------------------------------------------------
def _heads_of_line(line: int, block_size: int, head_dim: int) -> range:
    return range(line * block_size // head_dim, ((line + 1) * block_size - 1) // head_dim + 1)


def _open_count(available: int, members: list[tuple[int, int]]) -> int:
    """How many of `available` line indices a family opens: as many as the smallest member budget allows (one
    block per line), at least enough for the largest member to fit its blocks. `members`: (live units, units
    per line)."""
    fewest = min(n for n, _ in members)
    needed = max(math.ceil(n / length) for n, length in members)
    return min(available, max(fewest, needed))


def _choose_lines(order: list[int], count: int, heads: list[range] | None = None) -> list[int]:
    """`count` lines, first in `order`; with `heads`, greedily the line reaching the most heads not yet reached
    (ties: first in `order`) while any line reaches a new one."""
    chosen: list[int] = []
    if heads is not None:
        reached: set[int] = set()
        while len(chosen) < count:
            best = max((r for r in order if r not in chosen), key=lambda r: len(set(heads[r]) - reached))
            if not set(heads[best]) - reached:
                break
            chosen.append(best)
            reached |= set(heads[best])
    chosen += [line for line in order if line not in chosen][:count - len(chosen)]
    return sorted(chosen)


def _score_order(order: list[int], heads: list[range], value_heads: set[int], needed: int) -> list[int]:
    """Candidate score lines: those whose heads all have an open value line; if the budget needs more lines,
    also those with one such head; then any."""
    full = [r for r in order if set(heads[r]) <= value_heads]
    partial = [r for r in order if r not in full and set(heads[r]) & value_heads]
    for tier in (full, full + partial):
        if needed <= len(tier):
            return tier
    return full + partial + [r for r in order if r not in full and r not in partial]


def _place(shape: tuple[int, int], axis: int, lines: list[int], live: int, gen: torch.Generator) -> torch.Tensor:
    """bool mask with `live` units: one at a random position of each of the first min(live, len(lines)) open
    lines, the rest uniformly at random among the other positions of the open lines."""
    score = torch.rand(shape, generator=gen)
    along = score if axis == 0 else score.t()  # [lines, positions]
    open_ = torch.zeros(along.shape[0], dtype=torch.bool)
    open_[lines] = True
    along = along.masked_fill(~open_[:, None], -1.0)
    mask = torch.zeros_like(along, dtype=torch.bool)
    anchored = torch.tensor(lines[:min(live, len(lines))], dtype=torch.long)
    mask[anchored, along[anchored].argmax(dim=1)] = True
    rest = live - anchored.numel()
    if rest > 0:
        flat = along.masked_fill(mask, -1.0).flatten()
        mask.view(-1)[torch.topk(flat, rest).indices] = True
    return mask if axis == 0 else mask.t().contiguous()


def _path_aware_block(specs: dict[str, tuple[int, LayerSpec]], counts: dict[str, int], n_heads: int,
                      hidden: int, cfg: SparsityConfig, block: int) -> dict[str, torch.Tensor]:
    """Masks of one transformer block's sparse projections (`specs`: kind -> (model-order index, spec))."""
    b, head_dim = cfg.block_size, hidden // n_heads
    masks: dict[str, torch.Tensor] = {}
    value_heads: set[int] | None = None  # heads with an open value line (None: v and o are both dense)
    for family, kinds in FAMILIES:
        sparse = [k for k in kinds if k in specs]
        if not sparse:
            continue
        first = specs[sparse[0]][1]
        n_lines = (first.out_features if LINE_AXIS[sparse[0]] == 0 else first.in_features) // b
        members = []
        for k in sparse:
            spec = specs[k][1]
            length = (spec.in_features if LINE_AXIS[k] == 0 else spec.out_features) // b
            members.append((counts[spec.name], length))
        order = torch.randperm(n_lines, generator=keyed_generator("paths", cfg.seed, block, family)).tolist()
        heads = [_heads_of_line(r, b, head_dim) for r in range(n_lines)] if family != "mlp" else None
        if family == "score" and value_heads is not None:
            order = _score_order(order, heads, value_heads, max(math.ceil(n / length) for n, length in members))
        count = _open_count(len(order), members)
        lines = _choose_lines(order, count, heads if family == "value" else None)
        if family == "value":
            value_heads = {h for r in lines for h in heads[r]}
        for k in sparse:
            index, spec = specs[k]
            gen = unit_generator(cfg.seed, 0, index)
            shape = (spec.out_features // b, spec.in_features // b)
            masks[spec.name] = _place(shape, LINE_AXIS[k], lines, counts[spec.name], gen)
    return masks


def initial_masks(specs: list[LayerSpec], counts: dict[str, int], n_heads: int, hidden: int,
                  cfg: SparsityConfig) -> dict[str, torch.Tensor]:
    """bool [out / B, in / B] initial unit mask of every sparse projection (`specs` in model order, `counts` from
    `allocate`): path-aware for B > 1 with block_topology=path_aware, else each layer uniformly at random from
    the generator keyed by (seed, 0, model-order index)."""
    b = cfg.block_size
    masks: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, tuple[int, LayerSpec]]] = {}
    for index, spec in enumerate(specs):
        site = parse_projection(spec.name) if path_aware(cfg) else None
        if site is None:
            gen = unit_generator(cfg.seed, 0, index)
            masks[spec.name] = random_mask(spec.out_features // b, spec.in_features // b, counts[spec.name], gen)
        else:
            blocks.setdefault(site[0], {})[site[1]] = (index, spec)
    for block, kinds in blocks.items():
        masks.update(_path_aware_block(kinds, counts, n_heads, hidden, cfg, block))
    return {spec.name: masks[spec.name] for spec in specs}


# --- topology updates --------------------------------------------------------------------------------------
def _by_line(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The [lines, positions] view of a [out / B, in / B] tensor (a transpose for column-line kinds)."""
    return t if LINE_AXIS[kind] == 0 else t.t()


def path_drop_grow(kind: str, mask: torch.Tensor, magnitude: torch.Tensor, grow_score: torch.Tensor, n: int,
                   locked: torch.Tensor | None = None, regrow_dropped: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One path-aware update of a `kind` projection's mask (module docstring), `topology.drop_grow`'s contract
    inside open lines: drop the n live units of smallest `magnitude`, refill every open line the drop emptied with
    its candidate unit of largest `grow_score`, then grow the rest of the n among the candidates of open lines.
    Candidates: units dead before the update, or (`regrow_dropped`) every unit dead after the drop. A line keeps
    its largest unit (is never emptied) when `locked` (bool [lines]: a partner line of the same family was
    replaced earlier in this update) or when it has no candidate to refill it with. n is capped so that the live
    count stays exact. Returns (new mask, grown units)."""
    old, mag, score = (_by_line(t, kind).contiguous() for t in (mask, magnitude.float(), grow_score.float()))
    inf = torch.tensor(math.inf, device=old.device)
    open_ = old.any(dim=1)
    keep = torch.zeros_like(open_) if regrow_dropped else open_ & ~(~old).any(dim=1)
    if locked is not None:
        keep |= open_ & locked.to(old.device)
    kept = keep.nonzero().flatten()
    protected = torch.zeros_like(old)
    protected[kept, torch.where(old, mag, -inf).argmax(dim=1)[kept]] = True
    droppable = old & ~protected
    n = min(n, int(droppable.sum()), int(droppable.sum()) if regrow_dropped else int((~old & open_[:, None]).sum()))
    new, grown = old.clone(), torch.zeros_like(old)
    if n > 0:
        new.view(-1)[torch.topk(torch.where(droppable, mag, inf).flatten(), n, largest=False).indices] = False
        candidates = (~new if regrow_dropped else ~old) & open_[:, None]
        emptied = (open_ & ~new.any(dim=1)).nonzero().flatten()
        grown[emptied, torch.where(candidates, score, -inf).argmax(dim=1)[emptied]] = True
        rest = n - emptied.numel()  # <= candidates left: each emptied line lost >= 1 unit to the n dropped
        if rest > 0:
            left = torch.where(candidates & ~grown, score, -inf).flatten()
            grown.view(-1)[torch.topk(left, rest).indices] = True
        new |= grown
    return _by_line(new, kind).contiguous(), _by_line(grown, kind).contiguous()


def replaced_lines(kind: str, old: torch.Tensor, new: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
    """bool [lines]: the lines that were open in `old` and keep none of its units untouched in `new` (they hold
    only units grown by this update, regrown just-dropped ones included; with regrow_init=zero, only zeros)."""
    old, new, grown = (_by_line(t, kind) for t in (old, new, grown))
    return old.any(dim=1) & ~(old & new & ~grown).any(dim=1)


class PathAwareUpdate:
    """One topology update of a model's Llama projections, decided layer by layer in model order: `decide` a
    layer's new mask, then `record` the mask actually installed (e.g. rank 0's broadcast decision), which locks
    the lines it replaced in the layers of the same family that follow."""

    def __init__(self, sites: dict[str, tuple[int, str]]):
        """`sites`: layer name -> (transformer block, kind), from `parse_projection`."""
        self.sites = sites
        self.replaced: dict[tuple[int, str], torch.Tensor] = {}  # (block, family) -> bool [lines]

    def _family(self, name: str) -> tuple[int, str]:
        block, kind = self.sites[name]
        return block, FAMILY_OF[kind]

    def decide(self, name: str, mask: torch.Tensor, magnitude: torch.Tensor, grow_score: torch.Tensor, n: int,
               regrow_dropped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(new mask, grown units) of layer `name` (`path_drop_grow`)."""
        return path_drop_grow(self.sites[name][1], mask, magnitude, grow_score, n,
                              self.replaced.get(self._family(name)), regrow_dropped)

    def record(self, name: str, old: torch.Tensor, new: torch.Tensor, grown: torch.Tensor) -> None:
        lines, family = replaced_lines(self.sites[name][1], old, new, grown), self._family(name)
        self.replaced[family] = self.replaced[family] | lines if family in self.replaced else lines
