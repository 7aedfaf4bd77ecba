"""Resume a ZeRO checkpoint on a different number of ranks (16 GPUs -> 8 and back), through DeepSpeed's universal
checkpoints.

A ZeRO 1/2/3 checkpoint stores the fp32 master weights and Adam moments as one flat shard per rank, so it loads
only into the world size that wrote it. On a mismatch, rank 0 converts the tag once with
`deepspeed.checkpoint.ds_to_universal` into a sibling folder holding one full tensor per parameter and state
(fp32, exp_avg, exp_avg_sq, step), every rank waits, and the engine loads it with its universal-checkpoint path,
which re-slices each tensor for the new partitioning:

    checkpoints/step_00000120/             the ZeRO checkpoint, written by N ranks (untouched)
    checkpoints/step_00000120_universal/   its universal form (made on demand; pruned with its tag)

Why this design and not a portable state written with every checkpoint (full fp32 weights + moments gathered
through `sparsity.optim_state` and loaded back with safe_set_*): measured on deepspeed 0.19.8 (CPU/gloo) the
universal path restores stages 1, 2 and 3 exactly (the resumed run matches an uninterrupted one to float
reduction order), it costs nothing on the save path (a portable copy would roughly double every checkpoint's size
and add a gather of all states per save, paid on every save for a rare event), and DeepSpeed owns the layout of
its shards (Adam's step, param-group hyper-parameters, loss-scaler state), so we do not mirror its internals.
The conversion runs once per tag, on rank 0, reading and writing the optimizer state once (temp + rename, reused
when present).

Two things the engine's universal load does not do, done here: it never loads the module state dict, so the
buffers (DST masks and block layouts, i.e. the topology) are copied from the checkpoint's model file; and it is
switched on by the `checkpoint.load_universal` config flag, which DeepSpeed reads only inside load_checkpoint, so
it is set for the duration of that call rather than baked into the engine's config (the same engine saves
ordinary ZeRO checkpoints afterwards).

RNG on a world-size change: rank r < N (the old count) restores the state rank r saved; a rank that did not exist
(growing) gets a fresh state seeded from (seed, step, rank), so ranks stay distinct and the resume deterministic.
The training loop itself draws no random numbers (the data order is arithmetic, SET grows from a generator keyed
by (seed, step, layer), RigL is deterministic, the model has no dropout), so this choice does not change the loss
trajectory.

Not covered: tensor/pipeline parallelism (the trainer uses neither), NVMe/CPU optimizer offload, and changing the
ZeRO stage across the resume (refused by the checkpoint's fingerprint check).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparse_dc.errors import SparseDCError

SUFFIX = "_universal"


def universal_tag(tag: str) -> str:
    return tag + SUFFIX


def convert_to_universal(ckpt_dir: str, tag: str) -> str:
    """Convert `ckpt_dir/tag` into `ckpt_dir/<tag>_universal` (not collective: one process calls it) and return
    that path; an existing one is reused. Written under a temp folder, then renamed, so a crash mid-conversion
    leaves no half-converted tag that a later resume would trust."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = os.path.join(ckpt_dir, universal_tag(tag))
    if os.path.isdir(out):
        return out
    # ds_to_universal writes `latest_universal` next to its output folder: keep that inside the temp folder too
    work = os.path.join(ckpt_dir, f".convert_{tag}")
    shutil.rmtree(work, ignore_errors=True)  # a crashed earlier attempt
    staged = os.path.join(work, universal_tag(tag))
    args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=staged,
                              num_extract_workers=1, num_merge_workers=1,  # in-process: no worker pool to spawn
                              keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # plain models carry no universal_checkpoint_info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and tqdm bars
            ds_to_universal(args)
    except Exception as exc:
        shutil.rmtree(work, ignore_errors=True)
        detail = " | ".join(log.getvalue().strip().splitlines()[-3:])
        raise SparseDCError(f"converting checkpoint {args.input_folder} to a universal checkpoint failed "
                            f"({type(exc).__name__}: {exc}; {detail}): expected a complete ZeRO checkpoint") \
            from exc
    os.rename(staged, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def ensure_universal(ckpt_dir: str, tag: str, rank: int) -> None:
    """Collective: rank 0 converts (or reuses) the universal form of `tag`; every rank returns once it exists,
    or raises the same SparseDCError on every rank if the conversion failed."""
    error = None
    if rank == 0:
        try:
            convert_to_universal(ckpt_dir, tag)
        except SparseDCError as exc:
            error = str(exc)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)  # doubles as the barrier: no rank reads a half-written folder
        error = box[0]
    if error is not None:
        raise SparseDCError(error)


@contextlib.contextmanager
def _universal_loading(engine: Any):
    # DeepSpeed reads `checkpoint.load_universal` only in load_checkpoint/_load_checkpoint/_load_zero_checkpoint
    # (0.19.8), so switching it for one call equals building the engine with it, without a second engine config.
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def load_universal(engine: Any, ckpt_dir: str, tag: str) -> tuple[str | None, dict[str, Any]]:
    """Collective: load `<tag>_universal` (see ensure_universal) into `engine`: weights, Adam moments and step,
    LR scheduler, client state, and the module's buffers (the sparse topology). Returns (path, client_state)."""
    with _universal_loading(engine):
        path, client_state = engine.load_checkpoint(ckpt_dir, tag=universal_tag(tag), load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    if path is not None:
        repair_optimizer_state(engine, os.path.join(ckpt_dir, universal_tag(tag)))
        load_buffers(engine.module, os.path.join(ckpt_dir, tag))
    return path, client_state or {}


def repair_optimizer_state(engine: Any, universal_dir: str) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (harmless to redo under ZeRO 1/2, which load
    per group). Each showed as a 1 -> 2 rank ZeRO-3 resume drifting from the uninterrupted run after one step:

    - it copies param group 0's hyper-parameters into every group, so the no-decay group (norm gains) would get
      weight decay: every group gets its own saved values back;
    - it gives every group's state the same `step` tensor object, which torch's Adam increments in place once
      per group per update, so the step count (and bias correction) runs ahead: each state gets its own copy."""
    path = os.path.join(universal_dir, "zero", "optimizer_state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["param_groups"]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if len(saved) != len(inner.param_groups):
        raise SparseDCError(f"{path} has {len(saved)} optimizer param groups but the run has "
                            f"{len(inner.param_groups)}: expected the same model and optimizer config")
    for group, values in zip(inner.param_groups, saved):
        group.update({key: value for key, value in values.items() if key != "params"})
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@torch.no_grad()
def load_buffers(module: torch.nn.Module, tag_dir: str) -> None:
    """Copy the persistent buffers (masks, block layouts) of `module` from the tag's model-states file; the
    parameters come from the optimizer's fp32 master weights instead."""
    files = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
    if not files:
        raise SparseDCError(f"checkpoint {tag_dir} has no *model_states.pt file: expected a DeepSpeed checkpoint")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    params = {name for name, _ in module.named_parameters()}
    buffers = {name: tensor for name, tensor in saved.items() if name not in params}
    missing, unexpected = module.load_state_dict(buffers, strict=False)
    missing = sorted(set(missing) - params)
    if missing or unexpected:
        raise SparseDCError(f"checkpoint {tag_dir} buffers do not match the model (missing {missing}, unexpected "
                            f"{sorted(unexpected)}): expected the same model/sparsity config")


def seed_all(seed: int, step: int, rank: int) -> None:
    """A fresh RNG state for a rank the checkpoint had no state for, a pure function of (seed, step, rank)."""
    value = ((seed * 1_000_003 + step) * 10_007 + rank) % 2 ** 32
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
