"""`sparse-dc reproduce`: the paper's headline findings at small scale, from one command.

    sparse-dc reproduce --scale tiny --out runs/reproduce-tiny            # 2-core CPU, built-in corpus, ~15 min
    sparse-dc reproduce --scale small --out runs/reproduce-small          # one GPU
    sparse-dc reproduce --scale medium --data DIR --launcher slurm -- --partition=gpu

Plans sizes x densities {1, 0.5, 0.25, 0.125} x epochs {1, 2, 4, 8, 16} at one unique-token budget U, trains the
grid through the sweep runner (re-running skips finished runs), fits the sparse data-constrained law with
bootstrap intervals, scores it on the largest size held out, and writes OUT/report/report.md with its figures.
With --launcher slurm the runs are submitted; run again with --report-only once they have finished.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from sparse_dc.reproduce.scales import SCALES, ReproduceError, get_scale


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-dc reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="tiny", choices=list(SCALES),
                   help="tiny: 2-core CPU; small: one GPU; medium: a cluster; ci: test-only smoke grid")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="a `sparse-dc data prepare` directory (default: prepare the built-in corpus under OUT/data)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/reproduce-<scale>)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--nproc", type=int, default=1, help="ranks per local run (torchrun when > 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank for local runs (OMP_NUM_THREADS; default 1 unless the environment "
                        "sets it: on a shared 2-core machine 2 threads per rank measured ~7x slower)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="K", help="bootstrap resamples (default: per scale)")
    p.add_argument("--dry-run", action="store_true", help="plan and print the runs, train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: fit and report from the ledger (e.g. once submitted SLURM jobs finished)")
    p.add_argument("sbatch_args", nargs="*", help="after --: extra sbatch arguments for --launcher slurm")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reproduce: %(message)s", datefmt="%H:%M:%S")
    from sparse_dc.launch.sweep import run_sweep, summarize, unfinished
    from sparse_dc.reproduce.plan import plan_runs, prepare_data

    scale = get_scale(args.scale)
    if args.nproc < 1 or (args.threads is not None and args.threads < 1):
        raise ReproduceError(f"--nproc {args.nproc} --threads {args.threads}: expected integers >= 1")
    out = args.out or os.path.join("runs", f"reproduce-{scale.name}")
    os.makedirs(out, exist_ok=True)
    data_dir = prepare_data(scale, args.data, out)
    base, runs = plan_runs(scale, data_dir, out, args.nproc)
    ledger = runs[0].config.train.ledger
    status: dict[str, str] = {}
    if not args.report_only:
        env = dict(os.environ)
        if args.launcher == "local":
            env["OMP_NUM_THREADS"] = str(args.threads or env.get("OMP_NUM_THREADS", 1))
        status = run_sweep(runs, base, ledger, os.path.join(out, "logs"), args.launcher, args.nproc,
                           args.sbatch_args, args.dry_run, env)
        print(f"reproduce {scale.name}: {len(runs)} runs: {summarize(status)}")
        if args.dry_run:
            return 0
        if {"submitted", "queued"} & set(status.values()):
            print("submitted to SLURM: once the jobs have finished, run the same command with --report-only")
            return 0
        failed = unfinished(status)
        if failed:
            raise ReproduceError(f"{len(failed)} run(s) did not finish ({', '.join(failed[:5])}): see {out}/logs; "
                                 "re-run the same command to retry them")
    from sparse_dc.reproduce.report import write_report

    path = write_report(scale, ledger, [r.name for r in runs], os.path.join(out, "report"),
                        args.bootstrap if args.bootstrap is not None else scale.bootstrap, status)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    from sparse_dc.cli import main as sparse_dc_main

    sys.exit(sparse_dc_main(["reproduce", *sys.argv[1:]]))
