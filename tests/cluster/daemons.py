"""Daemons the cluster tests start for themselves (munged, slurmctld, slurmd, sshd, dockerd): each one started in
the foreground as a child of the test session, its output in a log file, and stopped by its PID at the end.
Nothing listens on anything but 127.0.0.1 or a Unix socket in the test's own folder."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def require(*binaries: str, install: str) -> dict[str, str]:
    """{name: path} of each binary, or skip the test naming what is missing and how to get it."""
    found = {name: shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for name in binaries}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: {install} (.ci/cluster-deps installs it)")
    return found  # type: ignore[return-value]


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


class Daemon:
    """One daemon process run in the foreground (its own session), output appended to `log`."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.log = name, log
        with open(log, "ab") as sink:
            self.proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; only this PID (its children are its own business: the
        daemons here stop their workers on SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Stack:
    """Daemons started in order and stopped in reverse order, whatever happens in between."""

    def __init__(self) -> None:
        self.daemons: list[Daemon] = []
        self.cleanups: list[Callable[[], None]] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(name, argv, log, env)
        self.daemons.append(daemon)
        return daemon

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        for cleanup in reversed(self.cleanups):
            cleanup()
