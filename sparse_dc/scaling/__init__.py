"""The scaling-law toolkit: read the run ledger, fit a law with uncertainty, predict, and plan the next run.

numpy/scipy only (matplotlib for plots, imported on use): importing this package never imports torch.

    runs = read_runs("runs/ledger.jsonl")
    fit = fit_law(runs, "paper")                       # FitResult: params, objective, metrics (joint fit)
    notebook = fit_law(runs, "paper", "paper")         # the official notebook's procedure exactly
    fit.predict(runs)                                  # loss per run
    best = plan(fit.law, fit.params, unique_tokens=2.6e9, compute=1e20)
"""
from sparse_dc.scaling.fit import FitResult, fit_law, load_fit, objective
from sparse_dc.scaling.forms import PAPER, LawForm, find_preset, get_form
from sparse_dc.scaling.ledger import Runs, read_runs, runs_from_rows, write_runs
from sparse_dc.scaling.optimize import (
    Plan,
    compute_optimal,
    diminishing_returns_epochs,
    loss_optimal_density,
    plan,
    predict_loss,
    training_config,
)

__all__ = [
    "PAPER", "FitResult", "LawForm", "Plan", "Runs", "compute_optimal", "diminishing_returns_epochs",
    "find_preset", "fit_law", "get_form", "load_fit", "loss_optimal_density", "objective", "plan",
    "predict_loss", "read_runs", "runs_from_rows", "training_config", "write_runs",
]
