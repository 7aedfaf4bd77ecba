"""Helpers for real end-to-end training runs on CPU: a small prepared corpus, and `sparse-dc train` launched as a plain process
or as 2 ranks over gloo through torchrun, each in its own subprocess with TMPDIR inside the test's tmp folder."""
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml


# 4096 unique tokens as 128 sequences of 32; 3.05 epochs = 390 samples = 24 full global batches of 16 and a
# partial 25th of 6 samples (3 per rank: one micro-batch of 3 and one empty one per rank).
BASE = {
    "data": {"unique_tokens": 4096, "seq_len": 32, "epochs": 3.05, "val_tokens": 2048, "seed": 7,
             "verify": "size"},
    "model": {"preset": "tiny"},
    "train": {"micro_batch": 4, "global_batch": 16, "precision": "fp32",
              "optimizer": {"lr": 3.0e-3, "weight_decay": 0.1}, "schedule": {"warmup_steps": 3},
              "log_interval": 1, "eval_interval": 10, "checkpoint_interval": 0, "progress": False},
}
SPARSITY = {
    "block": {"density": 0.5, "block_size": 32, "method": "set", "update_frequency": 5,
              "prune_rate": 0.5},
    "unstructured": {"density": 0.5, "block_size": 1, "method": "rigl", "update_frequency": 5,
                     "prune_rate": 0.5},
}
TOTAL_STEPS = 25


@dataclass
class Run:
    dir: Path
    proc: subprocess.CompletedProcess | None = None
    records: list = field(default_factory=list)

    def load(self) -> "Run":
        path = self.dir / "metrics.jsonl"
        self.records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return self

    def losses(self) -> dict[int, float]:
        """step -> train loss (the last record of a step wins, so a resumed run overrides replayed steps)."""
        return {r["step"]: r["loss"] for r in self.records if r["kind"] == "train"}

    def final(self) -> dict:
        return next(r for r in reversed(self.records) if r["kind"] == "final")


def prepare_corpus(root: Path, n_docs: int = 700) -> Path:
    """Prepared shards of the first `n_docs` built-in documents (700: ~150K tokens) under root/data, vocab 512."""
    from sparse_dc.data.corpus import builtin_documents
    from sparse_dc.data.prepare import PrepareConfig, prepare

    docs = root / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as fh:
        for doc in itertools.islice(builtin_documents(), n_docs):
            fh.write(json.dumps({"text": doc}) + "\n")
    prepare(PrepareConfig(inputs=[str(docs)], out=str(root / "data"), vocab_size=512, shard_tokens=40_000,
                          workers=2))
    return root / "data"


def write_config(tmp_path: Path, data_dir: Path, name: str, sparsity: str | None, stage: int = 2, **train) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg.update(name=name, output_dir=str(tmp_path / "runs"))
    cfg["data"]["dir"] = str(data_dir)
    if sparsity:
        cfg["sparsity"] = dict(SPARSITY[sparsity])
    cfg["train"].update(ledger=str(tmp_path / "ledger.jsonl"), deepspeed={"zero_stage": stage}, **train)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(config: Path, nproc: int, *extra: str) -> list[str]:
    if nproc == 1:  # a plain process: sparse-dc sets up its own one-rank rendezvous
        return [sys.executable, "-m", "sparse_dc.cli", "train", "--config", str(config), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "sparse_dc.train.cli", "--config", str(config), *extra]


def train_env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                    "MASTER_"))}
    return {**env, "TMPDIR": str(tmp), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


# Open MPI's mpirun flags for ranks on this machine: as root too, over the loopback interface only
OPEN_MPI = (["--allow-run-as-root"] if os.geteuid() == 0 else []) + [
    "--oversubscribe", "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(tmp_path: Path, config: Path, nproc: int = 2, *extra: str, launcher: str = "torchrun",
              timeout: float = 240) -> Run:
    """Run to completion. launcher="slurm": start the ranks directly with only SLURM_* variables, as `srun`
    does (and without a torchrun agent process: one torch import fewer per run)."""
    if launcher == "slurm":
        port = str(free_port())
        procs = [subprocess.Popen(train_command(config, 1, *extra), text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  env={**train_env(tmp_path), "SLURM_PROCID": str(r), "SLURM_NTASKS": str(nproc),
                                       "SLURM_LOCALID": str(r), "SLURM_JOB_NODELIST": "localhost",
                                       "MASTER_PORT": port})
                 for r in range(nproc)]
        outs = [p.communicate(timeout=timeout) for p in procs]
        proc = subprocess.CompletedProcess(procs[0].args, max(p.returncode for p in procs),
                                           "".join(o for o, _ in outs), "".join(e for _, e in outs))
    else:
        proc = subprocess.run(train_command(config, nproc, *extra), env=train_env(tmp_path), capture_output=True,
                              text=True, timeout=timeout)
    name = yaml.safe_load(config.read_text())["name"]
    return Run(tmp_path / "runs" / name, proc).load()


def start_train(tmp_path: Path, config: Path, nproc: int = 2, *extra: str) -> subprocess.Popen:
    """Start a run in its own process group (so the test can signal the launcher and all ranks at once)."""
    return subprocess.Popen(train_command(config, nproc, *extra), env=train_env(tmp_path), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll metrics.jsonl until a train record at `step` or later appears."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if '"kind": "train"' in x]
            if steps and max(steps) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def check_ok(run: Run) -> None:
    assert run.proc.returncode == 0, (run.proc.stdout[-2000:], run.proc.stderr[-4000:])


def run_in_processes(jobs: list) -> None:
    """Run (function, args) jobs in forked processes at once; each must exit cleanly."""
    import multiprocessing as mp

    procs = [mp.get_context("fork").Process(target=f, args=a) for f, a in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)

