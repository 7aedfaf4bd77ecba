"""`sparse-dc train --config FILE.yaml [key=value ...] [--resume auto|never]`: the entry point.

Works unchanged as a plain process, under `torchrun`, the `deepspeed` launcher (which adds --local_rank) and
SLURM `srun` (see dist.py). Parse -> validate -> rendezvous -> build -> train.
"""
from __future__ import annotations

import argparse
import os
import sys

from sparse_dc.config.base import load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.errors import SparseDCError

# Exit status after SIGTERM/SIGUSR1 made the run save and stop early (EX_TEMPFAIL): "resumable, run me again".
# launch/slurm/train.sbatch requeues the job on it.
EXIT_STOPPED = 75


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-dc train", description="Train a sparse Llama with DeepSpeed ZeRO.")
    p.add_argument("--config", help="YAML run config (data, model, sparsity, train sections)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.deepspeed.zero_stage=3")
    p.add_argument("--resume", choices=("auto", "never"), default="never",
                   help="auto: continue from the newest complete checkpoint of this run name, if any")
    p.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment is what we read
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    # every rank hits the same user error: rank 0 reports it, the others exit quietly with the same status
    launch_rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        finished = run(cfg, args.resume)
    except SparseDCError:
        if launch_rank != 0:
            os._exit(2)
        raise
    return 0 if finished else EXIT_STOPPED


def run(cfg: RunConfig, resume: str) -> bool:
    """Rendezvous, build, resume or refuse to clobber, train; False when a signal stopped it after a save."""
    from sparse_dc.train.dist import init_distributed, setup_env, silence_non_main

    denv = setup_env()
    cfg.train.accumulation_steps(denv.world_size)  # a config error, before any process group exists
    device = init_distributed(denv)
    silence_non_main(denv)
    import torch.distributed as dist

    from sparse_dc.train.checkpoint import ResumeError
    from sparse_dc.train.trainer import Trainer

    trainer = Trainer(cfg, denv, device)
    if resume == "auto":
        if trainer.resume() and denv.is_main:
            print(f"resumed {cfg.name} at step {trainer.step} ({trainer.samples} samples)", file=sys.stderr)
    elif trainer.checkpointer.latest() is not None:
        raise ResumeError(f"run {cfg.name!r} already has checkpoints in {trainer.checkpointer.dir}: expected "
                          "--resume auto to continue it, or a new name (name=...) to start over")
    trainer.train()
    dist.destroy_process_group()
    return not trainer.stopped_by_signal


if __name__ == "__main__":
    from sparse_dc.cli import main as sparse_dc_main

    sys.exit(sparse_dc_main(["train", *sys.argv[1:]]))
