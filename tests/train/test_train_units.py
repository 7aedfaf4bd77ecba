"""In-process checks of the pieces without DeepSpeed: checkpoint completeness, ledger appends under concurrency,
the generated DeepSpeed JSON."""
import json
import multiprocessing as mp

import numpy as np
import pytest

from sparse_dc.config.base import ConfigError
from sparse_dc.train.checkpoint import MARKER, Checkpointer, complete_checkpoints
from sparse_dc.train.config import TrainConfig
from sparse_dc.train.ledger import SHARED_FIELDS, append_row, read_ledger
from train_harness import run_in_processes


def test_incomplete_checkpoint_is_ignored(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):  # 30: killed while saving
        tag = ckpts / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (tag / MARKER).write_text(json.dumps({"step": step}))
    (ckpts / "step_junk").mkdir()
    assert complete_checkpoints(str(ckpts)) == [(10, "step_00000010"), (20, "step_00000020")]
    assert Checkpointer(str(tmp_path / "run"), 0, 1, keep=2).latest() == (20, "step_00000020")
    assert Checkpointer(str(tmp_path / "other"), 0, 1, keep=2).latest() is None


def _append_many(path: str, worker: int) -> None:
    for i in range(40):
        append_row(path, {**{f: worker for f in SHARED_FIELDS}, "i": i, "pad": "x" * (1000 * (i % 5))})


def test_ledger_appends_from_many_processes_never_tear(tmp_path):
    path = str(tmp_path / "sub" / "ledger.jsonl")
    procs = [mp.get_context("fork").Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = read_ledger(path)
    assert len(rows) == 160 and sorted((r["name"], r["i"]) for r in rows) == [(w, i) for w in range(4)
                                                                                for i in range(40)]


def test_ledger_row_needs_the_shared_fields(tmp_path):
    with pytest.raises(Exception, match="val_loss"):
        append_row(str(tmp_path / "l.jsonl"), {f: 1 for f in SHARED_FIELDS if f != "val_loss"})


def test_deepspeed_json_is_generated_from_the_config():
    extra = {"zero_optimization": {"stage3_max_live_parameters": 7}}
    cfg = TrainConfig.from_dict({"micro_batch": 2, "global_batch": 16, "precision": "bf16", "grad_clip": 0.5,
                                 "deepspeed": {"zero_stage": 3, "extra": extra}})
    ds = cfg.deepspeed_config(world_size=4)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_max_live_parameters"] == 7
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="micro_batch x world size = 2 x 3"):
        cfg.deepspeed_config(world_size=3)


def _record_many(path: str, worker: int) -> None:
    from sparse_dc.train.ledger import record_run

    for i in range(30):
        assert record_run(path, {**{f: 0 for f in SHARED_FIELDS}, "name": f"w{worker}-{i}", "run_id": f"{worker}-{i}"})


def _update_many(path: str, worker: int) -> None:
    from sparse_dc.train.ledger import update_row

    for i in range(worker, 40, 2):
        update_row(path, lambda r, i=i: r["name"] == f"old-{i}", lambda r, i=i: {**r, "downstream": {"score": i}})


def test_runs_record_their_rows_once_while_rows_update_in_place(tmp_path):
    """record_run reads and appends under the lock update_row rewrites the ledger under: no row is lost or
    doubled."""
    from sparse_dc.train.ledger import record_run

    path = str(tmp_path / "ledger.jsonl")
    for i in range(40):
        append_row(path, {**{f: 0 for f in SHARED_FIELDS}, "name": f"old-{i}", "run_id": f"old-{i}"})
    run_in_processes([(f, (path, w)) for f in (_record_many, _update_many) for w in range(2)])
    rows = read_ledger(path)
    assert sorted(r["name"] for r in rows) == sorted([f"old-{i}" for i in range(40)]
                                                     + [f"w{w}-{i}" for w in range(2) for i in range(30)])
    assert all(r["downstream"] == {"score": int(r["name"][4:])} for r in rows if r["name"].startswith("old-"))
    row = dict(rows[-1])
    assert not record_run(path, row) and not record_run(path, {**row, "val_loss": 9})  # same run_id: kept once
    assert record_run(path, {**row, "run_id": "another"})  # the same name trained again from scratch
    assert len(read_ledger(path)) == 101


def test_unreadable_ledgers_are_one_line(tmp_path):
    from sparse_dc.errors import SparseDCError

    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"name": "a"}\n{"name": "caf\xe9"}\n')
    with pytest.raises(SparseDCError, match=r"ledger.jsonl is not UTF-8 text \(undecodable bytes after line 0\)"):
        read_ledger(str(path))
    path.write_text('{"name": "a"}\n[1]\n')
    with pytest.raises(SparseDCError, match=r"ledger.jsonl:2: expected a JSON object, got list"):
        read_ledger(str(path))


def _fake_tag(ckpts, step: int) -> None:
    from sparse_dc.train.checkpoint import file_record

    tag = ckpts / f"step_{step:08d}"
    tag.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "rng_rank0.pt"):
        (tag / name).write_bytes(bytes(range(256)) * step)
    files = {n: file_record(str(tag / n)) for n in ("mp_rank_00_model_states.pt", "rng_rank0.pt")}
    (tag / MARKER).write_text(json.dumps({"step": step, "files": files}))


def test_resume_picks_the_newest_intact_checkpoint(tmp_path, capsys):
    from sparse_dc.train.checkpoint import ResumeError, tag_problem

    ckpts = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        _fake_tag(ckpts, step)
    checkpointer = Checkpointer(str(tmp_path / "run"), 0, 1, keep=3)
    assert checkpointer.newest_intact() == (30, "step_00000030") and capsys.readouterr().err == ""
    model = ckpts / "step_00000030" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    (ckpts / "step_00000020" / "rng_rank0.pt").unlink()
    assert tag_problem(str(ckpts / "step_00000020")) == "rng_rank0.pt is missing"
    assert checkpointer.newest_intact() == (10, "step_00000010")
    assert checkpointer.last_intact == (10, "checksums verified at resume")
    assert capsys.readouterr().err.strip() == ("checkpoint step_00000020 is damaged (rng_rank0.pt is missing): "
                                               "resuming from step_00000010 instead (kept as step_00000020.corrupt)")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000010", "step_00000020.corrupt",
                                                        "step_00000030.corrupt"]
    (ckpts / "step_00000010" / MARKER).write_text("{")
    with pytest.raises(ResumeError, match=r"no intact checkpoint in .* \(step_00000010: .*COMPLETE is unreadable "
                                          r"\(JSONDecodeError"):
        checkpointer.newest_intact()


def _hold(path: str, ready, release) -> None:
    from sparse_dc.train.runguard import RunLock

    RunLock(path).acquire()
    ready.set()
    release.wait(30)


def test_one_writer_per_run_directory_and_the_lock_dies_with_its_holder(tmp_path):
    from sparse_dc.train.runguard import RunBusy, RunLock

    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "run"), ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(RunBusy, match=rf"is being written by another process \(pid {holder.pid} on "):
        RunLock(str(tmp_path / "run")).acquire(wait_s=0.5)
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.join()
    lock = RunLock(str(tmp_path / "run"))
    assert lock.acquire(wait_s=0.5) is None
    lock.release()
def test_ledger_n_is_the_n_the_paper_law_was_fitted_with(tmp_path):
    """Ledger rows of the paper recipe's sizes read back (as `law fit --anchor paper` reads them) with N = the
    paper's published count x S within 3% (its notebook's PARAMS_MAP; the LM head scaled by S too), so the
    published coefficients predict on equal terms; the physical live count, which keeps the head dense, is far
    off for sparse runs and would shift the paper law's loss by up to ~0.3 nats."""
    from types import SimpleNamespace

    from sparse_dc.config.run import RunConfig
    from sparse_dc.launch.presets import paper_recipe
    from sparse_dc.model import param_counts
    from sparse_dc.scaling.forms import find_preset
    from sparse_dc.scaling.ledger import read_runs
    from sparse_dc.train.ledger import make_row

    paper_n = {"60m": 8.0e7, "120m": 1.45e8, "480m": 5.21e8}
    path = str(tmp_path / "ledger.jsonl")
    for size in paper_n:
        for density in (1.0, 0.25, 0.0625):
            cfg = RunConfig.from_dict(paper_recipe(size, density))
            plan = SimpleNamespace(unique_tokens=2_600_000_000, total_tokens=10_400_000_000, seq_len=256,
                                   packing="document", unique_real_tokens=0, total_real_tokens=0, val_tokens=0,
                                   val_source="heldout", val_from="C4 validation")
            row = make_row(cfg, param_counts(cfg.model, cfg.sparsity, 32000), plan, val_loss=3.0, tokens_per_s=1.0,
                           wall_time_s=1.0, steps=1, world_size=1)
            assert row["block_size"] == (1 if density < 1 else None)
            append_row(path, row)
    runs = read_runs(path)
    form, coefficients = find_preset("paper")
    published = np.array([paper_n[name.split("-")[1]] * s for name, s in zip(runs.name, runs.density)])
    assert np.all(np.abs(runs.active_params / published - 1) < 0.03)
    ours = form.predict(coefficients, runs)
    theirs = form.predict(coefficients, SimpleNamespace(**{**vars(runs), "active_params": published}))
    assert np.max(np.abs(ours - theirs)) < 0.02
    physical = np.array([r["active_params_physical"] for r in read_ledger(path)], dtype=float)
    shifted = form.predict(coefficients, SimpleNamespace(**{**vars(runs), "active_params": physical}))
    assert np.max(physical / published) > 2 and np.max(np.abs(shifted - theirs)) > 0.1
