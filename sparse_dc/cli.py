"""`sparse-dc <command> ...`: one console script, one module per command, imported only when used.

Each command is a function `main(argv: list[str]) -> int` with its own argparse parser ("module" names the
module's `main`, "module:function" another function), imported only when used and parsing its arguments before
importing torch or DeepSpeed, so `sparse-dc law ...` or any `--help` answers at once.
"""
from __future__ import annotations

import importlib
import sys

from sparse_dc.errors import SparseDCError

# command -> (module with main(argv), one-line help). Later stages register theirs here.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("sparse_dc.data.cli", "prepare Arrow token shards; inspect a token-budget plan"),
    "model": ("sparse_dc.model.cli", "exact parameter counts and FLOPs per token of the model presets"),
    "train": ("sparse_dc.train.cli", "train a sparse Llama with DeepSpeed ZeRO"),
    "export": ("sparse_dc.train.checkpoint_cli:export_main",
               "consolidate a ZeRO checkpoint into a Hugging Face Llama folder"),
    "eval": ("sparse_dc.eval.cli", "downstream scores with lm-evaluation-harness, joined to the run's ledger row"),
    "reshard": ("sparse_dc.train.checkpoint_cli:reshard_main",
                "convert a ZeRO checkpoint ahead of a resume on another world size"),
    "law": ("sparse_dc.scaling.cli", "fit, predict and plan with the sparse data-constrained scaling law"),
    "sweep": ("sparse_dc.launch.cli", "run a grid of training runs (local torchrun or SLURM) into one ledger"),
    "quickstart": ("sparse_dc.launch.quickstart", "the whole pipeline on the built-in corpus, on CPU, in minutes"),
    "reproduce": ("sparse_dc.reproduce.cli", "train a small grid, fit the law, report on the paper's findings"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sparse-dc <command> [options]   (sparse-dc <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `deepspeed --no_python sparse-dc train ...` puts --local_rank=N before the command; LOCAL_RANK is read instead
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from sparse_dc import __version__

        print(f"sparse-dc {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"sparse-dc: error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"sparse-dc: error: command {argv[0]!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(module, function or "main")(argv[1:]) or 0)
    except SparseDCError as exc:
        print(f"sparse-dc {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparse-dc {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
