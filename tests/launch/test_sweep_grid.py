"""Sweep expansion: names, validation before anything runs, ledger skipping, launcher commands."""
import json
import os
import stat

import pytest

from sparse_dc.config import ConfigError
from sparse_dc.launch.sweep import (SweepError, expand, finished, parse_grid_args, run_name, run_sweep, slurm_command,
                                   slurm_log_dir)


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
    assert cmd[:4] == ["sbatch", "--parsable", f"--job-name={run.name}", "--nodes=2"]
    assert cmd[4].endswith("launch/slurm/train.sbatch") and cmd[5] == base and f"name={run.name}" in cmd


@pytest.fixture
def fake_slurm(tmp_path):
    """sbatch/squeue stand-ins on PATH (no SLURM on CI machines): sbatch logs its job name and prints the next id;
    squeue prints the requested ids listed in `queue` (what SLURM still holds), or fails when `down` exists."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir(), state.mkdir()
    (state / "queue").write_text("")
    scripts = {
        "sbatch": f"""n=$(($(wc -l < {state}/submitted 2>/dev/null || echo 0) + 101))
echo "$2" >> {state}/submitted; echo "$n;cluster" """,
        "squeue": f"""[ -e {state}/down ] && {{ echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1; }}
jobs=$(printf '%s\\n' "$@" | sed -n 's/^--jobs=//p')
for id in $(echo "$jobs" | tr , ' '); do grep -qx "$id" {state}/queue && echo "$id"; done; exit 0""",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return state, {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_slurm_resweep_skips_queued_jobs_and_resubmits_ended_ones(base, tmp_path, fake_slurm, monkeypatch):
    state, env = fake_slurm
    monkeypatch.chdir(tmp_path)  # submitting creates the script's job-log folder, relative to here
    runs = expand(base, {"sparsity.density": [1.0, 0.5, 0.25]})
    ledger, logs = str(tmp_path / "ledger.jsonl"), str(tmp_path / "logs")
    names = [r.name for r in runs]
    assert run_sweep(runs, base, ledger, logs, "slurm", env=env) == dict.fromkeys(names, "submitted")
    assert json.loads(open(f"{logs}/slurm_jobs.json").read()) == dict(zip(names, ["101", "102", "103"]))
    # run 0 finished (ledger row), run 1 still pending, run 2's job ended without a row (failed/cancelled)
    (tmp_path / "ledger.jsonl").write_text(json.dumps({"name": names[0], "val_loss": 3.0}) + "\n")
    (state / "queue").write_text("102\n")
    status = run_sweep(runs, base, ledger, logs, "slurm", env=env)
    assert status == {names[0]: "skipped", names[1]: "queued", names[2]: "submitted"}
    assert (state / "submitted").read_text().split() == [f"--job-name={n}" for n in names + names[2:]]
    assert json.loads(open(f"{logs}/slurm_jobs.json").read())[names[2]] == "104"
    # squeue unreachable: refuse rather than risk submitting a queued run twice
    (state / "down").write_text("")
    with pytest.raises(SweepError, match="squeue failed .*Unable to contact"):
        run_sweep(runs, base, ledger, logs, "slurm", env=env)
    assert len((state / "submitted").read_text().split()) == 4


def test_slurm_submission_creates_the_job_log_folder_first(base, tmp_path, fake_slurm, monkeypatch):
    """SLURM opens the job's --output file before the script runs and fails the job, without a log, when its folder
    is missing (tests/cluster/test_slurm.py shows it on a real cluster)."""
    _, env = fake_slurm
    monkeypatch.chdir(tmp_path)
    runs = expand(base, {"sparsity.density": [1.0]})
    assert not (tmp_path / "runs").exists()
    run_sweep(runs, base, str(tmp_path / "ledger.jsonl"), str(tmp_path / "logs"), "slurm", env=env)
    assert (tmp_path / "runs" / "slurm").is_dir()  # train.sbatch: #SBATCH --output=runs/slurm/%x-%j.out
    # the command line overrides the header, relative to --chdir when given; a %-pattern folder cannot be made
    assert slurm_log_dir(["--output=logs/x/%j.out"]) == str(tmp_path / "logs" / "x")
    assert slurm_log_dir(["-D", "/scratch", "-o", "out/%x.out"]) == "/scratch/out"
    assert slurm_log_dir(["--chdir=/scratch", "-ojob.out"]) == "/scratch/"
    assert slurm_log_dir(["--output", "%u/%j.out"]) is None


def test_console_script_lists_sweep_and_quickstart_and_ignores_deepspeed_local_rank(capsys):
    from sparse_dc.cli import main

    assert main(["--help"]) == 0 and {"sweep", "quickstart"} <= set(capsys.readouterr().out.split())
    # `deepspeed --no_python sparse-dc train ...` runs `sparse-dc --local_rank=N train ...`
    assert main(["--local_rank=1", "law", "predict", "--preset", "paper", "--dense-params", "1e8",
                 "--unique-tokens", "1e9", "--tokens", "1e9", "--density", "1"]) == 0
    assert "predicted loss" in capsys.readouterr().out
