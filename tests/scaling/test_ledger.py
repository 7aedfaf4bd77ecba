"""Reading the run ledger (JSONL) and CSV, and the one-line errors for bad input."""
import json

import numpy as np
import pytest

from sparse_dc.scaling.ledger import LedgerError, LedgerWarning, read_runs, write_runs

ROWS = [
    {"name": "r1", "dense_params": 8.0e7, "density": 1.0, "unique_tokens": 1e9, "tokens": 1e9, "val_loss": 3.4,
     "git_commit": "abc", "block_size": 32},
    {"name": "r2", "dense_params": "1.45e8", "active_params": 7.0e7, "density": 0.5, "unique_tokens": "2.6B",
     "tokens": "10.4B", "val_loss": 3.1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return str(path)


def write_csv(path, rows, cols=("name", "dense_params", "active_params", "density", "unique_tokens", "tokens",
                                "val_loss")):
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_and_csv_read_the_same(tmp_path):
    a = read_runs(write_jsonl(tmp_path / "l.jsonl", ROWS))
    b = read_runs(write_csv(tmp_path / "l.csv", ROWS))
    for runs in (a, b):
        assert list(runs.name) == ["r1", "r2"]
        np.testing.assert_allclose(runs.active_params, [8.0e7, 7.0e7])  # default dense x density; given wins
        np.testing.assert_allclose(runs.unique_tokens, [1e9, 2.6e9])
        np.testing.assert_allclose(runs.epochs, [1.0, 4.0])


def test_round_trip_through_write_runs(tmp_path):
    runs = read_runs(write_jsonl(tmp_path / "l.jsonl", ROWS))
    write_runs(runs, str(tmp_path / "copy.jsonl"))
    again = read_runs(str(tmp_path / "copy.jsonl"))
    np.testing.assert_allclose(again.val_loss, runs.val_loss)


@pytest.mark.parametrize("change,match", [
    ({"density": 1.5}, r"density=1.5: expected a value in \(0, 1\]"),
    ({"density": 0}, "density=0: expected a positive number"),
    ({"tokens": -5}, "tokens=-5: expected a positive number"),
    ({"val_loss": "abc"}, "val_loss='abc': expected a positive number"),
    ({"unique_tokens": None}, "missing unique_tokens"),
])
def test_bad_values_name_the_run_and_field(tmp_path, change, match):
    with pytest.raises(LedgerError, match=match) as err:
        read_runs(write_jsonl(tmp_path / "l.jsonl", [ROWS[0], {**ROWS[1], **change}]))
    assert "\n" not in str(err.value) and "run 2 (r2)" in str(err.value)


def test_missing_csv_column_and_bad_files(tmp_path):
    with pytest.raises(LedgerError, match="lacks column.*val_loss"):
        read_runs(write_csv(tmp_path / "l.csv", ROWS, cols=("name", "dense_params", "density", "unique_tokens",
                                                            "tokens")))
    with pytest.raises(LedgerError, match="does not exist"):
        read_runs(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"name": 1\n')
    with pytest.raises(LedgerError, match="bad.jsonl:1: not valid JSON"):
        read_runs(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LedgerError, match="no runs found"):
        read_runs(str(tmp_path / "empty.jsonl"))


def test_duplicate_names_are_reported_and_counted_once(tmp_path):
    r2 = {**ROWS[1], "active_params": None}  # dense x density: the convention, nothing else to report
    rerun = {**ROWS[0], "val_loss": 3.3}  # r1 trained again: the later row replaces the earlier one
    path = write_jsonl(tmp_path / "l.jsonl", [ROWS[0], r2, rerun])
    with pytest.warns(LedgerWarning, match=r"1 run name\(s\) appear more than once \(r1 x2\): using the last row"):
        runs = read_runs(path)
    assert list(runs.name) == ["r2", "r1"] and runs.val_loss[1] == 3.3
    with pytest.warns(LedgerWarning, match=r"\(r1 x2\): every row kept, as asked"):
        every = read_runs(path, keep_duplicates=True)
    assert list(every.name) == ["r1", "r2", "r1"]


@pytest.mark.parametrize("change,match", [
    ({"active_params": 2e8}, r"run 2 \(r2\) active_params=2e\+08 > dense_params=1.45e\+08: expected active <= dense"),
    ({"val_loss": float("nan")}, r"run 2 \(r2\) val_loss=nan: expected a finite number"),
    ({"tokens": "inf"}, r"run 2 \(r2\) tokens='inf': expected a finite number"),
])
def test_impossible_rows_are_refused_naming_the_row(tmp_path, change, match):
    for path in (write_jsonl(tmp_path / "l.jsonl", [ROWS[0], {**ROWS[1], **change}]),
                 write_csv(tmp_path / "l.csv", [ROWS[0], {**ROWS[1], **change}])):
        with pytest.raises(LedgerError, match=match.replace("=nan", "=(nan|'nan')")) as err:
            read_runs(path)
        assert "\n" not in str(err.value)


def test_active_params_off_the_convention_are_reported(tmp_path):
    with pytest.warns(LedgerWarning, match=r"1 run\(s\) have active_params != dense_params x density .* e.g. r2"):
        read_runs(write_jsonl(tmp_path / "l.jsonl", ROWS))  # r2: 7.0e7 active vs 1.45e8 x 0.5


@pytest.mark.parametrize("name", ["l.jsonl", "l.csv"])
def test_a_file_that_is_not_utf8_is_one_line(tmp_path, name):
    (tmp_path / name).write_bytes(b"name,dense_params\n\xff\xfe caf\xe9\n")
    with pytest.raises(LedgerError, match=r"not UTF-8 text \(byte 0xff at offset 18\)") as err:
        read_runs(str(tmp_path / name))
    assert "\n" not in str(err.value)
