"""A real local sweep: a 2 x 2 grid of tiny runs with 2 DeepSpeed ranks each (torchrun, gloo), one ledger that
`sparse-dc law fit` and `law plan` read, and a re-run that skips every finished run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparse_dc.config.base import load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.data.prepare import PrepareConfig, prepare
from sparse_dc.scaling.fit import load_fit

# 4096 unique tokens = 128 sequences of 32; global batch 16: 8 steps per epoch.
BASE = {
    "name": "base",
    "model": {"preset": "tiny"},
    "sparsity": {"block_size": 32, "method": "set", "update_frequency": 4, "prune_rate": 0.3},
    "data": {"unique_tokens": 4096, "seq_len": 32, "val_tokens": 2048, "verify": "size"},
    "train": {"micro_batch": 8, "global_batch": 16, "precision": "fp32", "optimizer": {"lr": 2.0e-3},
              "schedule": {"warmup_steps": 2}, "log_interval": 4, "eval_interval": 0, "checkpoint_interval": 0,
              "tensorboard": False, "progress": False, "save_final": False},
}


def sparse_dc(tmp_path: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                    "MASTER_"))}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(TMPDIR=str(tmp_path / "tmp"), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sparse_dc.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_sweep_runs_a_grid_that_law_fit_and_plan_read(tmp_path):
    prepare(PrepareConfig(builtin=True, out=str(tmp_path / "data"), vocab_size=512, workers=2))
    cfg = json.loads(json.dumps(BASE))
    cfg["output_dir"] = str(tmp_path / "runs")
    cfg["data"]["dir"] = str(tmp_path / "data")
    cfg["train"]["ledger"] = str(tmp_path / "ledger.jsonl")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    sweep = ["sweep", "--config", str(base), "--grid", "sparsity.density=1,0.5", "--grid", "data.epochs=1,2",
             "--prefix", "t", "--nproc", "2"]

    proc = sparse_dc(tmp_path, *sweep)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 runs: 4 done" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == ["t-d0.5-e1", "t-d0.5-e2", "t-d1-e1", "t-d1-e2"]
    for row in rows:
        assert row["world_size"] == 2 and row["unique_tokens"] == 4096 and row["val_loss"] > 0
        assert row["tokens"] == 4096 * int(row["name"][-1]) and row["density"] == float(row["name"].split("-d")[1][:-3])
    assert {r["dst_method"] for r in rows} == {"dense", "set"}

    # The paper's staged fit needs runs in each of its four stages; 4 runs at one size cannot support it ...
    fit = tmp_path / "fit.json"
    proc = sparse_dc(tmp_path, "law", "fit", str(tmp_path / "ledger.jsonl"), "--out", str(fit))
    assert proc.returncode == 2 and "needs at least" in proc.stderr and not fit.exists()
    # ... a preset-anchored fit (the paper's exponents and shape, scales a, b, e refitted) does.
    proc = sparse_dc(tmp_path, "law", "fit", str(tmp_path / "ledger.jsonl"), "--out", str(fit), "--anchor", "paper")
    assert proc.returncode == 0, proc.stderr
    result = load_fit(str(fit))
    assert result.procedure == "anchored" and result.metrics["n_runs"] == 4
    assert result.metrics["mape"] < 0.05  # the recalibrated law is within 5% of each observed loss
    assert result.params["alpha"] == pytest.approx(0.32682177)  # held at the paper's value

    planned = tmp_path / "next.yaml"
    proc = sparse_dc(tmp_path, "law", "plan", "--params", str(fit), "--unique-tokens", "1B", "--compute", "1e19",
                     "--write-config", str(planned), "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    assert "recommended: model" in proc.stdout
    load_config(RunConfig, str(planned))  # the written config is a valid `sparse-dc train` config

    proc = sparse_dc(tmp_path, *sweep)
    assert proc.returncode == 0 and "4 runs: 4 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 4
