"""JSON lines (the run ledger, JSONL corpora): one reader whose every failure is a one-line error naming the file
and line, of the type the caller's stage raises."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sparse_dc.errors import SparseDCError


def json_objects(path: str, error: type[SparseDCError] = SparseDCError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of `path`; `error` names the line that is not a JSON object
    and a file that is not UTF-8 (decoding runs a buffer ahead, so that names the last line read whole)."""
    lineno = 0
    with open(path, encoding="utf-8") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise error(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line"
                                ) from None
                if not isinstance(row, dict):
                    raise error(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
        except UnicodeDecodeError:
            raise error(f"{path} is not UTF-8 text (undecodable bytes after line {lineno}): expected UTF-8 JSON "
                        "lines") from None
