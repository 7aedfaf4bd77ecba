"""Training through the Triton kernels, the path GPUs run, on CPU under Triton's interpreter: a real 2-rank ZeRO 2
run of the tiny model with 32x32 blocks and RigL (forward, dX and dW kernels every step; the sampled-gradient kernel
at topology updates), chosen by the run's config (sparsity.kernel_backend=triton). Its losses match the same run on
the torch reference path; without the interpreter the choice is refused in one line, so the run did not silently
fall back to the reference path."""
import subprocess
import sys

import pytest
import yaml

from train_harness import check_ok, run_train, train_env, write_config

pytestmark = pytest.mark.slow

STEPS = 4  # 4 global batches of 16 sequences of 32 tokens; a RigL update at step 2 (updates stop at 75%)


def run_config(tmp_path, data_dir, name, backend):
    path = write_config(tmp_path, data_dir, name, "block", 2, eval_interval=0, tensorboard=False)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(epochs=None, total_tokens=STEPS * 16 * 32)
    cfg["sparsity"].update(method="rigl", update_frequency=2, kernel_backend=backend)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_run_through_the_triton_kernels_matches_the_reference_path(prepared_data, tmp_path):
    triton = run_train(tmp_path / "t", run_config(tmp_path / "t", prepared_data, "triton", "triton"), 2,
                       launcher="slurm", timeout=600)
    check_ok(triton)
    reference = run_train(tmp_path / "r", run_config(tmp_path / "r", prepared_data, "reference", "reference"), 2,
                          launcher="slurm")
    check_ok(reference)
    ours, theirs = triton.losses(), reference.losses()
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in ours:  # fp32 through both paths: only the summation order differs
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4), step
    dst = [r for r in triton.records if r["kind"] == "dst"]
    assert [r["step"] for r in dst] == [2] and dst[0]["changed_fraction"] > 0
    assert len(set(triton.final()["replica_digests"])) == 1  # both ranks hold the same weights and topology


def test_the_triton_backend_without_a_gpu_or_the_interpreter_is_a_one_line_error(prepared_data, tmp_path):
    config = run_config(tmp_path, prepared_data, "no-interpreter", "triton")
    env = {k: v for k, v in train_env(tmp_path).items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sparse_dc.cli", "train", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRITON_INTERPRET=1" in lines[0], proc.stderr[-3000:]
