"""2-rank ZeRO 1/2/3 runs of the tiny preset (block-sparse SET and unstructured RigL at density 0.5), exact resume
after kill -9 (resuming on another world size: test_train_resume_world.py). Every run is a real `sparse-dc train`
under torchrun over gloo."""
import math
import os
import signal
import time

import psutil
import pytest

from sparse_dc.config.base import load_config
from sparse_dc.config.run import RunConfig
from sparse_dc.model import param_counts
from sparse_dc.train.ledger import SHARED_FIELDS, read_ledger

from train_harness import TOTAL_STEPS, Run, check_ok, run_train, start_train, wait_for_step, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sparsity", ["block", "unstructured"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_run_trains_and_agrees(zero_run, stage, sparsity):
    run = zero_run(stage, sparsity)
    _, config, tmp = zero_run.cache[stage, sparsity]
    losses = run.losses()
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (23, 24, 25)) / 3
    assert last < first - 0.5, losses

    final = run.final()
    digests = final["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # params + topology identical across ranks
    assert final["dst"]["density"] == pytest.approx(0.5, abs=0.01)
    assert final["dst"]["ever_active_fraction"] > 0.5  # the topology actually changed (updates at 5, 10, 15)

    cfg = load_config(RunConfig, str(config))
    counts = param_counts(cfg.model, cfg.sparsity, 512)
    (row,) = read_ledger(str(tmp / "ledger.jsonl"))
    assert set(SHARED_FIELDS) <= set(row)
    val = [r["val_loss"] for r in run.records if r["kind"] == "eval"]
    assert len(val) == 3  # steps 10, 20 and the end
    assert row["name"] == cfg.name and row["val_loss"] == val[-1] and math.isfinite(row["val_loss"])
    assert row["dense_params"] == counts.law_dense and row["active_params"] == counts.law_active
    assert row["dense_params_total"] == counts.dense and row["active_params_total"] == counts.active
    assert row["dense_params_non_embedding"] == counts.dense_non_embedding
    assert row["density"] == 0.5 and row["block_size"] == cfg.sparsity.block_size
    assert row["unique_tokens"] == 4096 and row["tokens"] == 390 * 32 and row["epochs"] == 390 * 32 / 4096
    assert row["zero_stage"] == stage and row["world_size"] == 2 and row["steps"] == TOTAL_STEPS
    assert row["dst_method"] == cfg.sparsity.method and row["tokens_per_s"] > 0
    # every live weight on a live gradient path (block topology: path-aware by default), so no warning either
    assert row["effective_active_params"] == row["active_params"] and final["dst"]["dead_path_params"] == 0
    assert "dead gradient path" not in run.proc.stdout
    assert row["config_hash"] == cfg.fingerprint() and len(row["git_commit"] or "x" * 40) == 40
    assert (run.dir / "checkpoints" / f"step_{TOTAL_STEPS:08d}" / "COMPLETE").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run.dir / "tensorboard"))


def test_kill9_then_resume_reproduces_trajectory_bitwise(zero_run, prepared_data, tmp_path):
    reference = zero_run(2, "block")
    config = write_config(tmp_path, prepared_data, "killed", "block", 2, checkpoint_interval=4)
    run_dir = tmp_path / "runs" / "killed"
    proc = start_train(tmp_path, config)
    try:
        wait_for_step(run_dir, 14, proc)
        # the ranks: torchrun starts them in sessions of their own, out of reach of a kill of its process group
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "sparse_dc.train.cli" in " ".join(p.cmdline())]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group, mid-run, no chance to clean up
        proc.wait()
    assert len(ranks) == 2 and not _still_running(ranks, 30)  # no orphan keeps training: they die with torchrun
    killed = Run(run_dir).load()
    assert not any(r["kind"] == "final" for r in killed.records), "the run finished before it was killed"
    resumed = run_train(tmp_path, config, 2, "--resume", "auto")
    check_ok(resumed)
    assert "resumed killed at step" in resumed.proc.stderr
    assert resumed.losses() == reference.losses()  # every step, bitwise (fp32 on CPU)
    val = [r["val_loss"] for r in resumed.records if r["kind"] == "eval"][-1]
    assert val == [r["val_loss"] for r in reference.records if r["kind"] == "eval"][-1]
    assert resumed.final()["replica_digests"] == reference.final()["replica_digests"]


def _still_running(procs: list, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_one_rank_and_two_ranks_train_the_same_model(prepared_data, tmp_path):
    """The data order is world-size invariant and every micro-batch loss is weighted by its token count, so 1 rank
    (4 micro-batches per step; the partial last batch splits 4 + 2 + 0 + 0) and 2 ranks (2 per rank; 3 + 0 each)
    compute the same global-batch gradients up to float reduction order. Dense, so no topology decision can flip."""
    runs = []
    for nproc in (1, 2):
        config = write_config(tmp_path / f"w{nproc}", prepared_data, f"dense-w{nproc}", None, 2)
        runs.append(run_train(tmp_path / f"w{nproc}", config, nproc, launcher="slurm"))
        check_ok(runs[-1])
    one, two = (r.losses() for r in runs)
    assert sorted(one) == sorted(two) == list(range(1, TOTAL_STEPS + 1))
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-6, abs=0), step
    val = [[r["val_loss"] for r in run.records if r["kind"] == "eval"][-1] for run in runs]
    assert val[0] == pytest.approx(val[1], rel=1e-6, abs=0)  # after the partial final batch's update
