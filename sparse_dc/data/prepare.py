"""`sparse-dc data prepare`: documents -> SentencePiece tokens -> Arrow shards in a seeded document order.

Two passes keep memory flat for corpora larger than RAM: (1) tokenize in input order into one scratch Arrow file,
(2) write the final shards by gathering documents from the memory-mapped scratch file in a permutation seeded by
`seed`. Everything is written under a temporary sibling directory that is renamed into place at the end, so a
crash or a bad input never leaves a half-written output.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from tqdm import tqdm

from sparse_dc.config.base import Config
from sparse_dc.data import shards as fmt
from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.sources import DataError, expand_inputs, iter_documents
from sparse_dc.data.tokenizer import load_tokenizer_bytes, processor_from_bytes, sha256_bytes, train_tokenizer
from sparse_dc.data.validation import ValidationSource

log = logging.getLogger(__name__)
ENCODE_CHUNK_DOCS = 1024  # documents per batched (multi-threaded) sentencepiece call
BATCH_TOKENS = 1 << 20  # tokens per Arrow record batch inside a shard


@dataclass(kw_only=True)
class PrepareConfig(Config):
    inputs: list[str] = field(default_factory=list)
    """Text (.txt/.md), JSONL, parquet files, folders of them, or saved HF `datasets` directories."""
    builtin: bool = False
    """Use the built-in corpus (standard-library docstrings + language reference; no download)."""
    out: str = ""
    """Output directory (must not exist unless `overwrite`)."""
    text_field: str = "text"
    """Field/column holding the text in JSONL, parquet and HF datasets."""
    doc_boundary: Literal["file", "blankline", "line"] = "file"
    """How plain-text files split into documents."""
    split: str = "train"
    """Split of a saved HF DatasetDict."""
    tokenizer: str | None = None
    """An existing SentencePiece model to use instead of training one."""
    vocab_size: int = 8192
    """Vocabulary size of the trained tokenizer."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    workers: int = max(1, min(8, os.cpu_count() or 1))
    """Threads for tokenizer training and encoding."""
    shard_tokens: int = 100_000_000
    """Target tokens per shard file (documents are never split across shards)."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    seed: int = 0
    """Seeds the document order; the unique pool of every run is a prefix of it."""
    overwrite: bool = False
    # --- streaming (`--hf-dataset`, see stream_prepare.py) ---------------------------------------------------
    hf_dataset: str | None = None
    """Stream this dataset (`datasets.load_dataset(..., streaming=True)`): a hub name such as allenai/c4, a
    packaged builder over local files (json, parquet, text, csv, arrow with hf_data_files), or a local folder."""
    hf_config: str | None = None
    """The dataset's configuration (C4: en)."""
    hf_split: str = "train"
    """Split streamed for training."""
    hf_data_files: list[str] = field(default_factory=list)
    """Data-file glob patterns, each GLOB (the hf_split split) or SPLIT=GLOB (e.g. validation=c4-validation.*)."""
    hf_revision: str | None = None
    """Hub branch, tag or commit (default: main); the manifest records the commit it resolved to."""
    max_tokens: int | None = None
    """Streaming: write exactly this many training tokens, then stop reading (required with hf_dataset)."""
    shuffle_buffer: int = 0
    """Streaming: 0 keeps the stream's order; N > 0 shuffles files and records through a seeded N-record buffer."""
    tokenizer_docs: int = 100_000
    """Streaming without `tokenizer`: train the tokenizer on the first this-many documents of the stream."""
    # --- held-out validation set (validation.py) -------------------------------------------------------------
    val_inputs: list[str] = field(default_factory=list)
    """Files/folders of a held-out validation set (never the training inputs)."""
    val_split: str | None = None
    """The split the held-out set comes from: of the hf_dataset stream, or of saved HF DatasetDict folders among
    val_inputs (default there: validation)."""
    val_tokens: int | None = None
    """Tokens of the held-out set (its first ones); required for a stream split, default all of val_inputs."""

    def validate(self, path: str = "") -> None:
        self.check(bool(self.out), path, "out", "an output directory (--out DIR)")
        sources = sum([self.builtin, bool(self.inputs), self.hf_dataset is not None])
        self.check(sources > 0, path, "inputs", "at least one --input PATH, --builtin or --hf-dataset NAME")
        self.check(sources == 1, path, "inputs", "one of --input, --builtin and --hf-dataset, not several")
        streaming = self.hf_dataset is not None
        self.check(not streaming or (self.max_tokens or 0) >= 1, path, "max_tokens",
                   "an integer >= 1 with --hf-dataset (--max-tokens 2.6B: stop reading once written)")
        for name in ("max_tokens", "hf_config", "hf_data_files", "hf_revision", "shuffle_buffer"):
            self.check(streaming or getattr(self, name) in (None, [], 0), path, name, "only with --hf-dataset")
        self.check(self.shuffle_buffer >= 0, path, "shuffle_buffer", "an integer >= 0 (0 = stream order)")
        self.check(self.tokenizer_docs >= 1, path, "tokenizer_docs", "an integer >= 1")
        self.check(self.val_tokens is None or self.val_tokens >= 1, path, "val_tokens", "null or an integer >= 1")
        self.check(self.val_tokens is None or bool(self.val_inputs) or self.val_split is not None, path,
                   "val_tokens", "a validation source too (--val-input PATH... or --val-split SPLIT)")
        self.check(self.val_split is None or bool(self.val_inputs) or streaming, path, "val_split",
                   "--hf-dataset (a split of the stream) or --val-input (saved HF DatasetDict folders)")
        self.check(not (streaming and self.val_split and not self.val_inputs and self.val_tokens is None), path,
                   "val_tokens", f"a token count for the {self.val_split!r} split (--val-tokens 10M)")
        self.check(self.tokenizer is not None or 256 + 3 < self.vocab_size <= 1 << 22, path, "vocab_size",
                   "an integer in (259, 4194304] (byte fallback needs 256 + 3 special pieces)")
        self.check(self.workers >= 1, path, "workers", "an integer >= 1")
        self.check(self.shard_tokens >= 1024, path, "shard_tokens", "an integer >= 1024")
        super().validate(path)


def _documents(cfg: PrepareConfig, files: list[str], builtin: list[str],
               skipped: Counter | None = None) -> Iterator[str]:
    yield from builtin
    for path in files:
        yield from iter_documents(path, cfg.text_field, cfg.doc_boundary, cfg.split, skipped)


def _no_documents(cfg: PrepareConfig, skipped: Counter) -> None:
    why = f" (skipped {describe_skipped(skipped)})" if skipped else ""
    raise DataError(f"inputs {cfg.inputs or ['<builtin>']} contain no non-empty documents{why}")


def describe_skipped(skipped: Counter) -> str:
    """'200 rows: 100 'text' is int, not a string; 100 'text' is blank' (most frequent reason first)."""
    reasons = "; ".join(f"{n} {why}" for why, n in skipped.most_common())
    return f"{sum(skipped.values())} rows: {reasons}"


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole preparation of files (or the built-in corpus); returns the manifest written to
    `cfg.out/manifest.json`. A stream (`cfg.hf_dataset`) is prepared by `stream_prepare.prepare_stream`."""
    cfg.validate()
    if cfg.hf_dataset is not None:
        raise DataError(f"hf_dataset={cfg.hf_dataset!r}: a stream is prepared by "
                        "sparse_dc.data.stream_prepare.prepare_stream (the CLI picks it)")
    out = os.path.abspath(cfg.out)
    if os.path.exists(out) and not cfg.overwrite:
        raise DataError(f"output {cfg.out!r} already exists: expected a new directory (or pass --overwrite)")
    files = [] if cfg.builtin else expand_inputs(cfg.inputs)
    held_out = ValidationSource(inputs=cfg.val_inputs, text_field=cfg.text_field, doc_boundary=cfg.doc_boundary,
                                split=cfg.val_split or "validation", train_inputs=files) if cfg.val_inputs else None
    # The built-in corpus is small (~2 MB) but slow to parse: read it once for both passes.
    builtin = list(builtin_documents()) if cfg.builtin else []
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    started = time.time()
    skipped: Counter = Counter()
    try:
        if cfg.tokenizer:
            proto = load_tokenizer_bytes(cfg.tokenizer)
        else:
            if next(_documents(cfg, files, builtin, skipped), None) is None:  # sentencepiece's own error is cryptic
                _no_documents(cfg, skipped)
            log.info("training a %s tokenizer (vocab %d) on the inputs", cfg.model_type, cfg.vocab_size)
            documents = _documents(cfg, files, builtin)
            proto = train_tokenizer(documents, cfg.vocab_size, cfg.model_type, cfg.workers, cfg.seed)
        processor = processor_from_bytes(proto)
        vocab_size = processor.get_piece_size()
        dtype = fmt.token_dtype_for(vocab_size, cfg.dtype)
        with open(os.path.join(tmp, fmt.TOKENIZER_FILE), "wb") as fh:
            fh.write(proto)
        scratch = os.path.join(tmp, "scratch.arrow")
        skipped.clear()
        if not _tokenize_to_scratch(_documents(cfg, files, builtin, skipped), processor, dtype, scratch,
                                    cfg.workers):
            _no_documents(cfg, skipped)
        if skipped:
            log.warning("skipped %s", describe_skipped(skipped))
        shard_entries = _write_shards(scratch, tmp, dtype, cfg.shard_tokens, cfg.seed)
        os.remove(scratch)
        manifest = {
            "format": fmt.FORMAT,
            "tokenizer": tokenizer_entry(proto, processor, cfg.tokenizer or "trained", cfg.model_type),
            "dtype": dtype,
            "doc_order_seed": cfg.seed,
            "total_tokens": sum(s["tokens"] for s in shard_entries),
            "total_documents": sum(s["documents"] for s in shard_entries),
            "shards": shard_entries,
            "sources": ["<builtin: python stdlib docstrings + language reference>"] if cfg.builtin else files,
            "skipped_rows": dict(skipped),  # rows of the inputs that held no usable text, by reason
        }
        if held_out is not None:
            manifest["validation"] = held_out.write(tmp, processor, dtype, cfg.shard_tokens, cfg.val_tokens,
                                                    cfg.workers)
        manifest["seconds"] = round(time.time() - started, 2)
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _tokenize_to_scratch(documents: Iterable[str], processor, dtype: str, path: str, threads: int) -> int:
    """Pass 1: encode documents in input order (batched, `threads` threads) and append EOS; returns #documents."""
    _, pa_dtype = fmt.DTYPES[dtype]
    schema = pa.schema([("tokens", pa.list_(pa_dtype))])
    eos, n_docs = processor.eos_id(), 0
    bar = tqdm(desc="tokenizing", unit=" docs", mininterval=0.5)
    with ipc.new_file(path, schema) as writer:
        for chunk in _chunks(documents, ENCODE_CHUNK_DOCS):
            ids = processor.encode(chunk, out_type=int, num_threads=threads)
            for doc in ids:
                doc.append(eos)
            writer.write_batch(pa.record_batch([pa.array(ids, type=pa.list_(pa_dtype))], schema=schema))
            n_docs += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return n_docs


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_shards(scratch: str, directory: str, dtype: str, shard_tokens: int, seed: int) -> list[dict]:
    """Pass 2: write the documents of `scratch` in a seeded permutation into shards of ~shard_tokens tokens."""
    np_dtype, pa_dtype = fmt.DTYPES[dtype]
    schema = pa.schema([("tokens", pa.list_(pa_dtype))])
    reader = ipc.open_file(pa.memory_map(scratch, "r"))
    views, doc_piece, doc_start, doc_len = [], [], [], []
    for i in range(reader.num_record_batches):
        column = reader.get_batch(i).column(0)
        offsets = column.offsets.to_numpy().astype(np.int64)
        views.append(column.flatten().to_numpy(zero_copy_only=True))
        doc_piece.append(np.full(len(column), i, np.int64))
        doc_start.append(offsets[:-1])
        doc_len.append(np.diff(offsets))
    piece, start, length = (np.concatenate(a) for a in (doc_piece, doc_start, doc_len))
    order = np.random.default_rng(seed).permutation(len(length))
    entries: list[dict] = []
    bar = tqdm(total=int(length.sum()), desc="writing shards", unit=" tok", unit_scale=True, mininterval=0.5)
    position = 0
    while position < len(order):
        # Take documents until the shard reaches shard_tokens (at least one document per shard).
        cumulative = np.cumsum(length[order[position:]])
        count = max(1, int(np.searchsorted(cumulative, shard_tokens, side="right")))
        docs = order[position: position + count]
        name = f"shard_{len(entries):05d}.arrow"
        path = os.path.join(directory, name)
        with ipc.new_file(path, schema) as writer:
            for batch_docs in _split_by_tokens(docs, length, BATCH_TOKENS):
                parts = [views[piece[d]][start[d]: start[d] + length[d]] for d in batch_docs]
                offsets = np.concatenate([[0], np.cumsum(length[batch_docs])]).astype(np.int32)
                values = np.concatenate(parts).astype(np_dtype, copy=False)
                writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offsets, values)], schema=schema))
        n_tokens = int(length[docs].sum())
        entries.append(fmt.shard_entry(directory, name, n_tokens, int(count)))
        bar.update(n_tokens)
        position += count
    bar.close()
    return entries


def _split_by_tokens(docs: np.ndarray, length: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    cumulative = np.cumsum(length[docs])
    boundaries = np.searchsorted(cumulative, np.arange(budget, int(cumulative[-1]), budget), side="right")
    for part in np.split(docs, np.unique(boundaries)):
        if len(part):
            yield part


def tokenizer_entry(proto: bytes, processor, source: str, model_type: str) -> dict:
    """The manifest's `tokenizer` record."""
    return {"file": fmt.TOKENIZER_FILE, "sha256": sha256_bytes(proto), "vocab_size": processor.get_piece_size(),
            "eos_id": processor.eos_id(), "bos_id": processor.bos_id(), "source": source, "model_type": model_type}


def write_manifest(directory: str, manifest: dict) -> None:
    with open(os.path.join(directory, fmt.MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)


def replace_dir(tmp: str, out: str) -> None:
    """Move the finished `tmp` into place; an existing `out` (overwrite) is swapped out, then deleted."""
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
