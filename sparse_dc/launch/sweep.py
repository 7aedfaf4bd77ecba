"""Sweeps: expand a grid of config overrides into training runs, run them locally or submit them to SLURM.

    grid = {"model.preset": ["20m", "40m"], "sparsity.density": [1.0, 0.5], "data.epochs": [1, 4]}

Every run is `sparse-dc train --config BASE --resume auto name=<derived> key=value ...` and appends one row to the
shared ledger when it finishes, so `sparse-dc law fit LEDGER` reads a sweep directly. Runs already in the ledger
are skipped, and an interrupted run resumes from its newest checkpoint: re-running a sweep finishes it. A local
run counts as done only once its row is in the ledger; how it ended otherwise comes from the status file the
run writes (sparse_dc/train/runguard.py), since torchrun replaces a run's exit status by its own: "stopped"
(a signal; resumable), "busy" (another process, e.g. a second sweep over the same folder, is training it) or
"failed" (its one-line error is logged).
With SLURM, submitted job ids are kept in `log_dir/slurm_jobs.json`; a re-run skips runs whose job is still pending
or running (asked of `squeue` in one call) and resubmits only those whose job ended without a ledger row, so
running a sweep twice before its jobs finish does not train anything twice. The folder of the script's job log
(`#SBATCH --output`, or `--output` among the sbatch arguments) is created before submitting: SLURM opens that file
before the script runs and fails the job, without a log, when the folder is missing.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from sparse_dc.config.base import load_config, parse_scalar, write_text_atomic
from sparse_dc.config.run import RunConfig
from sparse_dc.errors import SparseDCError
from sparse_dc.train.ledger import read_ledger
from sparse_dc.train.runguard import STATUS_ENV, read_status

log = logging.getLogger(__name__)
SLURM_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "slurm", "train.sbatch")
# launch/slurm/train.sbatch asks for 8 GPUs per node; what to pass after `--` where the nodes have none
CPU_NODE_HINT = ("the script requests GPUs (--gpus-per-node=8, 8 tasks x 12 CPUs): on CPU-only nodes override it "
                 "after --, e.g. -- --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1")
# Short names for the fields that usually vary, so run names stay readable: 20m-d0.5-u100M-e4
_TAGS = {"model.preset": "", "sparsity.density": "d", "sparsity.block_size": "b", "sparsity.method": "",
         "data.unique_tokens": "u", "data.epochs": "e", "data.total_tokens": "D", "train.seed": "s"}


class SweepError(SparseDCError):
    """A grid that cannot be expanded or run."""


@dataclass(frozen=True)
class Run:
    name: str
    overrides: tuple[str, ...]  # dotted key=value, `name=` first
    config: RunConfig  # the validated config the run will train with

    def train_args(self, base_config: str) -> list[str]:
        return ["--config", base_config, "--resume", "auto", *self.overrides]


def _short(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and value >= 1000:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
            if value >= scale and value % (scale // 10) == 0:
                return f"{value / scale:g}{suffix}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(prefix: str, point: dict[str, Any]) -> str:
    parts = [prefix] if prefix else []
    for key, value in point.items():
        tag = _TAGS.get(key, key.rsplit(".", 1)[-1] + "=")
        parts.append(f"{tag}{_short(value)}")
    return "-".join(parts).replace("/", "_")


def parse_grid_args(items: list[str]) -> dict[str, list[Any]]:
    """['sparsity.density=1,0.5', 'data.epochs=1,2,4'] -> {'sparsity.density': [1, 0.5], ...}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SweepError(f"grid axis {item!r}: expected key=v1,v2,... e.g. sparsity.density=1,0.5")
        grid[key.strip()] = [parse_scalar(v) for v in values.split(",")]
    return grid


def expand(base_config: str | None, grid: dict[str, list[Any]], prefix: str = "",
           extra: list[str] | None = None) -> list[Run]:
    """Cartesian product of the grid; each point is validated as a full RunConfig before anything runs."""
    if not grid:
        raise SweepError("empty grid: expected at least one axis such as sparsity.density=1,0.5")
    runs = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        name = run_name(prefix, point)
        overrides = (f"name={name}", *(extra or []), *(f"{k}={_text(v)}" for k, v in point.items()))
        # Validated now, so a bad grid value fails before the first run rather than mid-sweep.
        runs.append(Run(name, overrides, load_config(RunConfig, base_config, list(overrides))))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SweepError("two grid points map to the same run name: give each axis distinct values")
    return runs


def _text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def finished(ledger: str) -> set[str]:
    return {row.get("name") for row in read_ledger(ledger)} if os.path.exists(ledger) else set()


# statuses of runs that did not finish in this sweep; a sweep or reproduction reporting one of them exits non-zero
UNFINISHED = ("failed", "stopped", "busy")


def unfinished(status: dict[str, str]) -> list[str]:
    """Names of the runs of a run_sweep result that did not end with their ledger row."""
    return [name for name, s in status.items() if s in UNFINISHED]


def local_command(run: Run, base_config: str, nproc: int) -> list[str]:
    """One process (no launcher: it sets up its own rendezvous) or torchrun with `nproc` ranks on this host."""
    if nproc <= 1:
        return [sys.executable, "-m", "sparse_dc.train.cli", *run.train_args(base_config)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "sparse_dc.train.cli", *run.train_args(base_config)]


def _sbatch_option(args: list[str], long: str, short: str) -> str | None:
    """The last value of an sbatch option given as `--long=V`, `--long V`, `-s V` or `-sV` (as sbatch reads it)."""
    value = None
    for i, arg in enumerate(args):
        if arg in (long, short):
            value = args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith(long + "="):
            value = arg[len(long) + 1:]
        elif arg.startswith(short) and not arg.startswith("--") and len(arg) > len(short):
            value = arg[len(short):]
    return value


def _script_options(script: str) -> list[str]:
    """The options of a batch script's `#SBATCH` header (sbatch stops reading at the first command line)."""
    options: list[str] = []
    with open(script, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                break
            if line.startswith("#SBATCH"):
                options += shlex.split(line[len("#SBATCH"):])
    return options


def slurm_log_dir(sbatch_args: list[str], script: str = SLURM_SCRIPT) -> str | None:
    """The folder SLURM writes the job log into: the script header's --output, overridden by `sbatch_args`,
    relative to --chdir or the submitting directory; None when the folder name itself holds a %-pattern."""
    options = _script_options(script) + sbatch_args
    output = _sbatch_option(options, "--output", "-o")
    folder = os.path.dirname(output) if output else ""
    if "%" in folder:
        return None
    return os.path.join(_sbatch_option(options, "--chdir", "-D") or os.getcwd(), folder)


def slurm_command(run: Run, base_config: str, sbatch_args: list[str]) -> list[str]:
    # --parsable: sbatch prints "jobid[;cluster]" only, which is what we record
    return ["sbatch", "--parsable", f"--job-name={run.name}", *sbatch_args, os.path.abspath(SLURM_SCRIPT),
            base_config, *run.overrides]


def _jobs_file(log_dir: str) -> str:
    return os.path.join(log_dir, "slurm_jobs.json")


def _read_jobs(log_dir: str) -> dict[str, str]:
    path = _jobs_file(log_dir)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            return dict(json.load(fh))
    except (ValueError, TypeError) as exc:
        raise SweepError(f"{path}: not a JSON object of run name -> SLURM job id ({exc}); fix or delete it") from None


def queued_jobs(job_ids: list[str], env: dict[str, str] | None = None) -> set[str]:
    """The ids among `job_ids` that SLURM still holds (pending, running, requeued, ...): one squeue call."""
    if not job_ids:
        return set()
    cmd = ["squeue", "--noheader", "--format=%i", f"--jobs={','.join(job_ids)}"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise SweepError("squeue not found: cannot tell which submitted runs are still queued, so nothing is "
                         "resubmitted; run on a SLURM login node") from None
    # squeue exits non-zero with "Invalid job id" when every listed job already left the queue: none is queued
    if result.returncode and "Invalid job id" not in result.stderr:
        raise SweepError(f"squeue failed ({result.stderr.strip() or result.returncode}): cannot tell which "
                         "submitted runs are still queued, so nothing is resubmitted")
    return {line.split("_")[0].strip() for line in result.stdout.splitlines() if line.strip()} & set(job_ids)


def run_sweep(runs: list[Run], base_config: str, ledger: str, log_dir: str,
              launcher: Literal["local", "slurm"] = "local", nproc: int = 1, sbatch_args: list[str] | None = None,
              dry_run: bool = False, env: dict[str, str] | None = None) -> dict[str, str]:
    """Run (or submit) every run not yet in the ledger (nor queued in SLURM); returns {name: status}, status one
    of 'done' (its row is in the ledger), 'failed', 'stopped', 'busy' (local), 'submitted', 'queued' (slurm),
    'skipped' (in the ledger already), 'planned' (dry run).

    Local runs go one after another; each one's output is written to `log_dir/<name>.log`."""
    done, status = finished(ledger), {}
    jobs = _read_jobs(log_dir) if launcher == "slurm" else {}
    waiting = [r.name for r in runs if r.name not in done and r.name in jobs]
    queued = queued_jobs([jobs[name] for name in waiting], env) if waiting else set()
    for run in runs:
        if run.name in done:
            status[run.name] = "skipped"
        elif jobs.get(run.name) in queued:
            status[run.name] = "queued"
            log.info("%s: SLURM job %s is still queued or running: not resubmitted", run.name, jobs[run.name])
    todo = [r for r in runs if r.name not in status]
    log.info("sweep: %d runs, %d already in %s, %d queued, %d to %s", len(runs), len(done & {r.name for r in runs}),
             ledger, len(queued), len(todo), "submit" if launcher == "slurm" else "run")
    if launcher == "slurm" and todo and not dry_run:
        log_folder = slurm_log_dir(sbatch_args or [])
        if log_folder:
            os.makedirs(log_folder, exist_ok=True)
    for index, run in enumerate(todo, 1):
        cmd = (slurm_command(run, base_config, sbatch_args or []) if launcher == "slurm"
               else local_command(run, base_config, nproc))
        log.info("[%d/%d] %s", index, len(todo), shlex.join(cmd))
        if dry_run:
            status[run.name] = "planned"
            continue
        if launcher == "slurm":
            jobs[run.name] = _submit(run, cmd, env)
            status[run.name] = "submitted"
            # saved after every submission, so an sbatch failure later in the loop loses no job id
            write_text_atomic(_jobs_file(log_dir), json.dumps(jobs, indent=1, sort_keys=True) + "\n")
        else:
            status[run.name] = _execute(run, cmd, log_dir, ledger, env)
    return status


def summarize(status: dict[str, str]) -> str:
    """'4 done, 2 skipped'-style counts of a run_sweep result, statuses in alphabetical order."""
    counts = {s: list(status.values()).count(s) for s in sorted(set(status.values()))}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _submit(run: Run, cmd: list[str], env: dict[str, str] | None) -> str:
    """sbatch one run; returns its job id."""
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    job_id = result.stdout.strip().split(";")[0]
    if result.returncode or not job_id.isdigit():
        message = result.stderr.strip() or result.stdout.strip()
        if "gres" in message.lower():
            message += f"; {CPU_NODE_HINT}"
        raise SweepError(f"sbatch failed for {run.name}: {message}")
    log.info("  submitted %s as job %s", run.name, job_id)
    return job_id


def _execute(run: Run, cmd: list[str], log_dir: str, ledger: str, env: dict[str, str] | None) -> str:
    started = time.time()
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{run.name}.log")
    status_path = os.path.join(log_dir, f"{run.name}.{os.getpid()}.status.json")  # this sweep's attempt only
    with open(log_path, "a") as sink:
        result = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                env={**(os.environ if env is None else env), STATUS_ENV: status_path})
    outcome = read_status(status_path) or {}
    if os.path.exists(status_path):
        os.remove(status_path)
    if run.name in finished(ledger):
        log.info("  %s finished in %.0f s (log: %s)", run.name, time.time() - started, log_path)
        return "done"
    state, message = outcome.get("state"), outcome.get("message")
    if state == "stopped":
        log.warning("  %s stopped by a signal after saving step %s: resumable, re-run the sweep to continue (log: "
                    "%s)", run.name, outcome.get("step"), log_path)
        return "stopped"
    if state == "busy":
        log.warning("  %s: %s", run.name, message)
        return "busy"
    if state in ("finished", "paused"):
        message = (f"it ended ({state}) without a row in the ledger {ledger}" if state == "finished" else
                   f"it paused at train.stop_at_step (step {outcome.get('step')}) before the end of its budget")
    log.error("  %s failed (exit %d): %s (log: %s)", run.name, result.returncode,
              message or "it ended without a status (killed?)", log_path)
    return "failed"


def sweep_ledger(runs: list[Run]) -> str:
    """The one ledger every run of the sweep appends to (a grid over train.ledger is refused)."""
    ledgers = {r.config.train.ledger for r in runs}
    if len(ledgers) != 1:
        raise SweepError(f"the runs of one sweep must share a ledger; the grid gives {sorted(ledgers)}")
    return ledgers.pop()
