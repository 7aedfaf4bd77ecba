"""A held-out validation set from another input (`prepare --val-input PATH...`) or another split of the stream
(`prepare --hf-dataset ... --val-split validation`), written beside the training shards.

The paper evaluates on C4's validation split (10M tokens), not on a part of the training corpus; with a held-out set
the training stream is all unique-pool material (the loader no longer carves a validation prefix off it). The set is
the first `--val-tokens` tokens of the source in its own order (all of it for files when not given), tokenized with
the training tokenizer, in shards `validation_*.arrow`; the manifest's `validation` entry records the source, the
token and document counts and each shard's sha256.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

from tqdm import tqdm

from sparse_dc.data.hub import DocumentStream, StreamSpec
from sparse_dc.data.sources import DataError, expand_inputs, iter_documents
from sparse_dc.data.writer import ShardWriter, write_documents

SHARD_PREFIX = "validation"


class ValidationSource:
    """Opened before any training shard is written, so a missing file or split fails fast."""

    def __init__(self, *, inputs: list[str] | None = None, stream: StreamSpec | None = None,
                 text_field: str = "text", doc_boundary: str = "file", split: str = "validation",
                 train_inputs: list[str] | None = None):
        self.text_field, self.doc_boundary, self.split = text_field, doc_boundary, split
        self.files = expand_inputs(inputs) if inputs else []
        shared = sorted({os.path.abspath(f) for f in self.files} & {os.path.abspath(f) for f in train_inputs or []})
        if shared:
            raise DataError(f"validation input {shared[0]!r} is also a training input: expected a held-out source")
        self.stream = DocumentStream(stream) if stream is not None and not self.files else None

    def describe(self) -> dict:
        if self.stream is not None:
            return {"kind": "stream", **self.stream.describe()}
        return {"kind": "files", "files": self.files, "text_field": self.text_field, "split": self.split}

    def label(self) -> str:
        """One line for the ledger and `data inspect`: where the held-out tokens come from."""
        if self.stream is not None:
            spec, rev = self.stream.spec, self.stream.revision
            config = f" ({spec.config})" if spec.config else ""
            label = f"{spec.dataset}{config} split {spec.split}"
            if rev:
                return f"{label} @ {rev[:12]}"
            return f"{label}: {_names(self.stream.describe()['resolved_files'])}" if spec.data_files else label
        return f"files {_names(self.files)}"

    def documents(self) -> Iterator[tuple[int, str]]:
        if self.stream is not None:
            yield from self.stream.documents()
            return
        index = 0
        for path in self.files:
            for text in iter_documents(path, self.text_field, self.doc_boundary, self.split):
                yield index, text
                index += 1

    def write(self, directory: str, processor, dtype: str, shard_tokens: int, max_tokens: int | None,
              threads: int) -> dict:
        """Tokenize the set into `directory` and return the manifest's `validation` entry."""
        writer = ShardWriter(directory, SHARD_PREFIX, dtype, shard_tokens)
        with tqdm(total=max_tokens, desc="validation", unit=" tok", unit_scale=True, mininterval=0.5) as bar:
            truncated = write_documents(self.documents(), processor, writer, max_tokens, threads, bar)
        entries = writer.close()
        if writer.tokens == 0:
            raise DataError(f"validation source {self.label()} holds no non-empty documents")
        if max_tokens is not None and writer.tokens < max_tokens:
            raise DataError(f"validation source {self.label()} holds {writer.tokens} tokens: expected at least "
                            f"--val-tokens {max_tokens} (lower --val-tokens or add inputs)")
        return {"description": self.label(), "source": self.describe(), "tokens": writer.tokens,
                "documents": writer.documents, "last_document_truncated": truncated, "shards": entries}


def _names(paths: list[str]) -> str:
    names = ", ".join(os.path.basename(str(p)) for p in paths[:3])
    return names + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
