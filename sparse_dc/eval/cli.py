"""`sparse-dc eval --checkpoint RUN_DIR|HF_DIR [--tasks boolq,arc_easy,...]`: downstream scores with
lm-evaluation-harness, joined to the run's ledger row.

    sparse-dc eval --checkpoint runs/my-run                               # the paper's zero-shot suite, native
    sparse-dc eval --checkpoint runs/my-run --model hf --tasks arc_easy   # through the exported HF model
    sparse-dc eval --checkpoint runs/my-run --tasks my_task --include-path tasks/   # local custom tasks
    torchrun --standalone --nproc_per_node 8 -m sparse_dc.cli eval --checkpoint runs/my-run   # 8 GPUs, one node

Several ranks split the requests (data parallel; rank 0 gathers, writes and updates the ledger): the native
model on GPUs (NCCL) or CPUs (gloo); the HF model on GPUs only (the harness's accelerate integration).
Nothing is downloaded: a task's data must be in the Hugging Face cache or in local files (see eval/tasks.py).
"""
from __future__ import annotations

import argparse
import logging
import os

from sparse_dc.errors import SparseDCError
from sparse_dc.eval.config import PAPER_TASKS, EvalConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-dc eval", description="Downstream scores of a run or an export with "
                                "lm-evaluation-harness, joined to the run's ledger row.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--checkpoint", required=True, help="run folder (or checkpoints/ or step_*) or export folder")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated lm-eval tasks (default: %(default)s)")
    p.add_argument("--num-fewshot", type=int, default=0, help="in-context examples (default 0, as in the paper)")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass per rank")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of custom task YAMLs")
    p.add_argument("--out", default=None, metavar="FILE.json", help="results (default: <folder>/eval/results.json)")
    p.add_argument("--model", choices=("auto", "native", "hf"), default="auto",
                   help="native: our model from the checkpoint; hf: transformers on an export (default: auto)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this rank's GPU, else cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="SentencePiece model (default: the run's)")
    p.add_argument("--ledger", default=None, help="ledger to update (default: the run's train.ledger)")
    p.add_argument("--no-ledger", action="store_true", help="do not touch the ledger")
    p.add_argument("--log-samples", action="store_true", help="keep per-document outputs in the results JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    cfg = EvalConfig(checkpoint=args.checkpoint, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                     num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                     include_path=args.include_path, out=args.out, model=args.model, device=args.device,
                     dtype=args.dtype, tokenizer=args.tokenizer, ledger=args.ledger,
                     update_ledger=not args.no_ledger, log_samples=args.log_samples, seed=args.seed)
    cfg.validate()
    return cfg


def log_to(path: str) -> None:
    """The harness's and our log records in `path`; warnings also on stderr (replacing an earlier call's)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_stderr = logging.StreamHandler()
    to_stderr.setLevel(logging.WARNING)
    for name in ("lm_eval", "sparse_dc"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "sparse_dc_eval", False)]:
            logger.removeHandler(old)
            old.close()
        logger.setLevel(logging.INFO)
        for handler in (to_file, to_stderr):
            handler.sparse_dc_eval = True
            logger.addHandler(handler)


def table(report: dict) -> str:
    lines = [f"{'task':<24} {'metric':<20} {'value':>8} {'stderr':>8} {'n':>7}"]
    for task, metrics in report["scores"].items():
        for metric, s in metrics.items():
            stderr = f"{s['stderr']:.4f}" if s["stderr"] is not None else "-"
            lines.append(f"{task:<24} {metric:<20} {s['value']:>8.4f} {stderr:>8} {report['meta'][task]['n']:>7}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg = config_from_args(parser().parse_args(argv))
    from sparse_dc.eval.run import evaluate, resolve_source
    from sparse_dc.train.dist import setup_env, silence_non_main

    denv = setup_env(dict(os.environ))  # read only: the harness model joins the process group
    try:
        if denv.is_main:
            home = os.path.dirname(os.path.abspath(cfg.out)) if cfg.out else os.path.join(
                resolve_source(cfg.checkpoint).home, "eval")
            log_to(os.path.join(home, "eval.log"))
        else:
            silence_non_main(denv)
        report = evaluate(cfg)
    except SparseDCError:
        if not denv.is_main:  # every rank hits the same error: rank 0 reports it
            os._exit(2)
        raise
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if report is not None:
        print(table(report))
        print(report["ledger"])
        print(f"wrote {report['out']}")
    return 0
