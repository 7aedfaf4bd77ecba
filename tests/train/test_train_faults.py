"""Faults a long run meets, injected into real `sparse-dc train` runs: a kill between the last checkpoint and the
ledger append, damaged checkpoints, a full disk, a second writer, errors and SIGTERM under launchers. Nothing is
lost: every finished run ends with exactly one ledger row carrying the uninterrupted run's validation loss.

The reference is one finished single-rank run with checkpoints at steps 10, 20 and 25; each case works on a copy
of its folder (whose ledger, in the copy's folder, starts empty: the state a kill after the final checkpoint and
before the ledger append leaves behind)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from sparse_dc.train.ledger import read_ledger
from sparse_dc.train.runguard import STATUS_ENV
from train_harness import (OPEN_MPI, TOTAL_STEPS, Run, check_ok, run_train, start_train, train_command, train_env,
                           wait_for_step, write_config)

pytestmark = pytest.mark.slow
NAME = "faults"
REPO = Path(__file__).resolve().parents[2]


def config_in(tmp_path: Path, data: Path, **train) -> Path:
    return write_config(tmp_path, data, NAME, "block", 2, checkpoint_interval=10, keep_checkpoints=3,
                        tensorboard=False, **train)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared_data):
    """The uninterrupted run (checkpoints 10, 20, 25) and its ledger row."""
    tmp = tmp_path_factory.mktemp("faults_reference")
    run = run_train(tmp, config_in(tmp, prepared_data), 1)
    check_ok(run)
    (row,) = read_ledger(str(tmp / "ledger.jsonl"))
    return run, row


def copy_of(reference, tmp_path: Path, data: Path, **train) -> Path:
    run, _ = reference
    shutil.copytree(run.dir, tmp_path / "runs" / NAME)
    return config_in(tmp_path, data, **train)


def resume(tmp_path: Path, config: Path, *extra: str) -> Run:
    return run_train(tmp_path, config, 1, "--resume", "auto", *extra)


def test_finished_run_without_its_row_records_it_exactly_once(reference, prepared_data, tmp_path):
    _, want = reference
    config = copy_of(reference, tmp_path, prepared_data)
    first = resume(tmp_path, config)
    check_ok(first)
    assert "already finished (25 steps); its missing ledger row is now appended" in first.proc.stdout
    again = resume(tmp_path, config)
    check_ok(again)
    assert "its ledger row is in" in again.proc.stdout
    (row,) = read_ledger(str(tmp_path / "ledger.jsonl"))
    assert row == want  # the row the run computed when it finished: same run_id, val_loss, wall time


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(4):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_master_weights(path: Path) -> None:
    """A well-formed optimizer file whose fp32 master weights are NaN: loads without complaint today."""
    state = torch.load(path, weights_only=False)
    for group in state["optimizer_state_dict"]["single_partition_of_fp32_groups"]:
        group.detach().fill_(float("nan"))
    torch.save(state, path)


def _garbage(path: Path) -> None:
    path.write_text('{"step": 2')


def _damage(run_dir: Path, step: int, name: str, how) -> None:
    how(run_dir / "checkpoints" / f"step_{step:08d}" / name)


MODEL, OPTIM = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize("damage, resumed_from", [
    ([(25, MODEL, _flip_bytes)], 20),
    ([(25, OPTIM, _nan_master_weights)], 20),
    ([(25, OPTIM, lambda p: p.write_bytes(p.read_bytes()[:1000])), (20, "COMPLETE", _garbage)], 10),
    ([(25, "rng_rank0.pt", os.remove), (20, MODEL, lambda p: p.write_bytes(b"")),
      (10, OPTIM, _flip_bytes)], None),
])
def test_damaged_checkpoints_are_never_loaded(reference, prepared_data, tmp_path, damage, resumed_from):
    _, want = reference
    config = copy_of(reference, tmp_path, prepared_data)
    run_dir = tmp_path / "runs" / NAME
    for step, name, how in damage:
        _damage(run_dir, step, name, how)
    run = resume(tmp_path, config)
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    if resumed_from is None:  # every tag damaged: refused with one line, nothing deleted
        assert run.proc.returncode == 2
        (line,) = run.proc.stderr.strip().splitlines()[-1:]
        assert line.startswith("sparse-dc train: error: no intact checkpoint in ") and "start over" in line
        assert tags == [f"step_{s:08d}.corrupt" for s in (10, 20, 25)]
        assert not (tmp_path / "ledger.jsonl").exists()
        return
    check_ok(run)
    notes = [line for line in run.proc.stderr.splitlines() if "is damaged" in line]
    assert len(notes) == 1 and f"resuming from step_{resumed_from:08d} instead" in notes[0], run.proc.stderr
    assert f"resumed {NAME} at step {resumed_from}" in run.proc.stderr
    assert "loss is" not in run.proc.stderr  # no NaN from a damaged state
    (row,) = read_ledger(str(tmp_path / "ledger.jsonl"))
    assert row["val_loss"] == want["val_loss"] and row["run_id"] == want["run_id"]  # bitwise: fp32, CPU


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` to mount a small tmpfs")
def test_full_disk_is_one_line_and_loses_nothing(reference, prepared_data, tmp_path):
    """Real full filesystems: the run folder on a 3 MiB tmpfs (room for one checkpoint of ~1.8 MB, not two),
    then the ledger on a full 16 KiB one. Each failure is one line naming the mount; after space is freed
    `--resume auto` continues, and the run ends with its one row."""
    _, want = reference
    disk, ledger_disk, out = tmp_path / "disk", tmp_path / "ledger_disk", tmp_path / "out"
    for d in (disk, ledger_disk, out):
        d.mkdir()
    cfg = yaml.safe_load(write_config(disk, prepared_data, NAME, "block", 2, checkpoint_interval=10,
                                      keep_checkpoints=2, tensorboard=False).read_text())
    cfg["train"]["ledger"] = str(ledger_disk / "ledger.jsonl")
    config = tmp_path / "faults.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (disk / "faults.yaml").unlink()
    train = " ".join(train_command(config, 1, "--resume", "auto"))
    script = f"""
set -u
mount -t tmpfs -o size=3m tmpfs {disk}
mount -t tmpfs -o size=16k tmpfs {ledger_disk}
head -c 16384 /dev/zero > {ledger_disk}/filler 2>/dev/null
{train} > {out}/1.out 2> {out}/1.err; echo $? > {out}/1.rc
ls {disk}/runs/{NAME}/checkpoints > {out}/1.ls
mount -o remount,size=64m {disk}
{train} > {out}/2.out 2> {out}/2.err; echo $? > {out}/2.rc
rm {ledger_disk}/filler
{train} > {out}/3.out 2> {out}/3.err; echo $? > {out}/3.rc
cp {ledger_disk}/ledger.jsonl {out}/ledger.jsonl
"""
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", script], env=train_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda name: (out / name).read_text()  # noqa: E731

    assert read("1.rc").strip() == "2", read("1.err")[-3000:]
    line = read("1.err").strip().splitlines()[-1]
    assert line.startswith(f"sparse-dc train: error: no space left on {disk} (") and "step_00000020" in line
    assert "the previous one is intact" in line
    assert read("1.ls").split() == ["step_00000010", "zero_to_fp32.py", "zero_to_torch.py"]  # the partial tag went

    assert read("2.rc").strip() == "2", read("2.err")[-3000:]
    assert "resumed faults at step 10" in read("2.err")
    line = read("2.err").strip().splitlines()[-1]
    assert line.startswith(f"sparse-dc train: error: no space left on {ledger_disk} (")
    assert "the row of run 'faults' was not written" in line

    assert read("3.rc").strip() == "0", read("3.err")[-3000:]
    assert "its missing ledger row is now appended" in read("3.out")
    (row,) = [json.loads(x) for x in read("ledger.jsonl").splitlines()]
    assert row["val_loss"] == want["val_loss"] and row["steps"] == TOTAL_STEPS


def test_a_second_writer_is_refused_while_the_first_trains(prepared_data, tmp_path):
    config = write_config(tmp_path, prepared_data, "busy", "block", 2, checkpoint_interval=0, tensorboard=False)
    long = ("data.epochs=60", "--resume", "auto")  # ~500 steps: still training when the second one starts
    first = start_train(tmp_path, config, 1, *long)
    try:
        wait_for_step(tmp_path / "runs" / "busy", 2, first)
        second = run_train(tmp_path, config, 1, *long).proc
        assert first.poll() is None, "the first run ended before the second one started"
        os.killpg(first.pid, signal.SIGTERM)  # it saves and stops: only the refusal was to be seen
        output, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 73, second.stderr[-3000:]
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"sparse-dc train: error: run directory {tmp_path / 'runs' / 'busy'} is being written by "
                           f"another process (pid {first.pid} on ")
    assert first.returncode == 75, output[-3000:]
    assert "--resume auto: no checkpoint of run 'busy'" in output and "starting at step 0" in output
    assert not (tmp_path / "ledger.jsonl").exists()  # the refused launch wrote nothing


def test_user_error_reaches_the_screen_once_under_torchrun_and_srun(prepared_data, tmp_path):
    """Raised on both ranks after the rendezvous (the data folder is read by every rank)."""
    config = write_config(tmp_path, prepared_data, "err", "block", 2)
    message = f"prepared data directory '{tmp_path / 'nowhere'}' does not exist"
    for launcher in ("torchrun", "slurm"):
        proc = run_train(tmp_path, config, 2, f"data.dir={tmp_path / 'nowhere'}", launcher=launcher).proc
        assert proc.returncode != 0
        screen = proc.stdout + proc.stderr
        assert screen.count(message) == 1, (launcher, screen[-4000:])
        if launcher == "slurm":  # srun: each rank's own status; only rank 0 spoke (libraries may warn besides)
            errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
            assert proc.returncode == 2 and errors == [f"sparse-dc train: error: {message} (run `sparse-dc data "
                                                       "prepare`)"], proc.stderr[-3000:]
        else:  # torchrun: in its failure summary, as the root cause
            root = screen[screen.index("Root Cause"):]
            assert message in root and "exitcode  : 2" in root


def test_config_error_reaches_the_screen_once_under_mpirun(tmp_path):
    """Raised on both ranks before any rendezvous: each rank must know its rank from mpirun's own variables
    (OMPI_COMM_WORLD_*) already then, or both report it as rank 0 (and both write the status file)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None or "Open MPI" not in subprocess.run([mpirun, "--version"], capture_output=True,
                                                          text=True).stdout:
        pytest.skip("needs Open MPI's mpirun (apt-get install openmpi-bin)")
    status = tmp_path / "status.json"
    proc = subprocess.run([mpirun, "-n", "2", *OPEN_MPI, sys.executable, "-m", "sparse_dc.train.cli", "--config",
                           str(REPO / "launch" / "configs" / "tiny.yaml"), "train.micro_batch=-1"],
                          env={**train_env(tmp_path), STATUS_ENV: str(status)}, capture_output=True, text=True,
                          timeout=120)
    message = "sparse-dc train: error: train.micro_batch=-1: expected an integer >= 1"
    assert proc.returncode == 2 and (proc.stdout + proc.stderr).count(message) == 1, proc.stdout + proc.stderr
    assert json.loads(status.read_text())["state"] == "failed"


def _fake_slurm(bin_dir: Path, log: Path) -> None:
    """srun that starts the ranks through torchrun (a launcher that exits 1 whatever its ranks return), and
    scontrol that logs requeues: what train.sbatch calls."""
    bin_dir.mkdir()
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 -m sparse_dc.train.cli"
    # srun [--flags] sparse-dc train ARGS -> torchrun ... ARGS
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [ "${1#-}" != "$1" ]; do shift; done\nshift 2\n'
                                  f'exec {torchrun} "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
                                      f'else echo "$@" >> {log}; fi\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)


def test_sigterm_under_torchrun_is_recognised_as_preemption_by_the_slurm_script(prepared_data, tmp_path):
    config = write_config(tmp_path, prepared_data, "preempt", "block", 2, checkpoint_interval=0, tensorboard=False)
    requeues = tmp_path / "requeues"
    _fake_slurm(tmp_path / "bin", requeues)
    env = {**train_env(tmp_path), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "train.sbatch"), str(config)], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        wait_for_step(tmp_path / "runs" / "preempt", 3, job)
        launcher = next(p for p in psutil.Process(job.pid).children(recursive=True)
                        if "torch.distributed.run" in " ".join(p.cmdline()))
        launcher.send_signal(signal.SIGTERM)  # SLURM's preemption signal reaches the launcher
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 1, output[-3000:]  # torchrun's own status ...
    assert "saved step" in output and "requeueing job 4242" in output
    assert requeues.read_text().split() == ["requeue", "4242"]  # ... yet the job is requeued
    status = json.loads((tmp_path / "runs" / "slurm" / "4242-0.status.json").read_text())
    assert status["state"] == "stopped" and status["exit"] == 75


def test_sweep_counts_a_run_only_with_its_ledger_row(prepared_data, tmp_path):
    """A run that exits 0 without finishing (train.stop_at_step) has no row: the sweep reports it, exit 1."""
    config = write_config(tmp_path, prepared_data, "base", None, 2, tensorboard=False, checkpoint_interval=0)
    proc = subprocess.run([sys.executable, "-m", "sparse_dc.cli", "sweep", "--config", str(config), "--grid",
                           "data.seed=7", "--set", "train.stop_at_step=2", "--log-dir", str(tmp_path / "logs")],
                          env=train_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "1 runs: 1 failed" in proc.stdout
    assert "paused at train.stop_at_step (step 2) before the end of its budget" in proc.stderr
    assert not (tmp_path / "ledger.jsonl").exists()


def test_help_and_config_errors_need_no_torch(tmp_path):
    probe = ("import sys; from sparse_dc.cli import main\n"
             "for argv in (['model', '--help'], ['export', '--help'], ['reshard', '--help'], ['train']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules, 'deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stdout + proc.stderr
    assert "sparse-dc train: error: --config: expected a YAML run config" in proc.stderr
