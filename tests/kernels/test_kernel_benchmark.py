"""benchmarks/kernels.py --cpu-smoke runs end to end (reference + interpreter) and writes its JSON."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_cpu_smoke_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu-smoke", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels_cpu_smoke.json").read_text())
    assert {"device", "torch", "triton"} <= set(result["meta"])
    assert (tmp_path / "kernels_cpu_smoke.png").stat().st_size > 0
    rows = result["rows"]
    assert {r["backend"] for r in rows} == {"reference", "triton"} and len(rows) == 4
    for r in rows:
        assert r["forward_max_rel_err"] < 1e-5
        assert all(r[f"sparse_{op}_ms"] > 0 for op in ("forward", "dX", "dW", "fwd+bwd"))
        assert r["forward_efficiency"] > 0
    assert "TFLOP/s" in capsys.readouterr().out
