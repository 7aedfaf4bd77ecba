"""Planning, free-coefficient choice and the findings' verdicts, on synthetic ledgers (no training)."""
import json
import os

import numpy as np
import pytest

from sparse_dc.cli import main as cli_main
from sparse_dc.reproduce.fit import analyse, choose_free
from sparse_dc.reproduce.plan import plan_runs, prepare_data
from sparse_dc.reproduce.report import write_report
from sparse_dc.reproduce.scales import SCALES, ReproduceError, get_scale
from sparse_dc.scaling.ledger import read_runs

from synthetic_ledger import TOY


def test_every_scale_plans_the_paper_grid(tmp_path):
    for name, scale in SCALES.items():
        os.makedirs(tmp_path / name / "data")
        base, runs = plan_runs(scale, str(tmp_path / name / "data"), str(tmp_path / name), nproc=2)
        assert len(runs) == scale.n_runs and len({r.name for r in runs}) == len(runs)
        if name != "ci":
            assert scale.densities == (1.0, 0.5, 0.25, 0.125) and scale.epochs == (1, 2, 4, 8, 16)
        cfgs = [r.config for r in runs]
        assert {c.data.unique_tokens for c in cfgs} == {scale.unique_tokens}  # one fixed U
        assert {c.train.ledger for c in cfgs} == {str(tmp_path / name / "ledger.jsonl")}
        # the global batch is kept; micro batches shrink so 2 ranks divide it
        assert all(c.train.global_batch % (2 * c.train.micro_batch) == 0 for c in cfgs)
    runs = plan_runs(get_scale("tiny"), str(tmp_path), str(tmp_path / "t"))[1]
    big = [r.config for r in runs if r.name == "h128-d0.125-e16"][0]
    assert (big.model.shape().hidden_size, big.sparsity.density, big.data.epochs) == (128, 0.125, 16)
    small = [r.config for r in runs if r.name == "h32-d1-e1"][0]
    assert small.model.shape().hidden_size == 32


def test_data_errors_are_one_line(tmp_path):
    with pytest.raises(ReproduceError, match="needs U = 1e\\+08 unique tokens.*expected --data DIR"):
        prepare_data(get_scale("medium"), None, str(tmp_path))
    with pytest.raises(ReproduceError, match="expected a directory written by `sparse-dc data prepare`"):
        prepare_data(get_scale("tiny"), str(tmp_path), str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"total_tokens": 1000}))
    with pytest.raises(ReproduceError, match="holds 1000 tokens; --scale tiny needs at least 49152"):
        prepare_data(get_scale("tiny"), str(tmp_path), str(tmp_path))
    with pytest.raises(ReproduceError, match="--scale 'huge': expected one of ci, tiny, small, medium"):
        get_scale("huge")
    assert cli_main(["reproduce", "--scale", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_free_coefficients_follow_what_the_grid_identifies(tmp_path, synthetic):
    path = tmp_path / "ledger.jsonl"
    synthetic(path, get_scale("tiny"))
    runs = read_runs(str(path))
    free, fixed = choose_free(runs)  # 3 sizes, 3 sparse densities, multi-epoch: all but alpha and R_N*
    assert free == ["e", "a", "b", "g2", "eps", "c12", "c", "mu", "c22"]
    assert set(fixed) == {"alpha", "g1", "c11", "c21"} and "3 model size(s)" in fixed["alpha"]
    single = runs.subset(runs.epochs == 1)  # no repetition: b and R_D*(S) are not identifiable
    free, fixed = choose_free(single)
    assert "b" not in free and "g2" not in free and "c12" not in free and "no multi-epoch runs" in fixed["b"]
    few = runs.subset((runs.dense_params == runs.dense_params.min()) & (runs.epochs <= 2))
    free, fixed = choose_free(few)  # 8 runs: keep one more run than coefficients
    assert free == ["e", "a", "b", "g2", "eps", "c12", "c"] and fixed["mu"] == "only 8 runs in the fit"
    with pytest.raises(ReproduceError, match="expected at least 4"):
        choose_free(runs.subset(np.arange(3)))


def test_fit_recovers_synthetic_law_and_predicts_the_held_out_size(tmp_path, synthetic):
    path = tmp_path / "ledger.jsonl"
    synthetic(path, get_scale("tiny"), noise=0.002)
    an = analyse(read_runs(str(path)), n_bootstrap=8)
    assert an.holdout["n_test"] == 20 and an.holdout["mape"] < 0.01  # the largest size, out of sample
    assert an.fit.metrics["r2"] > 0.99
    for k in ("e", "a", "b"):  # well identified at fixed U: within 5% of the generating values
        assert an.fit.params[k] == pytest.approx(TOY[k], rel=0.05)
        lo, hi = an.intervals[k]
        assert lo <= an.fit.params[k] <= hi
    assert len(an.fit.bootstrap) == 8


def _verdicts(report: str) -> list[str]:
    return [line.split(": this data ")[-1].split(": the fitted law ")[-1].split(" it.**")[0]
            for line in report.splitlines() if line.startswith("**")and "it.**" in line]


def test_verdicts_follow_the_data(tmp_path, synthetic):
    scale = get_scale("tiny")
    names = synthetic(tmp_path / "paper.jsonl", scale)
    text = open(write_report(scale, str(tmp_path / "paper.jsonl"), names, str(tmp_path / "a"), 4)).read()
    assert _verdicts(text)[1] == "supports"  # the paper's law: moderate loss-optimal density
    # a law under which sparsity only hurts (f(S) grows fast as S falls) and repetition helps sparse less
    worse = {**TOY, "eps": -1.0, "c": 0.0, "c12": -0.9, "c22": 0.0}
    names = synthetic(tmp_path / "dense.jsonl", scale, params=worse)
    text = open(write_report(scale, str(tmp_path / "dense.jsonl"), names, str(tmp_path / "b"), 4)).read()
    assert _verdicts(text)[:2] == ["does not support", "does not support"]
    assert "the best density is 1 most often" in text


def test_report_refuses_an_incomplete_ledger(tmp_path, synthetic):
    scale = get_scale("tiny")
    names = synthetic(tmp_path / "l.jsonl", scale)
    with pytest.raises(ReproduceError, match="1 planned run\\(s\\) are not in"):
        write_report(scale, str(tmp_path / "l.jsonl"), names + ["h64-d0.5-e32"], str(tmp_path / "r"), 0)


def test_report_only_fits_an_existing_ledger(tmp_path, synthetic, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"total_tokens": 10**6}))
    out.mkdir()
    synthetic(out / "ledger.jsonl", get_scale("ci"))  # as if submitted jobs had finished
    args = ["reproduce", "--scale", "ci", "--data", str(data), "--out", str(out), "--report-only"]
    assert cli_main(args) == 0
    assert "report: " in capsys.readouterr().out and not (out / "logs").exists()  # nothing was trained
    report = (out / "report" / "report.md").read_text()
    assert "This invocation: report only" in report and "**Held out**: the 4 runs" in report
