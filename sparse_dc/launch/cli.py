"""`sparse-dc sweep`: expand a grid of overrides into training runs that all append to one ledger.

    sparse-dc sweep --config launch/configs/tiny.yaml --grid sparsity.density=1,0.5 --grid data.epochs=1,2 --nproc 2
    sparse-dc sweep --config launch/configs/120m-d0.5.yaml --grid-file grid.yaml --launcher slurm -- --nodes=2
"""
from __future__ import annotations

import argparse
import logging

from sparse_dc.config.base import load_yaml_mapping
from sparse_dc.launch.sweep import (
    SweepError,
    expand,
    parse_grid_args,
    run_sweep,
    summarize,
    sweep_ledger,
    unfinished,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-dc sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base run config (YAML) every grid point starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one grid axis (repeatable), e.g. sparsity.density=1,0.5")
    p.add_argument("--grid-file", help="YAML mapping of dotted keys to lists of values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                   help="an override applied to every run (repeatable)")
    p.add_argument("--prefix", default="", help="run-name prefix")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--nproc", type=int, default=1, help="local ranks per run (torchrun when > 1)")
    p.add_argument("--log-dir", default=None, help="per-run logs of local runs (default <output_dir>/sweep-logs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("sbatch_args", nargs="*", help="after --: extra sbatch arguments for --launcher slurm")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sweep: %(message)s", datefmt="%H:%M:%S")
    grid = parse_grid_args(args.grid)
    if args.grid_file:
        for key, values in load_yaml_mapping(args.grid_file).items():
            grid[key] = values if isinstance(values, list) else [values]
    runs = expand(args.config, grid, args.prefix, args.extra)
    ledger = sweep_ledger(runs)
    log_dir = args.log_dir or f"{runs[0].config.output_dir}/sweep-logs"
    status = run_sweep(runs, args.config, ledger, log_dir, args.launcher,
                       args.nproc, args.sbatch_args, args.dry_run)
    print(f"sweep: {len(runs)} runs: {summarize(status)}; ledger {ledger}")
    left = unfinished(status)
    if left:
        raise SweepError(f"{len(left)} run(s) did not finish: {', '.join(f'{n} ({status[n]})' for n in left)}; "
                         f"see {log_dir}; re-run the sweep to continue them")
    return 0
