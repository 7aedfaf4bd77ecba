"""Read documents from the inputs of `sparse-dc data prepare`: text, JSONL, parquet, or a saved HF dataset."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from sparse_dc.errors import SparseDCError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class DataError(SparseDCError):
    """Bad data input: missing, empty, corrupt, or inconsistent files."""


def _is_hf_dataset_dir(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or ("state.json" in names and "dataset_info.json" in names)


def expand_inputs(paths: list[str]) -> list[str]:
    """Files and HF dataset dirs named by `paths` (folders are searched recursively, in sorted order)."""
    if not paths:
        raise DataError("no --input given: expected at least one file or directory (or --builtin)")
    found: list[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"input {path!r} does not exist")
        if os.path.isdir(path) and _is_hf_dataset_dir(path):
            found.append(path)
        elif os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                if _is_hf_dataset_dir(dirpath):
                    found.append(dirpath)
                    dirnames.clear()
                    continue
                found += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)]
        else:
            if not path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES):
                raise DataError(f"input {path!r}: expected a .txt/.md, .jsonl/.json, .parquet file "
                                "or a saved HF datasets directory")
            found.append(path)
    if not found:
        raise DataError(f"inputs {paths}: no .txt, .jsonl, .parquet files or HF dataset directories found")
    return found


def iter_documents(path: str, text_field: str = "text", doc_boundary: str = "file",
                   split: str = "train", skipped: Counter | None = None) -> Iterator[str]:
    """Yield the non-empty documents of one input.

    Text files hold one document per file (`doc_boundary="file"`), per blank-line-separated block ("blankline")
    or per line ("line"). JSONL and parquet rows and HF dataset rows give one document per row from `text_field`;
    rows whose field is not a string, or is blank, are counted in `skipped` (keyed by why) instead of yielded.
    """
    if os.path.isdir(path):
        yield from _hf_documents(path, text_field, split, skipped)
    elif path.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, text_field, skipped)
    elif path.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path, text_field, skipped)
    else:
        yield from _text_documents(path, doc_boundary)


def _row_text(value: Any, text_field: str, skipped: Counter | None) -> str | None:
    """The document in one row's text field, or None (counted in `skipped`) when it is not a non-blank string."""
    if isinstance(value, str) and value.strip():
        return value
    if skipped is not None:
        kind = "null" if value is None else type(value).__name__
        why = "blank" if isinstance(value, str) else f"{kind}, not a string"
        skipped[f"{text_field!r} is {why}"] += 1
    return None


def _text_documents(path: str, doc_boundary: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"input {path!r} is not UTF-8 text (byte {exc.start})") from None
    if doc_boundary == "file":
        parts = [text]
    elif doc_boundary == "line":
        parts = text.splitlines()
    else:
        parts = [block for block in text.split("\n\n")]
    for part in parts:
        if part.strip():
            yield part.strip()


def _jsonl_documents(path: str, text_field: str, skipped: Counter | None = None) -> Iterator[str]:
    from sparse_dc.jsonl import json_objects

    for lineno, row in json_objects(path, DataError):
        if text_field not in row:
            raise DataError(f"{path}:{lineno}: expected an object with a {text_field!r} field "
                            "(choose it with --text-field)")
        text = _row_text(row[text_field], text_field, skipped)
        if text is not None:
            yield text


def _parquet_documents(path: str, text_field: str, skipped: Counter | None = None) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise DataError(f"input {path!r} is not a readable parquet file ({type(exc).__name__})") from None
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"input {path!r}: no column {text_field!r}; columns are {parquet.schema_arrow.names} "
                        "(choose one with --text-field)")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            text = _row_text(value, text_field, skipped)
            if text is not None:
                yield text


def _hf_documents(path: str, text_field: str, split: str, skipped: Counter | None = None) -> Iterator[str]:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"HF dataset {path!r} has splits {list(loaded)}; expected split {split!r} (--split)")
        loaded = loaded[split]
    if text_field not in loaded.column_names:
        raise DataError(f"HF dataset {path!r}: no column {text_field!r}; columns are {loaded.column_names} "
                        "(choose one with --text-field)")
    for text in loaded.select_columns([text_field]).iter(batch_size=4096):
        for value in text[text_field]:
            item = _row_text(value, text_field, skipped)
            if item is not None:
                yield item
