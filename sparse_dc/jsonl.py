"""JSON lines (run ledgers, JSONL corpora): one parser whose every failure is a one-line error naming the file and
line, of the type the caller's stage raises."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from sparse_dc.errors import SparseDCError


def parse_json_lines(lines: Iterable[str], where: str,
                     error: type[SparseDCError] = SparseDCError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; `error` names the line (`where:N`) that is not a JSON
    object."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise error(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def json_objects(path: str, error: type[SparseDCError] = SparseDCError) -> Iterator[tuple[int, dict[str, Any]]]:
    """`parse_json_lines` over a file, streamed; a file that is not UTF-8 is an `error` too (decoding runs a buffer
    ahead, so it names the last line read whole)."""
    lineno = 0
    with open(path, encoding="utf-8") as fh:
        try:
            for lineno, row in parse_json_lines(fh, path, error):
                yield lineno, row
        except UnicodeDecodeError:
            raise error(f"{path} is not UTF-8 text (undecodable bytes after line {lineno}): expected UTF-8 JSON "
                        "lines") from None
