"""Checkpointer.save / load in-process on a real one-rank DeepSpeed engine (ZeRO 1, gloo on CPU): the files and
COMPLETE record a save writes, pruning, what a load restores (weights, optimizer, RNG, client state) and how it
refuses a checkpoint it cannot use, a resume on another world size through a universal checkpoint, a full disk.
Real multi-rank saves and resumes: test_train_faults.py, test_train_resume_world.py."""
import contextlib
import errno
import json
import os
import random
import re
import socket
import time

import deepspeed
import numpy as np
import pytest
import torch

from sparse_dc.errors import DiskFull
from sparse_dc.train.checkpoint import MARKER, Checkpointer, ResumeError, complete_checkpoints, file_record, tag_files

# What a first DeepSpeed engine imports lazily (~15 s: torch._dynamo, through torch.optim, and DeepSpeed's Muon
# optimizer, which compiles on import), imported with this module instead, so that processes forked after
# collection (mutation testing runs one per mutant) share it rather than each paying it again
torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
with contextlib.suppress(ImportError):
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine():
    """A one-rank ZeRO-1 DeepSpeed engine (AdamW, a decaying LR schedule) over a small linear layer; the process
    group is torn down afterwards."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no C++ build of the shm comm op
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                                            opt, lambda step: 1 / (1 + step)))
    try:
        yield eng
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train_step(engine, seed: int = 0) -> None:
    """One optimizer step on a batch drawn from its own generator (the global RNG is left alone)."""
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
    loss = engine(x).square().sum()
    engine.backward(loss)
    engine.step()


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_save_writes_a_verified_complete_record_and_keeps_the_newest(engine, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    checkpointer = Checkpointer(str(run), 0, 1, keep=2)
    stale = ckpts / "step_00000003"  # an earlier attempt at step 3 killed while saving
    stale.mkdir(parents=True)
    (stale / "leftover.pt").write_bytes(b"x")
    for step in (1, 2):
        train_step(engine)
        checkpointer.save(engine, step, {"step": step}, {"zero_stage": 1})
    (ckpts / "step_00000001_universal" / "zero").mkdir(parents=True)  # a resharded copy of the oldest tag
    train_step(engine)
    before = time.time()
    tag_dir = checkpointer.save(engine, 3, {"step": 3, "samples": 96}, {"zero_stage": 1, "note": "kept"})
    assert tag_dir == str(ckpts / "step_00000003")
    assert checkpointer.last_intact == (3, "saved by this run")
    # the stale attempt is gone, the oldest tag and its universal copy are pruned (keep=2)
    assert complete_checkpoints(str(ckpts)) == [(2, "step_00000002"), (3, "step_00000003")]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000002",
                                                                                    "step_00000003"]
    names = tag_files(tag_dir)
    assert "leftover.pt" not in names and "rng_rank0.pt" in names
    assert any(n.endswith("model_states.pt") for n in names) and any(n.endswith("optim_states.pt") for n in names)
    marker = json.loads((ckpts / "step_00000003" / MARKER).read_text())
    assert marker["step"] == 3 and marker["world_size"] == 1 and marker["zero_stage"] == 1
    assert marker["note"] == "kept" and before <= marker["saved_at"] <= time.time()
    assert marker["files"] == {n: file_record(os.path.join(tag_dir, n)) for n in names}
    assert not [p for p in os.listdir(tag_dir) if p.startswith(f"{MARKER}.tmp")]
    assert "latest" not in os.listdir(ckpts)  # DeepSpeed's own pointer would name a tag before it is complete


def test_load_restores_weights_optimizer_rng_and_client_state(engine, tmp_path, capsys):
    checkpointer = Checkpointer(str(tmp_path / "run"), 0, 1, keep=3)
    train_step(engine)
    tag_dir = checkpointer.save(engine, 5, {"step": 5, "samples": 160}, {"zero_stage": 1})
    saved, saved_lr, saved_epoch = weights(engine), engine.get_lr(), engine.lr_scheduler.last_epoch
    next_draw = torch.rand(4)  # the global RNG right after the save: a resume continues from here
    train_step(engine, seed=1)
    after_step = weights(engine)
    assert not all(torch.equal(a, b) for a, b in zip(saved, after_step))
    state = checkpointer.load(engine, "step_00000005", {"zero_stage": 1})
    assert state["step"] == 5 and state["samples"] == 160
    assert all(torch.equal(a, b) for a, b in zip(saved, weights(engine))) and engine.get_lr() == saved_lr
    assert engine.lr_scheduler.last_epoch == saved_epoch  # the schedule carries on from the saved step
    assert torch.equal(torch.rand(4), next_draw)
    assert not os.path.exists(tag_dir + "_universal") and capsys.readouterr().err == ""  # same world size: direct
    train_step(engine, seed=1)  # Adam's moments and the LR schedule came back too: the same step, the same weights
    assert all(torch.equal(a, b) for a, b in zip(after_step, weights(engine)))


def test_load_refuses_another_setting_with_the_fix(engine, tmp_path):
    checkpointer = Checkpointer(str(tmp_path / "run"), 0, 1, keep=3)
    tag_dir = checkpointer.save(engine, 7, {"step": 7}, {"zero_stage": 1})
    with pytest.raises(ResumeError) as info:
        checkpointer.load(engine, "step_00000007", {"zero_stage": 2})
    assert str(info.value) == (f"checkpoint {tag_dir} has zero_stage=1 but this run has 2: expected the same setting "
                               "to resume (use a new run name to start over)")


def test_a_checkpoint_that_cannot_be_loaded(engine, tmp_path):
    checkpointer = Checkpointer(str(tmp_path / "run"), 0, 1, keep=3)
    tag_dir = checkpointer.save(engine, 8, {"step": 8}, {})
    model_file = next(os.path.join(tag_dir, n) for n in tag_files(tag_dir) if n.endswith("model_states.pt"))
    with open(model_file, "r+b") as fh:
        fh.truncate(100)
    # its files were verified at resume: a failure to load is not put down to damage, the error stays as it is
    with pytest.raises(RuntimeError):
        checkpointer.load(engine, "step_00000008", {})
    # saved before files were recorded: the damage can only show now, as one line naming the checkpoint
    marker = json.loads(open(os.path.join(tag_dir, MARKER)).read())
    del marker["files"]
    with open(os.path.join(tag_dir, MARKER), "w") as fh:
        json.dump(marker, fh)
    with pytest.raises(ResumeError) as info:
        checkpointer.load(engine, "step_00000008", {})
    message = str(info.value)
    assert message.startswith(f"checkpoint {tag_dir} (saved without a file record, so unverified) cannot be loaded "
                              "(RuntimeError: ")
    assert re.fullmatch(r".*\(RuntimeError: \S[^\n]*\); move it aside to resume from an older one", message)


class FullDisk:
    """The real engine, whose checkpoint write then fails as a full filesystem (or another error) fails it."""

    def __init__(self, engine, error: OSError):
        self.engine, self.error = engine, error

    def save_checkpoint(self, *args, **kwargs):
        self.engine.save_checkpoint(*args, **kwargs)
        raise self.error


def test_a_full_disk_during_save_is_one_line_and_leaves_the_previous_checkpoint(engine, tmp_path):
    checkpointer = Checkpointer(str(tmp_path / "run"), 0, 1, keep=3)
    checkpointer.save(engine, 1, {"step": 1}, {})
    tag_dir = os.path.join(checkpointer.dir, "step_00000002")
    with pytest.raises(DiskFull) as info:
        checkpointer.save(FullDisk(engine, OSError(errno.ENOSPC, "No space left on device")), 2, {"step": 2}, {})
    assert str(info.value).endswith(f" writing {tag_dir}: the checkpoint was not saved (the previous one is "
                                    "intact); free space and continue with --resume auto")
    assert str(info.value).startswith("no space left on ")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not os.path.exists(tag_dir) and complete_checkpoints(checkpointer.dir) == [(1, "step_00000001")]
    assert checkpointer.last_intact == (1, "saved by this run")
    with pytest.raises(PermissionError):  # not a full disk: raised as it is, the partial tag left for a retry
        checkpointer.save(FullDisk(engine, PermissionError(errno.EACCES, "denied")), 2, {"step": 2}, {})
    assert os.path.isdir(tag_dir) and complete_checkpoints(checkpointer.dir) == [(1, "step_00000001")]


def test_a_checkpoint_from_another_world_size_goes_through_a_universal_checkpoint(engine, tmp_path, capsys):
    run = str(tmp_path / "run")
    writer = Checkpointer(run, 0, 1, keep=3, seed=11)
    tag_dir = writer.save(engine, 6, {"step": 6, "samples": 192}, {})
    saved = weights(engine)
    next_draw = torch.rand(3)
    train_step(engine)
    # this process as rank 0 of 2 resuming a one-rank checkpoint: rank 0 carries on rank 0's RNG streams
    start = time.perf_counter()
    state = Checkpointer(run, 0, 2, keep=3, seed=11).load(engine, "step_00000006", {})
    took = time.perf_counter() - start
    assert state["samples"] == 192 and all(torch.equal(a, b) for a, b in zip(saved, weights(engine)))
    assert torch.equal(torch.rand(3), next_draw)
    assert os.path.isdir(tag_dir + "_universal")
    err = capsys.readouterr().err
    said = re.search(r"^world size changed: checkpoint step_00000006 was written by 1 ranks, resuming on 2 \(ZeRO "
                     r"state re-partitioned through a DeepSpeed universal checkpoint in (\d+\.\d) s\)$", err, re.M)
    assert said and float(said.group(1)) <= took + 0.05  # the conversion's own time, within the call's
    # as rank 1, which the checkpoint has no RNG state for: a fresh state from (seed, step, rank), and no message
    train_step(engine)
    state = Checkpointer(run, 1, 2, keep=3, seed=11).load(engine, "step_00000006", {})
    assert state["samples"] == 192 and all(torch.equal(a, b) for a, b in zip(saved, weights(engine)))
    drawn = torch.rand(3), np.random.rand(3), random.random()
    value = ((11 * 1_000_003 + 6) * 10_007 + 1) % 2 ** 32
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    assert torch.equal(drawn[0], torch.rand(3)) and np.array_equal(drawn[1], np.random.rand(3))
    assert drawn[2] == random.random()
    assert capsys.readouterr().err == ""


def test_a_failed_conversion_names_both_ways_out(engine, tmp_path):
    run = str(tmp_path / "run")
    tag_dir = Checkpointer(run, 0, 1, keep=3).save(engine, 4, {"step": 4}, {})
    for name in tag_files(tag_dir):
        if name.endswith("optim_states.pt"):
            os.remove(os.path.join(tag_dir, name))  # nothing to re-partition
    ckpts = os.path.join(run, "checkpoints")
    with pytest.raises(ResumeError) as info:
        Checkpointer(run, 0, 2, keep=3).load(engine, "step_00000004", {})
    message = str(info.value)
    assert message.startswith(f"converting checkpoint {tag_dir} (written by another world size) to a universal "
                              "checkpoint failed: ")
    assert message.endswith(f". Resume with the 1 ranks that wrote it, or consolidate the weights with `python "
                            f"{ckpts}/zero_to_fp32.py {ckpts} OUT --tag step_00000004` (or `sparse-dc export`) and "
                            "start a new run from them (optimizer state is not carried over)")
