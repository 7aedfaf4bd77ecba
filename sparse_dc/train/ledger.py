"""The run ledger: one JSON line per finished run, read by the scaling-law toolkit (`sparse-dc law`).

Shared field names (the law toolkit's contract): `name`, `dense_params` (dense-equivalent N in the paper fit's
convention: every parameter but the input embedding table, see sparse_dc/model/params.py), `active_params` (the
same over live parameters), `density`, `unique_tokens`, `tokens`, `val_loss`. The rest: raw totals
(`*_params_total`, embedding included) and non-embedding counts, `epochs` (R = D / U), block size, DST method,
throughput, wall time, config hash, git commit.

Every writer holds an exclusive `flock` on the sidecar `<ledger>.lock` (a file that is never replaced, so the lock
outlives rewrites of the ledger itself):
- `record_run` appends a finished run's row unless a row with its `run_id` is already there (idempotent: a run
  that is resumed after it finished, or re-records after a crash, ends with exactly one row); the append is one
  `write()` of a whole line on an O_APPEND descriptor, so concurrent runs never interleave or tear lines;
- `update_rows` merges fields into existing rows (e.g. downstream evaluation results) by writing the whole ledger
  to a temporary file and renaming it over the old one, so a reader sees the old or the new ledger, never a mix,
  and no append made meanwhile is lost (appends wait for the lock).
Readers take no lock: every state of the file they can see is whole.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sparse_dc.errors import SparseDCError, reporting_disk_full
from sparse_dc.jsonl import json_objects

SHARED_FIELDS = ("name", "dense_params", "active_params", "density", "unique_tokens", "tokens", "val_loss")


def git_commit() -> str | None:
    """The sparse-dc source tree's commit (None outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextmanager
def locked(path: str) -> Iterator[None]:
    """Exclusive lock of the ledger at `path` for writers (blocks while another writer holds it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_row(row: dict[str, Any]) -> None:
    missing = [f for f in SHARED_FIELDS if f not in row]
    if missing:
        raise SparseDCError(f"ledger row lacks {', '.join(missing)}: expected all of {', '.join(SHARED_FIELDS)}")


def _append_unlocked(path: str, row: dict[str, Any]) -> None:
    data = (json.dumps(row, allow_nan=True) + "\n").encode("utf-8")
    with reporting_disk_full(path, f"the row of run {row['name']!r} was not written"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):  # a full disk can also cut a write short: take the partial line back
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(28, f"short write to the ledger {path}: {written} of {len(data)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)


def append_row(path: str, row: dict[str, Any]) -> None:
    """Append `row` as one JSON line to the ledger at `path` (created with its folder if missing)."""
    _check_row(row)
    with locked(path):
        _append_unlocked(path, row)


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows record the same run: the same `run_id`, or the same name when either lacks one."""
    if a.get("run_id") and b.get("run_id"):
        return a["run_id"] == b["run_id"]
    return a.get("name") == b.get("name")


def record_run(path: str, row: dict[str, Any]) -> bool:
    """Append the row of a finished run unless the ledger already holds it (`same_run`); returns whether it
    was appended. Safe to call again after a crash: a run ends with exactly one row."""
    _check_row(row)
    with locked(path):
        if os.path.exists(path) and any(same_run(old, row) for old in read_ledger(path)):
            return False
        _append_unlocked(path, row)
        return True


def update_rows(path: str, match: Callable[[dict[str, Any]], bool], fields: dict[str, Any]) -> int:
    """Merge `fields` into every row for which `match(row)` holds, in place (atomic rewrite under the writers'
    lock); returns how many rows changed. E.g. `update_rows(p, lambda r: r["name"] == "x", {"downstream": {...}})`.
    """
    from sparse_dc.config.base import write_text_atomic

    with locked(path):
        rows = read_ledger(path)
        hits = [row for row in rows if match(row)]
        for row in hits:
            row.update(fields)
        if hits:
            with reporting_disk_full(path, "the ledger was left unchanged"):
                write_text_atomic(path, "".join(json.dumps(row, allow_nan=True) + "\n" for row in rows))
        return len(hits)


def read_ledger(path: str) -> list[dict[str, Any]]:
    """All rows of a ledger file, in order; a line that is not a JSON object is a one-line error naming it."""
    return [row for _, row in json_objects(path)]


def make_row(cfg: Any, counts: Any, plan: Any, *, val_loss: float | None, tokens_per_s: float, wall_time_s: float,
             steps: int, world_size: int, run_id: str | None = None) -> dict[str, Any]:
    """The ledger row of a finished run. `cfg`: RunConfig; `counts`: ParamCounts; `plan`: BudgetPlan; `run_id`:
    the identity `record_run` keeps rows unique by (None for a run from before run ids: its name is used)."""
    from sparse_dc.model.build import achieved_density

    return {
        "name": cfg.name,
        "run_id": run_id,
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
        "density_achieved": achieved_density(cfg.model, cfg.sparsity),  # live fraction of the sparse layers
        "epochs": plan.total_tokens / plan.unique_tokens,
        "seq_len": plan.seq_len,
        "block_size": cfg.sparsity.block_size,
        "dst_method": cfg.sparsity.method if cfg.sparsity.sparse else "dense",
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
