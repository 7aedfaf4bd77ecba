"""A one-node SLURM cluster inside a test folder: munged, slurmctld and slurmd from the Debian packages, with every
file (config, key, sockets, spool, state, logs) under that folder and the controller on 127.0.0.1. Nothing in
/etc is read or changed: clients find the cluster through SLURM_CONF, munge through its own socket."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from daemons import Stack, require, wait_until
from train_harness import free_port

PACKAGES = "apt-get install slurmctld slurmd slurm-client munge"

SLURM_CONF = """\
ClusterName=sparsedc
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again after ~11 s instead of the default ~121 s
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
{node} NodeAddr=127.0.0.1
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def node_line(slurmd: str) -> str:
    """This machine as `slurmd -C` sees it (CPUs, cores, memory), RealMemory lowered so the node is never drained
    for having less memory than configured."""
    line = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in line.split())
    fields["RealMemory"] = str(int(fields["RealMemory"]) * 9 // 10)
    return " ".join(f"{key}={value}" for key, value in fields.items())


class LocalSlurm:
    """Start with `start()`, submit with `sbatch()`, stop with `stop()` (cancels every job first)."""

    def __init__(self, root: Path):
        self.bins = require("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol",
                            install=PACKAGES)
        self.root = root
        self.stack = Stack()
        self.conf = root / "slurm.conf"
        self.host = ""
        # jobs inherit this environment (sbatch --export=ALL): the test's Python first on PATH for `sparse-dc`
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env.update(SLURM_CONF=str(self.conf), PATH=f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}")

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # a Unix socket path is limited to 108 bytes: keep it short
        socket_dir = Path(f"/tmp/sdc-munge-{os.getpid()}")
        socket_dir.mkdir(mode=0o755, exist_ok=True)
        self.stack.cleanups.append(lambda: shutil.rmtree(socket_dir, ignore_errors=True))
        munge_socket = socket_dir / "munge.sock"
        munged = self.stack.start("munged", [self.bins["munged"], "--foreground", "--force",
                                             f"--key-file={key}", f"--socket={munge_socket}",
                                             f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                                             f"--seed-file={self.root / 'munge' / 'seed'}"],
                                  self.root / "log" / "munged.log")
        wait_until(lambda: munge_socket.exists() or munged.check_alive(), 20, "munged socket")

        node = node_line(self.bins["slurmd"])
        self.host = node.split()[0].split("=", 1)[1]
        self.conf.write_text(SLURM_CONF.format(host=self.host, ctld_port=free_port(), slurmd_port=free_port(),
                                               munge_socket=munge_socket, root=self.root, node=node))
        ctld = self.stack.start("slurmctld", [self.bins["slurmctld"], "-D", "-f", str(self.conf)],
                                self.root / "log" / "slurmctld.out", self.env)
        slurmd = self.stack.start("slurmd", [self.bins["slurmd"], "-D", "-f", str(self.conf)],
                                  self.root / "log" / "slurmd.out", self.env)

        def node_idle() -> bool:
            ctld.check_alive()
            slurmd.check_alive()
            return self.run("sinfo", "--noheader", "--format=%T", check=False).stdout.strip() == "idle"

        wait_until(node_idle, 60, "SLURM node idle", interval=0.5)

    def stop(self) -> None:
        """Cancel every job, wait for the node to be empty (job steps stop with their job), stop the daemons."""
        try:
            if self.conf.exists():
                self.run("scancel", "--full", "--user", "root", check=False)
                wait_until(lambda: not self.queued(check=False), 60, "cancelled jobs to leave the queue")
        finally:
            self.stack.stop()

    # ------------------------------------------------------------------------------------------------- clients
    def run(self, *argv: str, cwd: Path | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str, cwd: Path, timeout: float = 60) -> str:
        """Submit; returns the job id (with --wait, once the job ended: raises if it failed)."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, timeout=timeout).stdout.strip().split(";")[0]

    def queued(self, check: bool = True) -> set[str]:
        """Ids of the jobs SLURM still lists (pending, running, completing, requeued)."""
        proc = self.run("squeue", "--noheader", "--format=%i", check=check)
        return set(proc.stdout.split())

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (kept by the controller for MinJobAge = 300 s after the job ended)."""
        text = self.run("scontrol", "--oneliner", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_done(self, job_ids: set[str] | list[str], timeout: float) -> None:
        wait_until(lambda: not (set(job_ids) & self.queued()), timeout, f"jobs {sorted(job_ids)} to finish",
                   interval=1)


def job_log(folder: Path, job_id: str) -> str:
    """The text of the one job log named *-<job_id>.out in `folder` (empty while none exists)."""
    logs = list(folder.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else ""
