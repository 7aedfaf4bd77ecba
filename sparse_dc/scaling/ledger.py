"""The run ledger as numpy arrays: read JSON lines (one finished run per line) or a CSV with the same columns.

Required fields: name, dense_params, density, unique_tokens, tokens, val_loss; optional active_params (default
dense_params x density, the paper's convention, which its fit assumes). Extra fields are ignored. Numbers may be
written 2.6e9 or 2.6B.

Refused with a line naming the row: a missing, non-numeric, non-finite or non-positive value, a density outside
(0, 1], active_params > dense_params. Reported (a LedgerWarning): a run name that appears more than once (the last
row of each name is used unless keep_duplicates), active_params that differ from dense_params x density.
"""
from __future__ import annotations

import collections
import csv
import io
import json
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

import numpy as np

from sparse_dc.config import parse_quantity
from sparse_dc.errors import SparseDCError
from sparse_dc.jsonl import parse_json_lines

REQUIRED = ("name", "dense_params", "density", "unique_tokens", "tokens", "val_loss")


class LedgerError(SparseDCError):
    """A ledger/CSV that cannot be used: missing file or column, or a value out of range (one line)."""


class LedgerWarning(UserWarning):
    """A ledger that can be used but says something the user should know (duplicate names, odd counts)."""


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


def runs_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "runs", keep_duplicates: bool = False) -> Runs:
    """Validate rows (dicts) and stack them; errors name the source, the row and the field.

    A name seen more than once counts once (its last row: a rerun appended later replaces the earlier one) unless
    `keep_duplicates`; either way it is reported."""
    cols: dict[str, list[Any]] = {k: [] for k in (*REQUIRED, "active_params")}
    for i, row in enumerate(rows, start=1):
        missing = [k for k in REQUIRED if row.get(k) in (None, "")]
        where = f"{source}: run {i} ({row.get('name', '?')})"
        if missing:
            raise LedgerError(f"{where} is missing {', '.join(missing)}; "
                              f"expected fields {', '.join(REQUIRED)} (active_params optional)")
        cols["name"].append(str(row["name"]))
        for key in REQUIRED[1:]:
            cols[key].append(_number(row[key], f"{where} {key}"))
        density, dense_params = cols["density"][-1], cols["dense_params"][-1]
        if not 0.0 < density <= 1.0:
            raise LedgerError(f"{where} density={density!r}: expected a value in (0, 1]")
        active = row.get("active_params")
        active = dense_params * density if active in (None, "") else _number(active, f"{where} active_params")
        if active > dense_params:
            raise LedgerError(f"{where} active_params={active:.6g} > dense_params={dense_params:.6g}: expected "
                              "active <= dense (active = dense x density)")
        cols["active_params"].append(active)
    if not cols["name"]:
        raise LedgerError(f"{source}: no runs found; expected one run per line (JSONL) or per CSV row")
    runs = Runs(name=np.array(cols["name"], dtype=object),
                **{k: np.array(cols[k], dtype=float) for k in REQUIRED[1:] + ("active_params",)})
    off = np.abs(runs.active_params / (runs.dense_params * runs.density) - 1.0)
    if (off > 0.01).any():
        warnings.warn(LedgerWarning(
            f"{source}: {int((off > 0.01).sum())} run(s) have active_params != dense_params x density (by up to "
            f"{100 * off.max():.0f}%, e.g. {runs.name[int(np.argmax(off))]}): the law uses active_params; the paper "
            "procedure's single-epoch stages use dense_params x density, as the official notebook"), stacklevel=2)
    return _duplicates(runs, source, keep_duplicates)


def _duplicates(runs: Runs, source: str, keep: bool) -> Runs:
    """Report names seen more than once; keep every row (`keep`) or the last row of each name."""
    counts = collections.Counter(runs.name)
    repeated = {name: n for name, n in counts.items() if n > 1}
    if not repeated:
        return runs
    listed = ", ".join(f"{name} x{n}" for name, n in list(repeated.items())[:5]) + (", ..." if len(repeated) > 5
                                                                                    else "")
    what = ("every row kept, as asked" if keep else
            f"using the last row of each, {sum(repeated.values()) - len(repeated)} earlier row(s) left out "
            "(keep_duplicates / --keep-duplicates fits every row)")
    warnings.warn(LedgerWarning(f"{source}: {len(repeated)} run name(s) appear more than once ({listed}): {what}"),
                  stacklevel=3)
    if keep:
        return runs
    last = {name: i for i, name in enumerate(runs.name)}
    return runs.subset(np.array(sorted(last.values())))


def _number(raw: Any, what: str) -> float:
    try:
        value = parse_quantity(raw, what)
    except SparseDCError:
        try:
            value = float(raw)  # 'nan' / 'inf' (a CSV cell): refused below as non-finite
        except (TypeError, ValueError):
            raise LedgerError(f"{what}={raw!r}: expected a positive number such as 2.6e9 or 2.6B") from None
    if not np.isfinite(value):
        raise LedgerError(f"{what}={raw!r}: expected a finite number (a diverged or unfinished run? fix or remove "
                          "the row)")
    if value <= 0:
        raise LedgerError(f"{what}={raw!r}: expected a positive number")
    return value


def read_runs(path: str, keep_duplicates: bool = False) -> Runs:
    """Read a ledger: JSON lines (`.jsonl`/`.json`, blank lines skipped) or CSV (`.csv`, header row).
    `keep_duplicates`: see runs_from_rows."""
    if not os.path.isfile(path):
        raise LedgerError(f"ledger {path!r} does not exist")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise LedgerError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "expected a JSON-lines or CSV ledger") from None
    if path.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        absent = [k for k in REQUIRED if k not in (reader.fieldnames or [])]
        if absent:
            raise LedgerError(f"{path}: CSV header lacks column(s) {', '.join(absent)}; "
                              f"expected {', '.join(REQUIRED)} (active_params optional)")
        return runs_from_rows(list(reader), path, keep_duplicates)
    rows = [row for _, row in parse_json_lines(text.splitlines(), path, LedgerError)]
    return runs_from_rows(rows, path, keep_duplicates)


def write_runs(runs: Runs, path: str) -> None:
    """Write runs as JSON lines (temp file + rename), the format `read_runs` reads."""
    from sparse_dc.config import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in runs.to_rows()))
