"""Fault injection on real `sparse-dc train` runs (tiny preset, CPU, gloo): kills at random moments, damaged
checkpoints, full disks, concurrent writers, errors and SIGTERM under launchers. For every fault it checks that
nothing is lost (each finished run has exactly one ledger row, with the uninterrupted run's validation loss) and
nothing is silently wrong (a damaged checkpoint is never loaded, every error is one line shown once).

    python benchmarks/fault_injection.py [--kills 14] [--launch-errors 13] [--out benchmarks/results/fault_injection]

Writes `<out>.md` (the table) and `<out>.json`. Runs for ~15 minutes on 2 CPU cores; `--quick` for a smoke pass.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from sparse_dc.config.base import write_text_atomic

BASE = {  # 4096 unique tokens, 25 steps of 16 sequences of 32 tokens (the tests' harness budget)
    "data": {"unique_tokens": 4096, "seq_len": 32, "epochs": 3.05, "val_tokens": 2048, "seed": 7, "verify": "size"},
    "model": {"preset": "tiny"},
    "sparsity": {"density": 0.5, "block_size": 32, "method": "set", "update_frequency": 5, "prune_rate": 0.5},
    "train": {"micro_batch": 4, "global_batch": 16, "precision": "fp32", "optimizer": {"lr": 3.0e-3},
              "schedule": {"warmup_steps": 3}, "log_interval": 1, "eval_interval": 10, "checkpoint_interval": 4,
              "keep_checkpoints": 2, "progress": False, "tensorboard": False},
}
FAULTS = ("kills", "window", "corrupt", "disk", "writers", "sigterm", "errors")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "sparse_dc.train.cli"]


class Bench:
    def __init__(self, root: Path, data: Path) -> None:
        self.root, self.data, self.rows = root, data, []
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
        (root / "tmp").mkdir(exist_ok=True)
        self.env.update(TMPDIR=str(root / "tmp"), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    # --- runs ---------------------------------------------------------------------------------------------
    def config(self, folder: Path, name: str, **train: Any) -> Path:
        cfg = json.loads(json.dumps(BASE))
        cfg.update(name=name, output_dir=str(folder / "runs"))
        cfg["data"]["dir"] = str(self.data)
        cfg["train"].update(ledger=str(folder / "ledger.jsonl"), **train)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def command(self, config: Path, nproc: int, *extra: str) -> list[str]:
        if nproc == 1:
            return [sys.executable, "-m", "sparse_dc.cli", "train", "--config", str(config), *extra]
        return [*TORCHRUN, "--config", str(config), *extra]

    def run(self, config: Path, nproc: int = 2, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(config, nproc, *extra), env=env or self.env, capture_output=True,
                              text=True, timeout=900)

    def srun_like(self, config: Path, *extra: str) -> subprocess.CompletedProcess:
        """Two ranks started directly with only SLURM_* variables, as `srun` (without --kill-on-bad-exit) does."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        procs = [subprocess.Popen(self.command(config, 1, *extra), text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  env={**self.env, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                       "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port}) for r in range(2)]
        outs = [p.communicate(timeout=900) for p in procs]
        return subprocess.CompletedProcess([], max(p.returncode for p in procs), "".join(o for o, _ in outs),
                                           "".join(e for _, e in outs))

    def start(self, config: Path, nproc: int = 2, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(config, nproc, *extra), env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def rows_of(folder: Path) -> list[dict]:
        path = folder / "ledger.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    @staticmethod
    def step_of(run_dir: Path) -> int:
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if '"kind": "train"' in x]
        return max(steps, default=0)

    def record(self, fault: str, trials: int, outcome: str, lost: int, seconds: float, **detail: Any) -> None:
        row = {"fault": fault, "trials": trials, "outcome": outcome, "lost_or_wrong": lost,
               "seconds": round(seconds, 1), **detail}
        self.rows.append(row)
        print(f"  {fault}: {outcome} (lost or wrong: {lost}, {seconds:.0f} s)", flush=True)


def prepare_data(root: Path) -> Path:
    from sparse_dc.data.corpus import builtin_documents
    from sparse_dc.data.prepare import PrepareConfig, prepare

    docs = root / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as fh:
        for doc in itertools.islice(builtin_documents(), 700):
            fh.write(json.dumps({"text": doc}) + "\n")
    prepare(PrepareConfig(inputs=[str(docs)], out=str(root / "data"), vocab_size=512, shard_tokens=40_000, workers=2))
    return root / "data"


# --- the faults -------------------------------------------------------------------------------------------------
def kills(b: Bench, reference: dict, trials: int, rng: random.Random) -> None:
    """kill -9 of torchrun's process group at a random moment of the training loop (whose length the reference
    run measured), then --resume auto (repeated until it finishes)."""
    started, ok, mid_save, orphans = time.time(), 0, 0, 0
    for t in range(trials):
        folder = b.root / f"kill{t}"
        config = b.config(folder, "k")
        proc = b.start(config)
        while b.step_of(folder / "runs" / "k") < 1 and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, reference["wall_time_s"]))
        ranks = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1.0)
        orphans += sum(1 for pid in ranks if _alive(pid))
        ckpts = folder / "runs" / "k" / "checkpoints"
        if ckpts.is_dir() and any(not (p / "COMPLETE").exists() for p in ckpts.glob("step_*")):
            mid_save += 1
        for _ in range(3):
            done = b.run(config, 2, "--resume", "auto")
            if done.returncode == 0:
                break
        rows = b.rows_of(folder)
        ok += len(rows) == 1 and rows[0]["val_loss"] == reference["val_loss"]
        shutil.rmtree(folder)
    b.record("kill -9 of torchrun's group at a random moment, then --resume auto", trials,
             f"{ok}/{trials} end with one row and the uninterrupted val_loss (bitwise); {mid_save} kills landed "
             f"mid-save; {orphans} orphan ranks survived their launcher", trials - ok + orphans,
             time.time() - started, mid_save=mid_save, orphans=orphans)


def row_window(b: Bench, finished: Path, reference: dict) -> None:
    """The state a kill between the final checkpoint and the ledger append leaves: the run folder, no row."""
    started = time.time()
    folder = b.root / "window"
    shutil.copytree(finished / "runs", folder / "runs")
    config = b.config(folder, "ref")
    first, second = b.run(config, 1, "--resume", "auto"), b.run(config, 1, "--resume", "auto")
    rows = b.rows_of(folder)
    good = first.returncode == second.returncode == 0 and len(rows) == 1 and rows[0] == reference
    b.record("killed after the final checkpoint, before the ledger append; --resume auto twice", 1,
             "row written once, identical to the original" if good else "FAILED", 0 if good else 1,
             time.time() - started)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(4):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_weights(path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=False)
    for group in state["optimizer_state_dict"]["single_partition_of_fp32_groups"]:
        group.detach().fill_(float("nan"))
    torch.save(state, path)


MODEL, OPTIM, RNG = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"
DAMAGE: dict[str, tuple[list[tuple[int, str, Callable[[Path], None]]], int | None]] = {
    "4 flipped bytes in the model states": ([(25, MODEL, _flip)], 20),
    "4 flipped bytes in the optimizer states": ([(25, OPTIM, _flip)], 20),
    "well-formed optimizer file with NaN master weights": ([(25, OPTIM, _nan_weights)], 20),
    "truncated optimizer file": ([(25, OPTIM, lambda p: p.write_bytes(p.read_bytes()[:1000]))], 20),
    "empty model-states file": ([(25, MODEL, lambda p: p.write_bytes(b""))], 20),
    "missing RNG file": ([(25, RNG, os.remove)], 20),
    "unparseable COMPLETE marker": ([(25, "COMPLETE", lambda p: p.write_text('{"step": 2'))], 20),
    "newest two tags damaged": ([(25, MODEL, _flip), (20, OPTIM, _flip)], 10),
    "every tag damaged": ([(25, MODEL, _flip), (20, OPTIM, _flip), (10, RNG, os.remove)], None),
}


def corruptions(b: Bench, finished: Path, reference: dict) -> None:
    for what, (damage, fallback) in DAMAGE.items():
        started = time.time()
        folder = b.root / "corrupt"
        shutil.copytree(finished / "runs", folder / "runs")
        config = b.config(folder, "ref")
        run_dir = folder / "runs" / "ref"
        for step, name, how in damage:
            how(run_dir / "checkpoints" / f"step_{step:08d}" / name)
        proc = b.run(config, 1, "--resume", "auto")
        rows = b.rows_of(folder)
        if fallback is None:
            lines = proc.stderr.strip().splitlines()
            good = proc.returncode == 2 and "no intact checkpoint" in lines[-1] and not rows
            outcome = "refused in one line, nothing loaded or deleted" if good else "FAILED"
        else:
            good = (proc.returncode == 0 and f"resuming from step_{fallback:08d}" in proc.stderr and len(rows) == 1
                    and rows[0]["val_loss"] == reference["val_loss"] and "loss is" not in proc.stderr)
            outcome = f"fell back to step {fallback}, one row, uninterrupted val_loss" if good else "FAILED"
        b.record(f"damaged checkpoint: {what}", 1, outcome, 0 if good else 1, time.time() - started)
        shutil.rmtree(folder)


def disk_full(b: Bench, reference: dict) -> None:
    """The run folder on a 3 MiB tmpfs (one checkpoint fits, two do not), the ledger on a full 16 KiB one."""
    started = time.time()
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        b.record("full disk", 0, "not run: `unshare -rm` (to mount a tmpfs) is not available here", 0, 0.0)
        return
    folder, disk, ledger_disk = b.root / "full", b.root / "full" / "disk", b.root / "full" / "ledger_disk"
    for d in (disk, ledger_disk):
        d.mkdir(parents=True)
    config = b.config(folder, "ref", checkpoint_interval=10, keep_checkpoints=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"], cfg["train"]["ledger"] = str(disk / "runs"), str(ledger_disk / "ledger.jsonl")
    config.write_text(yaml.safe_dump(cfg))
    train = " ".join(b.command(config, 1, "--resume", "auto"))
    script = f"""
mount -t tmpfs -o size=3m tmpfs {disk}; mount -t tmpfs -o size=16k tmpfs {ledger_disk}
head -c 16384 /dev/zero > {ledger_disk}/filler 2>/dev/null
{train} > {folder}/1.out 2> {folder}/1.err; echo $? > {folder}/1.rc
mount -o remount,size=64m {disk}
{train} > {folder}/2.out 2> {folder}/2.err; echo $? > {folder}/2.rc
rm {ledger_disk}/filler
{train} > {folder}/3.out 2> {folder}/3.err; echo $? > {folder}/3.rc
cp {ledger_disk}/ledger.jsonl {folder}/ledger.jsonl
"""
    subprocess.run(["unshare", "-rm", "bash", "-c", script], env=b.env, capture_output=True, timeout=900)
    last = {i: ((folder / f"{i}.err").read_text().strip().splitlines() or [""])[-1:] for i in (1, 2)}
    rcs = [(folder / f"{i}.rc").read_text().strip() for i in (1, 2, 3)]
    rows = b.rows_of(folder)
    good = (rcs == ["2", "2", "0"] and "no space left on" in last[1][0] and "no space left on" in last[2][0]
            and len(rows) == 1 and rows[0]["val_loss"] == reference["val_loss"])
    b.record("full disk during a checkpoint save, then for the ledger append (real tmpfs)", 1,
             "one line each (`" + last[1][0].split(": error: ")[-1].replace(str(b.root), "<tmp>")[:60]
             + "...`); after freeing space: one row, "
             "uninterrupted val_loss" if good else f"FAILED {rcs} {last}", 0 if good else 1, time.time() - started)


def writers(b: Bench) -> None:
    """Two sweeps over one output folder at once; a second `train` on a running run; orphans after kill -9."""
    started = time.time()
    folder = b.root / "sweeps"
    config = b.config(folder, "base", checkpoint_interval=0)
    sweep = [sys.executable, "-m", "sparse_dc.cli", "sweep", "--config", str(config), "--grid",
             "sparsity.density=1,0.5", "--grid", "data.epochs=1,2", "--nproc", "2"]
    procs = [subprocess.Popen(sweep, env=b.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    rerun = subprocess.run(sweep, env=b.env, capture_output=True, text=True, timeout=1800)
    rows = b.rows_of(folder)
    names = sorted(r["name"] for r in rows)
    trained = {}
    for run_dir in (p for p in (folder / "runs").iterdir() if (p / "metrics.jsonl").exists()):
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "train"' in x]
        trained[run_dir.name] = len(steps) == len(set(steps))  # no step logged twice: trained once
    good = len(names) == len(set(names)) == 4 and all(trained.values()) and rerun.returncode == 0
    summaries = [next((x for x in o.splitlines() if x.startswith("sweep: ")), "?") for o in outs]
    b.record("two sweeps at once over one output folder (2x2 grid, 2 ranks per run), then a re-run", 2,
             f"each run trained once, one row each ({'; '.join(s.split(';')[0] for s in summaries)}; re-run: "
             f"{rerun.stdout.strip().splitlines()[-1].split(';')[0]})" if good else f"FAILED {names} {trained}",
             0 if good else 1, time.time() - started)

    started = time.time()
    folder = b.root / "second"
    config = b.config(folder, "s", checkpoint_interval=0)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["epochs"] = 30  # 240 steps: still training when the second launch has started
    config.write_text(yaml.safe_dump(cfg))
    first = b.start(config, 2)
    while b.step_of(folder / "runs" / "s") < 3 and first.poll() is None:
        time.sleep(0.2)
    second = b.run(config, 2, "--resume", "auto")
    first.wait(timeout=900)
    busy = "is being written by another process" in second.stdout + second.stderr
    good = busy and first.returncode == 0 and len(b.rows_of(folder)) == 1
    b.record("a second `train --resume auto` on a run that is training (torchrun, 2 ranks each)", 1,
             "refused in one line (status busy, 73); the first finishes with one row" if good else "FAILED",
             0 if good else 1, time.time() - started)


def launch_errors(b: Bench, trials: int) -> None:
    """A user error raised on every rank: shown exactly once per launch, whatever the launcher."""
    folder = b.root / "errors"
    config = b.config(folder, "e")
    message = "prepared data directory '/nonexistent/data' does not exist"
    launchers = {"torchrun": lambda: b.run(config, 2, "data.dir=/nonexistent/data"),
                 "srun-style (SLURM_* variables, no launcher)":
                     lambda: b.srun_like(config, "data.dir=/nonexistent/data"),
                 "deepspeed --num_gpus 2": lambda: subprocess.run(
                     ["deepspeed", "--num_gpus", "2", "--module", "sparse_dc.train.cli", "--config", str(config),
                      "data.dir=/nonexistent/data"], env=b.env, capture_output=True, text=True, timeout=900)}
    for name, launch in launchers.items():
        started, counts = time.time(), []
        n = trials if name == "torchrun" else max(1, trials // 4)
        for _ in range(n):
            proc = launch()
            counts.append((proc.stdout + proc.stderr).count(message) if proc.returncode else -1)
        good = sum(c == 1 for c in counts)
        b.record(f"user error on every rank under {name}", n, f"{good}/{n} launches show it exactly once "
                 f"(counts {sorted(set(counts))})", n - good, time.time() - started)


def sigterm(b: Bench, reference: dict) -> None:
    """SIGTERM to torchrun mid-run inside a sweep: the sweep reports 'stopped'; its re-run finishes the run."""
    started = time.time()
    folder = b.root / "term"
    config = b.config(folder, "ref")
    sweep = [sys.executable, "-m", "sparse_dc.cli", "sweep", "--config", str(config), "--grid", "data.seed=7",
             "--nproc", "2", "--log-dir", str(folder / "logs")]
    proc = subprocess.Popen(sweep, env=b.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = folder / "runs" / "seed=7"
    while b.step_of(run_dir) < 6 and proc.poll() is None:
        time.sleep(0.2)
    launcher = next((pid for pid in _descendants(proc.pid) if "torch.distributed.run" in _cmdline(pid)), None)
    if launcher:
        os.kill(launcher, signal.SIGTERM)
    out = proc.communicate(timeout=900)[0]
    rerun = subprocess.run(sweep, env=b.env, capture_output=True, text=True, timeout=900)
    rows = b.rows_of(folder)
    good = ("1 stopped" in out and rerun.returncode == 0 and len(rows) == 1
            and rows[0]["val_loss"] == reference["val_loss"])
    b.record("SIGTERM to torchrun (exits 1) inside a sweep, then the sweep again", 1,
             "sweep reports 'stopped' (status file: exit 75); re-run resumes, one row, uninterrupted val_loss"
             if good else f"FAILED: {out[-300:]}", 0 if good else 1, time.time() - started)


def integrity_cost(b: Bench, finished: Path) -> dict:
    """What the size + sha256 record costs per save, measured on the reference run's tags."""
    from sparse_dc.train.checkpoint import file_record, tag_files

    tag = sorted((finished / "runs" / "ref" / "checkpoints").glob("step_*"))[-1]
    names = tag_files(str(tag))
    size = sum((tag / n).stat().st_size for n in names)
    start = time.perf_counter()
    for _ in range(20):
        for n in names:
            file_record(str(tag / n))
    seconds = (time.perf_counter() - start) / 20
    return {"tag_bytes": size, "hash_s_per_save": seconds, "sha256_mb_per_s": size / seconds / 1e6}


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return ""


def table(rows: list[dict]) -> str:
    lines = ["| fault | trials | outcome | lost or wrong | s |", "|---|---|---|---|---|"]
    lines += [f"| {r['fault']} | {r['trials']} | {r['outcome']} | {r['lost_or_wrong']} | {r['seconds']:.0f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=14)
    p.add_argument("--launch-errors", type=int, default=13)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 kills, 2 launch errors per launcher")
    p.add_argument("--out", default="benchmarks/results/fault_injection")
    p.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated subset of {', '.join(FAULTS)}")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.launch_errors = 2, 4
    rng = random.Random(args.seed)
    begun = time.time()
    with tempfile.TemporaryDirectory(prefix="sparse-dc-faults-") as tmp:
        root = Path(tmp)
        b = Bench(root, prepare_data(root))
        print("reference runs (uninterrupted)", flush=True)
        ref2 = b.config(root / "ref2", "k")
        assert b.run(ref2, 2).returncode == 0
        reference2 = b.rows_of(root / "ref2")[0]
        ref1 = b.config(root / "ref1", "ref", checkpoint_interval=10, keep_checkpoints=3)
        assert b.run(ref1, 1).returncode == 0
        reference1 = b.rows_of(root / "ref1")[0]
        cost = integrity_cost(b, root / "ref1")
        print("faults", flush=True)
        chosen = args.only.split(",")
        steps = {"kills": lambda: kills(b, reference2, args.kills, rng),
                 "window": lambda: row_window(b, root / "ref1", reference1),
                 "corrupt": lambda: corruptions(b, root / "ref1", reference1),
                 "disk": lambda: disk_full(b, reference1),
                 "writers": lambda: writers(b),
                 # its sweep sets data.seed=7, BASE's value: the same run as the 2-rank reference
                 "sigterm": lambda: sigterm(b, reference2),
                 "errors": lambda: launch_errors(b, args.launch_errors)}
        for name in FAULTS:
            if name in chosen:
                steps[name]()
        rows = b.rows
    load = os.getloadavg()
    meta = {"cpu_count": os.cpu_count(), "load_avg_1_5_15": [round(x, 1) for x in load],
            "seconds": round(time.time() - begun), "integrity_record": cost,
            "python": sys.version.split()[0]}
    md = (f"# Fault injection (`benchmarks/fault_injection.py`)\n\n{table(rows)}\n\n"
          f"Machine: {meta['cpu_count']} CPU cores, load average {meta['load_avg_1_5_15']} at the end; "
          f"{meta['seconds']} s in all. The integrity record (size + sha256 of every file of a tag) cost "
          f"{cost['hash_s_per_save'] * 1e3:.1f} ms per save for a {cost['tag_bytes'] / 1e6:.2f} MB tag "
          f"({cost['sha256_mb_per_s']:.0f} MB/s on one core; the ranks share the hashing).\n")
    print("\n" + md)
    write_text_atomic(f"{args.out}.md", md)
    write_text_atomic(f"{args.out}.json", json.dumps({"rows": rows, **meta}, indent=1) + "\n")
    return 0 if all(r["lost_or_wrong"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
