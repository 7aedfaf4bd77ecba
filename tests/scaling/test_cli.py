"""`sparse-dc law`: ledger -> fit -> predict -> plan round trip, figures, and one-line errors (exit code 2)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from sparse_dc.cli import main
from sparse_dc.config.base import load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.data.config import DataConfig
from sparse_dc.launch.presets import paper_lr, recipe_preset
from sparse_dc.scaling.fit import load_fit
from sparse_dc.scaling.forms import PAPER, get_form
from sparse_dc.scaling.ledger import write_runs
from sparse_dc.scaling.optimize import plan, predict_loss


def run(capsys, *argv):
    code = main(["law", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_with_the_paper_preset(capsys):
    code, out, _ = run(capsys, "predict", "--preset", "paper", "--dense-params", "200M", "--unique-tokens", "1B",
                       "--tokens", "4e9", "--density", "0.5", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["active_params"] == 1e8 and got["loss"] == pytest.approx(3.085263, abs=1e-6)


def test_round_trip_ledger_fit_predict_plan(tmp_path, capsys, train_runs):
    ledger, fit_path, cfg = tmp_path / "ledger.jsonl", tmp_path / "fit.json", tmp_path / "next.yaml"
    write_runs(train_runs, str(ledger))
    above = f"{sorted(train_runs.dense_params)[-20]:.6g}"
    code, out, _ = run(capsys, "fit", str(ledger), "--out", str(fit_path), "--bootstrap", "4", "--workers", "1",
                       "--holdout-above", above, "--plot", str(tmp_path / "plots"))
    assert code == 0 and "held out" in out and "95% CI" in out
    fit = load_fit(str(fit_path))
    assert len(fit.bootstrap) == 4 and fit.holdout["n_test"] >= 19 and fit.metrics["r2"] > 0.98
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "isoflop.png", "isoloss.png", "optimal_density.png", "pred_vs_obs.png"]

    code, out, _ = run(capsys, "predict", "--params", str(fit_path), "--active-params", "1e8", "--unique-tokens",
                       "1e9", "--tokens", "4e9", "--density", "0.5", "--json")
    got = json.loads(out)
    assert got["loss"] == pytest.approx(float(predict_loss(fit.law, fit.params, 1e8, 1e9, 4e9, 0.5)))
    assert got["loss_interval"][0] <= got["loss_interval"][1]

    code, out, _ = run(capsys, "plan", "--params", str(fit_path), "--unique-tokens", "2.6B", "--compute", "1e20",
                       "--json", "--write-config", str(cfg))
    got = json.loads(out)
    expected = plan(fit.law, fit.params, 2.6e9, 1e20, samples=fit.bootstrap)
    assert got["preset"] == expected.preset and got["density"] == pytest.approx(expected.density)
    written = yaml.safe_load(cfg.read_text())
    assert written["model"]["preset"] == expected.preset and written["data"]["total_tokens"] == int(expected.tokens)
    DataConfig.from_dict(written["data"]).validate("data")


@pytest.mark.parametrize("recipe", [None, "paper", "fast"])
def test_plan_writes_the_chosen_recipes_preset(tmp_path, capsys, recipe):
    """--write-config writes the chosen family's preset (paper when --recipe is not given) of the recommended size
    at the recommended density and budget; the paper family's file carries its document packing and LR rule."""
    path = tmp_path / "next.yaml"
    code, out, _ = run(capsys, "plan", "--preset", "paper", "--unique-tokens", "2.6B", "--compute", "1e20", "--json",
                       "--write-config", str(path), "--name", "next", "--data-dir", "corpus",
                       *(["--recipe", recipe] if recipe else []))
    p, family = plan(get_form("paper"), PAPER, 2.6e9, 1e20), recipe or "paper"
    assert code == 0 and json.loads(out)["preset"] == p.preset and p.density < 1
    written = yaml.safe_load(path.read_text())
    assert written == recipe_preset(family, p.preset, round(p.density, 6), data_dir="corpus",
                                    unique_tokens=int(2.6e9), epochs=None, total_tokens=int(p.tokens), name="next")
    cfg = load_config(RunConfig, str(path))  # what `sparse-dc train --config next.yaml` validates
    assert (cfg.model.preset, cfg.data.total_tokens) == (p.preset, int(p.tokens))
    assert cfg.sparsity.density == pytest.approx(p.density, abs=1e-6)
    if family == "paper":
        assert (cfg.data.packing, cfg.sparsity.block_size, cfg.sparsity.regrow_optimizer) == ("document", 1, "adamdst")
        assert cfg.train.optimizer.lr == paper_lr(p.preset, round(p.density, 6))
    else:
        assert (cfg.data.packing, cfg.sparsity.block_size) == ("stream", 64)


def test_fit_with_cv_and_joint_stages(tmp_path, capsys, train_runs):
    write_runs(train_runs, str(tmp_path / "l.jsonl"))
    code, out, _ = run(capsys, "fit", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "f.json"), "--stages",
                       "joint", "--cv", "3")
    assert code == 0 and "3-fold CV" in out
    fit = load_fit(str(tmp_path / "f.json"))
    assert fit.procedure == "joint" and fit.cv["k"] == 3 and fit.stages[-1]["name"] == "joint"
    # 2 folds leave too few dense single-epoch runs for stage 1 in a fold: said so, naming the fold
    code, _, err = run(capsys, "fit", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "g.json"), "--cv", "2")
    assert code == 2 and "2-fold CV, fold" in err and "stage 1-dense-single-epoch" in err


def test_plan_text_output_with_preset(capsys):
    code, out, _ = run(capsys, "plan", "--preset", "paper", "--unique-tokens", "1e9", "--compute", "1e19")
    assert code == 0 and "recommended: model" in out


@pytest.mark.parametrize("argv,match", [
    (["predict", "--preset", "paper", "--active-params", "1e8", "--unique-tokens", "1e9", "--tokens", "4e9",
      "--density", "1.5"], "--density='1.5': expected a density in (0, 1]"),
    (["predict", "--preset", "paper", "--active-params", "-3", "--unique-tokens", "1e9", "--tokens", "4e9",
      "--density", "1"], "--active-params='-3': expected a positive number"),
    (["predict", "--preset", "paper", "--active-params", "lots", "--unique-tokens", "1e9", "--tokens", "4e9",
      "--density", "1"], "--active-params='lots'"),
    (["predict", "--preset", "gpt", "--active-params", "1e8", "--unique-tokens", "1e9", "--tokens", "4e9",
      "--density", "1"], "preset 'gpt' is unknown"),
    (["plan", "--preset", "paper", "--unique-tokens", "1e9", "--compute", "1e9"], "compute=1e+09"),
    (["fit", "/nonexistent/ledger.jsonl", "--out", "x.json"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2 and match in err and err.count("\n") == 1


def test_too_few_runs_for_the_stages(tmp_path, capsys, train_runs):
    write_runs(train_runs.subset(train_runs.density < 1), str(tmp_path / "sparse_only.jsonl"))
    code, _, err = run(capsys, "fit", str(tmp_path / "sparse_only.jsonl"), "--out", str(tmp_path / "f.json"))
    assert code == 2 and "stage 1-dense-single-epoch" in err and "needs at least 5 matching runs" in err


def test_importing_the_toolkit_does_not_import_torch():
    code = ("import sys, sparse_dc.scaling, sparse_dc.scaling.cli, sparse_dc.scaling.uncertainty, "
            "sparse_dc.scaling.plots; bad = [m for m in ('torch', 'deepspeed', 'triton', 'matplotlib') "
            "if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_far_outside_the_fitted_range_warns_but_answers(capsys):
    code, out, err = run(capsys, "predict", "--preset", "paper", "--active-params", "1e8", "--unique-tokens", "1e9",
                         "--tokens", "5e5", "--density", "1e-4", "--json")
    assert code == 0 and "loss" in json.loads(out)
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("sparse-dc law: warning: ") for line in lines)
    assert "tokens=5e+05 < unique_tokens=1e+09" in lines[0] and "density=0.0001" in lines[2]
    code, out, err = run(capsys, "plan", "--preset", "paper", "--unique-tokens", "1e9", "--compute", "1e31")
    assert code == 0 and "recommended: model" in out and "compute=1e+31 FLOPs: beyond 1e+30" in err
    code, _, err = run(capsys, "predict", "--preset", "paper", "--active-params", "1e8", "--unique-tokens", "1e9",
                       "--tokens", "4e9", "--density", "0.5")
    assert code == 0 and err == ""


def test_plan_sizes_960m_as_built_or_as_the_notebook_labelled_it(capsys):
    argv = ["plan", "--preset", "paper", "--unique-tokens", "1e9", "--compute", "3e19", "--json"]
    built = json.loads(run(capsys, *argv)[1])
    label = json.loads(run(capsys, *argv, "--sizes", "notebook")[1])
    assert built["preset"] == label["preset"] == "960m"
    assert built["preset_dense_params"] == 1_026_316_032 and label["preset_dense_params"] == 1.17e9


def test_fit_reports_duplicates_and_sub_epoch_runs(tmp_path, capsys, train_runs):
    rows = train_runs.subset(np.arange(12)).to_rows()
    rows[3]["tokens"] = 0.5 * rows[3]["unique_tokens"]
    ledger = tmp_path / "l.jsonl"
    ledger.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[0]]))
    code, out, err = run(capsys, "fit", str(ledger), "--out", str(tmp_path / "f.json"), "--anchor", "paper")
    assert code == 0 and "fit: 12 runs" in out
    assert "1 run name(s) appear more than once (syn-0000 x2): using the last row" in err
    assert "1 run(s) train for less than one epoch" in err and err.count("\n") == 2
    code, out, _ = run(capsys, "fit", str(ledger), "--out", str(tmp_path / "f.json"), "--anchor", "paper",
                       "--keep-duplicates")
    assert code == 0 and "fit: 13 runs" in out


def test_paper_stages_and_unreadable_files_are_one_line_errors(tmp_path, capsys, train_runs):
    write_runs(train_runs, str(tmp_path / "l.jsonl"))
    code, _, err = run(capsys, "fit", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "f.json"), "--form",
                       "chinchilla", "--stages", "paper")
    assert code == 2 and "stages=paper: the official notebook's procedure fits the paper law only" in err
    (tmp_path / "latin1.jsonl").write_bytes('{"name": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "fit.json").write_bytes(b"\xff{}")
    for argv in (["fit", str(tmp_path / "latin1.jsonl"), "--out", str(tmp_path / "f.json")],
                 ["predict", "--params", str(tmp_path / "fit.json"), "--active-params", "1e8", "--unique-tokens",
                  "1e9", "--tokens", "4e9", "--density", "1"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "not UTF-8" in err and err.count("\n") == 1
