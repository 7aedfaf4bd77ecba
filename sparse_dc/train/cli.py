"""`sparse-dc train --config FILE.yaml [key=value ...] [--resume auto|never]`: the entry point.

Works unchanged as a plain process, under `torchrun`, the `deepspeed` launcher (which adds --local_rank),
`mpirun` and SLURM `srun` (see dist.py). Parse -> validate -> rendezvous -> lock the run directory -> build -> train.
Exit status: 0 finished (or paused at train.stop_at_step), 2 user error, 73 another process is writing the run,
75 stopped by a signal after saving (resumable); with $SPARSE_DC_STATUS_FILE set the outcome is also written
there (runguard.py), for launchers that replace the status by their own.
"""
from __future__ import annotations

import argparse
import os
import sys

from sparse_dc.config.base import ConfigError, load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.errors import SparseDCError
from sparse_dc.train.dist import launch_rank
from sparse_dc.train.runguard import EXIT_BUSY, EXIT_ERROR, EXIT_STOPPED, RunBusy, report_error, write_status

__all__ = ["EXIT_STOPPED", "main", "run"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-dc train", description="Train a sparse Llama with DeepSpeed ZeRO.")
    p.add_argument("--config", help="YAML run config (data, model, sparsity, train sections), e.g. "
                                    "launch/configs/tiny.yaml (required)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.deepspeed.zero_stage=3")
    p.add_argument("--resume", choices=("auto", "never"), default="never",
                   help="auto: continue from the newest intact checkpoint of this run name, if any")
    p.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment is what we read
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    rank = launch_rank()  # decided as the rendezvous decides it (mpirun, srun, torchrun, ...): one rank reports
    try:
        if args.config is None:  # the built-in defaults describe no data a user prepared: never train them silently
            raise ConfigError("--config: expected a YAML run config such as launch/configs/tiny.yaml")
        cfg = load_config(RunConfig, args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        outcome = run(cfg, args.resume)
    except SparseDCError as exc:
        busy = isinstance(exc, RunBusy)
        code = EXIT_BUSY if busy else EXIT_ERROR
        if rank == 0:
            write_status("busy" if busy else "failed", code, message=str(exc))
        if report_error(f"sparse-dc train: error: {exc}", rank, code):
            print(f"sparse-dc train: error: {exc}", file=sys.stderr, flush=True)
        return code
    except BaseException as exc:  # a bug or a crash: the traceback follows; the status file still says so
        if rank == 0 and not isinstance(exc, SystemExit):
            write_status("failed", 1, message=f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise
    return EXIT_STOPPED if outcome == "stopped" else 0


def run(cfg: RunConfig, resume: str) -> str:
    """Rendezvous, lock, build, resume or refuse to clobber, train. Returns the outcome: "finished", "paused"
    (train.stop_at_step) or "stopped" (a signal; saved, resumable)."""
    from sparse_dc.train.dist import init_distributed, setup_env, silence_non_main
    from sparse_dc.train.runguard import die_with_launcher

    denv = setup_env()
    cfg.train.accumulation_steps(denv.world_size)  # a config error, before any process group exists
    die_with_launcher()
    device = init_distributed(denv)
    silence_non_main(denv)
    import torch.distributed as dist

    from sparse_dc.train.checkpoint import ResumeError
    from sparse_dc.train.trainer import Trainer

    lock_run_dir(os.path.join(cfg.output_dir, cfg.name), denv.is_main, denv.world_size)
    trainer = Trainer(cfg, denv, device)
    if resume == "auto":
        resumed = trainer.resume()
        if denv.is_main:
            print(f"resumed {cfg.name} at step {trainer.step} ({trainer.samples} samples)" if resumed else
                  f"--resume auto: no checkpoint of run {cfg.name!r} in {trainer.checkpointer.dir}; starting at "
                  "step 0", file=sys.stderr, flush=True)
    elif trainer.checkpointer.latest() is not None:
        raise ResumeError(f"run {cfg.name!r} already has checkpoints in {trainer.checkpointer.dir}: expected "
                          "--resume auto to continue it, or a new name (name=...) to start over")
    trainer.train()
    outcome = ("stopped" if trainer.stopped_by_signal else
               "finished" if trainer.step >= trainer.total_steps else "paused")
    if denv.is_main:
        write_status(outcome, EXIT_STOPPED if outcome == "stopped" else 0, step=trainer.step,
                     total_steps=trainer.total_steps, ledger=cfg.train.ledger)
    if denv.world_size > 1:
        dist.barrier()  # no rank exits (and makes srun stop the others) before the status is written
    dist.destroy_process_group()
    return outcome


def lock_run_dir(run_dir: str, is_main: bool, world_size: int) -> None:
    """Collective: rank 0 takes the run directory's writer lock (kept until exit); every rank raises RunBusy
    if another process holds it."""
    from sparse_dc.train.runguard import RunLock

    verdict: list[tuple[str, str] | None] = [None]
    if is_main:
        try:  # the lock's descriptor stays open (the lock held) until this process exits
            warning = RunLock(run_dir).acquire()
            if warning:
                print(warning, file=sys.stderr, flush=True)
        except RunBusy as exc:
            verdict = [("busy", str(exc))]
        except OSError as exc:  # e.g. the output folder cannot be created
            verdict = [("error", f"cannot lock the run directory {run_dir}: {exc.strerror or exc}")]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        kind, message = verdict[0]
        raise RunBusy(message) if kind == "busy" else SparseDCError(message)


if __name__ == "__main__":
    from sparse_dc.cli import main as sparse_dc_main

    sys.exit(sparse_dc_main(["train", *sys.argv[1:]]))
