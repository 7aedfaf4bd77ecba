"""`sparse-dc law predict | fit | plan | downstream`: the scaling-law toolkit from the command line (numpy/scipy
only)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any

from sparse_dc.config import parse_quantity, write_text_atomic
from sparse_dc.errors import SparseDCError
from sparse_dc.scaling.fit import PROCEDURES, FitResult, fit_anchored, fit_law, load_fit
from sparse_dc.scaling.forms import LawForm, find_preset
from sparse_dc.scaling.ledger import LedgerWarning, read_runs
from sparse_dc.scaling.optimize import MIN_DENSITY, SIZE_TABLES, plan, predict_loss, range_warnings, training_config


def warn(message: str) -> None:
    """One line on stderr: the result is still printed, but the user is told what to distrust."""
    print(f"sparse-dc law: warning: {message}", file=sys.stderr)


def _positive(name: str):
    def parse(text: str) -> float:
        value = parse_quantity(text, name)
        if not (math.isfinite(value) and value > 0):
            raise SparseDCError(f"{name}={text!r}: expected a positive number such as 2.6e9 or 2.6B")
        return value
    return parse


def _density(text: str) -> float:
    value = parse_quantity(text, "--density")
    if not 0.0 < value <= 1.0:
        raise SparseDCError(f"--density={text!r}: expected a density in (0, 1] (1 = dense, 0.25 = 75% sparse)")
    return value


def _law_source(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="published coefficients: paper, muennighoff or chinchilla")
    group.add_argument("--params", metavar="FIT.json", help="a fit written by `sparse-dc law fit --out`")


def _load_law(args: argparse.Namespace) -> tuple[LawForm, dict[str, float], FitResult | None]:
    if args.params:
        fit = load_fit(args.params)
        return fit.law, fit.params, fit
    form, params = find_preset(args.preset)
    return form, params, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-dc law", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predicted validation loss of one run")
    _law_source(p)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--active-params", type=str, help="N: non-zero parameters (2.6e9 or 2.6B)")
    size.add_argument("--dense-params", type=str, help="dense-equivalent parameters (N = dense x density)")
    p.add_argument("--unique-tokens", required=True, type=str, help="U: unique training tokens")
    p.add_argument("--tokens", required=True, type=str, help="D: total training tokens")
    p.add_argument("--density", required=True, type=str, help="S in (0, 1]; 1 = dense")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_predict)

    f = sub.add_parser("fit", help="fit the law to a run ledger (JSONL) or CSV")
    f.add_argument("ledger", metavar="LEDGER_OR_CSV")
    f.add_argument("--out", required=True, metavar="FIT.json")
    f.add_argument("--form", default="paper", choices=("paper", "muennighoff", "chinchilla"))
    f.add_argument("--stages", default="joint", choices=PROCEDURES,
                   help="joint (default): all coefficients together on all runs after a staged start, the best "
                        "predictor of held-out runs; paper: the official notebook's four-stage procedure exactly; "
                        "staged: sparse-dc's four stages on the full law")
    f.add_argument("--keep-duplicates", action="store_true",
                   help="fit every row of a run name that appears more than once (default: its last row)")
    f.add_argument("--anchor", metavar="PRESET",
                   help="few runs: start from this preset (e.g. paper) and refit only --free on all runs")
    f.add_argument("--free", default="a,b,e", help="with --anchor: coefficients to refit (default a,b,e)")
    f.add_argument("--bootstrap", type=int, default=0, metavar="K", help="K resampled refits for intervals")
    f.add_argument("--cv", type=int, default=0, metavar="K", help="K-fold cross-validation error")
    f.add_argument("--holdout-above", type=str, metavar="N",
                   help="fit only runs with dense_params <= N and report the error on the larger ones")
    f.add_argument("--plot", metavar="DIR", help="write figures (PNG) into DIR")
    f.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes for bootstrap")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_fit)

    q = sub.add_parser("plan", help="compute-optimal size, density and tokens for a budget")
    q.add_argument("--unique-tokens", required=True, type=str, help="U: unique tokens available")
    q.add_argument("--compute", required=True, type=str, help="C: training FLOPs (6 N_active D)")
    _law_source(q)
    q.add_argument("--min-density", type=str, default=str(MIN_DENSITY),
                   help="sparsest density to consider (default: the paper's sparsest, 0.0625)")
    q.add_argument("--sizes", default="built", choices=tuple(SIZE_TABLES),
                   help="N of each model size: built (what `train` builds, default) or notebook (the official "
                        "fit's labels, e.g. 960m = 1.17e9)")
    q.add_argument("--json", action="store_true")
    q.add_argument("--write-config", metavar="FILE.yaml", help="write a `sparse-dc train` config for the plan")
    q.add_argument("--recipe", default="paper", choices=("paper", "fast"),
                   help="training recipe of the written config (launch/configs/paper/ or launch/configs/). paper "
                        "(default): the setup the paper's law and its published coefficients were fitted on "
                        "(unstructured SET with AdamDST, one document per sequence, the paper's LR rule), so the "
                        "run is the one the plan's loss predicts; fast: 64x64 block-sparse AdamW presets that train "
                        "faster at scale but are not that setup: plan them with a law fitted to fast runs (--params)")
    q.add_argument("--name", default=None, help="run name in the written config")
    q.add_argument("--data-dir", default="runs/data/corpus", help="data.dir in the written config")
    q.set_defaults(func=cmd_plan)

    d = sub.add_parser("downstream", help="plot downstream accuracy against validation loss (sparse-dc eval scores)")
    d.add_argument("ledger", metavar="LEDGER")
    d.add_argument("--out", required=True, metavar="FILE.png")
    d.add_argument("--metric", default="acc", help="harness metric per task (default acc; e.g. acc_norm)")
    d.add_argument("--loss", default="val_loss", help="ledger loss field on the x axis (default val_loss)")
    d.set_defaults(func=cmd_downstream)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", LedgerWarning)
        warnings.showwarning = lambda message, *_, **__: warn(str(message))
        return int(args.func(args) or 0)


def cmd_predict(args: argparse.Namespace) -> int:
    form, params, fit = _load_law(args)
    density = _density(args.density)
    if args.active_params is not None:
        active = _positive("--active-params")(args.active_params)
    else:
        active = _positive("--dense-params")(args.dense_params) * density
    u, d = _positive("--unique-tokens")(args.unique_tokens), _positive("--tokens")(args.tokens)
    for line in range_warnings(u, d, density, 6 * active * d):
        warn(line)
    loss = float(predict_loss(form, params, active, u, d, density))
    out: dict[str, Any] = {"law": form.name, "active_params": active, "unique_tokens": u, "tokens": d,
                           "density": density, "epochs": d / u, "loss": loss}
    if fit is not None and fit.bootstrap:
        from types import SimpleNamespace

        from sparse_dc.scaling.uncertainty import predict_interval

        lo, hi = predict_interval(fit, SimpleNamespace(active_params=active, unique_tokens=u, tokens=d,
                                                       density=density))
        out["loss_interval"] = [float(lo[0]), float(hi[0])]
    if args.json:
        print(json.dumps(out))
    else:
        ci = f"  (95% CI {out['loss_interval'][0]:.4f}..{out['loss_interval'][1]:.4f})" if "loss_interval" in out \
            else ""
        print(f"predicted loss {loss:.4f}{ci}  [{form.name} law; N={active:.3g} active, U={u:.3g}, D={d:.3g} "
              f"({d / u:.2f} epochs), density {density:g}]")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from sparse_dc.scaling import uncertainty

    runs = read_runs(args.ledger, keep_duplicates=args.keep_duplicates)
    sub_epoch = runs.tokens < runs.unique_tokens
    if sub_epoch.any():
        warn(f"{int(sub_epoch.sum())} run(s) train for less than one epoch (tokens < unique_tokens, e.g. "
             f"{runs.name[sub_epoch][0]}): the law, like the official one, credits them all U unique tokens "
             "(D_eff = U); if a run saw only D distinct tokens, record unique_tokens = tokens for it")
    test = None
    if args.holdout_above is not None:
        above = _positive("--holdout-above")(args.holdout_above)
        runs, test = uncertainty.holdout_split(runs, above)
    if args.anchor:
        form, anchor = find_preset(args.anchor)
        if args.bootstrap or args.cv:
            raise SparseDCError("--anchor: bootstrap and cross-validation are not offered for anchored fits")
        fit = fit_anchored(runs, form, anchor, tuple(k.strip() for k in args.free.split(",") if k.strip()))
    else:
        fit = fit_law(runs, args.form, args.stages, progress=True)
    for stage in fit.stages:
        print(f"  stage {stage['name']:<22} runs {stage['n_runs']:>4}  starts {stage['starts']:>4}  "
              f"objective {stage['objective']:.4g}  {stage['seconds']:.2f}s")
    m = fit.metrics
    print(f"fit: {m['n_runs']} runs  objective {fit.objective:.5g}  R^2 {m['r2']:.4f}  RMSE {m['rmse']:.4f}  "
          f"MAE {m['mae']:.4f}")
    if test is not None:
        fit.holdout = uncertainty.holdout_report(fit, test, above)
        h = fit.holdout
        print(f"held out ({h['n_test']} runs above {above:.3g} dense params): R^2 {h['r2']:.4f}  "
              f"RMSE {h['rmse']:.4f}  MAE {h['mae']:.4f}")
    if args.cv:
        fit.cv = uncertainty.cross_validate(runs, args.form, args.stages, args.cv, args.seed, progress=True)
        print(f"{args.cv}-fold CV: RMSE {fit.cv['rmse']:.4f}  MAE {fit.cv['mae']:.4f}")
    if args.bootstrap:
        fit.bootstrap = uncertainty.bootstrap(runs, fit, args.bootstrap, args.seed, args.workers, progress=True)
        for k, (lo, hi) in uncertainty.intervals(fit.bootstrap).items():
            print(f"  {k:<6} {fit.params[k]:>10.4f}   95% CI [{lo:.4f}, {hi:.4f}]")
    fit.save(args.out)
    print(f"wrote {args.out}")
    if args.plot:
        from sparse_dc.scaling.plots import all_plots

        for path in all_plots(fit.law, fit.params, runs, args.plot, held_out=test):
            print(f"wrote {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    form, params, fit = _load_law(args)
    u, c = _positive("--unique-tokens")(args.unique_tokens), _positive("--compute")(args.compute)
    min_density = _density(args.min_density)
    for line in range_warnings(u, density=min_density, compute=c):
        warn(line)
    result = plan(form, params, u, c, samples=fit.bootstrap if fit else None, min_density=min_density,
                  sizes=args.sizes)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        o = result.optimum
        ci = f" (95% CI {result.loss_interval[0]:.4f}..{result.loss_interval[1]:.4f})" if result.loss_interval else ""
        print(f"budget: C={c:.3g} FLOPs, U={u:.3g} unique tokens  [{form.name} law]")
        print(f"optimum: {o['dense_params']:.3g} dense-equivalent params at density {o['density']:.3f} "
              f"({o['active_params']:.3g} active), {o['tokens']:.3g} tokens = {o['epochs']:.2f} epochs, "
              f"loss {o['loss']:.4f}")
        print(f"recommended: model {result.preset} ({result.preset_dense_params:.3g} params), density "
              f"{result.density:.3f}, {result.tokens:.4g} tokens = {result.epochs:.2f} epochs, predicted loss "
              f"{result.loss:.4f}{ci}")
        print(f"returns from repetition halve after {result.saturation_epochs:.1f} epochs at this size and density; "
              f"ignoring compute, the loss-optimal density at this size and data is {result.loss_optimal_density:.3f}")
    if args.write_config:
        import yaml

        name = args.name or f"plan-{result.preset}-d{result.density:.3f}-U{u:.2g}".replace("+", "")
        config = training_config(result, name, args.data_dir, recipe=args.recipe)
        write_text_atomic(args.write_config, yaml.safe_dump(config, sort_keys=False))
        if not args.json:
            print(f"wrote {args.write_config} ({args.recipe} recipe)")
    return 0


def cmd_downstream(args: argparse.Namespace) -> int:
    from sparse_dc.scaling.plots import downstream_points, downstream_vs_loss

    read_runs(args.ledger)  # one-line errors for a missing or malformed ledger
    rows = []
    if not args.ledger.lower().endswith(".csv"):  # scores are nested fields: JSONL ledgers only
        with open(args.ledger, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    points = downstream_points(rows, args.metric, args.loss)
    if not points:
        raise SparseDCError(f"{args.ledger}: no run has downstream {args.metric} scores with {args.loss}; expected "
                            "a JSONL ledger whose rows were scored by `sparse-dc eval`")
    for task, pts in points.items():
        print(f"{task}: " + ", ".join(f"{run} {args.loss} {x:.4f} {args.metric} {y:.4f}" for run, x, y, _, _ in pts))
    print(f"wrote {downstream_vs_loss(points, args.out, args.metric, args.loss)}")
    return 0
