"""Plain single-process `sparse-dc train` (its own rendezvous): SIGTERM saves and stops, NaN loss stops with a clear
message, config errors exit 2 with one line; the rendezvous env for every launcher; the LR schedule."""
import json
import os
import signal
import subprocess
import sys

import pytest

from sparse_dc.train.config import ScheduleConfig
from sparse_dc.errors import SparseDCError
from sparse_dc.train.dist import DistEnv, first_slurm_host, launch_rank, setup_env
from sparse_dc.train.ledger import read_ledger
from train_harness import Run, run_train, start_train, wait_for_step, write_config


@pytest.mark.slow
def test_sigterm_saves_a_complete_checkpoint_and_exits_cleanly(prepared_data, tmp_path):
    config = write_config(tmp_path, prepared_data, "preempted", "block", 2, checkpoint_interval=0)
    run_dir = tmp_path / "runs" / "preempted"
    proc = start_train(tmp_path, config, 1)
    wait_for_step(run_dir, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM sends on preemption / scancel
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]  # EX_TEMPFAIL: resumable (the SLURM script requeues on it)
    assert "saved step" in output and "--resume auto" in output
    run = Run(run_dir).load()
    last = max(run.losses())
    assert not any(r["kind"] == "final" for r in run.records) and last < 25
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == [f"step_{last:08d}"]  # saved at the step it stopped after, though no interval asked for it
    marker = json.loads((run_dir / "checkpoints" / ckpts[0] / "COMPLETE").read_text())
    assert marker["step"] == last and marker["world_size"] == 1


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(prepared_data, tmp_path):
    config = write_config(tmp_path, prepared_data, "diverges", None, 1, optimizer={"lr": 1e12}, grad_clip=0.0,
                          schedule={"warmup_steps": 0})
    run = run_train(tmp_path, config, 1)
    assert run.proc.returncode == 2
    line = run.proc.stderr.strip().splitlines()[-1]
    assert line.startswith("sparse-dc train: error: loss is") and "no checkpoint was saved yet" in line


@pytest.mark.slow
def test_dead_gradient_paths_warn_and_reach_the_ledger(prepared_data, tmp_path):
    """Independent 16x16 block masks at density 0.125 leave live blocks on dead paths: one warning line at start
    and at updates, and the ledger's effective_active_params falls short of active_params by the final count."""
    config = write_config(tmp_path, prepared_data, "dead-paths", "block", 1, eval_interval=0)
    run = run_train(tmp_path, config, 1, "sparsity.block_topology=independent", "sparsity.block_size=16",
                    "sparsity.density=0.125")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    warnings = [line for line in run.proc.stdout.splitlines() if "dead gradient path" in line]
    assert warnings[0].startswith("WARNING: step 0: ") and "effective_active_params=" in warnings[0]
    assert len(warnings) >= 2 and all(w.startswith("WARNING: step ") for w in warnings)
    (row,) = read_ledger(str(tmp_path / "ledger.jsonl"))
    final = run.final()["dst"]
    assert row["dead_path_params"] == final["dead_path_params"] > 0
    assert row["effective_active_params"] == final["effective_active_params"] < 0.95 * row["active_params"]
    assert row["block_topology"] == "independent" and row["regrow_init"] == "zero"


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch=0", "train.micro_batch=0: expected an integer >= 1"),
    ("train.precision=fp8", "train.precision='fp8': expected one of 'fp32', 'bf16', 'fp16'"),
    ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage=4: expected 1, 2 or 3"),
    ("train.global_batch=10", "train.global_batch=10: expected a positive multiple of micro_batch=4"),
    ("train.optimiser.lr=1", "train.optimiser: unknown config section"),
    ("train.stop_at_step=0", "train.stop_at_step=0: expected null or an integer >= 1"),
])
def test_config_error_exits_2_with_one_line(prepared_data, tmp_path, override, message):
    config = write_config(tmp_path, prepared_data, "bad", "block")
    proc = subprocess.run([sys.executable, "-m", "sparse_dc.cli", "train", "--config", str(config), override],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_rendezvous_env_for_each_launcher():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-010,012]",
           "SLURM_JOB_ID": "4242"}
    denv = setup_env(env)
    assert (denv.rank, denv.local_rank, denv.world_size, denv.launcher) == (3, 1, 8, "slurm")
    assert env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == "24242" and env["RANK"] == "3"
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # a launcher inside an allocation wins over SLURM
    assert setup_env(torchrun) == type(denv)(1, 1, 2, "torchrun/deepspeed")
    single = {}
    assert setup_env(single).launcher == "single" and single["WORLD_SIZE"] == "1" and int(single["MASTER_PORT"]) > 0
    assert first_slurm_host("node1,node2") == "node1" and first_slurm_host("a[1-2]") == "a1"


def test_rendezvous_env_under_mpi_launchers():
    """mpirun (and `deepspeed --launcher openmpi`) export only their own rank variables; DeepSpeed's engine asserts
    LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK. tests/cluster/test_multinode.py runs Open MPI for real."""
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # mpirun in an allocation
    assert setup_env(ompi) == DistEnv(1, 1, 2, "mpi")
    assert (ompi["RANK"], ompi["LOCAL_RANK"], ompi["MASTER_ADDR"], ompi["MASTER_PORT"]) == ("1", "1", "127.0.0.1",
                                                                                            "29500")
    hydra = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4", "MASTER_ADDR": "n1"}
    assert setup_env(hydra) == DistEnv(5, 1, 8, "mpi") and hydra["MASTER_ADDR"] == "n1"
    with pytest.raises(SparseDCError, match="OMPI_COMM_WORLD_SIZE=8 ranks over several nodes .*MASTER_ADDR"):
        setup_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                   "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    # srun --mpi=pmi2 exports PMI_RANK/PMI_SIZE beside SLURM_*, but no local rank: SLURM_LOCALID gives it
    pmi2 = {"PMI_RANK": "3", "PMI_SIZE": "8", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3",
            "SLURM_JOB_NODELIST": "gpu1"}
    assert setup_env(pmi2) == DistEnv(3, 3, 8, "slurm")


def test_the_rank_that_reports_errors_is_the_rendezvous_rank():
    """`sparse-dc train` decides which rank reports a user error before the rendezvous: the rank setup_env will
    give under every launcher (mpirun's ranks all used to think they were rank 0), read without changing the
    environment, also when setup_env refuses the launcher's variables."""
    launchers = {
        "mpirun": ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 1),
        "hydra": ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
                   "MASTER_ADDR": "n1"}, 5),
        "srun": ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "g[1-2]"}, 3),
        "torchrun": ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 2),
        "plain": ({}, 0),
    }
    for name, (env, rank) in launchers.items():
        before = dict(env)
        assert launch_rank(env) == rank == setup_env(dict(env)).rank, name
        assert env == before, name
    over_nodes = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}  # refused: no MASTER_ADDR; the error is rank 0's to report
    with pytest.raises(SparseDCError, match="MASTER_ADDR"):
        setup_env(dict(over_nodes))
    assert launch_rank(over_nodes) == 6


def test_lr_schedule_warmup_then_cosine_to_min():
    s = ScheduleConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    factors = [s.lr_factor(i, 20) for i in range(20)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8] and factors[4] == 1.0
    assert factors[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[4:], factors[5:]))
