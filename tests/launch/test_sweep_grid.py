"""Sweep expansion: names, validation before anything runs, ledger skipping, launcher commands."""
import json

import pytest

from sparse_dc.config import ConfigError
from sparse_dc.launch.sweep import SweepError, expand, finished, parse_grid_args, run_name, run_sweep, slurm_command


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(f"name: base\ndata: {{dir: {tmp_path}/data}}\ntrain: {{ledger: {tmp_path}/ledger.jsonl}}\n")
    return str(path)


def test_grid_expands_to_named_validated_runs(base):
    grid = parse_grid_args(["sparsity.density=1,0.5", "data.epochs=1,2.5", "data.unique_tokens=100K"])
    assert grid == {"sparsity.density": [1, 0.5], "data.epochs": [1, 2.5], "data.unique_tokens": [100_000]}
    runs = expand(base, grid, prefix="tiny")
    assert [r.name for r in runs] == ["tiny-d1-e1-u100K", "tiny-d1-e2.5-u100K", "tiny-d0.5-e1-u100K",
                                      "tiny-d0.5-e2.5-u100K"]
    assert runs[3].config.sparsity.density == 0.5 and runs[3].config.data.epochs == 2.5
    assert runs[3].config.name == "tiny-d0.5-e2.5-u100K"
    assert run_name("", {"model.preset": "20m", "data.unique_tokens": 2_600_000_000}) == "20m-u2.6B"


def test_bad_grid_values_fail_before_any_run(base):
    with pytest.raises(ConfigError, match="sparsity.density=1.5"):
        expand(base, {"sparsity.density": [0.5, 1.5]})
    with pytest.raises(SweepError, match="expected key=v1,v2"):
        parse_grid_args(["sparsity.density"])
    with pytest.raises(SweepError, match="empty grid"):
        expand(base, {})


def test_finished_runs_are_skipped_and_dry_run_plans_the_rest(base, tmp_path):
    runs = expand(base, {"sparsity.density": [1.0, 0.5]})
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"name": runs[0].name, "val_loss": 3.0}) + "\n")
    assert finished(str(ledger)) == {runs[0].name}
    status = run_sweep(runs, base, str(ledger), str(tmp_path / "logs"), dry_run=True)
    assert status == {runs[0].name: "skipped", runs[1].name: "planned"}


def test_slurm_command_submits_the_sbatch_script(base):
    run = expand(base, {"sparsity.density": [0.5]})[0]
    cmd = slurm_command(run, base, ["--nodes=2"])
    assert cmd[:3] == ["sbatch", f"--job-name={run.name}", "--nodes=2"]
    assert cmd[3].endswith("launch/slurm/train.sbatch") and cmd[4] == base and f"name={run.name}" in cmd


def test_console_script_lists_sweep_and_quickstart_and_ignores_deepspeed_local_rank(capsys):
    from sparse_dc.cli import main

    assert main(["--help"]) == 0 and {"sweep", "quickstart"} <= set(capsys.readouterr().out.split())
    # `deepspeed --no_python sparse-dc train ...` runs `sparse-dc --local_rank=N train ...`
    assert main(["--local_rank=1", "law", "predict", "--preset", "paper", "--dense-params", "1e8",
                 "--unique-tokens", "1e9", "--tokens", "1e9", "--density", "1"]) == 0
    assert "predicted loss" in capsys.readouterr().out
