"""What keeps a run's outcome honest under any launcher: one writer per run directory, a status file that says how
the run ended when the launcher's exit code cannot, and user errors that reach the screen exactly once.

- **One writer.** Rank 0 holds an exclusive `flock` on `<run>/writer.lock` for the whole run (the file records
  who: pid, host, start time). The kernel drops the lock when the holder dies, however it dies, so a crash never
  leaves a stale lock; a second launch on the same run (two sweeps over one output folder, a resume while the
  first is still running) is refused with exit status 73 naming the holder. torchrun starts its ranks in their
  own sessions, so `kill -9` of torchrun's process group would leave them running as orphans that keep training
  and checkpointing: under torchrun every rank asks the kernel to SIGKILL it when its launcher dies.
- **Status file.** torchrun and the deepspeed launcher exit 1 whatever their ranks returned (75 after a
  preemption stop, 2 after a user error). When `SPARSE_DC_STATUS_FILE` is set, rank 0 writes there, atomically,
  how the run ended: {"state": finished | paused | stopped | busy | failed, "exit": code, "message": ...}. The
  sweep runner and the SLURM script read it instead of the launcher's status.
- **Errors once.** Every user error is raised identically on every rank (a replicated check, or one agreed by a
  collective), so rank 0 alone reports it, and ranks > 0 wait before they exit: a launcher that stops the job
  when its first rank fails (torchrun, the deepspeed launcher, srun --kill-on-bad-exit) must not kill rank 0
  before it reported. Under torchrun rank 0 writes the message to torchrun's error file instead of printing it,
  so it appears once, as the root cause in torchrun's failure summary.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
import time
from typing import Any

from sparse_dc.config.base import write_text_atomic
from sparse_dc.errors import SparseDCError

STATUS_ENV = "SPARSE_DC_STATUS_FILE"
EXIT_ERROR = 2  # a user error (config, data, checkpoint): the one-line message says what to fix
EXIT_BUSY = 73  # another process is writing this run (EX_CANTCREAT)
EXIT_STOPPED = 75  # a signal made the run save and stop: resumable (EX_TEMPFAIL); train.sbatch requeues on it
LOCK_FILE = "writer.lock"
LOCK_WAIT_S = 5.0  # a writer that was just killed may take a moment to go
ERROR_GRACE_S = 10.0  # how long ranks > 0 wait for rank 0 to report a shared error before they exit


class RunBusy(SparseDCError):
    """Another live process holds the run directory's writer lock."""


class RunLock:
    """The exclusive writer lock of one run directory, held until the process exits (or `release`)."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self, wait_s: float = LOCK_WAIT_S) -> str | None:
        """Take the lock (retrying for `wait_s`); raises RunBusy naming the holder. Returns a warning when the
        filesystem offers no flock (the run proceeds unguarded), else None."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    return (f"WARNING: cannot lock {self.path} ({os.strerror(exc.errno or 0)}): this filesystem has "
                            "no flock, so a second writer of this run would not be detected")
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunBusy(f"run directory {os.path.dirname(self.path)} is being written by another process "
                                  f"({holder}): expected one writer per run; wait for it to end or stop it, or "
                                  "use another name=") from None
                time.sleep(0.2)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def write_status(state: str, exit_code: int, **fields: Any) -> None:
    """Record how the run ended in $SPARSE_DC_STATUS_FILE (rank 0 calls it; no-op when the variable is unset)."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    record = {"state": state, "exit": exit_code, **fields, "pid": os.getpid(), "host": socket.gethostname(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_text_atomic(path, json.dumps(record) + "\n")
    except OSError as exc:  # the status file is a courtesy to the launcher: never let it mask the run's outcome
        print(f"WARNING: could not write the status file {path}: {exc}", file=sys.stderr)


def read_status(path: str) -> dict[str, Any] | None:
    """A status file's record, or None if it is missing or unreadable (the run died before writing one)."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> None:
    """Under torchrun (whose ranks run in their own sessions): have the kernel SIGKILL this rank when the
    launcher dies, so `kill -9` of the launcher leaves no orphan rank training or holding the writer lock."""
    if not under_torchrun() or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os._exit(EXIT_STOPPED)


def report_error(message: str, launch_rank: int, exit_code: int = EXIT_ERROR) -> bool:
    """Deliver a user error once per launch; returns whether the caller should print it (rank 0 outside
    torchrun). Ranks > 0 exit through here after a grace period, which the launcher normally cuts short once
    rank 0 has exited; under torchrun rank 0 hands the message to torchrun's error file and exits."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if launch_rank != 0:
        time.sleep(ERROR_GRACE_S)
        os._exit(exit_code)
    if not (under_torchrun() and error_file):
        return True
    # torchrun's summary names the failure with the earliest timestamp as the root cause; its timestamps are whole
    # seconds and a rank it stops afterwards is stamped at that moment, so this one is dated a second earlier
    try:
        write_text_atomic(error_file, json.dumps({"message": message, "timestamp": math.floor(time.time()) - 1}))
    except OSError:
        return True
    os._exit(exit_code)
