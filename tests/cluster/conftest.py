"""Fixtures of the real-cluster tests (marker `cluster`): a prepared corpus, and the pieces of a cluster started on
this machine by the tests themselves and stopped by PID at the end of the test module that uses them: a one-node
SLURM (munged, slurmctld, slurmd), a loopback sshd for pdsh, and a Docker daemon. A piece that is not installed skips
its tests, naming the packages (`.ci/cluster-deps` installs them all); everything listens on 127.0.0.1 or a Unix
socket in the test folder, and nothing in /etc or ~/.ssh is changed."""
import sys
from pathlib import Path

import pytest

# the end-to-end training helpers (config writer, run environment) are shared with tests/train
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from local_docker import LocalDocker  # noqa: E402
from local_slurm import LocalSlurm  # noqa: E402
from local_ssh import LoopbackSSH  # noqa: E402
from train_harness import prepare_corpus  # noqa: E402


@pytest.fixture(scope="session")
def cluster_data(tmp_path_factory) -> Path:
    """~150K tokens of built-in documents, vocab 512 (the corpus of tests/train)."""
    return prepare_corpus(tmp_path_factory.mktemp("cluster_data"))


def _started(piece, request):
    request.addfinalizer(piece.stop)
    piece.start()
    return piece


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, request) -> LocalSlurm:
    return _started(LocalSlurm(tmp_path_factory.mktemp("slurm")), request)


@pytest.fixture(scope="module")
def loopback_ssh(tmp_path_factory, request) -> LoopbackSSH:
    return _started(LoopbackSSH(tmp_path_factory.mktemp("ssh")), request)


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory, request) -> LocalDocker:
    return _started(LocalDocker(tmp_path_factory.mktemp("docker")), request)
