"""The run ledger as numpy arrays: read JSON lines (one finished run per line) or a CSV with the same columns.

Required fields: name, dense_params, density, unique_tokens, tokens, val_loss; optional active_params (default
dense_params x density). Extra fields are ignored. Numbers may be written 2.6e9 or 2.6B.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

import numpy as np

from sparse_dc.config import parse_quantity
from sparse_dc.errors import SparseDCError
from sparse_dc.jsonl import json_objects

REQUIRED = ("name", "dense_params", "density", "unique_tokens", "tokens", "val_loss")


class LedgerError(SparseDCError):
    """A ledger/CSV that cannot be used: missing file or column, or a value out of range (one line)."""


@dataclass(frozen=True)
class Runs:
    """Finished runs, one entry per run; every array has shape (n,). Losses are nats/token (validation)."""

    name: np.ndarray
    dense_params: np.ndarray
    """Dense-equivalent parameters (embeddings included, as the paper's fit counted them)."""
    active_params: np.ndarray
    """N: non-zero parameters (dense_params x density unless the ledger says otherwise)."""
    density: np.ndarray
    """S in (0, 1]; 1 = dense."""
    unique_tokens: np.ndarray
    """U: unique training tokens."""
    tokens: np.ndarray
    """D: total training tokens (D / U epochs)."""
    val_loss: np.ndarray

    def __len__(self) -> int:
        return len(self.name)

    @property
    def epochs(self) -> np.ndarray:
        return self.tokens / self.unique_tokens

    def subset(self, index: Any) -> "Runs":
        """Rows selected by a boolean mask or an integer index array (repeats allowed: bootstrap)."""
        return Runs(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to_rows(self) -> list[dict[str, Any]]:
        return [{f.name: _plain(getattr(self, f.name)[i]) for f in fields(self)} for i in range(len(self))]


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def runs_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "runs") -> Runs:
    """Validate rows (dicts) and stack them; errors name the source, the row and the field."""
    cols: dict[str, list[Any]] = {k: [] for k in (*REQUIRED, "active_params")}
    for i, row in enumerate(rows, start=1):
        missing = [k for k in REQUIRED if row.get(k) in (None, "")]
        if missing:
            raise LedgerError(f"{source}: run {i} ({row.get('name', '?')}) is missing {', '.join(missing)}; "
                              f"expected fields {', '.join(REQUIRED)} (active_params optional)")
        cols["name"].append(str(row["name"]))
        for key in REQUIRED[1:]:
            cols[key].append(_number(row[key], f"{source}: run {i} ({row['name']}) {key}"))
        density = cols["density"][-1]
        if not 0.0 < density <= 1.0:
            raise LedgerError(f"{source}: run {i} ({row['name']}) density={density!r}: expected a value in (0, 1]")
        active = row.get("active_params")
        cols["active_params"].append(cols["dense_params"][-1] * density if active in (None, "")
                                     else _number(active, f"{source}: run {i} ({row['name']}) active_params"))
    if not cols["name"]:
        raise LedgerError(f"{source}: no runs found; expected one run per line (JSONL) or per CSV row")
    return Runs(name=np.array(cols["name"], dtype=object),
                **{k: np.array(cols[k], dtype=float) for k in REQUIRED[1:] + ("active_params",)})


def _number(raw: Any, what: str) -> float:
    try:
        value = parse_quantity(raw, what)
    except SparseDCError:
        raise LedgerError(f"{what}={raw!r}: expected a positive number such as 2.6e9 or 2.6B") from None
    if not np.isfinite(value) or value <= 0:
        raise LedgerError(f"{what}={raw!r}: expected a positive number")
    return value


def read_runs(path: str) -> Runs:
    """Read a ledger: JSON lines (`.jsonl`/`.json`, blank lines skipped) or CSV (`.csv`, header row)."""
    if not os.path.isfile(path):
        raise LedgerError(f"ledger {path!r} does not exist")
    if not path.lower().endswith(".csv"):
        return runs_from_rows([row for _, row in json_objects(path, LedgerError)], path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            absent = [k for k in REQUIRED if k not in (reader.fieldnames or [])]
            if absent:
                raise LedgerError(f"{path}: CSV header lacks column(s) {', '.join(absent)}; "
                                  f"expected {', '.join(REQUIRED)} (active_params optional)")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise LedgerError(f"{path} is not UTF-8 text (byte {exc.start}): expected a UTF-8 CSV") from None
    return runs_from_rows(rows, path)


def write_runs(runs: Runs, path: str) -> None:
    """Write runs as JSON lines (temp file + rename), the format `read_runs` reads."""
    from sparse_dc.config import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in runs.to_rows()))
