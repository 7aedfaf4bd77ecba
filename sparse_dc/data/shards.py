"""The on-disk format: Arrow IPC shards of token ids plus `manifest.json`, and a verified zero-copy reader.

A shard is an Arrow IPC file with one column `tokens: list<uint16|uint32>`, one row per document; every document
ends with EOS, so a shard's flat values buffer *is* its documents joined by EOS. Documents were written in a seeded
order (`doc_order_seed` in the manifest), so the concatenation of all shards is the corpus in that order, and any
prefix of it is a valid "first U tokens of a seeded document order". A streamed directory (`prepare --hf-dataset`)
keeps the stream's order and holds exactly `--max-tokens` tokens: its last document is cut there, without EOS
(`last_document_truncated` in the manifest), so a smaller budget's directory is a token-exact prefix of a larger one.

An optional held-out validation set (`validation` in the manifest: source, token count, its own shards
`validation_*.arrow`) comes from another input or split; `open_validation` maps it like the training shards.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from sparse_dc.data.sources import DataError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = "sparse-dc-shards/1"
SMALL_BATCH_ROWS = 16  # gather copies row by row at or below this many rows
DTYPES = {"uint16": (np.uint16, pa.uint16()), "uint32": (np.uint32, pa.uint32())}


def token_dtype_for(vocab_size: int, requested: str = "auto") -> str:
    """uint16 when the vocabulary fits (ids < 65536), else uint32; a too-small requested dtype is an error."""
    fits16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested == "uint16" and not fits16:
        raise DataError(f"vocab_size={vocab_size} does not fit dtype uint16: expected vocab_size <= 65536 "
                        "(use --dtype uint32 or auto)")
    if requested not in DTYPES:
        raise DataError(f"dtype={requested!r}: expected auto, uint16 or uint32")
    return requested


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise DataError(f"prepared data directory {directory!r} does not exist (run `sparse-dc data prepare`)")
    if not os.path.isfile(path):
        raise DataError(f"{directory!r} has no {MANIFEST}: expected a directory written by `sparse-dc data prepare`")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt manifest ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: corrupt manifest (not UTF-8 text, byte {exc.start})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: corrupt manifest (a JSON {_json_kind(manifest)}): expected an object")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    _check_fields(path, "", manifest, _MANIFEST_FIELDS)
    _check_fields(path, "tokenizer.", manifest["tokenizer"], _TOKENIZER_FIELDS)
    for i, shard in enumerate(manifest["shards"]):
        _check_fields(path, f"shards[{i}].", shard, _SHARD_FIELDS)
    if manifest["dtype"] not in DTYPES:
        raise DataError(f"{path}: dtype={manifest['dtype']!r}, expected one of {', '.join(DTYPES)}")
    return manifest


# The manifest fields readers rely on, and their JSON types ("count": an integer >= 0)
_MANIFEST_FIELDS = {"tokenizer": dict, "dtype": str, "total_tokens": "count", "total_documents": "count",
                    "shards": list}
_TOKENIZER_FIELDS = {"file": str, "sha256": str, "vocab_size": "count", "eos_id": "count"}
_SHARD_FIELDS = {"file": str, "bytes": "count", "sha256": str, "tokens": "count", "documents": "count"}


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _check_fields(path: str, prefix: str, record: object, fields: dict) -> None:
    """DataError naming the first field of `record` that is missing or of the wrong type."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: corrupt manifest ({prefix.rstrip('.')} is a JSON {_json_kind(record)}): expected "
                        "an object")
    for name, kind in fields.items():
        if name not in record:
            raise DataError(f"{path}: corrupt manifest (no {prefix}{name}): expected a manifest written by "
                            "`sparse-dc data prepare`")
        value = record[name]
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) if kind == "count" \
            else isinstance(value, kind)
        if not ok:
            expected = "an integer >= 0" if kind == "count" else f"a JSON {_json_kind(kind())}"
            raise DataError(f"{path}: corrupt manifest ({prefix}{name}={value!r}): expected {expected}")


@dataclass
class TokenStream:
    """All documents of a prepared directory as one logical token array, read from memory-mapped shards.

    `pieces[i]` is a zero-copy numpy view of one record batch's flat token values; `starts[i]` is its global offset.
    `doc_ends` holds the global end offset of every document (for cutting the validation set at a boundary).
    """

    directory: str
    manifest: dict
    pieces: list[np.ndarray]
    starts: np.ndarray  # int64 [n_pieces + 1]
    doc_ends: np.ndarray  # int64 [n_documents]
    _window_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._starts_list = self.starts.tolist()  # Python ints: bisect on them is cheaper than numpy per call

    @property
    def total_tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        """Copy tokens [start, start + len(out)) into `out` (any integer dtype) and return it."""
        end = start + len(out)
        if start < 0 or end > self._starts_list[-1]:
            raise IndexError(f"token range [{start}, {end}) outside the stream of {self.total_tokens} tokens")
        piece = bisect.bisect_right(self._starts_list, start) - 1
        filled = 0
        while filled < len(out):
            local = start + filled - self._starts_list[piece]
            chunk = self.pieces[piece][local: local + len(out) - filled]
            out[filled: filled + len(chunk)] = chunk
            filled += len(chunk)
            piece += 1
        return out

    def read_many(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens [starts[i], starts[i] + length) for every i -> int64 [len(starts), length] (bounds-checked)."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + length > self.total_tokens):
            raise IndexError(f"token ranges outside the stream of {self.total_tokens} tokens")
        return self.gather(starts, length)

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """`read_many` without the bounds check, for int64 offsets that are valid by construction (the loader's
        per-batch path, where min/max/asarray alone cost several microseconds).

        A batch whose rows all lie inside one record batch with more than SMALL_BATCH_ROWS rows is one
        fancy-index gather; any other batch is one slice-copy per row (a batch of random sequences from a large
        pool touches as many record batches as it has rows, so per-piece grouping would not save calls).
        """
        out = np.empty((len(starts), length), dtype=np.int64)
        bounds, pieces = self._starts_list, self.pieces
        if len(starts) > SMALL_BATCH_ROWS:
            first = bisect.bisect_right(bounds, int(starts[0])) - 1
            # Every row inside piece `first` <=> the lowest start and the highest end are both inside it.
            if bounds[first] <= int(starts.min()) and int(starts.max()) + length <= bounds[first + 1]:
                # A strided [positions, length] window view over the piece: indexing its first axis copies whole
                # contiguous rows (no n x length index array), fast for both short and long sequences.
                out[:] = self._windows(first, length)[starts - bounds[first]]
                return out
        for row, start in enumerate(starts.tolist()):
            p = bisect.bisect_right(bounds, start) - 1
            if start + length <= bounds[p + 1]:
                out[row] = pieces[p][start - bounds[p]: start - bounds[p] + length]
            else:  # straddles two record batches: copy piecewise
                self.read(start, out[row])
        return out

    def _windows(self, piece: int, length: int) -> np.ndarray:
        key = (piece, length)
        if key not in self._window_cache:
            self._window_cache[key] = np.lib.stride_tricks.sliding_window_view(self.pieces[piece], length)
        return self._window_cache[key]


def manifest_tokenizer(directory: str, manifest: dict | None = None) -> str:
    """Path of the tokenizer a prepared directory was tokenized with, checked against its manifest's sha256."""
    tok = (manifest or read_manifest(directory))["tokenizer"]
    path = os.path.join(directory, tok["file"])
    if not os.path.isfile(path) or sha256_file(path) != tok["sha256"]:
        raise DataError(f"{path}: missing or not the manifest's tokenizer (sha256 {tok['sha256'][:12]}...)")
    return path


def shard_entry(directory: str, name: str, tokens: int, documents: int) -> dict:
    """The manifest entry of a finished shard file: counts, byte size and sha256."""
    path = os.path.join(directory, name)
    return {"file": name, "tokens": tokens, "documents": documents, "bytes": os.path.getsize(path),
            "sha256": sha256_file(path)}


def open_stream(directory: str, verify: str = "checksum", tokenizer_path: str | None = None) -> TokenStream:
    """Open a prepared directory, check every shard against the manifest, and map the tokens (zero copy).

    verify="checksum" hashes every shard file (sha256); "size" checks byte sizes and Arrow lengths only (fast).
    A tokenizer given by `tokenizer_path` must be the manifest's (same sha256).
    """
    manifest = read_manifest(directory)
    tok = manifest["tokenizer"]
    manifest_tokenizer(directory, manifest)
    if tokenizer_path is not None and sha256_file(tokenizer_path) != tok["sha256"]:
        raise DataError(f"tokenizer {tokenizer_path!r} is not the one {directory!r} was prepared with "
                        f"(expected sha256 {tok['sha256'][:12]}...)")
    return _map_shards(directory, manifest, manifest["shards"], manifest["total_tokens"], verify)


def open_validation(directory: str, manifest: dict, verify: str = "checksum") -> TokenStream | None:
    """The held-out validation set written by `prepare --val-input/--val-split` (None when the directory has none).

    Its shards hold documents of another input or split, tokenized with the same tokenizer; the loader evaluates
    on its first `data.val_tokens` tokens instead of carving a prefix off the training stream.
    """
    held_out = manifest.get("validation")
    if held_out is None:
        return None
    return _map_shards(directory, manifest, held_out["shards"], held_out["tokens"], verify)


def _map_shards(directory: str, manifest: dict, entries: list[dict], total_tokens: int, verify: str) -> TokenStream:
    """Check `entries` (manifest shard records) against their files and map them as one TokenStream."""
    np_dtype, _ = DTYPES[manifest["dtype"]]
    pieces, starts, doc_ends, offset = [], [0], [], 0
    for shard in entries:
        path = os.path.join(directory, shard["file"])
        if not os.path.isfile(path):
            raise DataError(f"shard {path!r} listed in the manifest is missing")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise DataError(f"shard {path!r} has {size} bytes, manifest says {shard['bytes']} (truncated or replaced)")
        if verify == "checksum" and sha256_file(path) != shard["sha256"]:
            raise DataError(f"shard {path!r} fails its sha256 check against the manifest (corrupt)")
        try:
            reader = ipc.open_file(pa.memory_map(path, "r"))
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"shard {path!r} is not a readable Arrow IPC file ({exc})") from None
        n_tokens = n_docs = 0
        for batch in batches:
            column = batch.column(0)
            values = column.flatten().to_numpy(zero_copy_only=True)
            if values.dtype != np_dtype:
                raise DataError(f"shard {path!r} holds {values.dtype}, manifest says {manifest['dtype']}")
            lengths = np.diff(column.offsets.to_numpy()).astype(np.int64)
            doc_ends.append(offset + n_tokens + np.cumsum(lengths))
            pieces.append(values)
            starts.append(offset + n_tokens + len(values))
            n_tokens += len(values)
            n_docs += len(column)
        if (n_tokens, n_docs) != (shard["tokens"], shard["documents"]):
            raise DataError(f"shard {path!r} has {n_tokens} tokens / {n_docs} documents, manifest says "
                            f"{shard['tokens']} / {shard['documents']}")
        offset += n_tokens
    if offset != total_tokens:
        raise DataError(f"{directory!r}: shards hold {offset} tokens, manifest says {total_tokens}")
    ends = np.concatenate(doc_ends) if doc_ends else np.zeros(0, np.int64)
    return TokenStream(directory, manifest, pieces, np.asarray(starts, np.int64), ends)
