"""Passwordless ssh to this machine for launchers that reach their nodes over ssh (pdsh, `deepspeed --hostfile`):
an sshd on 127.0.0.1 with its own host key, authorized key and client config, all inside a test folder. ~/.ssh
and /etc/ssh are not read or changed: `bin/ssh` runs the real ssh with that config and goes first on PATH."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from daemons import Stack, require, wait_until
from train_harness import free_port

PACKAGES = "apt-get install openssh-server openssh-client pdsh"

SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""

# The two "nodes" of a hostfile: two loopback names for the same machine.
SSH_CONFIG = """\
Host localhost 127.0.0.1
  Port {port}
  IdentityFile {root}/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile {root}/known_hosts
  StrictHostKeyChecking accept-new
  BatchMode yes
"""


class LoopbackSSH:
    def __init__(self, root: Path):
        self.bins = require("sshd", "ssh", "ssh-keygen", "pdsh", install=PACKAGES)
        self.root = root
        self.stack = Stack()
        self.bin_dir = root / "bin"
        self.env = {**os.environ, "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}"}

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        for key in ("host_key", "id_ed25519"):
            subprocess.run([self.bins["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / key)],
                           check=True)
        shutil.copy(self.root / "id_ed25519.pub", self.root / "authorized_keys")
        port = free_port()
        (self.root / "sshd_config").write_text(SSHD_CONFIG.format(port=port, root=self.root))
        (self.root / "ssh_config").write_text(SSH_CONFIG.format(port=port, root=self.root))
        self.bin_dir.mkdir()
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {self.bins["ssh"]} -F {self.root / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)

        privsep = Path("/run/sshd")  # sshd refuses to start as root without its privilege-separation folder
        if os.geteuid() == 0 and not privsep.exists():
            privsep.mkdir(mode=0o755, parents=True)
            self.stack.cleanups.append(lambda: shutil.rmtree(privsep, ignore_errors=True))
        sshd = self.stack.start("sshd", [self.bins["sshd"], "-D", "-e", "-f", str(self.root / "sshd_config")],
                                self.root / "sshd.log")

        def logged_in() -> bool:
            sshd.check_alive()
            return self.ssh("127.0.0.1", "true").returncode == 0

        wait_until(logged_in, 30, "ssh login to 127.0.0.1", interval=0.5)

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", host, command], capture_output=True, text=True, env=self.env, timeout=30)

    def stop(self) -> None:
        self.stack.stop()
