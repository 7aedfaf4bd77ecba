"""Rendezvous for every way a run is started: the `deepspeed` launcher, `torchrun`, `mpirun` (also
`deepspeed --launcher openmpi`), SLURM `srun`, or a plain single process; then DeepSpeed's process group (NCCL on
GPU, gloo on CPU).

The deepspeed launcher and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. MPI
launchers export only their own rank variables (OMPI_COMM_WORLD_* for Open MPI, PMI_* for MPICH and Intel MPI),
and `srun` only SLURM_* ones: both are translated. A plain process gets a one-rank world on a free port (without
these variables DeepSpeed falls back to probing MPI).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from sparse_dc.errors import SparseDCError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str
    """"torchrun/deepspeed" (env already set), "mpi", "slurm" or "single"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-007,010],cpu1' -> 'gpu003' (zero padding kept)."""
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise SparseDCError(f"SLURM_JOB_NODELIST={nodelist!r}: expected a SLURM host list such as node[01-04]")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


# The variables each MPI launcher exports to its ranks: (global rank, world size, rank on this node, ranks on this
# node); a launcher is recognised by its first three. Checked before SLURM_*: an `mpirun` inside an allocation gives
# every rank the batch step's SLURM_PROCID=0. (srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE but no local rank: SLURM_*.)
_MPI_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH's Hydra, Intel MPI
)


def _mpi_world(env: MutableMapping[str, str]) -> bool:
    """Translate an MPI launcher's rank variables; False when this process was not started by one."""
    names = next((names for names in _MPI_VARIABLES if all(name in env for name in names[:3])), None)
    if names is None:
        return False
    rank, size, local_rank, local_size = names
    # DeepSpeed's engine asserts that LOCAL_RANK equals OMPI_COMM_WORLD_LOCAL_RANK whenever the latter is set
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = env[rank], env[size], env[local_rank]
    if "MASTER_ADDR" not in env:
        if env.get(local_size, env[size]) != env[size]:
            raise SparseDCError(f"{size}={env[size]} ranks over several nodes ({local_size}={env[local_size]}) and "
                                "MASTER_ADDR is not set: expected the first node's address exported to every rank "
                                "(mpirun -x MASTER_ADDR=node01)")
        env["MASTER_ADDR"] = "127.0.0.1"  # every rank on this node
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def setup_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """Fill in the rendezvous variables (in `environ`, default os.environ) and describe this process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun/deepspeed"
        env.setdefault("LOCAL_RANK", env["RANK"])
    elif _mpi_world(env):
        launcher = "mpi"  # every rank must agree on MASTER_PORT: the fixed default below unless exported
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST",
                                                                                               "localhost"))))
        # one port per job, so two jobs sharing a node do not collide
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        launcher = "single"
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), launcher)


def launch_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as `setup_env` decides it, read from a copy of the environment: who reports a
    user error raised before (or by) the rendezvous."""
    env = dict(os.environ if environ is None else environ)
    try:
        return setup_env(env).rank
    except SparseDCError:  # a launcher setup_env refuses (e.g. mpirun over nodes without MASTER_ADDR): it had
        return int(env.get("RANK", "0"))  # already translated the launcher's rank into RANK


def init_distributed(denv: DistEnv) -> str:
    """Initialise DeepSpeed's process group; returns the torch device string for this rank."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank)
        backend, device = "nccl", f"cuda:{denv.local_rank}"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        backend, device = "gloo", "cpu"
    import deepspeed

    if backend == "gloo":
        # DeepSpeed's CPU accelerator would otherwise JIT-compile its shared-memory comm op (20-25 s, needs a
        # C++ compiler) on every fresh machine; gloo is enough here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return device


def silence_non_main(denv: DistEnv) -> None:
    """Ranks > 0 log only errors and no Python warnings: rank 0 speaks for the run."""
    import logging

    if not denv.is_main:
        import warnings

        logging.getLogger().setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")  # library deprecation warnings would print once per rank
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - deepspeed is a hard requirement
        pass
