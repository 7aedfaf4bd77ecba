"""Checkpoints: DeepSpeed save/load with our client state, an atomic completion marker, and preemption signals.

Layout under <run>/checkpoints/:

    step_00000120/            DeepSpeed's files for this tag (model + ZeRO optimizer shards, client state)
        rng_rank{r}.pt        each rank's RNG states
        COMPLETE              JSON written last, atomically, by rank 0 after every rank finished saving: the
                              run's config, world size, and the size + sha256 of every file of the tag
    step_00000120_universal/  only after a resume on another world size: the tag as a DeepSpeed universal
                              checkpoint (see reshard.py); pruned with its tag
    zero_to_fp32.py           DeepSpeed's consolidation script (copied by save_checkpoint under ZeRO)

A tag without COMPLETE (a crash or kill during save) is ignored by `latest()` and never deleted before a newer
complete one exists, so a crash during save never costs the previous checkpoint. A resume first checks the
newest complete tag's files against its COMPLETE record (ranks share the hashing); a tag that fails (flipped
bytes, truncation, a lost file, a damaged marker) is renamed `step_*.corrupt` and the next older one is tried,
so a damaged checkpoint is never loaded. The checks assume every rank sees the whole checkpoint folder (a shared
filesystem), as the COMPLETE protocol already does. A checkpoint resumes on any world size: the same one loads
its shards directly, another one goes through reshard.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparse_dc.config.base import write_text_atomic
from sparse_dc.errors import SparseDCError, disk_full, is_disk_full
from sparse_dc.train import reshard

MARKER = "COMPLETE"
CORRUPT_SUFFIX = ".corrupt"
_TAG = re.compile(r"^step_(\d{8})$")


class ResumeError(SparseDCError):
    """A checkpoint that cannot be resumed by this run (config changed, not loadable...)."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _TAG.match(name)
        if match and os.path.isfile(os.path.join(directory, name, MARKER)):
            found.append((int(match.group(1)), name))
    return sorted(found)


def read_marker(tag_dir: str) -> dict[str, Any]:
    """The COMPLETE record of a tag; ResumeError (one line) when it is unreadable."""
    path = os.path.join(tag_dir, MARKER)
    try:
        with open(path, encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise ResumeError(f"{path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(marker, dict):
        raise ResumeError(f"{path}: expected a JSON object, got {type(marker).__name__}")
    return marker


def tag_files(tag_dir: str) -> list[str]:
    """Paths (relative to the tag) of every file of a checkpoint tag but its COMPLETE marker, sorted."""
    found = []
    for root, _, names in os.walk(tag_dir):
        found += [os.path.relpath(os.path.join(root, n), tag_dir) for n in names]
    return sorted(f for f in found if f != MARKER and not f.startswith(f"{MARKER}.tmp"))


def file_record(path: str, chunk: int = 1 << 22) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def file_problem(tag_dir: str, name: str, expected: dict[str, Any]) -> str | None:
    """What is wrong with one recorded file of a tag (None if its size and sha256 match the record)."""
    path = os.path.join(tag_dir, name)
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        return f"{name} has {size} bytes, expected {expected['bytes']}"
    if file_record(path)["sha256"] != expected["sha256"]:
        return f"{name} fails its sha256 check"
    return None


def tag_problem(tag_dir: str, rank: int = 0, world_size: int = 1) -> str | None:
    """This rank's share of the integrity check of a tag against its COMPLETE record: the first problem found,
    or None. Every rank calls it with its rank; together they cover every file once. A record without `files`
    (written before they were recorded) cannot be checked and passes."""
    try:
        marker = read_marker(tag_dir)
    except ResumeError as exc:
        return str(exc)
    files = marker.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"{MARKER} has no valid file record"
    for name in sorted(files)[rank::world_size]:
        problem = file_problem(tag_dir, name, files[name])
        if problem:
            return problem
    return None


def _gather(value: Any, world_size: int) -> list[Any]:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, value)
        return out
    return [value]


class Checkpointer:
    def __init__(self, run_dir: str, rank: int, world_size: int, keep: int, seed: int = 0):
        """`seed`: seeds the RNG of a rank a checkpoint from fewer ranks has no state for (see reshard.py)."""
        self.dir = os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size, self.keep, self.seed = rank, world_size, keep, seed
        # (step, how it is known to be intact) of the checkpoint a failure can fall back to
        self.last_intact: tuple[int, str] | None = None

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def latest(self) -> tuple[int, str] | None:
        found = complete_checkpoints(self.dir)
        return found[-1] if found else None

    def save(self, engine: Any, step: int, client_state: dict[str, Any], marker: dict[str, Any]) -> str:
        """Collective: every rank saves its shards, the ranks hash the tag's files between them, then rank 0
        writes the COMPLETE record (sizes + sha256) and prunes old tags. A full disk is a one-line DiskFull."""
        tag = self.tag(step)
        tag_dir = os.path.join(self.dir, tag)
        try:
            if self.rank == 0:  # a stale incomplete attempt at this step, and a universal copy of an older one
                self._remove(tag)
            _barrier()
            engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)
            torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{self.rank}.pt"))
            _barrier()  # every rank's files are on disk before they are hashed and the marker says so
            names = tag_files(tag_dir)
            mine = {name: file_record(os.path.join(tag_dir, name)) for name in names[self.rank::self.world_size]}
            files = {k: v for part in _gather(mine, self.world_size) for k, v in part.items()}
            if self.rank == 0:
                write_text_atomic(os.path.join(tag_dir, MARKER),
                                  json.dumps({**marker, "step": step, "world_size": self.world_size,
                                              "saved_at": time.time(), "files": files}, indent=1))
                for _, old in complete_checkpoints(self.dir)[:-self.keep]:
                    os.remove(os.path.join(self.dir, old, MARKER))  # unmark first: a half-deleted tag is ignored
                    self._remove(old)
            _barrier()
        except (OSError, RuntimeError) as exc:
            # on a shared filesystem every rank sees the disk full, whichever rank's write or collective failed
            if not is_disk_full(exc, self.dir):
                raise
            error = disk_full(tag_dir, "the checkpoint was not saved (the previous one is intact); free space and "
                                       "continue with --resume auto")
            if self.rank == 0:
                self._remove(tag)  # the incomplete tag only costs space
            raise error from None
        self.last_intact = (step, "saved by this run")
        return tag_dir

    def newest_intact(self) -> tuple[int, str] | None:
        """Collective: the newest complete tag whose files match their COMPLETE record. Each damaged newer tag is
        renamed step_*.corrupt (never tried again) with one line on rank 0 saying why; ResumeError when complete
        tags exist but none is intact. None when there is no complete tag."""
        found, damaged = complete_checkpoints(self.dir), []
        for step, tag in reversed(found):
            problems = _gather(tag_problem(os.path.join(self.dir, tag), self.rank, self.world_size),
                               self.world_size)
            problem = next((p for p in problems if p), None)
            if problem is None:
                if damaged and self.rank == 0:
                    print(f"checkpoint {damaged[-1][0]} is damaged ({damaged[-1][1]}): resuming from {tag} instead "
                          f"(kept as {damaged[-1][0]}{CORRUPT_SUFFIX})", file=sys.stderr, flush=True)
                recorded = "files" in read_marker(os.path.join(self.dir, tag))
                self.last_intact = (step, "checksums verified at resume" if recorded else
                                    "saved without checksums, so unverified")
                return step, tag
            damaged.append((tag, problem))
            if self.rank == 0:
                bad = os.path.join(self.dir, tag)
                shutil.rmtree(bad + CORRUPT_SUFFIX, ignore_errors=True)
                os.rename(bad, bad + CORRUPT_SUFFIX)
            _barrier()
        if damaged:
            listed = "; ".join(f"{tag}: {problem}" for tag, problem in damaged)
            raise ResumeError(f"no intact checkpoint in {self.dir} ({listed}): expected at least one whose files "
                              f"match its {MARKER} record; the damaged ones are kept as step_*{CORRUPT_SUFFIX}; "
                              "start over with a new name=")
        return None

    def _remove(self, tag: str) -> None:
        for name in (reshard.universal_tag(tag), tag):  # the derived copy first: it is never trusted alone
            shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def load(self, engine: Any, tag: str, expect: dict[str, Any]) -> dict[str, Any]:
        """Collective: restore engine (weights, ZeRO optimizer state, LR scheduler) and RNG; returns the client
        state. Refuses, with the fix in the message, a checkpoint from another config. A checkpoint from another
        world size is re-partitioned through a DeepSpeed universal checkpoint (reshard.py)."""
        tag_dir = os.path.join(self.dir, tag)
        marker = read_marker(tag_dir)
        for key, value in expect.items():
            if marker.get(key) != value:
                raise ResumeError(f"checkpoint {tag_dir} has {key}={marker.get(key)!r} but this run has {value!r}: "
                                  f"expected the same setting to resume (use a new run name to start over)")
        saved_world = int(marker["world_size"])
        try:
            client_state = self._load_states(engine, tag, saved_world, int(marker["step"]))
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
            if "files" in marker:  # its files were verified: a failure here is not a damaged checkpoint
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ResumeError(f"checkpoint {tag_dir} (saved without a file record, so unverified) cannot be loaded "
                              f"({type(exc).__name__}: {first}); move it aside to resume from an older one") from None
        return client_state

    def _load_states(self, engine: Any, tag: str, saved_world: int, step: int) -> dict[str, Any]:
        tag_dir = os.path.join(self.dir, tag)
        if saved_world == self.world_size:
            path, client_state = engine.load_checkpoint(self.dir, tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        else:
            start = time.perf_counter()
            try:
                reshard.ensure_universal(self.dir, tag, self.rank)
            except SparseDCError as exc:
                raise ResumeError(
                    f"{exc}. Resume with the {saved_world} ranks that wrote it, or consolidate the weights with "
                    f"`python {self.dir}/zero_to_fp32.py {self.dir} OUT --tag {tag}` (or `sparse-dc export`) and "
                    "start a new run from them (optimizer state is not carried over)") from exc
            path, client_state = reshard.load_universal(engine, self.dir, tag)
            if self.rank == 0:
                print(f"world size changed: checkpoint {tag} was written by {saved_world} ranks, resuming on "
                      f"{self.world_size} (ZeRO state re-partitioned through a DeepSpeed universal checkpoint in "
                      f"{time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        from sparse_dc.sparsity import fix_deepspeed_state_after_load

        fix_deepspeed_state_after_load(engine)
        rng_path = os.path.join(tag_dir, f"rng_rank{self.rank}.pt")
        if self.rank < saved_world:  # also after shrinking: rank r continues rank r's streams
            set_rng_state(torch.load(rng_path, weights_only=False))
        else:
            reshard.seed_all(self.seed, step, self.rank)
        return client_state


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, `scancel`, torchrun shutdown) set a flag; `requested()` agrees on it
    across ranks (an all-reduce MAX), so every rank saves and stops after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: str = "cpu") -> None:
        self.device, self.flag = device, False
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag, self.received = True, signum

    def requested(self) -> bool:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if self.flag else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one 4-byte collective per step
            return bool(flag.item())
        return self.flag

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a stop signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
