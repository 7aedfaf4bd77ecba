"""The run ledger: one JSON line per finished run, read by the scaling-law toolkit (`sparse-dc law`).

Shared field names (the law toolkit's contract): `name`, `dense_params` (dense-equivalent N in the paper fit's
convention: every parameter but the input embedding table, see sparse_dc/model/params.py), `active_params` (the
same over live parameters), `density`, `unique_tokens`, `tokens`, `val_loss`. The rest: raw totals
(`*_params_total`, embedding included) and non-embedding counts, `effective_active_params` (the active ones on a
live gradient path, the only ones that can train; sparse_dc.sparsity.paths), `epochs` (R = D / U), block size,
block topology, DST method and regrowth init, throughput, wall time, config hash, git commit.

Appends are one `write()` of a whole line on an O_APPEND descriptor under an exclusive `flock`, so concurrent runs
sharing a ledger (an array job on one filesystem) never interleave or tear lines.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from typing import Any

from sparse_dc.errors import SparseDCError

SHARED_FIELDS = ("name", "dense_params", "active_params", "density", "unique_tokens", "tokens", "val_loss")


def git_commit() -> str | None:
    """The sparse-dc source tree's commit (None outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def append_row(path: str, row: dict[str, Any]) -> None:
    """Append `row` as one JSON line to the ledger at `path` (created with its folder if missing)."""
    missing = [f for f in SHARED_FIELDS if f not in row]
    if missing:
        raise SparseDCError(f"ledger row lacks {', '.join(missing)}: expected all of {', '.join(SHARED_FIELDS)}")
    data = (json.dumps(row, allow_nan=True) + "\n").encode("utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, data)
        if written != len(data):  # only on a full disk; leave no half line behind silently
            raise OSError(f"short write to the ledger {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_ledger(path: str) -> list[dict[str, Any]]:
    """All rows of a ledger file, in order."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def make_row(cfg: Any, counts: Any, plan: Any, *, val_loss: float | None, tokens_per_s: float, wall_time_s: float,
             steps: int, world_size: int, dead_path_params: int = 0) -> dict[str, Any]:
    """The ledger row of a finished run. `cfg`: RunConfig; `counts`: ParamCounts; `plan`: BudgetPlan;
    `dead_path_params`: live parameters on a dead gradient path at the end (sparse_dc.sparsity.paths)."""
    return {
        "name": cfg.name,
        "dense_params": counts.law_dense,
        "active_params": counts.law_active,
        "density": cfg.sparsity.density,
        "unique_tokens": plan.unique_tokens,
        "tokens": plan.total_tokens,
        "val_loss": val_loss,
        "dense_params_total": counts.dense,
        "active_params_total": counts.active,
        "dense_params_non_embedding": counts.dense_non_embedding,
        "active_params_non_embedding": counts.active_non_embedding,
        "density_measured": counts.density,
        "effective_active_params": counts.law_active - dead_path_params,  # active_params that can train
        "epochs": plan.total_tokens / plan.unique_tokens,
        "seq_len": plan.seq_len,
        "block_size": cfg.sparsity.block_size,
        "dst_method": cfg.sparsity.method if cfg.sparsity.sparse else "dense",
        "block_topology": cfg.sparsity.block_topology if cfg.sparsity.block_size > 1 else "independent",
        "regrow_init": cfg.sparsity.regrow_init,
        "model_preset": cfg.model.preset,
        "global_batch": cfg.train.global_batch,
        "steps": steps,
        "precision": cfg.train.precision,
        "zero_stage": cfg.train.deepspeed.zero_stage,
        "world_size": world_size,
        "tokens_per_s": tokens_per_s,  # training steps only (no eval/checkpoint time)
        "wall_time_s": wall_time_s,  # the whole loop over all resumed segments, eval and checkpoints included
        "config_hash": cfg.fingerprint(),
        "git_commit": git_commit(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
