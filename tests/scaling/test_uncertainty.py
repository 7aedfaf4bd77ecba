"""Bootstrap intervals, k-fold cross-validation and held-out evaluation."""
import numpy as np
import pytest

from sparse_dc.scaling.fit import FitError, fit_law
from sparse_dc.scaling.forms import CHINCHILLA, PAPER
from sparse_dc.scaling.synthetic import synthetic_runs
from sparse_dc.scaling.uncertainty import (
    bootstrap,
    cross_validate,
    holdout_report,
    holdout_split,
    intervals,
    predict_interval,
    strata,
)


@pytest.fixture(scope="module")
def chinchilla_case():
    runs = synthetic_runs(60, CHINCHILLA, "chinchilla", noise=0.01, seed=10)
    fit = fit_law(runs, "chinchilla")
    fit.bootstrap = bootstrap(runs, fit, 60, seed=0)
    return runs, fit


def test_bootstrap_intervals_cover_the_true_coefficients(chinchilla_case):
    _, fit = chinchilla_case
    iv = intervals(fit.bootstrap, 0.95)
    for k, true in CHINCHILLA.items():
        lo, hi = iv[k]
        assert lo <= true <= hi, (k, lo, true, hi)
    assert iv["alpha"][1] - iv["alpha"][0] < 0.15  # informative, not vacuous
    assert iv["beta"][1] - iv["beta"][0] < 0.15


def test_prediction_interval_covers_the_true_loss(chinchilla_case):
    _, fit = chinchilla_case
    x = synthetic_runs(20, CHINCHILLA, "chinchilla", noise=0.0, seed=11)
    lo, hi = predict_interval(fit, x)
    assert np.all(lo <= hi) and np.mean((lo <= x.val_loss) & (x.val_loss <= hi)) >= 0.9
    assert np.all(hi - lo < 0.05 * x.val_loss)


def test_bootstrap_in_processes_equals_serial(train_runs, paper_fit):
    serial = bootstrap(train_runs, paper_fit, 3, seed=7, workers=1)
    parallel = bootstrap(train_runs, paper_fit, 3, seed=7, workers=2)
    assert serial == parallel and len(serial) == 3 and set(serial[0]) == set(PAPER)


def test_resampling_keeps_every_stage_populated(train_runs):
    labels = strata(train_runs, "paper")
    assert len(np.unique(labels)) == 4  # dense/sparse x single/multi-epoch


def test_cross_validation_error_is_near_the_noise(train_runs, noise):
    cv = cross_validate(train_runs, "paper", "staged", k=3, seed=0)
    assert cv["k"] == 3 and len(cv["predictions"]) == len(train_runs)
    assert cv["mape"] < 2.5 * noise
    with pytest.raises(FitError, match="cv=1"):
        cross_validate(train_runs, k=1)


def test_holdout_fits_small_runs_and_scores_large_ones(train_runs, noise):
    above = float(np.quantile(train_runs.dense_params, 0.85))
    small, large = holdout_split(train_runs, above)
    assert small.dense_params.max() <= above < large.dense_params.min()
    report = holdout_report(fit_law(small, "paper", "joint"), large, above)
    assert report["n_test"] == len(large) and report["mape"] < 3 * noise
    with pytest.raises(FitError, match="holdout-above"):
        holdout_split(train_runs, 1e12)
