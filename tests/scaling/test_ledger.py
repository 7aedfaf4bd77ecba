"""Reading the run ledger (JSONL) and CSV, and the one-line errors for bad input."""
import json

import numpy as np
import pytest

from sparse_dc.scaling.ledger import LedgerError, read_runs, write_runs

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
