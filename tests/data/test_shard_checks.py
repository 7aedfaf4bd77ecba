"""Every check `open_stream` makes of a prepared directory, each failing as one line that names the file and the
numbers (a damaged copy of the prepared corpus per test), the checksums against hashlib, and the batched reader's
window cache and piece-edge rows against the Arrow rows read directly."""
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from sparse_dc.data.shards import (DataError, TokenStream, manifest_tokenizer, open_stream, open_validation,
                                   read_manifest, sha256_file, shard_entry, token_dtype_for)


@pytest.fixture
def data(prepared, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(prepared, target)
    return target


def edit_manifest(directory, change) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def fails(directory, message, verify="size", **kw):
    with pytest.raises(DataError) as info:
        open_stream(str(directory), verify=verify, **kw)
    assert str(info.value) == message
    return info


def test_missing_directory_and_manifest(tmp_path):
    fails(tmp_path / "nope", f"prepared data directory {str(tmp_path / 'nope')!r} does not exist (run `sparse-dc "
                             "data prepare`)")
    fails(tmp_path, f"{str(tmp_path)!r} has no manifest.json: expected a directory written by `sparse-dc data "
                    "prepare`")


def test_unparseable_manifest_names_the_line(data):
    (data / "manifest.json").write_text('{\n  "format": \n')
    fails(data, f"{data / 'manifest.json'}: corrupt manifest (Expecting value at line 3)")


@pytest.mark.parametrize("fmt", ["sparse-dc-shards/2", None])
def test_other_format(data, fmt):
    edit_manifest(data, lambda m: m.update(format=fmt) if fmt else m.pop("format"))
    fails(data, f"{data / 'manifest.json'}: format {fmt!r}, expected 'sparse-dc-shards/1'")


@pytest.mark.parametrize("change, detail", [
    (lambda m: m.update(shards={}), "shards={}): expected a JSON array"),
    (lambda m: m.update(dtype=16), "dtype=16): expected a JSON string"),
    (lambda m: m.update(total_tokens=True), "total_tokens=True): expected an integer >= 0"),
    (lambda m: m.update(total_tokens=-1), "total_tokens=-1): expected an integer >= 0"),
    (lambda m: m.update(total_tokens=1.5), "total_tokens=1.5): expected an integer >= 0"),
    (lambda m: m["tokenizer"].update(eos_id="2"), "tokenizer.eos_id='2'): expected an integer >= 0"),
    (lambda m: m["shards"][1].update(file=None), "shards[1].file=None): expected a JSON string"),
    (lambda m: m.update(shards=[True]), "shards[0] is a JSON boolean): expected an object"),
    (lambda m: m.update(shards=["a"]), "shards[0] is a JSON string): expected an object"),
    (lambda m: m.update(shards=[1.5]), "shards[0] is a JSON number): expected an object"),
    (lambda m: m.update(shards=[[]]), "shards[0] is a JSON array): expected an object"),
    (lambda m: m.update(tokenizer=None), "tokenizer=None): expected a JSON object"),
])
def test_a_field_of_the_wrong_kind_is_named(data, change, detail):
    edit_manifest(data, change)
    fails(data, f"{data / 'manifest.json'}: corrupt manifest ({detail}")


def test_a_manifest_that_is_a_string_or_number(data):
    for value, kind in (("x", "string"), (3, "number"), (True, "boolean")):
        (data / "manifest.json").write_text(json.dumps(value))
        fails(data, f"{data / 'manifest.json'}: corrupt manifest (a JSON {kind}): expected an object")


def test_zero_counts_are_valid(data):
    edit_manifest(data, lambda m: m["tokenizer"].update(eos_id=0))
    assert read_manifest(str(data))["tokenizer"]["eos_id"] == 0


def test_missing_or_resized_shard(data):
    path = str(data / "shard_00001.arrow")
    size = os.path.getsize(path)
    with open(path, "ab") as fh:
        fh.write(b"\0")
    fails(data, f"shard {path!r} has {size + 1} bytes, manifest says {size} (truncated or replaced)")
    os.remove(path)
    fails(data, f"shard {path!r} listed in the manifest is missing")


def test_unreadable_arrow_file(data):
    path = data / "shard_00000.arrow"
    path.write_bytes(b"\0" * path.stat().st_size)  # the manifest's size, not an Arrow file
    with pytest.raises(DataError) as info:
        open_stream(str(data), verify="size")
    assert re.fullmatch(rf"shard {re.escape(repr(str(path)))} is not a readable Arrow IPC file \(.+\)", str(info.value))
    assert "\n" not in str(info.value)


def test_checksum_mode_hashes_and_size_mode_does_not(data, prepared):
    path = data / "shard_00000.arrow"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    fails(data, f"shard {str(path)!r} fails its sha256 check against the manifest (corrupt)", verify="checksum")
    damaged, intact = open_stream(str(data), verify="size"), open_stream(str(prepared), verify="size")
    assert damaged.total_tokens == intact.total_tokens  # sizes and lengths agree: "size" does not read the bytes
    assert not np.array_equal(damaged.pieces[0], intact.pieces[0])


def test_manifest_counts_disagreeing_with_the_shards(data):
    path = str(data / "shard_00002.arrow")
    manifest = edit_manifest(data, lambda m: m["shards"][2].update(documents=m["shards"][2]["documents"] + 1))
    tokens, documents = manifest["shards"][2]["tokens"], manifest["shards"][2]["documents"]
    fails(data, f"shard {path!r} has {tokens} tokens / {documents - 1} documents, manifest says {tokens} / "
                f"{documents}")
    edit_manifest(data, lambda m: m["shards"][2].update(documents=documents - 1))
    total = edit_manifest(data, lambda m: m.update(total_tokens=m["total_tokens"] + 1))["total_tokens"]
    fails(data, f"{str(data)!r}: shards hold {total - 1} tokens, manifest says {total}")
    edit_manifest(data, lambda m: m.update(total_tokens=total - 1, dtype="uint32"))
    fails(data, f"shard {str(data / 'shard_00000.arrow')!r} holds uint16, manifest says uint32")


def test_tokenizer_checks(data, prepared):
    model = str(data / "tokenizer.model")
    sha = read_manifest(str(data))["tokenizer"]["sha256"]
    assert open_stream(str(data), tokenizer_path=str(prepared / "tokenizer.model")).total_tokens > 0
    assert manifest_tokenizer(str(data)) == model
    os.remove(model)
    fails(data, f"{model}: missing or not the manifest's tokenizer (sha256 {sha[:12]}...)")
    with pytest.raises(DataError, match=re.escape(f"(sha256 {sha[:12]}...)")):
        manifest_tokenizer(str(data))


def test_checksums_and_shard_entries_against_hashlib(tmp_path, prepared):
    path = tmp_path / "blob"
    blob = bytes(range(256)) * 41 + b"tail"
    path.write_bytes(blob)
    expect = hashlib.sha256(blob).hexdigest()
    assert sha256_file(str(path)) == expect and sha256_file(str(path), chunk=1000) == expect
    path.write_bytes(b"")
    assert sha256_file(str(path)) == hashlib.sha256(b"").hexdigest()
    shard = prepared / "shard_00001.arrow"
    entry = shard_entry(str(prepared), "shard_00001.arrow", 5, 2)
    assert entry == {"file": "shard_00001.arrow", "tokens": 5, "documents": 2, "bytes": shard.stat().st_size,
                     "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}


def test_gather_windows_per_length_and_rows_ending_at_a_piece_edge(prepared):
    stream = open_stream(str(prepared), verify="size")
    rows = []
    for shard in read_manifest(str(prepared))["shards"]:
        rows += ipc.open_file(pa.memory_map(str(prepared / shard["file"]), "r")).read_all().column(0).to_pylist()
    flat = np.concatenate([np.asarray(r, np.int64) for r in rows])
    edge = int(stream.starts[1])
    for length in (40, 24, 40):  # the cached strided views differ by length
        for starts in (np.arange(20) * 5 + 3, np.arange(edge - length - 19, edge - length + 1),  # last row ends at edge
                       np.arange(edge - length - 18, edge - length + 2),  # last row crosses it
                       np.arange(edge, edge + 20)):  # every row in the second piece
            got = stream.gather(starts, length)
            assert got.dtype == np.int64  # token ids as the embedding takes them, whichever path copied them
            np.testing.assert_array_equal(got, np.stack([flat[s:s + length] for s in starts]))
    n = stream.total_tokens
    few = stream.read_many(np.array([n - 40, 0]), 40)
    assert few.dtype == np.int64
    np.testing.assert_array_equal(few, np.stack([flat[-40:], flat[:40]]))


def test_reads_over_record_batches_of_any_sizes():
    """Record batches of any sizes (a short first one, empty ones, a long last one): every read, batched read and
    gather is the concatenation's slice."""
    rng = np.random.default_rng(5)
    for sizes in ([2, 17], [5, 0, 3, 40], [1, 1, 1, 30], [0, 12, 0], [50]):
        pieces = [rng.integers(0, 60_000, s).astype(np.uint16) for s in sizes]
        flat = np.concatenate(pieces).astype(np.int64)
        stream = TokenStream("in-memory", {}, pieces, np.cumsum([0, *sizes]), np.cumsum(sizes))
        n = len(flat)
        for start in range(n):
            for length in {1, min(2, n - start), n - start}:
                np.testing.assert_array_equal(stream.read(start, np.empty(length, np.int64)),
                                              flat[start:start + length])
        starts = rng.integers(0, n - 1, 20)
        np.testing.assert_array_equal(stream.read_many(starts, 2), np.stack([flat[s:s + 2] for s in starts]))


def test_read_many_bounds_hold_for_small_index_dtypes():
    """The bounds check sees the real end of each range, not one wrapped around a uint8 index's range."""
    stream = TokenStream("in-memory", {}, [np.arange(50, dtype=np.uint16)], np.array([0, 50]), np.array([50]))
    for starts in (np.array([255], np.uint8), np.array([49], np.uint8), np.array([60, 3], np.int16)):
        with pytest.raises(IndexError, match="^token ranges outside the stream of 50 tokens$"):
            stream.read_many(starts, 2)
    np.testing.assert_array_equal(stream.read_many(np.array([48, 0], np.uint8), 2), [[48, 49], [0, 1]])


def test_shards_of_several_record_batches_map_every_batch_and_document(data):
    """Shards written as several record batches each (prepare writes one per BATCH_TOKENS): every batch is a piece at
    its global offset, every document end is global, and the stream reads as the rows joined."""
    manifest = read_manifest(str(data))
    rows, batch_sizes = [], []
    for i, shard in enumerate(manifest["shards"]):
        path = data / shard["file"]
        column = ipc.open_file(pa.memory_map(str(path), "r")).read_all().column(0).combine_chunks()
        cuts = [0, 1, len(column) // 2, len(column)]  # a one-document batch, then two larger ones
        with ipc.new_file(str(path), pa.schema([("tokens", column.type)])) as writer:
            for a, b in zip(cuts, cuts[1:]):
                part = column.slice(a, b - a)
                writer.write_batch(pa.record_batch([part], names=["tokens"]))
                batch_sizes.append(sum(len(r) for r in part.to_pylist()))
        rows += column.to_pylist()
        manifest["shards"][i] = shard_entry(str(data), shard["file"], shard["tokens"], shard["documents"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    stream = open_stream(str(data), verify="checksum")
    flat = np.concatenate([np.asarray(r, np.int64) for r in rows])
    assert len(stream.pieces) == 3 * len(manifest["shards"])
    np.testing.assert_array_equal(stream.starts, np.cumsum([0, *batch_sizes]))
    np.testing.assert_array_equal(stream.doc_ends, np.cumsum([len(r) for r in rows]))
    np.testing.assert_array_equal(stream.read(0, np.empty(len(flat), np.int64)), flat)


def test_no_shards_map_to_an_empty_stream(prepared):
    """A held-out set with no shards is an empty stream: no pieces, starts [0], no document ends (int64)."""
    manifest = read_manifest(str(prepared))
    stream = open_validation(str(prepared), {**manifest, "validation": {"shards": [], "tokens": 0}})
    assert stream.pieces == [] and stream.starts.tolist() == [0] and stream.total_tokens == 0
    assert stream.doc_ends.shape == (0,) and stream.doc_ends.dtype == np.int64


def test_held_out_shards_are_checksummed_by_default(data):
    """open_validation hashes its shards unless told "size": a flipped byte of the same length is refused."""
    manifest = read_manifest(str(data))
    held_out = {"shards": manifest["shards"][:1], "tokens": manifest["shards"][0]["tokens"]}
    path = data / manifest["shards"][0]["file"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with_held_out = {**manifest, "validation": held_out}
    with pytest.raises(DataError) as info:
        open_validation(str(data), with_held_out)
    assert str(info.value) == f"shard {str(path)!r} fails its sha256 check against the manifest (corrupt)"
    assert open_validation(str(data), with_held_out, verify="size").total_tokens == held_out["tokens"]


def test_whole_messages_of_a_missing_field_a_foreign_tokenizer_and_a_small_dtype(data, tmp_path):
    edit_manifest(data, lambda m: m.pop("total_tokens"))
    fails(data, f"{data / 'manifest.json'}: corrupt manifest (no total_tokens): expected a manifest written by "
                "`sparse-dc data prepare`")
    edit_manifest(data, lambda m: m.update(total_tokens=sum(s["tokens"] for s in m["shards"])))
    other = tmp_path / "other.model"
    other.write_bytes(b"not the tokenizer")
    sha = read_manifest(str(data))["tokenizer"]["sha256"]
    fails(data, f"tokenizer {str(other)!r} is not the one {str(data)!r} was prepared with (expected sha256 "
                f"{sha[:12]}...)", tokenizer_path=str(other))
    with pytest.raises(DataError) as info:
        token_dtype_for(65537, "uint16")
    assert str(info.value) == ("vocab_size=65537 does not fit dtype uint16: expected vocab_size <= 65536 "
                               "(use --dtype uint32 or auto)")
