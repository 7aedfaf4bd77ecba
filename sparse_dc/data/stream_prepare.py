"""`sparse-dc data prepare --hf-dataset NAME ... --max-tokens N`: stream documents, tokenize them in stream order,
and stop reading once exactly N tokens are written (never the whole corpus).

Order and budgets: documents keep the stream's order (or a seeded shuffle buffer, see hub.py) and are not permuted
afterwards, so the directory of a smaller --max-tokens is a token-exact prefix of a larger one's, and every unique
budget U of the loader is a prefix of the same order (the nested-prefix property of the file-based prepare).

Tokenizer: `--tokenizer MODEL` (e.g. the T5 SentencePiece model the paper used on C4), or one trained, before
anything is written, on the first `--tokenizer-docs` documents of the stream (which then are tokenized first).

Resume: everything is written under `<out>.partial/`. After each finished shard `progress.json` records the shards
so far and the stream records they consumed. Rerunning the same command continues from there: the tokenizer and
finished shards are kept and the stream skips the consumed records (`IterableDataset.skip`, which still reads them
from the source, but does not tokenize them). Another command refuses to touch the folder unless --overwrite. A
bad input (one-line error) removes it; Ctrl-C, a network failure or a kill leave it for the rerun.
"""
from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import logging
import os
import shutil
import time

from tqdm import tqdm

from sparse_dc.data import shards as fmt
from sparse_dc.data.hub import DocumentStream, StreamSpec
from sparse_dc.data.prepare import PrepareConfig, replace_dir, tokenizer_entry, write_manifest
from sparse_dc.data.sources import DataError
from sparse_dc.data.tokenizer import load_tokenizer_bytes, processor_from_bytes, sha256_bytes, train_tokenizer
from sparse_dc.data.validation import ValidationSource
from sparse_dc.data.writer import ShardWriter, write_documents
from sparse_dc.errors import SparseDCError

log = logging.getLogger(__name__)
PROGRESS = "progress.json"
LOCK = ".lock"


def stream_spec(cfg: PrepareConfig) -> StreamSpec:
    return StreamSpec(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, tuple(cfg.hf_data_files), cfg.hf_revision,
                      cfg.text_field, cfg.shuffle_buffer, cfg.seed)


def prepare_stream(cfg: PrepareConfig) -> dict:
    """Run a streaming preparation (resuming an interrupted one); returns the manifest written to `cfg.out`."""
    cfg.validate()
    out = os.path.abspath(cfg.out)
    partial = f"{out}.partial"
    if os.path.exists(out) and not cfg.overwrite:
        raise DataError(f"output {cfg.out!r} already exists: expected a new directory (or pass --overwrite)")
    spec = stream_spec(cfg)
    os.makedirs(partial, exist_ok=True)
    lock = _Lock(partial)
    progress = None
    try:  # open every source before writing: an unreachable hub, a missing split or field fails here
        progress = None if cfg.overwrite else _read_progress(partial)
        if progress is None:
            _clear(partial)
        stream = DocumentStream(spec, skip=progress["records_consumed"] if progress else 0)
        key = _resume_key(cfg, stream.revision)
        if progress is not None:
            _check_resumable(partial, progress, key, cfg.max_tokens)
        held_out = None
        if cfg.val_inputs or cfg.val_split:
            # the validation split of the very commit the training split was read from
            val_spec = dataclasses.replace(spec, split=cfg.val_split, revision=stream.revision or spec.revision)
            held_out = ValidationSource(
                inputs=cfg.val_inputs, stream=val_spec if cfg.val_split else None, text_field=cfg.text_field,
                doc_boundary=cfg.doc_boundary, split=cfg.val_split or "validation")
    except BaseException:
        lock.release()
        if progress is None:  # nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
        raise
    started = time.time()
    writer = None
    try:
        documents = stream.documents()
        proto, first_docs, tokenizer_source = _tokenizer(cfg, partial, documents, progress)
        processor = processor_from_bytes(proto)
        dtype = fmt.token_dtype_for(processor.get_piece_size(), cfg.dtype)

        def save_progress(entries: list[dict], records_consumed: int) -> None:
            _write_json(os.path.join(partial, PROGRESS),
                        {"key": key, "shards": entries, "records_consumed": records_consumed,
                         "tokenizer_source": tokenizer_source})

        writer = ShardWriter(partial, "shard", dtype, cfg.shard_tokens, progress["shards"] if progress else None,
                             on_shard=save_progress)
        if progress:
            log.info("resuming %s: %d tokens in %d shard(s) kept; skipping %d records of the stream", partial,
                     writer.tokens, len(writer.entries), progress["records_consumed"])
        with tqdm(total=cfg.max_tokens, initial=writer.tokens, desc=f"streaming {spec.dataset}", unit=" tok",
                  unit_scale=True, mininterval=0.5) as bar:
            truncated = write_documents(itertools.chain(first_docs, documents), processor, writer, cfg.max_tokens,
                                        cfg.workers, bar)
        entries = writer.close()
        if writer.tokens < cfg.max_tokens:
            raise DataError(f"{stream.where()} ends after {writer.tokens} tokens: expected at least --max-tokens "
                            f"{cfg.max_tokens} (lower it, or stream a larger split)")
        manifest = {
            "format": fmt.FORMAT,
            "tokenizer": tokenizer_entry(proto, processor, tokenizer_source, cfg.model_type),
            "dtype": dtype,
            "doc_order_seed": cfg.seed if cfg.shuffle_buffer else None,
            "total_tokens": writer.tokens,
            "total_documents": writer.documents,
            "max_tokens": cfg.max_tokens,
            "last_document_truncated": truncated,
            "shards": entries,
            "sources": [f"hf:{spec.dataset}"],
            "stream": stream.describe(),
        }
        if held_out is not None:
            manifest["validation"] = held_out.write(partial, processor, dtype, cfg.shard_tokens, cfg.val_tokens,
                                                    cfg.workers)
        manifest["seconds"] = round(time.time() - started, 2)
        write_manifest(partial, manifest)
        os.remove(os.path.join(partial, PROGRESS))  # written at the last shard: the folder is complete now
        lock.release()
        replace_dir(partial, out)
    except SparseDCError:
        lock.release()
        shutil.rmtree(partial, ignore_errors=True)  # a bad input: nothing to resume
        raise
    except BaseException as exc:
        if writer is not None:
            writer.abandon()
        lock.release()
        if not os.path.isfile(os.path.join(partial, PROGRESS)):  # no finished shard: nothing to resume from
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.warning("prepare interrupted (%s) with %d tokens in finished shards: %s is kept; rerun the same "
                    "command to resume (or pass --overwrite to start over)", type(exc).__name__,
                    sum(e["tokens"] for e in _read_progress(partial)["shards"]), partial)
        raise
    return manifest


def _tokenizer(cfg: PrepareConfig, partial: str, documents, progress: dict | None) -> tuple[bytes, list, str]:
    """(model proto, documents already read from the stream, source label); the model is saved in `partial`."""
    path = os.path.join(partial, fmt.TOKENIZER_FILE)
    if progress is not None:  # resume: the model the finished shards were written with
        with open(path, "rb") as fh:
            return fh.read(), [], progress["tokenizer_source"]
    if cfg.tokenizer:
        proto, first, source = load_tokenizer_bytes(cfg.tokenizer), [], cfg.tokenizer
    else:
        first = list(tqdm(itertools.islice(documents, cfg.tokenizer_docs), total=cfg.tokenizer_docs,
                          desc="reading documents for the tokenizer", unit=" docs", mininterval=0.5))
        if not first:
            raise DataError(f"--hf-dataset {cfg.hf_dataset} split {cfg.hf_split!r} holds no non-empty documents")
        log.info("training a %s tokenizer (vocab %d) on the first %d documents", cfg.model_type, cfg.vocab_size,
                 len(first))
        proto = train_tokenizer((text for _, text in first), cfg.vocab_size, cfg.model_type, cfg.workers, cfg.seed)
        source = f"trained on the first {len(first)} documents of the stream"
    with open(path, "wb") as fh:
        fh.write(proto)
    return proto, first, source


def _resume_key(cfg: PrepareConfig, revision: str | None) -> dict:
    """The settings that decide the bytes of the training shards (not --max-tokens: a prefix stays a prefix)."""
    tokenizer = ({"file_sha256": sha256_bytes(load_tokenizer_bytes(cfg.tokenizer))} if cfg.tokenizer else
                 {"vocab_size": cfg.vocab_size, "model_type": cfg.model_type, "docs": cfg.tokenizer_docs})
    return {"dataset": cfg.hf_dataset, "config": cfg.hf_config, "split": cfg.hf_split,
            "data_files": list(cfg.hf_data_files), "revision": revision, "text_field": cfg.text_field,
            "shuffle_buffer": cfg.shuffle_buffer, "seed": cfg.seed, "shard_tokens": cfg.shard_tokens,
            "dtype": cfg.dtype, "tokenizer": tokenizer}


def _read_progress(partial: str) -> dict | None:
    """The progress of an interrupted prepare in `partial` (None before its first finished shard)."""
    path = os.path.join(partial, PROGRESS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _clear(partial: str) -> None:
    """Empty `partial` (a run interrupted before its first shard, or --overwrite), keeping our lock file."""
    for name in os.listdir(partial):
        if name != LOCK:
            path = os.path.join(partial, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _check_resumable(partial: str, progress: dict, key: dict, max_tokens: int) -> None:
    changed = [f"{k}: {progress['key'].get(k)!r} -> {v!r}" for k, v in key.items() if progress["key"].get(k) != v]
    if changed:
        raise DataError(f"{partial} holds an interrupted prepare with other settings ({'; '.join(changed)}): "
                        "rerun it with the same settings to resume, or pass --overwrite to discard it")
    held = sum(s["tokens"] for s in progress["shards"])
    if held > max_tokens:
        raise DataError(f"{partial} already holds {held} tokens: expected --max-tokens >= {held} to resume it "
                        "(or --overwrite to start over)")
    for shard in progress["shards"]:
        path = os.path.join(partial, shard["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
            raise DataError(f"{path} does not match {PROGRESS}: pass --overwrite to start over")


class _Lock:
    """An exclusive flock on `<partial>/.lock`: two prepares never write the same folder."""

    def __init__(self, partial: str):
        self.path = os.path.join(partial, LOCK)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise DataError(f"{partial} is being written by another prepare: wait for it, or use another "
                            "--out") from None

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self.fd < 0:
            return
        if os.path.exists(self.path):
            os.remove(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
