"""A Docker daemon inside a test folder (images, containers and its socket there; no bridge, no iptables rules), and
the CPU stand-in for docker/Dockerfile's CUDA base image: Debian debootstrapped from the mirror apt already uses,
imported as an image, with Python and the CI pins of torch (CPU build) and triton installed from wheels."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemons import Stack, require, wait_until

PACKAGES = "apt-get install docker.io debootstrap"
ROOT = Path(__file__).resolve().parents[2]
SUITE, PYTHON = "bookworm", "3.11"  # the stand-in base's Debian release and the Python it ships


class LocalDocker:
    def __init__(self, root: Path):
        self.bins = require("dockerd", "docker", "debootstrap", install=PACKAGES)
        self.root = root
        self.stack = Stack()
        # the daemon's run-time folder holds Unix sockets (at most 108 bytes a path): keep it short
        self.exec_root = Path(f"/tmp/sdc-docker-{os.getpid()}")
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.exec_root}/docker.sock", "DOCKER_BUILDKIT": "0"}

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.stack.cleanups.append(self._remove_storage)
        # folders dockerd and containerd's shims make in /run whatever their roots: removed after, if new
        for made in [path for path in (Path("/run/docker"), Path("/run/containerd")) if not path.exists()]:
            self.stack.cleanups.append(lambda made=made: shutil.rmtree(made, ignore_errors=True))
        daemon = self.stack.start("dockerd", [
            self.bins["dockerd"], f"--data-root={self.root / 'data'}", f"--exec-root={self.exec_root}",
            f"--pidfile={self.root / 'dockerd.pid'}", f"--host={self.env['DOCKER_HOST']}",
            "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none"], self.root / "dockerd.log")

        def answers() -> bool:
            daemon.check_alive()
            return self.docker("version", check=False).returncode == 0

        wait_until(answers, 60, "dockerd", interval=0.5)

    def stop(self) -> None:
        self.stack.stop()

    def _remove_storage(self) -> None:
        """Unmount what a killed daemon may have left mounted, then delete its images (gigabytes)."""
        with open("/proc/mounts", encoding="utf-8") as fh:
            mounts = [line.split()[1] for line in fh]
        for mount in sorted(mounts, reverse=True):
            if mount.startswith((str(self.root), str(self.exec_root))):
                subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.root / "data", ignore_errors=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)

    def docker(self, *argv: str, check: bool = True, timeout: float = 60,
               log: Path | None = None) -> subprocess.CompletedProcess:
        """Run the docker client; with `log`, its output goes to that file (builds print thousands of lines)."""
        if log is None:
            proc = subprocess.run([self.bins["docker"], *argv], capture_output=True, text=True, env=self.env,
                                  timeout=timeout)
        else:
            with open(log, "w") as sink:
                proc = subprocess.run([self.bins["docker"], *argv], stdout=sink, stderr=subprocess.STDOUT, text=True,
                                      env=self.env, timeout=timeout)
        if check and proc.returncode:
            output = log.read_text()[-4000:] if log else proc.stderr[-4000:]
            raise AssertionError(f"docker {' '.join(argv[:3])} exited {proc.returncode}: {output}")
        return proc

    # ------------------------------------------------------------------------------------- the stand-in base
    def debian_image(self, tag: str) -> str:
        """`debootstrap --variant=minbase` of SUITE, imported as `tag` (the root filesystem is deleted after)."""
        rootfs = self.root / "rootfs"
        log = self.root / "debootstrap.log"
        with open(log, "w") as sink:
            proc = subprocess.run([self.bins["debootstrap"], "--variant=minbase", SUITE, str(rootfs), debian_mirror()],
                                  stdout=sink, stderr=subprocess.STDOUT, timeout=900)
        if proc.returncode:
            pytest.skip(f"debootstrap {SUITE} failed (exit {proc.returncode}): {log.read_text()[-500:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([self.bins["docker"], "import", "-c", 'CMD ["/bin/bash"]', "-", tag],
                                  stdin=tar.stdout, capture_output=True, text=True, env=self.env, timeout=300)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
        assert imported.returncode == 0 and tar.returncode == 0, imported.stderr
        return tag

    def cpu_base(self, tag: str, rootfs_image: str, pins: dict[str, str]) -> str:
        """tests/cluster/cpu-base.Dockerfile on `rootfs_image`, with torch and triton at `pins` as wheels."""
        context = self.root / "base-context"
        (context / "wheels").mkdir(parents=True)
        (context / "certs").mkdir()
        wheels = [f"{name}=={pins[name]}" for name in ("torch", "triton")]
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   f"--python-version={PYTHON}", "--platform=manylinux_2_28_x86_64",
                                   "-d", str(context / "wheels"), *wheels], capture_output=True, text=True, timeout=600)
        assert download.returncode == 0, download.stderr[-3000:]
        if not any("+cpu" in p.name for p in (context / "wheels").glob("torch-*.whl")):
            pytest.skip(f"pip resolves {wheels[0]} to a CUDA build here, not the CPU wheel: the stand-in base would "
                        "download gigabytes")
        # the build machine's extra certificate authorities, the folder update-ca-certificates reads
        for cert in Path("/usr/local/share/ca-certificates").rglob("*.crt"):
            shutil.copy(cert, context / "certs" / cert.name)
        shutil.copy(Path(__file__).parent / "cpu-base.Dockerfile", context / "Dockerfile")
        self.docker("build", "--network=host", f"--build-arg=ROOTFS_IMAGE={rootfs_image}", "-t", tag, str(context),
                    timeout=1200, log=self.root / "base-build.log")
        shutil.rmtree(context)
        return tag


def debian_mirror() -> str:
    """The Debian archive apt on this machine uses (deb822 .sources or a one-line sources.list)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    texts += [p.read_text() for p in [Path("/etc/apt/sources.list")] if p.exists()]
    for text in texts:
        match = (re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, flags=re.M)
                 or re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)/?\s", text, flags=re.M))
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def ci_pins() -> dict[str, str]:
    """requirements/ci.txt as {normalised name: version}."""
    pins = {}
    for line in (ROOT / "requirements" / "ci.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
