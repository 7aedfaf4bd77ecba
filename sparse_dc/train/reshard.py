"""Resume a ZeRO checkpoint on a different number of ranks (16 GPUs -> 8 and back), through DeepSpeed's universal
checkpoints.

A ZeRO 1/2/3 checkpoint stores the fp32 master weights and Adam moments as one flat shard per rank, so it loads
only into the world size that wrote it. On a mismatch, rank 0 converts the tag once with
`deepspeed.checkpoint.ds_to_universal` into a sibling folder holding one full tensor per parameter and state
(fp32, exp_avg, exp_avg_sq, step, and any other elementwise optimizer state such as AdamDST's per-weight step:
extra_states.py), every rank waits, and the engine loads it with its universal-checkpoint path, which re-slices
each tensor for the new partitioning:

    checkpoints/step_00000120/             the ZeRO checkpoint, written by N ranks (untouched)
    checkpoints/step_00000120_universal/   its universal form (made on demand; pruned with its tag)

Why this design and not a "portable" state written with every checkpoint (full fp32 weights + Adam moments + step
gathered through `sparsity.optim_state` and loaded back with safe_set_*): on deepspeed 0.19.8 (CPU/gloo) the
universal path restores stages 1, 2 and 3 (fp32: the resumed run matches the uninterrupted one to ~1e-7 relative
in loss, i.e. float reduction order; bf16 ZeRO 1: within bf16's own 1-vs-2-rank spread, ~3e-5), it costs nothing
on the save path (a portable copy is 12 bytes per parameter, ~0.75-0.85x the size of a tag, plus a gather of all
states, on every save, for a rare event), and DeepSpeed keeps owning its shard layout (step, param-group settings,
loss-scaler state) instead of us mirroring its internals. The conversion runs once per tag on rank 0 (tiny
preset: 0.1-0.7 s; benchmarks/reshard.py), temp + rename, reused when present.

What the engine's universal load gets wrong or leaves out, done here:
- it never loads the module state dict: the buffers (DST masks and block layouts, i.e. the topology) are copied
  from the checkpoint's model file;
- ZeRO 3 gives every param group group 0's hyper-parameters and one shared `step` tensor (see
  repair_optimizer_state);
- it is switched on by the `checkpoint.load_universal` config flag, which DeepSpeed reads only inside
  load_checkpoint, so it is set for that call rather than baked into the engine's config (the same engine saves
  ordinary ZeRO checkpoints afterwards).
The LR scheduler, DeepSpeed's step counters and our client state (samples consumed, DST state, wall time) come
from the model file as on any resume.

RNG on a world-size change: rank r < N (the old count) restores the state rank r saved; a rank that did not exist
(growing) gets a fresh state seeded from (seed, step, rank), so ranks stay distinct and the resume deterministic.
The training loop itself draws no random numbers (the data order is arithmetic, SET grows from a generator keyed
by (seed, step, layer), RigL is deterministic, the model has no dropout), so this choice does not change the loss
trajectory.

Not covered: tensor/pipeline parallelism (the trainer uses neither), NVMe/CPU optimizer offload, node-local
checkpoint storage (every rank must see rank 0's conversion), and changing the ZeRO stage across the resume
(refused by the fingerprint check). The other ranks wait in a collective while rank 0 converts: a conversion
longer than the process group's timeout (NCCL watchdog) would abort the resume (the temp folder is discarded, the
checkpoint untouched): convert big models beforehand with `sparse-dc reshard` (checkpoint_cli.py), which the resume
reuses.
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
from sparse_dc.train.extra_states import restore_extra_states, write_extra_states

SUFFIX = "_universal"


def universal_tag(tag: str) -> str:
    return tag + SUFFIX


def convert_to_universal(ckpt_dir: str, tag: str, workers: int = 1) -> str:
    """Convert `ckpt_dir/tag` into `ckpt_dir/<tag>_universal` (not collective: one process calls it) and return
    that path; an existing one is reused. Written under a temp folder, then renamed, so a crash mid-conversion
    leaves no half-converted tag that a later resume would trust. `workers` > 1: DeepSpeed's extract/merge
    process pools (offline conversion of big models, `sparse-dc reshard`)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = os.path.join(ckpt_dir, universal_tag(tag))
    if os.path.isdir(out):
        return out
    # ds_to_universal writes `latest_universal` next to its output folder: keep that inside the temp folder too
    work = os.path.join(ckpt_dir, f".convert_{tag}")
    shutil.rmtree(work, ignore_errors=True)  # a crashed earlier attempt
    staged = os.path.join(work, universal_tag(tag))
    args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=staged,
                              num_extract_workers=workers, num_merge_workers=workers,  # 1: in-process, no pool
                              keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # plain models carry no universal_checkpoint_info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and tqdm bars
            ds_to_universal(args)
        write_extra_states(args.input_folder, staged)  # e.g. AdamDST's per-weight step
    except Exception as exc:
        shutil.rmtree(work, ignore_errors=True)
        # a bare assert in the converter has no message: its last printed lines say how far it got
        detail = str(exc) or " | ".join(log.getvalue().strip().splitlines()[-2:])
        raise SparseDCError(f"converting checkpoint {args.input_folder} (written by another world size) to a "
                            f"universal checkpoint failed: {type(exc).__name__}: {detail}") from exc
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
        restore_extra_states(engine, os.path.join(ckpt_dir, universal_tag(tag)))
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
