"""DST under DeepSpeed ZeRO 1/2/3 on 2 CPU ranks (gloo): identical topology on every rank although each rank sees
different data, regrown/dropped units' fp32 weights and Adam moments exactly zero after updates, pruned entries
still zero after further steps, and the accessor working after load_checkpoint (the 0.19.8 post-load bug)."""
import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "dst_zero_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_topology_identical_and_moments_reset_under_zero(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), WORKER, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]) == {f"zero{s}-{case}" for s in (1, 2, 3) for case in ("B1-rigl", "B32-rigl", "B32-set")}
    for key, r0 in ranks[0].items():
        r1 = ranks[1][key]
        assert len(r0["hashes"]) == 2, key  # updates at steps 2 and 4
        assert r0["hashes"] == r1["hashes"], f"{key}: topology differs between ranks"
        assert r0["hashes"][0] != r0["hashes"][1], f"{key}: the second update changed nothing"
        assert all(c > 0 for c in r0["changed"]), key
        assert r0["reset_zero"] and r1["reset_zero"], f"{key}: regrown weights or moments not zero"
        assert r0["pruned_zero"] and r1["pruned_zero"], f"{key}: pruned weights moved"
        assert r0["live"] == r1["live"]
