"""Write documents to shards in the order they arrive, up to an exact token budget.

The streaming prepare (`--hf-dataset`) and held-out validation sets use this path; the file-based prepare writes
its seeded permutation in `prepare._write_shards`. Shards are the format of shards.py. A finished shard is reported
to `on_shard` with the number of source records consumed up to its last document: the resume point of an
interrupted streaming prepare.
"""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from sparse_dc.data import shards as fmt

ENCODE_CHUNK_DOCS = 1024  # documents per batched (multi-threaded) sentencepiece call
FIRST_CHUNK_DOCS = 64  # the first call is small: a tiny budget then reads few records past what it needs

# (list of finished shard entries so far, source records consumed up to the last document in them)
ShardCallback = Callable[[list[dict], int], None]


class ShardWriter:
    """Appends documents, in order, to `<prefix>_00000.arrow, ...` of about `shard_tokens` tokens each.

    A shard closes before the document that would take it over `shard_tokens` (a document is never split across
    shards; a longer one gets a shard of its own), as in the file-based prepare. `entries` are shards already
    finished by an interrupted run (resume): their counts continue, new shards are numbered after them.
    """

    def __init__(self, directory: str, prefix: str, dtype: str, shard_tokens: int, entries: list[dict] | None = None,
                 on_shard: ShardCallback | None = None):
        self.directory, self.prefix, self.shard_tokens, self.on_shard = directory, prefix, shard_tokens, on_shard
        _, self.pa_dtype = fmt.DTYPES[dtype]
        self.schema = pa.schema([("tokens", pa.list_(self.pa_dtype))])
        self.entries: list[dict] = list(entries or [])
        self.tokens = sum(e["tokens"] for e in self.entries)  # all shards, finished and open
        self.documents = sum(e["documents"] for e in self.entries)
        self._file: ipc.RecordBatchFileWriter | None = None
        self._open_tokens = self._open_docs = 0
        self._last_record = -1

    def add(self, column: pa.ListArray, records: np.ndarray) -> None:
        """Append documents `column` (token lists); records[i] is the source record document i came from."""
        lengths = np.diff(column.offsets.to_numpy()).astype(np.int64)
        start = 0
        while start < len(column):
            room = self.shard_tokens - self._open_tokens
            fit = int(np.searchsorted(np.cumsum(lengths[start:]), room, side="right"))
            if fit == 0 and self._open_docs == 0:
                fit = 1  # a document longer than a shard gets a shard of its own
            if fit:
                self._write(column.slice(start, fit), int(lengths[start:start + fit].sum()), int(records[start + fit - 1]))
                start += fit
            if start < len(column):
                self._close_shard()

    def close(self) -> list[dict]:
        """Finish the open shard; returns every shard's manifest entry."""
        if self._file is not None:
            self._close_shard()
        return self.entries

    def abandon(self) -> None:
        """Close the open shard's file without recording it (an interrupted run; resume rewrites it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _name(self) -> str:
        return f"{self.prefix}_{len(self.entries):05d}.arrow"

    def _write(self, docs: pa.ListArray, n_tokens: int, last_record: int) -> None:
        if self._file is None:
            self._file = ipc.new_file(os.path.join(self.directory, self._name()), self.schema)
        self._file.write_batch(pa.record_batch([docs], schema=self.schema))
        self._open_tokens += n_tokens
        self._open_docs += len(docs)
        self.tokens += n_tokens
        self.documents += len(docs)
        self._last_record = last_record

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        self.entries.append(fmt.shard_entry(self.directory, self._name(), self._open_tokens, self._open_docs))
        self._open_tokens = self._open_docs = 0
        if self.on_shard is not None:
            self.on_shard(self.entries, self._last_record + 1)


def write_documents(documents: Iterable[tuple[int, str]], processor, writer: ShardWriter, max_tokens: int | None,
                    threads: int, progress=None) -> bool:
    """Tokenize (record index, text) pairs in order into `writer` until it holds `max_tokens` tokens (None: all).

    Every document ends with EOS, except a last one cut at `max_tokens`, so the written tokens are exactly the
    first `max_tokens` tokens of the documents joined by EOS. Reads only as many records as that needs (plus at most
    one encoding chunk). Returns whether the last document was cut. `progress` (a tqdm bar) counts tokens.
    """
    eos = processor.eos_id()
    pa_type = pa.list_(writer.pa_dtype)
    stream = iter(documents)
    size = FIRST_CHUNK_DOCS
    while max_tokens is None or writer.tokens < max_tokens:
        chunk = list(itertools.islice(stream, size))
        if not chunk:
            return False
        records = np.fromiter((r for r, _ in chunk), np.int64, len(chunk))
        ids = processor.encode([text for _, text in chunk], out_type=int, num_threads=threads)
        for doc in ids:
            doc.append(eos)
        column = pa.array(ids, type=pa_type)
        before = writer.tokens
        cut = False
        if max_tokens is not None:
            column, cut = _cut_at(column, max_tokens - writer.tokens)
            records = records[:len(column)]
        writer.add(column, records)
        if progress is not None:
            progress.update(writer.tokens - before)
        if cut:
            return True
        size = _next_chunk_size(writer, max_tokens)
    return False


def _cut_at(column: pa.ListArray, budget: int) -> tuple[pa.ListArray, bool]:
    """The first `budget` tokens of the documents in `column`: whole documents, then a cut one (no EOS)."""
    offsets = column.offsets.to_numpy().astype(np.int64)
    ends = offsets[1:] - offsets[0]
    if ends[-1] <= budget:
        return column, False
    whole = int(np.searchsorted(ends, budget, side="right"))  # documents that fit entirely
    if whole and ends[whole - 1] == budget:
        return column.slice(0, whole), False
    new_offsets = np.append(offsets[:whole + 1] - offsets[0], budget).astype(np.int32)
    values = column.values.slice(int(offsets[0]), budget)
    return pa.ListArray.from_arrays(pa.array(new_offsets), values), True


def _next_chunk_size(writer: ShardWriter, max_tokens: int | None) -> int:
    """Documents to read next: a full chunk, or about what the remaining budget needs at the mean length so far."""
    if max_tokens is None or writer.documents == 0:
        return ENCODE_CHUNK_DOCS
    mean = writer.tokens / writer.documents
    return max(1, min(ENCODE_CHUNK_DOCS, math.ceil((max_tokens - writer.tokens) / mean * 1.05) + 1))

