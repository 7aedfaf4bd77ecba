"""Optimizer states beyond Adam's across a world-size change (AdamDST's per-weight step, `element_step`).

DeepSpeed 0.19.8's universal-checkpoint converter extracts only fp32, exp_avg, exp_avg_sq and step from ZeRO
shards, and its ZeRO-3 universal loader restores only those: any other elementwise optimizer state would be lost
on a resume on another world size (AdamDST's would restart every weight's count). reshard.py calls:

- `write_extra_states(tag_dir, universal_dir)` after the conversion: every elementwise state of the inner
  optimizer that is not one of those keys is reassembled from the rank shards into one full tensor per parameter,
  `<universal>/zero/<param>/<key>.pt` in the converter's own file format. DeepSpeed's ZeRO 1/2 universal loader
  reads every file of a parameter's folder, so it restores these itself;
- `restore_extra_states(engine, universal_dir)` after the load: checks that every extra state the optimizer
  keeps (its EXTRA_STATE_KEYS) has its files (a universal folder converted without them is refused with the
  fix), and under ZeRO 3 copies each rank's slice into its partition (sparsity.optim_state.set_zero3_partition:
  deepspeed.utils.safe_set_full_optimizer_state fails when the ranks do not divide a parameter's size).

Shard layouts, as DeepSpeed writes them: ZeRO 1/2 rank r's flat partition of group g holds parameter fragments at
`param_slice_mappings[g][name]` (start, numel), in rank order; ZeRO 3 rank r's flat sub-group g holds, for every
parameter of `param_shapes[g]` in order, a slot of ceil(numel / ranks) elements of which the first
min(slot, numel - r x slot) are the parameter's elements r x slot onwards.
"""
from __future__ import annotations

import glob
import math
import os
import re
from collections import defaultdict
from typing import Any

import torch

from sparse_dc.errors import SparseDCError
from sparse_dc.sparsity.optim_state import set_zero3_partition

CARRIED = ("step", "exp_avg", "exp_avg_sq")  # what DeepSpeed's universal conversion already handles
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def extra_keys(state: dict[str, Any]) -> list[str]:
    """Elementwise states of one optimizer-state dict that DeepSpeed's universal conversion would drop."""
    return sorted(k for k, v in state.items() if k not in CARRIED and torch.is_tensor(v) and v.dim() > 0)


def _rank_files(tag_dir: str) -> list[str]:
    files = {int(m.group(1)): path for path in glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
             if (m := _RANK.search(os.path.basename(path)))}
    return [files[r] for r in sorted(files)]


def _fragments(tag_dir: str) -> tuple[dict[str, dict[str, list[torch.Tensor]]], list[dict[str, Any]]]:
    """(param name -> key -> its fragments in rank order, for every extra state of the tag's ZeRO shards; the
    parameter shapes per param group, from the model-states file)."""
    files = _rank_files(tag_dir)
    model_file = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))[0]
    shapes = torch.load(model_file, map_location="cpu", weights_only=False, mmap=True)["param_shapes"]
    out: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for rank, path in enumerate(files):
        sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        if "param_slice_mappings" in sd:  # ZeRO 1/2
            for group, state in sd["base_optimizer_state"]["state"].items():
                for name, frag in sd["param_slice_mappings"][group].items():
                    for key in extra_keys(state):
                        out[name][key].append(state[key].narrow(0, frag.start, frag.numel).clone())
            continue
        for group, state in sd["optimizer_state_dict"]["state"].items():  # ZeRO 3
            offset = 0
            for name, shape in shapes[group].items():
                numel = math.prod(shape)
                slot = math.ceil(numel / len(files))
                size = max(0, min(slot, numel - rank * slot))
                for key in extra_keys(state):
                    out[name][key].append(state[key].narrow(0, offset, size).clone())
                offset += slot
    return out, shapes


def write_extra_states(tag_dir: str, universal_dir: str) -> list[str]:
    """Write `<universal_dir>/zero/<param>/<key>.pt` ({"param": full tensor}, the converter's ZeRO 1/2 format)
    for every extra optimizer state of the ZeRO checkpoint in `tag_dir`; returns the keys written (none for a
    plain Adam run). Not collective: the converting process calls it."""
    from deepspeed.checkpoint.constants import PARAM

    fragments, groups = _fragments(tag_dir)
    shapes = {name: shape for group in groups for name, shape in group.items()}
    keys = set()
    for name, states in fragments.items():
        for key, pieces in states.items():
            path = os.path.join(universal_dir, "zero", name, f"{key}.pt")
            torch.save({PARAM: torch.cat(pieces).view(tuple(shapes[name]))}, path)
            keys.add(key)
    return sorted(keys)


def restore_extra_states(engine: Any, universal_dir: str) -> None:
    """Check that the universal folder holds every extra state the engine's optimizer keeps (its class lists them
    in EXTRA_STATE_KEYS), and under ZeRO 3 (whose universal loader ignores them) copy this rank's slices into the
    partitions. Every rank calls it."""
    from deepspeed.checkpoint.constants import PARAM

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    keys = getattr(inner, "EXTRA_STATE_KEYS", ())
    stage3 = engine.zero_optimization_stage() == 3
    for name, param in engine.module.named_parameters():
        for key in keys:
            path = os.path.join(universal_dir, "zero", name, f"{key}.pt")
            if not os.path.isfile(path):
                raise SparseDCError(f"{path} is missing: this universal checkpoint was converted without the "
                                    f"optimizer's {key!r} state; delete {universal_dir} and resume again")
            if stage3:
                set_zero3_partition(param, torch.load(path, map_location="cpu", weights_only=False)[PARAM], key)
