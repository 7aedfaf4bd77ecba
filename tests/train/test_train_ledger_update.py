"""ledger.update_row: one row changed in place (other lines byte for byte), atomically, without losing appends that
race with it."""
import json
import multiprocessing as mp

import pytest

from sparse_dc.errors import SparseDCError
from sparse_dc.train.ledger import SHARED_FIELDS, append_row, read_ledger, update_row


def _row(name, **extra):
    return {**{f: 1 for f in SHARED_FIELDS}, "name": name, **extra}


def test_update_row_changes_the_last_match_in_place(tmp_path):
    path = tmp_path / "ledger.jsonl"
    for row in (_row("a", v=1), _row("b", v=1), _row("a", v=2), _row("c", v=1)):
        append_row(str(path), row)
    before = path.read_text().splitlines()
    new = update_row(str(path), lambda r: r["name"] == "a", lambda r: {**r, "downstream": {"t": 1}})
    after = path.read_text().splitlines()
    assert new == {**_row("a", v=2), "downstream": {"t": 1}}
    assert len(after) == 4 and json.loads(after[2]) == new
    assert [after[i] for i in (0, 1, 3)] == [before[i] for i in (0, 1, 3)]  # the other lines untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.jsonl"]  # no temporary file left behind


def test_update_row_refuses_a_missing_row_or_ledger_and_leaves_the_file(tmp_path):
    path = tmp_path / "ledger.jsonl"
    append_row(str(path), _row("a"))
    text = path.read_text()
    with pytest.raises(SparseDCError, match="has no row of run 'z'"):
        update_row(str(path), lambda r: r["name"] == "z", dict, what="row of run 'z'")
    with pytest.raises(SparseDCError, match="does not exist"):
        update_row(str(tmp_path / "none.jsonl"), lambda r: True, dict)
    path.write_text(text + "{not json\n")
    with pytest.raises(SparseDCError, match=r"ledger.jsonl:2: not valid JSON"):
        update_row(str(path), lambda r: True, dict)
    assert path.read_text() == text + "{not json\n"


def _append_many(path: str, worker: int) -> None:
    for i in range(40):
        append_row(path, _row(f"w{worker}", i=i))


def _update_many(path: str) -> None:
    for _ in range(40):
        update_row(path, lambda r: r["name"] == "target", lambda r: {**r, "n": r["n"] + 1})


def test_appends_racing_updates_are_never_lost(tmp_path):
    """A writer that waited for the lock while update_row renamed a new file over the ledger must re-open it,
    or its line lands in the replaced file and is lost."""
    path = str(tmp_path / "ledger.jsonl")
    append_row(path, _row("target", n=0))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(2)]
    procs.append(ctx.Process(target=_update_many, args=(path,)))
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    rows = read_ledger(path)
    assert sorted((r["name"], r.get("i")) for r in rows if r["name"] != "target") == [
        (f"w{w}", i) for w in range(2) for i in range(40)]
    assert [r["n"] for r in rows if r["name"] == "target"] == [40]
