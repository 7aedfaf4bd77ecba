"""Bad data input is one line naming the file and what was expected: damaged manifests, non-UTF-8 inputs, inputs
with no usable text; rows dropped for lack of a string text field are counted and reported, never silently."""
import json
import os
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_dc.data.prepare import PrepareConfig, describe_skipped, prepare
from sparse_dc.data.shards import open_stream
from sparse_dc.data.sources import DataError


def test_rows_whose_text_is_not_a_string_are_counted(tmp_path, prepared):
    rows = [{"text": f"document number {i} about sparse training"} if i % 2 else {"text": i} for i in range(200)]
    rows[0]["text"] = None
    rows[2]["text"] = "   "
    with open(tmp_path / "mixed.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.table({"text": ["a parquet document", None]}), tmp_path / "more.parquet")
    manifest = prepare(PrepareConfig(inputs=[str(tmp_path / "mixed.jsonl"), str(tmp_path / "more.parquet")],
                                     out=str(tmp_path / "out"), tokenizer=os.path.join(prepared, "tokenizer.model")))
    assert manifest["total_documents"] == 101
    assert manifest["skipped_rows"] == {"'text' is int, not a string": 98, "'text' is null, not a string": 2,
                                        "'text' is blank": 1}
    assert describe_skipped(Counter(manifest["skipped_rows"])).startswith("101 rows: 98 'text' is int")


def test_input_without_text_fails_before_tokenizer_training(tmp_path):
    (tmp_path / "ints.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match=r"contain no non-empty documents \(skipped 3 rows: 3 'text' is int, not a "
                                        r"string\)$"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "ints.jsonl")], out=str(tmp_path / "out"), vocab_size=300))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_non_utf8_jsonl_input(tmp_path, prepared):
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl is not UTF-8 text \(undecodable bytes after line 0\)"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "latin1.jsonl")], out=str(tmp_path / "out"),
                              tokenizer=os.path.join(prepared, "tokenizer.model")))


def _drop(path):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return m
    return edit


FIELDS = [("tokenizer",), ("dtype",), ("total_tokens",), ("total_documents",), ("shards",), ("tokenizer", "file"),
          ("tokenizer", "sha256"), ("tokenizer", "vocab_size"), ("tokenizer", "eos_id"), ("shards", 0, "file"),
          ("shards", 0, "bytes"), ("shards", 0, "sha256"), ("shards", 0, "tokens"), ("shards", 0, "documents")]


@pytest.mark.parametrize("edit, message", [
    *[(_drop(f), "corrupt manifest (no " + ".".join(str(k) for k in f).replace(".0.", "[0].") + ")") for f in FIELDS],
    (lambda m: [], "corrupt manifest (a JSON array): expected an object"),
    (lambda m: None, "corrupt manifest (a JSON null): expected an object"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "bytes": str(m["shards"][0]["bytes"])}, *m["shards"][1:]]},
     "corrupt manifest (shards[0].bytes='"),
    (lambda m: {**m, "dtype": "int8"}, "dtype='int8', expected one of uint16, uint32"),
    (lambda m: {**m, "tokenizer": "spm"}, "corrupt manifest (tokenizer='spm'): expected a JSON object"),
    (lambda m: {**m, "shards": [7]}, "corrupt manifest (shards[0] is a JSON number): expected an object"),
])
def test_damaged_manifest_is_one_line(tmp_path, prepared, edit, message):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(DataError) as info:
        open_stream(str(data), verify="size")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_non_utf8_manifest(tmp_path, prepared):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (data / "manifest.json").write_bytes(b'{"format": "caf\xe9"}')
    with pytest.raises(DataError, match=r"corrupt manifest \(not UTF-8 text, byte 15\)"):
        open_stream(str(data))
