"""Multi-node launchers on two loopback "nodes" of this machine, each against the same 2-rank run started on one
node with torchrun: `deepspeed --hostfile` over pdsh/ssh, torchrun with --nnodes 2 and a c10d rendezvous, `mpirun
-n 2` (Open MPI) and `deepspeed --launcher openmpi`. Every launcher must end with the reference's losses, bitwise
(fp32 on CPU: the same world size gives the same arithmetic whatever started the ranks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemons import require
from train_harness import OPEN_MPI, Run, free_port, train_env, write_config

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
TRAIN = ["--module", "sparse_dc.train.cli"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, cluster_data):
    work = tmp_path_factory.mktemp("multinode")
    write_config(work, cluster_data, "multinode", "block")
    # the deepspeed launcher exports the variables in ./.deepspeed_env to every node (ssh starts a bare shell)
    (work / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\n")
    return work


def train(work: Path, name: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> Run:
    proc = subprocess.run(argv + [str(work / "multinode.yaml"), f"name={name}"], cwd=work, capture_output=True,
                          text=True, timeout=timeout, env={**train_env(work), **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return Run(work / "runs" / name, proc).load()


def ledger_row(work: Path, name: str) -> dict:
    rows = [json.loads(line) for line in (work / "ledger.jsonl").read_text().splitlines()]
    return next(row for row in rows if row["name"] == name)


@pytest.fixture(scope="module")
def reference(work) -> Run:
    return train(work, "one-node", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "sparse_dc.train.cli", "--config"])


def check_same_as_reference(work: Path, run: Run, reference: Run) -> None:
    assert len(reference.losses()) == 25 and run.losses() == reference.losses()
    row, expected = ledger_row(work, run.dir.name), ledger_row(work, reference.dir.name)
    assert row["world_size"] == 2 and row["val_loss"] == expected["val_loss"]


def hostfile(work: Path, text: str) -> str:
    path = work / f"hostfile-{free_port()}"
    path.write_text(text)
    return str(path)


def test_deepspeed_hostfile_two_nodes_over_pdsh(work, reference, loopback_ssh):
    nodes = hostfile(work, "localhost slots=1\n127.0.0.1 slots=1\n")  # two names, one machine
    run = train(work, "deepspeed-pdsh", DEEPSPEED + ["--hostfile", nodes, "--master_addr", "127.0.0.1",
                                                     "--master_port", str(free_port()), *TRAIN, "--config"],
                env=loopback_ssh.env)
    output = run.proc.stdout + run.proc.stderr
    assert "localhost: " in output and "127.0.0.1: " in output  # pdsh prefixes the lines of each node
    check_same_as_reference(work, run, reference)


def test_torchrun_two_nodes_with_c10d_rendezvous(work, reference):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "multinode", "-m", "sparse_dc.train.cli", "--config",
                               str(work / "multinode.yaml"), "name=torchrun-2nodes"],
                              cwd=work, env=train_env(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    check_same_as_reference(work, Run(work / "runs" / "torchrun-2nodes").load(), reference)


def test_mpirun_two_ranks(work, reference):
    mpirun = require("mpirun", install="apt-get install openmpi-bin")["mpirun"]
    if "Open MPI" not in subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("mpirun is not Open MPI's (apt-get install openmpi-bin)")
    run = train(work, "mpirun", [mpirun, "-n", "2", *OPEN_MPI, sys.executable, "-m", "sparse_dc.train.cli",
                                 "--config"], env={"MASTER_PORT": str(free_port())})
    check_same_as_reference(work, run, reference)


def test_deepspeed_openmpi_launcher(work, reference, loopback_ssh):
    """DeepSpeed's engine checks LOCAL_RANK against OMPI_COMM_WORLD_LOCAL_RANK: both must agree on every rank."""
    require("mpirun", "ompi_info", install="apt-get install openmpi-bin")
    nodes = hostfile(work, "localhost slots=2\n")
    run = train(work, "deepspeed-openmpi", DEEPSPEED + [
        "--launcher", "openmpi", "--force_multi", "--hostfile", nodes, "--master_addr", "127.0.0.1",
        "--launcher_args", " ".join(OPEN_MPI), *TRAIN, "--config"],
        env={**loopback_ssh.env, "MASTER_PORT": str(free_port())})
    check_same_as_reference(work, run, reference)
