"""benchmarks/train_step.py --cpu-smoke runs end to end (numbers are not asserted: performance lives in
benchmarks/results/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_step_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--cpu-smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["density"], r["block_size"]) for r in rows] == [(1.0, None), (0.5, 32)]
    assert rows[1]["active_params"] < rows[0]["active_params"] == rows[0]["dense_params"]
    assert rows[1]["model_state_gib"] < rows[0]["model_state_gib"]
    assert (tmp_path / "bench.md").read_text().count("\n| ") == 3
