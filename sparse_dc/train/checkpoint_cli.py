"""`sparse-dc export` and `sparse-dc reshard`: the two commands that work on a finished checkpoint. Arguments are
parsed (and `--help` answered) before torch and DeepSpeed are imported."""
from __future__ import annotations

import argparse
import os

from sparse_dc.errors import SparseDCError


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparse-dc export",
                                description="Consolidate a ZeRO checkpoint into a Hugging Face Llama folder.")
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or a step_* folder")
    p.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, tokenizer files)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="SentencePiece model to ship (default: the one in the run's prepared data directory)")
    args = p.parse_args(argv)
    from sparse_dc.train.export import export

    print(export(args.checkpoint, args.out, args.tokenizer))
    return 0


def reshard_main(argv: list[str]) -> int:
    """`sparse-dc reshard --checkpoint RUN|TAG [--workers N]`: convert ahead of a resume on another world size.

    A resume converts on rank 0 while the other ranks wait in a collective; for a big model that can outlast the
    process group's timeout. Converting here first (on a node with many cores) makes the resume reuse it."""
    p = argparse.ArgumentParser(prog="sparse-dc reshard", description=reshard_main.__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or a step_* folder")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="extract/merge processes")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise SparseDCError(f"--workers={args.workers}: expected an integer >= 1")
    from sparse_dc.train.export import resolve_checkpoint
    from sparse_dc.train.reshard import convert_to_universal

    root, tag = resolve_checkpoint(args.checkpoint)
    print(convert_to_universal(root, tag, args.workers))
    return 0
