"""The run ledger: one JSON line per finished run, read by the scaling-law toolkit (`sparse-dc law`).

Shared field names (the law toolkit's contract): `name`, `dense_params` and `active_params` (N exactly as the
paper's fit counts it: every parameter but the input embedding table, and active = dense x the measured live
fraction of the sparse layers, the LM head included and scaled; see sparse_dc/model/params.py), `density`,
`unique_tokens`, `tokens` (U and D in sequence slots, the paper's count), `val_loss`. The rest: the physical
counts (`active_params_physical`: live parameters but the input embedding; raw totals `*_params_total`, embedding
included; non-embedding counts), `density_measured` (the live fraction), real (unpadded) token counts,
`val_loss_paper` (the paper code's estimator), `effective_active_params` (active_params counted over the live
sparse weights on a live gradient path only, the ones that can train; `dead_path_params`: the live weights that
cannot; sparse_dc.sparsity.paths), `epochs` (R = D / U), the validation set (`val_tokens`, `val_source`: heldout |
prefix, `val_from`), block size (null for a dense run), block topology, DST method and regrowth init, throughput,
wall time, config hash, git commit.

Appends are one `write()` of a whole line on an O_APPEND descriptor under an exclusive `flock`, so concurrent runs
sharing a ledger (an array job on one filesystem) never interleave or tear lines. `record_run` appends a finished
run's row only if no row with its `run_id` is there yet, under the same lock (idempotent: a run resumed after it
finished, or recording again after a crash, ends with exactly one row). `update_row` changes one row in place
(downstream scores joining a finished run's row) by writing the whole ledger to a temporary file that replaces it,
under the same lock. Readers take no lock: every state of the file they can see is whole.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from typing import Any, Callable, Iterator

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


@contextlib.contextmanager
def _locked(path: str) -> Iterator[int]:
    """An O_APPEND descriptor on the ledger holding its exclusive flock. `update_row` replaces the file by a rename,
    so a writer that waited for the lock re-opens when `path` now names another file (its line would otherwise go
    to the replaced, unlinked one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    try:
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_row(row: dict[str, Any]) -> None:
    missing = [f for f in SHARED_FIELDS if f not in row]
    if missing:
        raise SparseDCError(f"ledger row lacks {', '.join(missing)}: expected all of {', '.join(SHARED_FIELDS)}")


def _write_line(fd: int, path: str, row: dict[str, Any]) -> None:
    """One whole line on the locked O_APPEND descriptor; a full disk is a one-line DiskFull, no half line left."""
    data = (json.dumps(row, allow_nan=True) + "\n").encode("utf-8")
    with reporting_disk_full(path, f"the row of run {row['name']!r} was not written"):
        written = os.write(fd, data)
        if written != len(data):  # a full disk can also cut a write short: take the partial line back
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(28, f"short write to the ledger {path}: {written} of {len(data)} bytes")
        os.fsync(fd)


def append_row(path: str, row: dict[str, Any]) -> None:
    """Append `row` as one JSON line to the ledger at `path` (created with its folder if missing)."""
    _check_row(row)
    with _locked(path) as fd:
        _write_line(fd, path, row)


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows record the same run: the same `run_id`, or the same name when either lacks one (a row
    from before run ids)."""
    if a.get("run_id") and b.get("run_id"):
        return a["run_id"] == b["run_id"]
    return a.get("name") == b.get("name")


def record_run(path: str, row: dict[str, Any]) -> bool:
    """Append the row of a finished run unless the ledger already holds it (`same_run`); returns whether it was
    appended. Safe to call again after a crash or on a resume of a finished run: a run ends with exactly one row."""
    _check_row(row)
    with _locked(path) as fd:
        if any(same_run(old, row) for old in read_ledger(path)):
            return False
        _write_line(fd, path, row)
        return True


def update_row(path: str, match: Callable[[dict[str, Any]], bool],
               change: Callable[[dict[str, Any]], dict[str, Any]], what: str = "matching row") -> dict[str, Any]:
    """Replace the last row for which `match(row)` holds by `change(row)` and return the new row. The ledger is
    rewritten to a temporary file (every other line byte for byte) that is renamed over it, under the append lock:
    a reader sees the old or the new ledger, a concurrent append is neither lost nor torn, and a crash leaves the
    old ledger. SparseDCError when the ledger is missing or no row matches (`what` names the row sought)."""
    if not os.path.isfile(path):
        raise SparseDCError(f"ledger {path} does not exist")
    with _locked(path):
        rows = {lineno - 1: row for lineno, row in json_objects(path)}  # checked: one-line errors
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
        hits = [i for i, row in rows.items() if match(row)]
        if not hits:
            raise SparseDCError(f"ledger {path} has no {what}")
        new = change(rows[hits[-1]])
        lines[hits[-1]] = json.dumps(new, allow_nan=True) + "\n"
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with reporting_disk_full(path, "the ledger was left unchanged"), open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(lines)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
    return new


def read_ledger(path: str) -> list[dict[str, Any]]:
    """All rows of a ledger file, in order (none if it does not exist yet); a line that is not a JSON object, or
    a file that is not UTF-8, is a one-line error naming it."""
    if not os.path.exists(path):
        return []
    return [row for _, row in json_objects(path)]


def make_row(cfg: Any, counts: Any, plan: Any, *, val_loss: float | None, tokens_per_s: float, wall_time_s: float,
             steps: int, world_size: int, val_loss_paper: float | None = None,
             run_id: str | None = None, effective_active_params: int | None = None,
             dead_path_params: int = 0) -> dict[str, Any]:
    """The ledger row of a finished run. `cfg`: RunConfig; `counts`: ParamCounts; `plan`: BudgetPlan; `run_id`:
    the identity `record_run` keeps rows unique by (None for a run from before run ids: its name is used);
    `effective_active_params`, `dead_path_params`: the DST engine's final stats (None: all active ones)."""
    return {
        "name": cfg.name,
        "run_id": run_id,
        "dense_params": counts.law_dense,
        "active_params": counts.law_active,
        "density": cfg.sparsity.density,
        "unique_tokens": plan.unique_tokens,
        "tokens": plan.total_tokens,
        "val_loss": val_loss,
        "val_loss_paper": val_loss_paper,
        "active_params_physical": counts.law_active_physical,
        "dense_params_total": counts.dense,
        "active_params_total": counts.active,
        "dense_params_non_embedding": counts.dense_non_embedding,
        "active_params_non_embedding": counts.active_non_embedding,
        "density_measured": counts.live_fraction,
        "effective_active_params": counts.law_active if effective_active_params is None else effective_active_params,
        "dead_path_params": dead_path_params,
        "epochs": plan.total_tokens / plan.unique_tokens,
        "packing": plan.packing,
        "unique_real_tokens": plan.unique_real_tokens,
        "real_tokens": plan.total_real_tokens,
        "seq_len": plan.seq_len,
        "val_tokens": plan.val_tokens,  # val_loss was measured on these tokens of:
        "val_source": plan.val_source,  # "heldout" (a separate prepared set) or "prefix" (carved off the corpus)
        "val_from": plan.val_from,
        "block_size": cfg.sparsity.block_size if cfg.sparsity.sparse else None,
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
