"""The token stream reader against the Arrow rows read directly: reads at every record-batch boundary, bounds errors,
the batched gather paths, and the token dtype rule."""
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from sparse_dc.data.shards import DataError, open_stream, open_validation, read_manifest, token_dtype_for


@pytest.fixture(scope="module")
def stream_and_flat(prepared):
    stream = open_stream(str(prepared), verify="checksum")
    rows = []
    for shard in read_manifest(str(prepared))["shards"]:
        table = ipc.open_file(pa.memory_map(str(prepared / shard["file"]), "r")).read_all()
        rows += table.column(0).to_pylist()
    return stream, np.concatenate([np.asarray(r, np.int64) for r in rows]), rows


def test_stream_is_the_rows_joined(stream_and_flat):
    stream, flat, rows = stream_and_flat
    assert stream.total_tokens == len(flat) and stream.starts[0] == 0 and len(stream.starts) == len(stream.pieces) + 1
    np.testing.assert_array_equal(stream.doc_ends, np.cumsum([len(r) for r in rows]))
    assert stream.eos_id == read_manifest(stream.directory)["tokenizer"]["eos_id"] and stream.vocab_size == 512
    for boundary in stream.starts.tolist()[1:-1]:  # reads that end at, start at and straddle a record batch edge
        for start, length in ((boundary - 5, 5), (boundary, 7), (boundary - 3, 9), (0, 1)):
            np.testing.assert_array_equal(stream.read(start, np.empty(length, np.int64)), flat[start:start + length])
    n = stream.total_tokens
    np.testing.assert_array_equal(stream.read(n - 4, np.empty(4, np.int32)), flat[-4:])
    for start, length in ((-1, 2), (n - 3, 4)):
        with pytest.raises(IndexError, match=rf"token range \[{start}, {start + length}\) outside the stream of {n}"):
            stream.read(start, np.empty(length, np.int64))


def test_read_many_and_gather(stream_and_flat):
    stream, flat, _ = stream_and_flat
    rng = np.random.default_rng(0)
    n = stream.total_tokens
    boundary = int(stream.starts[1])
    for starts in (rng.integers(0, n - 40, 50), np.arange(17) * 3 + 10, np.array([boundary - 20] * 20),
                   np.array([], np.int64), np.array([n - 40])):
        expect = np.stack([flat[s:s + 40] for s in starts]) if len(starts) else np.empty((0, 40), np.int64)
        np.testing.assert_array_equal(stream.read_many(starts, 40), expect)
    with pytest.raises(IndexError, match="token ranges outside the stream"):
        stream.read_many(np.array([n - 39]), 40)
    with pytest.raises(IndexError, match="token ranges outside the stream"):
        stream.read_many(np.array([-1]), 40)


def test_token_dtype_rule():
    assert token_dtype_for(65536) == "uint16" and token_dtype_for(65537) == "uint32"
    assert token_dtype_for(512, "uint32") == "uint32" and token_dtype_for(65536, "uint16") == "uint16"
    with pytest.raises(DataError, match=r"vocab_size=65537 does not fit dtype uint16: expected vocab_size <= 65536"):
        token_dtype_for(65537, "uint16")
    with pytest.raises(DataError, match="dtype='int8': expected auto, uint16 or uint32"):
        token_dtype_for(512, "int8")


def test_a_directory_without_a_held_out_set_has_none(prepared):
    assert open_validation(str(prepared), read_manifest(str(prepared))) is None
