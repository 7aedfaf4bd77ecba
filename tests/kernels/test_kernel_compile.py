"""The kernels compile for Ampere (sm80) and Hopper (sm90) without a GPU, pipelined, with wgmma on Hopper."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")


def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip("this Triton's ahead-of-time compile API differs from 3.7's")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 10
    for r in results:
        assert r["pipelined"], r  # the K / M loop is software-pipelined (cp.async)
        assert r["shared"] <= 160 * 1024, r  # fits an A100's shared memory
        assert r["wgmma"] == (r["cc"] == 90 and r["dtype"] in ("bf16", "fp16")), r  # Hopper tensor cores
