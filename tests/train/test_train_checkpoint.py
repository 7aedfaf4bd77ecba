"""Checkpoint bookkeeping in-process (the DeepSpeed save/load itself: test_train_faults.py, test_train_zero.py):
which tags count, how a tag's files are checked against its COMPLETE record, how export/eval find a checkpoint, what
a resume compares, RNG state, and the stop signal."""
import hashlib
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from sparse_dc.config.run import RunConfig
from sparse_dc.errors import SparseDCError
from sparse_dc.train.checkpoint import (
    MARKER,
    Checkpointer,
    ResumeError,
    StopSignal,
    complete_checkpoints,
    file_problem,
    file_record,
    read_marker,
    resolve_checkpoint,
    rng_state,
    run_config,
    run_record,
    saved_setting,
    set_rng_state,
    tag_files,
    tag_problem,
)

FILES = ("mp_rank_00_model_states.pt", "rng_rank0.pt", "zero/optim_states.pt")


def make_tag(ckpts, step: int, marker: dict | None = None):
    """A tag whose files match its COMPLETE record (as Checkpointer.save writes it)."""
    tag = ckpts / f"step_{step:08d}"
    for i, name in enumerate(FILES):
        (tag / name).parent.mkdir(parents=True, exist_ok=True)
        (tag / name).write_bytes(bytes([step % 256, i]) * (100 + i))
    files = {n: file_record(str(tag / n)) for n in FILES}
    (tag / MARKER).write_text(json.dumps({"step": step, "files": files, **(marker or {})}))
    return tag


def test_file_records_and_problems(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    record = file_record(str(path), chunk=7)  # chunked reads hash the same bytes
    assert record == {"bytes": 3000, "sha256": hashlib.sha256(b"abc" * 1000).hexdigest()} == file_record(str(path))
    assert file_problem(str(tmp_path), "f.bin", record) is None
    assert file_problem(str(tmp_path), "g.bin", record) == "g.bin is missing"
    path.write_bytes(b"abc" * 999)
    assert file_problem(str(tmp_path), "f.bin", record) == "f.bin has 2997 bytes, expected 3000"
    path.write_bytes(b"abd" * 1000)
    assert file_problem(str(tmp_path), "f.bin", record) == "f.bin fails its sha256 check"


def test_tag_files_and_completeness(tmp_path):
    ckpts = tmp_path / "checkpoints"
    tag = make_tag(ckpts, 7)
    (tag / f"{MARKER}.tmp.123").write_text("x")  # an atomic write in progress is not a file of the tag
    assert tag_files(str(tag)) == sorted(FILES)
    (ckpts / "step_00000009").mkdir()  # no marker: incomplete
    (ckpts / "step_9").mkdir()  # not a tag name
    (ckpts / "step_00000003.corrupt").mkdir()
    make_tag(ckpts, 12)
    assert complete_checkpoints(str(ckpts)) == [(7, "step_00000007"), (12, "step_00000012")]
    assert complete_checkpoints(str(tmp_path / "nowhere")) == []
    assert Checkpointer.tag(12) == "step_00000012"


def test_tag_problem_is_shared_between_ranks(tmp_path):
    tag = make_tag(tmp_path, 5)
    assert [tag_problem(str(tag), r, 3) for r in range(3)] == [None, None, None]
    name = sorted(FILES)[1]  # checked by rank 1 of 3: files are dealt out in sorted order
    (tag / name).write_bytes(b"damaged")
    size = 2 * (100 + FILES.index(name))
    assert [tag_problem(str(tag), r, 3) for r in range(3)] == [None, f"{name} has 7 bytes, expected {size}", None]
    assert tag_problem(str(tag)) == f"{name} has 7 bytes, expected {size}"  # one rank checks everything
    marker = json.loads((tag / MARKER).read_text())
    (tag / MARKER).write_text(json.dumps({**marker, "files": ["x"]}))
    assert tag_problem(str(tag)) == f"{MARKER} has no valid file record"
    (tag / MARKER).write_text(json.dumps({"step": 5}))  # written before files were recorded: cannot be checked
    assert tag_problem(str(tag)) is None
    (tag / MARKER).write_text("[1, 2]")
    assert tag_problem(str(tag)) == f"{tag / MARKER}: expected a JSON object, got list"
    with pytest.raises(ResumeError, match="expected a JSON object, got list"):
        read_marker(str(tag))
    (tag / MARKER).write_bytes(b"\xff\xfe")
    assert "is unreadable (UnicodeDecodeError" in tag_problem(str(tag))


def test_resolve_checkpoint_finds_the_newest_intact_tag(tmp_path, caplog):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (10, 20, 30):
        make_tag(ckpts, step)
    expect = (str(ckpts), "step_00000030")
    assert resolve_checkpoint(str(run)) == expect == resolve_checkpoint(str(ckpts))
    assert resolve_checkpoint(str(ckpts / "step_00000020")) == (str(ckpts), "step_00000020")
    (ckpts / "step_00000030" / FILES[0]).write_bytes(b"x")
    assert resolve_checkpoint(str(run)) == (str(ckpts), "step_00000020")
    assert "checkpoint step_00000030 is damaged" in caplog.text and "trying the one before it" in caplog.text
    with pytest.raises(SparseDCError, match=r"step_00000030 is damaged \(mp_rank_00_model_states.pt has 1 bytes"):
        resolve_checkpoint(str(ckpts / "step_00000030"))
    for step in (10, 20):
        (ckpts / f"step_{step:08d}" / FILES[1]).unlink()
    with pytest.raises(SparseDCError, match=r"every complete checkpoint in .*checkpoints is damaged"):
        resolve_checkpoint(str(run))
    with pytest.raises(SparseDCError, match="expected a run folder, its checkpoints/ folder or a step_"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_run_config_and_record_come_from_the_marker(tmp_path):
    cfg = RunConfig.from_dict({"name": "r1", "train": {"ledger": "x/ledger.jsonl"}, "data": {"seq_len": 64}})
    make_tag(tmp_path, 40, {"config": cfg.to_dict()})
    assert run_config(str(tmp_path), "step_00000040") == cfg
    assert run_record(str(tmp_path), "step_00000040") == {"name": "r1", "config_hash": cfg.fingerprint(),
                                                           "ledger": "x/ledger.jsonl", "step": 40}


def test_a_resume_compares_the_fingerprint_of_the_stored_config():
    cfg = RunConfig.from_dict({"name": "r", "train": {"log_interval": 3}})
    ours = cfg.fingerprint(results_only=True)
    # a marker from before the fingerprint's form changed: the recorded hash differs, the settings match
    legacy = {"resume_fingerprint": "0123456789abcdef", "config": cfg.to_dict(), "zero_stage": 2}
    assert saved_setting(legacy, "resume_fingerprint") == ours
    moved = RunConfig.from_dict({"name": "r", "train": {"log_interval": 50}, "output_dir": "elsewhere"})
    assert saved_setting({"config": moved.to_dict()}, "resume_fingerprint") == ours
    changed = RunConfig.from_dict({"name": "r", "data": {"seq_len": 128}})
    assert saved_setting({"config": changed.to_dict()}, "resume_fingerprint") != ours
    # a config this version cannot read: the recorded value is all there is
    assert saved_setting({"resume_fingerprint": "abc", "config": {"nope": 1}}, "resume_fingerprint") == "abc"
    assert saved_setting({"resume_fingerprint": "abc"}, "resume_fingerprint") == "abc"
    assert saved_setting(legacy, "zero_stage") == 2 and saved_setting(legacy, "missing") is None


def test_rng_state_round_trips():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_removing_a_tag_removes_its_universal_copy_first(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    make_tag(ckpts, 3)
    (ckpts / "step_00000003_universal" / "zero").mkdir(parents=True)
    make_tag(ckpts, 4)
    Checkpointer(str(tmp_path / "run"), 0, 1, keep=1)._remove("step_00000003")
    assert sorted(os.listdir(ckpts)) == ["step_00000004"]


def test_stop_signal_sets_a_flag_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal()
    try:
        assert not stop.requested() and stop.name() == "a stop signal on another rank"
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.name() == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before
