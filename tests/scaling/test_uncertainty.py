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


def test_resampling_draws_within_each_stratum_with_replacement(train_runs):
    """Every resample keeps each stratum's run count and draws only that stratum's runs; resamples differ by seed
    and repeat for a seed."""
    from sparse_dc.scaling.fit import stage_masks
    from sparse_dc.scaling.forms import get_form
    from sparse_dc.scaling.uncertainty import _resample

    labels = strata(train_runs, "paper")
    patterns = np.stack(stage_masks(get_form("paper"), train_runs)).T  # (runs, stages) membership
    for g in np.unique(labels):  # a label is exactly one pattern of stage membership
        assert len(np.unique(patterns[labels == g], axis=0)) == 1
    assert len(np.unique(patterns, axis=0)) == len(np.unique(labels))
    draws = []
    for seed in range(5):
        index = _resample(labels, np.random.default_rng(seed))
        assert len(index) == len(labels)
        np.testing.assert_array_equal(np.bincount(labels[index]), np.bincount(labels))
        assert len(np.unique(index)) < len(index)  # with replacement
        draws.append(index)
    assert not np.array_equal(draws[0], draws[1])
    np.testing.assert_array_equal(_resample(labels, np.random.default_rng(0)), draws[0])
    # a small stratum is never emptied or swamped: here stratum 1 has 2 runs among 10
    small = np.array([0] * 8 + [1] * 2)
    for seed in range(20):
        assert np.bincount(small[_resample(small, np.random.default_rng(seed))]).tolist() == [8, 2]


def test_intervals_are_the_percentiles_of_the_samples():
    samples = [{"a": float(v), "b": float(-v)} for v in range(101)]  # 0..100
    for level, expect in ((0.95, {"a": (2.5, 97.5), "b": (-97.5, -2.5)}), (0.5, {"a": (25, 75), "b": (-75, -25)})):
        got = intervals(samples, level)
        assert got.keys() == expect.keys()
        for k in expect:
            assert got[k] == (pytest.approx(expect[k][0]), pytest.approx(expect[k][1]))
    with pytest.raises(FitError, match="no bootstrap samples: refit with --bootstrap K"):
        intervals([])


def test_prediction_interval_is_over_the_bootstrap_coefficients():
    from types import SimpleNamespace

    from sparse_dc.scaling.fit import FitResult
    from sparse_dc.scaling.forms import get_form

    law = get_form("chinchilla")
    coefficients = [{**CHINCHILLA, "e": CHINCHILLA["e"] + d} for d in np.linspace(-0.1, 0.1, 41)]
    fit = FitResult(form="chinchilla", params=dict(CHINCHILLA), objective=0.0, metrics={}, bootstrap=coefficients)
    x = SimpleNamespace(active_params=1e8, unique_tokens=1e9, tokens=4e9, density=1.0)  # scalars are one run
    preds = np.array([law.predict(c, SimpleNamespace(**{k: np.array([v]) for k, v in vars(x).items()}))[0]
                      for c in coefficients])
    lo, hi = predict_interval(fit, x, 0.9)
    assert lo.shape == hi.shape == (1,)
    assert (lo[0], hi[0]) == (pytest.approx(np.percentile(preds, 5)), pytest.approx(np.percentile(preds, 95)))
    with pytest.raises(FitError, match="has no bootstrap samples"):
        predict_interval(FitResult(form="chinchilla", params=dict(CHINCHILLA), objective=0.0, metrics={}), x)


def test_holdout_split_puts_the_boundary_size_with_the_small_runs(train_runs):
    sizes = np.unique(train_runs.dense_params)
    above = float(sizes[len(sizes) // 2])
    small, large = holdout_split(train_runs, above)
    assert len(small) + len(large) == len(train_runs) and (small.dense_params == above).any()
    assert small.dense_params.max() == above < large.dense_params.min()
    with pytest.raises(FitError, match=r"holdout-above=.*: expected a size that leaves runs on both sides"):
        holdout_split(train_runs, float(sizes.min()) - 1)


def test_cross_validation_folds_deal_each_stratum_out_evenly(train_runs):
    """Every run is predicted once, by a fit that did not see it; folds hold each stratum's runs evenly."""
    cv = cross_validate(train_runs, "paper", "staged", k=3, seed=1)
    pred = np.array(cv["predictions"])
    res = pred - train_runs.val_loss
    assert cv["mae"] == pytest.approx(np.abs(res).mean()) and cv["rmse"] == pytest.approx(np.sqrt((res ** 2).mean()))
    assert cv["mape"] == pytest.approx(np.abs(res / train_runs.val_loss).mean())
    assert not np.allclose(pred, cross_validate(train_runs, "paper", "staged", k=3, seed=2)["predictions"])
    with pytest.raises(FitError, match=rf"cv={len(train_runs) + 1}: expected 2 <= K <= number of runs"):
        cross_validate(train_runs, k=len(train_runs) + 1)


def test_leave_one_out_predicts_each_run_from_a_fit_on_the_others(two_coefficient_form):
    """K = number of runs is allowed (leave-one-out): each prediction is exactly that of a fit on the other runs."""
    runs = synthetic_runs(5, CHINCHILLA, "chinchilla", noise=0.01, seed=4)
    cv = cross_validate(runs, "chinchilla-ab", "staged", k=5)
    for i in range(5):
        others = fit_law(runs.subset(np.arange(5) != i), "chinchilla-ab", "staged")
        assert cv["predictions"][i] == others.predict(runs.subset([i]))[0]
    res = np.array(cv["predictions"]) - runs.val_loss
    assert cv["k"] == 5 and cv["mae"] == pytest.approx(np.abs(res).mean(), rel=1e-12)
    assert cv["rmse"] == pytest.approx(np.sqrt((res ** 2).mean()), rel=1e-12)


def test_cross_validation_bounds_and_a_failing_fold(two_coefficient_form):
    runs = synthetic_runs(8, CHINCHILLA, "chinchilla", noise=0.01, seed=4)
    assert cross_validate(runs.subset(np.arange(6)), "chinchilla-ab", "staged", k=2)["k"] == 2  # 3 runs a fold
    with pytest.raises(FitError, match=r"^cv=1: expected 2 <= K <= number of runs \(8\)$"):
        cross_validate(runs, "chinchilla-ab", k=1)
    with pytest.raises(FitError, match=r"^2-fold CV, fold 1 \(fits on 4 runs\): stage 1-all of the chinchilla law "
                                       r"needs at least 6 matching runs to fit a, b, e, alpha, beta; the ledger has 4$"):
        cross_validate(runs, "chinchilla", "joint", k=2)


def test_bootstrap_resamples_are_reproducible_and_independent_across_seeds(two_coefficient_form, capsys):
    """Resample i of a seed is the same whatever n (a longer run extends a shorter one); two seeds share no
    resample; a progress bar only when asked."""
    runs = synthetic_runs(8, CHINCHILLA, "chinchilla", noise=0.01, seed=4)
    fit = fit_law(runs, "chinchilla-ab", "staged", start=CHINCHILLA)  # e, alpha, beta stay at CHINCHILLA's
    three = bootstrap(runs, fit, 3, seed=0, progress=True)
    # each refit uses the fit's procedure from the fit's coefficients: the staged fit moves a, b only
    for sample in three:
        assert {k: sample[k] for k in ("e", "alpha", "beta")} == {k: CHINCHILLA[k] for k in ("e", "alpha", "beta")}
        assert sample["a"] != fit.params["a"] and sample["b"] != fit.params["b"]
    err = capsys.readouterr().err
    assert "bootstrap: 100%" in err and "3/3 [" in err and ("fit/s]" in err or "s/fit]" in err)
    assert bootstrap(runs, fit, 2) == three[:2] and capsys.readouterr().err == ""  # seed 0 is the default
    assert bootstrap(runs, fit, 3, workers=2, progress=True) == three  # in processes: same samples, same bar
    err = capsys.readouterr().err
    assert "bootstrap: 100%" in err and "3/3 [" in err
    other = bootstrap(runs, fit, 3, seed=1)
    assert not any(s == t for s in three for t in other)
    assert len({tuple(s.values()) for s in three + other}) == 6


def test_holdout_report_scores_the_fit_on_the_large_runs(train_runs, paper_fit):
    above = float(np.quantile(train_runs.dense_params, 0.85))
    _, large = holdout_split(train_runs, above)
    report = holdout_report(paper_fit, large, above)
    pred = paper_fit.predict(large)
    assert report["above"] == above and report["n_test"] == len(large) == len(report["names"])
    assert report["names"] == [str(n) for n in large.name] and report["predictions"] == pred.tolist()
    assert report["mae"] == pytest.approx(np.abs(pred - large.val_loss).mean(), rel=1e-12)


def test_intervals_default_to_95_percent(chinchilla_case):
    _, fit = chinchilla_case
    assert intervals(fit.bootstrap) == intervals(fit.bootstrap, 0.95)
    x = synthetic_runs(5, CHINCHILLA, "chinchilla", noise=0.0, seed=11)
    lo, hi = predict_interval(fit, x)
    lo95, hi95 = predict_interval(fit, x, 0.95)
    assert lo.tolist() == lo95.tolist() and hi.tolist() == hi95.tolist()


def test_prediction_interval_of_a_single_sample_and_without_samples():
    """One bootstrap sample (--bootstrap 1) gives a zero-width interval at its prediction; none is a one-line
    error."""
    from types import SimpleNamespace

    from sparse_dc.scaling.fit import FitResult
    from sparse_dc.scaling.forms import get_form

    x = SimpleNamespace(active_params=[1e8, 2e8], unique_tokens=[1e9, 1e9], tokens=[4e9, 4e9], density=[1.0, 1.0])
    one = {**CHINCHILLA, "e": 0.6}
    fit = FitResult(form="chinchilla", params=dict(CHINCHILLA), objective=0.0, metrics={}, bootstrap=[one])
    lo, hi = predict_interval(fit, x)
    assert lo.tolist() == hi.tolist() == pytest.approx(get_form("chinchilla").predict(one, x).tolist(), rel=1e-12)
    assert intervals([one]) == {k: (v, v) for k, v in one.items()}
    fit.bootstrap = []
    with pytest.raises(FitError, match=r"^the fit has no bootstrap samples: refit with --bootstrap K to get "
                                       r"prediction intervals$"):
        predict_interval(fit, x)
    with pytest.raises(FitError, match=r"^no bootstrap samples: refit with --bootstrap K to get confidence "
                                       r"intervals$"):
        intervals([])


def _dealt_folds(n: int, k: int, seed: int) -> np.ndarray:
    """The stated fold rule for one stratum: its runs in a seeded permutation, dealt round-robin over the k folds
    from a random first fold (both draws from one generator seeded with `seed`)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    first = rng.integers(k)
    fold = np.empty(n, int)
    for j, run in enumerate(order):
        fold[run] = (first + j) % k
    return fold


def test_cross_validation_deals_each_stratum_round_robin_from_a_seeded_fold(two_coefficient_form):
    """With one stratum, k = 3 and 7 runs (uneven folds): every prediction is that of a fit on the runs outside its
    fold under the stated rule, for two seeds; a failing fold names how many runs it fitted on."""
    runs = synthetic_runs(7, CHINCHILLA, "chinchilla", noise=0.01, seed=4)
    assert len(np.unique(strata(runs, "chinchilla-ab"))) == 1
    for seed in (1, 2):  # first folds 2 and 1: dealt forwards, not backwards
        fold = _dealt_folds(7, 3, seed)
        cv = cross_validate(runs, "chinchilla-ab", "staged", k=3, seed=seed)
        for f in range(3):
            held = fold == f
            expect = fit_law(runs.subset(~held), "chinchilla-ab", "staged").predict(runs.subset(held))
            np.testing.assert_array_equal(np.array(cv["predictions"])[held], expect)
    n_fit = int((_dealt_folds(7, 3, 0) != 0).sum())  # chinchilla's joint fit needs 6 runs: fold 1 fails
    with pytest.raises(FitError, match=rf"^3-fold CV, fold 1 \(fits on {n_fit} runs\): stage 1-all of the chinchilla "
                                       rf"law needs at least 6 matching runs .* the ledger has {n_fit}$"):
        cross_validate(runs, "chinchilla", "joint", k=3)


def test_cross_validation_shows_progress_only_when_asked(two_coefficient_form, capsys):
    runs = synthetic_runs(6, CHINCHILLA, "chinchilla", noise=0.01, seed=4)
    quiet = cross_validate(runs, "chinchilla-ab", "staged", k=2)
    assert capsys.readouterr().err == ""
    shown = cross_validate(runs, "chinchilla-ab", "staged", k=2, progress=True)
    err = capsys.readouterr().err
    assert "cross-validation: 100%" in err and "2/2 [" in err and ("fold/s" in err or "s/fold" in err)
    assert shown == quiet


def test_cross_validation_defaults_to_five_joint_folds_of_the_paper_law(train_runs):
    cv = cross_validate(train_runs)
    assert cv["k"] == 5 and cv["predictions"] == cross_validate(train_runs, "paper", "joint", 5, 0)["predictions"]
