"""`data prepare`: input formats, shard format, atomic output, corruption detection, and the CLI end to end."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_dc.data.prepare import PrepareConfig, prepare
from sparse_dc.data.shards import open_stream, read_manifest
from sparse_dc.data.sources import DataError
from sparse_dc.data.tokenizer import processor_from_bytes


def test_shards_are_documents_joined_by_eos(prepared, corpus_jsonl):
    manifest = read_manifest(str(prepared))
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 512
    stream = open_stream(str(prepared))
    eos = stream.eos_id
    tokens = np.concatenate(stream.pieces)
    assert tokens.dtype == np.uint16 and len(tokens) == manifest["total_tokens"]
    assert (tokens == eos).sum() == manifest["total_documents"] == len(stream.doc_ends)
    assert np.all(tokens[stream.doc_ends - 1] == eos)
    # the text round-trips through the tokenizer exactly (identity normalization): indentation and newlines of
    # the docstrings survive, so each stored document decodes to one of the input documents
    proto = open(os.path.join(prepared, "tokenizer.model"), "rb").read()
    sp = processor_from_bytes(proto)
    inputs = {json.loads(line)["text"] for line in open(corpus_jsonl, encoding="utf-8")}
    starts = np.concatenate([[0], stream.doc_ends[:-1]])
    decoded = [sp.decode(tokens[a:b - 1].tolist()) for a, b in zip(starts[:50], stream.doc_ends[:50])]
    assert any("\n    " in d for d in decoded)
    assert all(d in inputs for d in decoded)


def test_same_seed_same_bytes_other_seed_other_order(tmp_path, corpus_jsonl, prepared):
    tok = os.path.join(prepared, "tokenizer.model")
    a = prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "a"), tokenizer=tok,
                              shard_tokens=40_000))
    b = prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "b"), tokenizer=tok, seed=1,
                              shard_tokens=40_000))
    ref = read_manifest(str(prepared))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert a["total_tokens"] == b["total_tokens"] and a["shards"][0]["sha256"] != b["shards"][0]["sha256"]


def test_all_input_formats(tmp_path, prepared):
    import datasets

    docs = ["The quick brown fox jumps over the lazy dog. " * 3, "A second document about tokenizers.",
            "Third: sparse training delays diminishing returns."]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(docs))
    with open(tmp_path / "in" / "b.jsonl", "w") as fh:
        fh.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    pq.write_table(pa.table({"body": docs}), tmp_path / "in" / "c.parquet")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "in" / "hf"))
    manifest = prepare(PrepareConfig(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"),
                                     tokenizer=os.path.join(prepared, "tokenizer.model"), text_field="body",
                                     doc_boundary="blankline"))
    assert manifest["total_documents"] == 4 * len(docs)
    assert len(manifest["sources"]) == 4


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path, prepared):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(PrepareConfig(inputs=[str(bad)], out=str(out), vocab_size=300))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("out")]
    with pytest.raises(DataError, match="does not exist"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "missing.txt")], out=str(out)))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(PrepareConfig(inputs=[str(empty)], out=str(out),
                              tokenizer=os.path.join(prepared, "tokenizer.model")))
    with pytest.raises(DataError, match="already exists"):
        prepare(PrepareConfig(inputs=[str(empty)], out=str(prepared)))
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        prepare(PrepareConfig(inputs=[str(empty)], out=str(out), tokenizer=str(bad)))
    assert not out.exists()


def test_vocab_too_large_for_uint16(tmp_path, prepared):
    from sparse_dc.data.shards import token_dtype_for

    assert token_dtype_for(70_000) == "uint32" and token_dtype_for(65_536) == "uint16"
    with pytest.raises(DataError, match="vocab_size=70000 does not fit dtype uint16"):
        token_dtype_for(70_000, "uint16")


@pytest.fixture
def copy_of(prepared, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(prepared, target)
    return target


def test_corrupt_shard_detected(copy_of):
    shard = copy_of / "shard_00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="fails its sha256 check"):
        open_stream(str(copy_of))


def test_truncated_shard_detected(copy_of):
    shard = copy_of / "shard_00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated or replaced"):
        open_stream(str(copy_of), verify="size")


def test_shard_length_disagreeing_with_manifest(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["shards"][0]["tokens"] += 1
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest says"):
        open_stream(str(copy_of), verify="size")


def test_foreign_tokenizer_rejected(copy_of, tmp_path):
    other = tmp_path / "other.model"
    other.write_bytes((copy_of / "tokenizer.model").read_bytes() + b"x")
    with pytest.raises(DataError, match="is not the one"):
        open_stream(str(copy_of), tokenizer_path=str(other))
    (copy_of / "tokenizer.model").write_bytes(other.read_bytes())
    with pytest.raises(DataError, match="not the manifest's tokenizer"):
        open_stream(str(copy_of))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparse_dc.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_cli_end_to_end_on_builtin_corpus(tmp_path):
    out = tmp_path / "builtin"
    run = _cli("data", "prepare", "--builtin", "--out", str(out), "--vocab-size", "2048")
    assert run.returncode == 0, run.stderr
    assert "documents" in run.stdout and (out / "manifest.json").exists()
    manifest = read_manifest(str(out))
    assert manifest["total_documents"] > 3000 and manifest["total_tokens"] > 300_000
    run = _cli("data", "inspect", str(out), "--unique-tokens", "100K", "--seq-len", "256", "--epochs", "3.5",
               "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["unique_tokens"] == 100_000 and report["unique_sequences"] == 390
    assert report["total_tokens"] == round(3.5 * 390) * 256 and (report["min_repeats"], report["max_repeats"]) == (3, 4)
    # bad input: one line on stderr, exit code 2
    run = _cli("data", "inspect", str(out), "--unique-tokens", "5B", "--epochs", "1")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "unique_tokens=5000000000 exceeds" in run.stderr
    run = _cli("data", "prepare", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert run.returncode == 2 and "does not exist" in run.stderr and not (tmp_path / "x").exists()


def test_held_out_validation_set_from_other_files(tmp_path, corpus_jsonl, prepared):
    """`--val-input`: a validation set from another file, its first --val-tokens tokens, used by the loader instead
    of a prefix of the corpus (whose pool then starts at token 0)."""
    import sentencepiece as spm

    from sparse_dc.data.config import DataConfig
    from sparse_dc.data.loader import TokenBudget
    from sparse_dc.data.shards import open_validation

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(f"Validation paragraph {i}: sparse weights, dense data, repeated epochs."
                                    for i in range(200)))
    tok = os.path.join(prepared, "tokenizer.model")
    manifest = prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "d"), tokenizer=tok,
                                     shard_tokens=40_000, val_inputs=[str(held_out)], doc_boundary="blankline",
                                     val_tokens=2_000))
    ref = read_manifest(str(prepared))
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in ref["shards"]]  # training unchanged
    entry = manifest["validation"]
    assert entry["tokens"] == 2_000 and entry["description"] == "files held_out.txt"
    assert entry["source"]["files"] == [str(held_out)] and entry["last_document_truncated"]
    sp = spm.SentencePieceProcessor(model_file=tok)
    expect = np.concatenate([sp.encode(p.strip()) + [sp.eos_id()] for p in held_out.read_text().split("\n\n")])
    stream = open_stream(str(tmp_path / "d"))
    validation = open_validation(str(tmp_path / "d"), stream.manifest)
    np.testing.assert_array_equal(np.concatenate(validation.pieces), expect[:2_000])
    budget = TokenBudget.from_config(DataConfig(dir=str(tmp_path / "d"), unique_tokens=10_000, seq_len=64,
                                                epochs=1.0, val_tokens=1_280))
    assert (budget.plan.val_source, budget.plan.train_start) == ("heldout", 0)
    np.testing.assert_array_equal(budget.validation_batch(np.arange(20)).reshape(-1), expect[:1_280])
    # the old layout where no held-out set was prepared: validation is the corpus prefix
    old = TokenBudget.from_config(DataConfig(dir=str(prepared), unique_tokens=10_000, seq_len=64, epochs=1.0,
                                             val_tokens=1_280))
    assert old.plan.val_source == "prefix" and old.plan.train_start >= 1_280
    # a held-out source smaller than asked, or one of the training inputs: one clear error, nothing written
    with pytest.raises(DataError, match=r"holds \d+ tokens: expected at least --val-tokens 100000"):
        prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "x"), tokenizer=tok,
                              val_inputs=[str(held_out)], val_tokens=100_000))
    with pytest.raises(DataError, match="is also a training input"):
        prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(tmp_path / "x"), tokenizer=tok,
                              val_inputs=[str(corpus_jsonl)]))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("x")]
