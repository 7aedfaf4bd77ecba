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
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint step_00000030 is damaged ({FILES[0]} has 1 bytes, expected 200): trying the one before it"]
    with pytest.raises(SparseDCError, match=r"step_00000030 is damaged \(mp_rank_00_model_states.pt has 1 bytes"):
        resolve_checkpoint(str(ckpts / "step_00000030"))
    for step in (10, 20):
        (ckpts / f"step_{step:08d}" / FILES[1]).unlink()
    with pytest.raises(SparseDCError) as info:
        resolve_checkpoint(str(run))
    assert str(info.value) == (f"--checkpoint {run}: every complete checkpoint in {ckpts} is damaged: expected an "
                               "intact one (its files matching its COMPLETE record)")
    with pytest.raises(SparseDCError) as info:
        resolve_checkpoint(str(tmp_path / "empty"))
    assert str(info.value) == (f"--checkpoint {tmp_path / 'empty'}: expected a run folder, its checkpoints/ folder "
                               "or a step_* folder holding a complete checkpoint (one with a COMPLETE marker)")


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
        assert signal.getsignal(signal.SIGUSR1) == stop._handle == signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.name() == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def _two_rank_bookkeeping(rank: int, store: str, run: str, out: str) -> None:
    """One of two forked ranks (gloo over a file store): gather, stop-signal agreement, the shared tag check."""
    import torch.distributed as dist

    from sparse_dc.train.checkpoint import _gather

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = {"gathered": _gather({"rank": rank}, 2)}
        stop = StopSignal()
        try:
            result["before"] = stop.requested()
            dist.barrier()
            if rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            result["after"] = stop.requested()  # rank 0 got no signal but stops with rank 1
            result["name"] = stop.name()
        finally:
            stop.restore()
        checkpointer = Checkpointer(run, rank, 2, keep=3)
        result["intact"] = checkpointer.newest_intact()
        result["last_intact"] = checkpointer.last_intact
    finally:
        dist.destroy_process_group()
    with open(out, "w") as fh:
        json.dump(result, fh)


def test_two_ranks_agree_on_gathers_stop_signals_and_damaged_checkpoints(tmp_path, capfd):
    from sparse_dc.train.checkpoint import _gather
    from train_harness import run_in_processes

    assert _gather(7, 1) == [7] and _gather(7, 4) == [7]  # without a process group: this rank's value only
    stop = StopSignal()
    try:
        assert stop.requested() is False
    finally:
        stop.restore()
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (10, 20):
        make_tag(ckpts, step)
    damaged = sorted(FILES)[1]  # rank 1 of 2 checks it: only rank 1 can see the damage, both must agree
    (ckpts / "step_00000020" / damaged).write_bytes(b"x")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    run_in_processes([(_two_rank_bookkeeping, (r, str(tmp_path / "store"), str(tmp_path / "run"), str(outs[r])))
                      for r in range(2)])
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["gathered"] for r in results] == [[{"rank": 0}, {"rank": 1}]] * 2
    assert [(r["before"], r["after"]) for r in results] == [(False, True)] * 2
    assert [r["name"] for r in results] == ["a stop signal on another rank", "SIGUSR1"]
    assert [r["intact"] for r in results] == [[10, "step_00000010"]] * 2
    assert [r["last_intact"] for r in results] == [[10, "checksums verified at resume"]] * 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000010", "step_00000020.corrupt"]
    err = capfd.readouterr().err
    line = (f"checkpoint step_00000020 is damaged ({damaged} has 1 bytes, expected {2 * (100 + FILES.index(damaged))}"
            "): resuming from step_00000010 instead (kept as step_00000020.corrupt)")
    assert err.count(line) == 1  # said once, by rank 0
    # a later resume on one rank finds the same checkpoint, the damaged one kept aside
    assert Checkpointer(str(tmp_path / "run"), 0, 1, keep=3).newest_intact() == (10, "step_00000010")


def _two_rank_integrity_check(rank: int, store: str, run: str, out: str) -> None:
    """One of two forked ranks: the files this rank hashes while both look for the newest intact checkpoint."""
    import torch.distributed as dist

    from sparse_dc.train import checkpoint

    checked, real = [], checkpoint.file_problem

    def recording(tag_dir, name, record):
        checked.append(name)
        return real(tag_dir, name, record)

    checkpoint.file_problem = recording
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        intact = Checkpointer(run, rank, 2, keep=3).newest_intact()
    finally:
        dist.destroy_process_group()
    with open(out, "w") as fh:
        json.dump({"intact": intact, "checked": checked}, fh)


def test_ranks_split_the_integrity_check_each_file_read_once(tmp_path):
    """Resuming verifies every recorded file's checksum: split over the ranks, so a large checkpoint costs each of
    them 1/world_size of the reads."""
    from train_harness import run_in_processes

    make_tag(tmp_path / "run" / "checkpoints", 10)
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    run_in_processes([(_two_rank_integrity_check, (r, str(tmp_path / "store"), str(tmp_path / "run"), str(outs[r])))
                      for r in range(2)])
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["intact"] for r in results] == [[10, "step_00000010"]] * 2
    assert [r["checked"] for r in results] == [sorted(FILES)[0::2], sorted(FILES)[1::2]]
    assert Checkpointer(str(tmp_path / "run"), 0, 1, keep=3).newest_intact() == (10, "step_00000010")  # one alone


def test_newest_intact_names_the_damage_it_stepped_over(tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (10, 20, 30, 40):
        make_tag(ckpts, step)
    marker = json.loads((ckpts / "step_00000010" / MARKER).read_text())
    del marker["files"]  # written before files were recorded
    (ckpts / "step_00000010" / MARKER).write_text(json.dumps(marker))
    (ckpts / "step_00000020.corrupt").mkdir()  # set aside by an earlier resume, before step 20 was saved again
    (ckpts / "step_00000020.corrupt" / "old.pt").write_bytes(b"old")
    for step in (20, 30, 40):
        (ckpts / f"step_{step:08d}" / FILES[2]).unlink()
    checkpointer = Checkpointer(str(run), 0, 1, keep=3)
    assert checkpointer.latest() == (40, "step_00000040")
    assert checkpointer.newest_intact() == (10, "step_00000010")
    assert checkpointer.last_intact == (10, "saved without checksums, so unverified")
    assert capsys.readouterr().err == (f"checkpoint step_00000020 is damaged ({FILES[2]} is missing): resuming from "
                                       "step_00000010 instead (kept as step_00000020.corrupt)\n")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000010", "step_00000020.corrupt",
                                                        "step_00000030.corrupt", "step_00000040.corrupt"]
    assert sorted(os.listdir(ckpts / "step_00000020.corrupt")) == [MARKER, "mp_rank_00_model_states.pt",
                                                                   "rng_rank0.pt", "zero"]  # the newer damage
    for step in (50, 60):
        make_tag(ckpts, step)
        (ckpts / f"step_{step:08d}" / FILES[0]).write_bytes(b"")
    (ckpts / "step_00000010" / MARKER).write_text("{")
    with pytest.raises(ResumeError) as info:
        checkpointer.newest_intact()
    assert str(info.value) == (
        f"no intact checkpoint in {ckpts} (step_00000060: {FILES[0]} has 0 bytes, expected 200; step_00000050: "
        f"{FILES[0]} has 0 bytes, expected 200; step_00000010: {ckpts / 'step_00000010' / MARKER} is unreadable "
        "(JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))): expected "
        f"at least one whose files match its {MARKER} record; the damaged ones are kept as step_*.corrupt; start "
        "over with a new name=")
