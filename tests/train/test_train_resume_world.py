"""Resume on another world size (a job continued on fewer or more nodes): ZeRO-2 block-sparse SET 2 -> 1
rank and ZeRO-3 unstructured RigL 1 -> 2 ranks end where the uninterrupted 2-rank run ends (losses, validation
loss, consolidated weights and topology); a changed config is still refused on a world-size change. Every run is a
real `sparse-dc train`.

The uninterrupted references are the cached 2-rank runs of the `zero_run` fixture (1 and 2 ranks train the same
model up to float reduction order, ~5e-8 relative, see test_train_zero), so each case pays only the interrupted
run and its resume."""
import json
import os
import shutil

import pytest
import torch

from sparse_dc.train.ledger import read_ledger
from train_harness import TOTAL_STEPS, check_ok, run_train, write_config

pytestmark = pytest.mark.slow

REL = 1e-5  # fp32; the runs agree to ~1e-7, a lost Adam state or step shows as >= 1e-4 within a few steps


STOP_STEP = 5  # right after the first DST update (steps 5, 10, 15): the later two run on the new world size


def stop_after_first_update(tmp_path, config, nproc: int) -> int:
    """Train the first STOP_STEP steps on `nproc` ranks, save and exit (train.stop_at_step), as a job cut short
    by its allocation would; returns the saved step.

    The stop step must not depend on timing. 1 and 2 ranks train the same weights only up to reduction order
    (~1e-7 relative), and a DST decision between two candidates closer than that can go either way: in this
    RigL run two dead entries of layers.0.mlp.gate score within 2e-7 of each other at step 10, and 1 rank grows
    one, 2 ranks the other. So the uninterrupted 2-rank run is the reference only for updates made on 2 ranks;
    a SIGTERM that happened to land after step 10 made that update on the old world size (a flaky test, not a
    resume bug: an uninterrupted 1-rank run makes the same choice as that resumed run)."""
    run_dir = tmp_path / "runs" / config.stem  # write_config names the file after the run
    proc = run_train(tmp_path, config, nproc, f"train.stop_at_step={STOP_STEP}", launcher="slurm").proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"train.stop_at_step={STOP_STEP}: saved step {STOP_STEP}" in proc.stdout, proc.stdout[-3000:]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert ckpts == [f"step_{STOP_STEP:08d}"]
    assert not (tmp_path / "ledger.jsonl").exists()  # an unfinished run has no ledger row
    return STOP_STEP


def consolidated(run_dir, step: int) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers (topology) of a finished run's checkpoint, whatever world size wrote it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:08d}")


@pytest.mark.parametrize("stage, sparsity, before, after, refuse_first", [(2, "block", 2, 1, True),
                                                                          (3, "unstructured", 1, 2, False)])
def test_resume_on_another_world_size_matches_the_uninterrupted_run(zero_run, prepared_data, tmp_path, stage,
                                                                    sparsity, before, after, refuse_first):
    reference = zero_run(stage, sparsity)
    config = write_config(tmp_path, prepared_data, "elastic", sparsity, stage, checkpoint_interval=0,
                          keep_checkpoints=1)
    step = stop_after_first_update(tmp_path, config, before)
    ckpt_dir = tmp_path / "runs" / "elastic" / "checkpoints"
    if refuse_first:  # a changed config is refused before anything is converted (one case: each try costs ~10 s)
        proc = run_train(tmp_path, config, after, "--resume", "auto", "train.optimizer.lr=0.001",
                         launcher="slurm").proc
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "has resume_fingerprint=" in lines[0] and "expected the same setting" in lines[0]
        assert sorted(os.listdir(ckpt_dir)) == [f"step_{step:08d}", "zero_to_fp32.py", "zero_to_torch.py"]

    resumed = run_train(tmp_path, config, after, "--resume", "auto", launcher="slurm")
    check_ok(resumed)
    notes = [line for line in resumed.proc.stderr.splitlines() if "world size changed" in line]
    assert len(notes) == 1 and (f"checkpoint step_{step:08d} was written by {before} ranks, resuming on {after}"
                                in notes[0]), notes

    ref, got = reference.losses(), resumed.losses()
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    for s in range(step + 1, TOTAL_STEPS + 1):  # the steps trained after the resume, on the new world size
        assert got[s] == pytest.approx(ref[s], rel=REL, abs=0), s
    val = [[r["val_loss"] for r in run.records if r["kind"] == "eval"][-1] for run in (reference, resumed)]
    assert val[1] == pytest.approx(val[0], rel=REL, abs=0)
    assert resumed.final()["dst"] == reference.final()["dst"]  # same topology decisions, same ever-active units
    assert resumed.final()["dst"]["dead_path_params"] == 0  # block runs: the path-aware topology held throughout

    want, have = consolidated(reference.dir, TOTAL_STEPS), consolidated(resumed.dir, TOTAL_STEPS)
    assert want.keys() == have.keys()
    for name, tensor in want.items():
        tensor, other = tensor.detach(), have[name].detach()
        if tensor.is_floating_point():  # relative Frobenius norm: Adam's 1/sqrt(v) amplifies last-bit noise of
            assert float((other - tensor).norm()) <= REL * float(tensor.norm()), name  # single near-0 weights
        else:  # masks and block layouts: exactly the same topology
            assert torch.equal(other, tensor), name

    # the universal copy is pruned with its tag; the new world size wrote ordinary checkpoints
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(("step_", ".convert"))) == \
        [f"step_{TOTAL_STEPS:08d}"]
    marker = json.loads((ckpt_dir / f"step_{TOTAL_STEPS:08d}" / "COMPLETE").read_text())
    assert marker["world_size"] == after
    (row,) = read_ledger(str(tmp_path / "ledger.jsonl"))  # only the finished segment appends a row
    assert row["world_size"] == after and row["steps"] == TOTAL_STEPS and row["val_loss"] == val[1]



def test_conversion_failure_is_one_clear_error_and_leaves_nothing_behind(tmp_path):
    from sparse_dc.errors import SparseDCError
    from sparse_dc.train.reshard import convert_to_universal

    tag = tmp_path / "step_00000003"
    tag.mkdir()
    (tag / "COMPLETE").write_text("{}")  # marked complete, but no DeepSpeed files (e.g. a partial copy)
    with pytest.raises(SparseDCError, match=r"converting checkpoint .*step_00000003 .* universal checkpoint failed"):
        convert_to_universal(str(tmp_path), tag.name)
    assert sorted(os.listdir(tmp_path)) == ["step_00000003"]
    done = tmp_path / "step_00000003_universal"
    done.mkdir()  # a finished conversion (renamed into place) is reused as is
    assert convert_to_universal(str(tmp_path), tag.name) == str(done)


def test_reshard_command_converts_ahead_of_the_resume(zero_run, tmp_path, capsys):
    """`sparse-dc reshard` (offline, DeepSpeed's worker pools) writes the folder a resume on another world size
    reuses; a copy of the cached 2-rank reference run keeps that run untouched for the other tests."""
    from sparse_dc.cli import main as sparse_dc_main

    run_dir = tmp_path / "run"
    shutil.copytree(zero_run(2, "block").dir / "checkpoints", run_dir / "checkpoints")
    assert sparse_dc_main(["reshard", "--checkpoint", str(run_dir), "--workers", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    tag = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith("_universal"))[-1]
    assert out == str(run_dir / "checkpoints" / f"{tag}_universal")
    assert os.path.isdir(os.path.join(out, "zero")) and len(os.listdir(os.path.join(out, "zero"))) > 3
    assert not any(p.name.startswith(".convert_") for p in (run_dir / "checkpoints").iterdir())
    assert sparse_dc_main(["reshard", "--checkpoint", str(run_dir), "--workers", "0"]) == 2
    assert "--workers=0: expected an integer >= 1" in capsys.readouterr().err
