"""`sparse-dc quickstart` end to end on CPU: built-in corpus, two 2-rank DeepSpeed runs, table, law, plot."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                    "MASTER_"))}
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "sparse_dc.cli", "quickstart", "--out", str(out), "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(1, 6):
        assert f"[{n}/5]" in proc.stdout
    rows = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert [(r["name"], r["density"], r["world_size"]) for r in rows] == [("tiny-d1", 1.0, 2), ("tiny-d0.5", 0.5, 2)]
    assert rows[1]["active_params"] < rows[0]["active_params"] == rows[1]["dense_params"]
    assert all(r["val_loss"] < 6.3 for r in rows)  # learned something: log(512) = 6.24 is the uniform guess

    table = (out / "summary.txt").read_text()
    assert "tiny-d1" in table and "tiny-d0.5" in table and "predicted val loss" in table
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the output paths are the last thing printed
    tail = proc.stdout[proc.stdout.index("Outputs:"):]
    for path in (out / "ledger.jsonl", out / "summary.txt", png):
        assert str(path) in tail
