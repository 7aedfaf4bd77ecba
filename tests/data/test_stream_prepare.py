"""`data prepare --hf-dataset`: the streaming path, run on local files through the very same
`datasets` streaming code (`json` + data files, a local parquet folder with two splits). No network: the oracle
is sentencepiece applied to the documents read straight from the files."""
import itertools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from sparse_dc.data.config import DataConfig
from sparse_dc.data.loader import TokenBudget
from sparse_dc.data.prepare import PrepareConfig
from sparse_dc.data.shards import open_stream, open_validation, read_manifest
from sparse_dc.data.sources import DataError
from sparse_dc.data.stream_prepare import prepare_stream
from sparse_dc.data.writer import ShardWriter


@pytest.fixture(scope="session")
def documents(corpus_jsonl):
    return [json.loads(line)["text"] for line in open(corpus_jsonl, encoding="utf-8")]


@pytest.fixture(scope="session")
def jsonl_files(tmp_path_factory, documents):
    """The 700 documents in three JSONL files (400, 200, 100 documents), in this order."""
    root = tmp_path_factory.mktemp("stream_json")
    for name, part in (("a", documents[:400]), ("b", documents[400:600]), ("c", documents[600:])):
        with open(root / f"part-{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(part))
    return root


@pytest.fixture(scope="session")
def parquet_folder(tmp_path_factory, documents):
    """A local dataset folder: train = documents[:600] in two files, validation = documents[600:]."""
    root = tmp_path_factory.mktemp("stream_parquet") / "corpus"
    root.mkdir()
    pq.write_table(pa.table({"text": documents[:300]}), root / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": documents[300:600]}), root / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": documents[600:]}), root / "validation-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="session")
def tokenizer(prepared):
    return str(prepared / "tokenizer.model")


def oracle_tokens(tokenizer, docs):
    """sentencepiece ids of `docs`, each followed by EOS, concatenated -> (tokens, document end offsets)."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ids = [sp.encode(d) + [sp.eos_id()] for d in docs]
    return np.concatenate(ids), np.cumsum([len(x) for x in ids])


def stream_json(jsonl_files, tokenizer, out, max_tokens, **kw):
    cfg = dict(hf_dataset="json", hf_data_files=[str(jsonl_files / "part-*.jsonl")], out=str(out),
               tokenizer=tokenizer, max_tokens=max_tokens, shard_tokens=2_000, workers=2)
    return prepare_stream(PrepareConfig(**{**cfg, **kw}))


def tokens_of(directory):
    return np.concatenate(open_stream(str(directory), verify="size").pieces).astype(np.int64)


def test_exact_budget_reads_only_what_it_needs(tmp_path, jsonl_files, documents, tokenizer):
    budget = 6_001
    manifest = stream_json(jsonl_files, tokenizer, tmp_path / "s", budget)
    expect, ends = oracle_tokens(tokenizer, documents)
    assert budget not in set(ends.tolist())  # the budget cuts a document
    tokens = tokens_of(tmp_path / "s")
    assert manifest["total_tokens"] == len(tokens) == sum(s["tokens"] for s in manifest["shards"]) == budget
    np.testing.assert_array_equal(tokens, expect[:budget])
    used = int(np.searchsorted(ends, budget, side="left")) + 1  # whole documents + the cut one
    assert manifest["total_documents"] == used and manifest["last_document_truncated"]
    np.testing.assert_array_equal(open_stream(str(tmp_path / "s")).doc_ends, np.append(ends[:used - 1], budget))
    assert len(manifest["shards"]) >= 3 and not os.path.exists(f"{tmp_path / 's'}.partial")
    # Stop early: ~70 documents needed, one 256-record read, never the 700 (nor the 2nd and 3rd files).
    stream = manifest["stream"]
    assert used < stream["records_read"] <= 256 < 400
    assert stream["resolved_files"] == [str(jsonl_files / f"part-{n}.jsonl") for n in "abc"]
    assert stream["order"] == "stream order" and stream["revision"] is None
    # a budget that ends exactly at a document boundary keeps that document's EOS
    exact = stream_json(jsonl_files, tokenizer, tmp_path / "b", int(ends[9]))
    assert not exact["last_document_truncated"] and exact["total_documents"] == 10


def test_deterministic_and_nested_with_a_seeded_shuffle_buffer(tmp_path, jsonl_files, tokenizer):
    runs = {name: stream_json(jsonl_files, tokenizer, tmp_path / name, budget, shuffle_buffer=64, seed=seed)
            for name, budget, seed in (("a", 5_000, 1), ("again", 5_000, 1), ("large", 12_000, 1),
                                       ("other_seed", 5_000, 2))}
    sha = {name: [s["sha256"] for s in m["shards"]] for name, m in runs.items()}
    assert sha["a"] == sha["again"]
    small, large = tokens_of(tmp_path / "a"), tokens_of(tmp_path / "large")
    np.testing.assert_array_equal(small, large[:5_000])  # token-exact prefix
    assert not np.array_equal(small, tokens_of(tmp_path / "other_seed"))
    assert runs["a"]["stream"]["order"] == "shuffle buffer 64, seed 1" and runs["a"]["doc_order_seed"] == 1
    # the order is the one `load_dataset(..., streaming=True).shuffle(seed, buffer_size)` gives (as in the paper's
    # official code, which streams C4 through dataset.shuffle(seed=32), buffer 1000)
    import datasets

    reference = datasets.load_dataset("json", data_files=str(jsonl_files / "part-*.jsonl"), split="train",
                                      streaming=True).shuffle(seed=1, buffer_size=64)
    expect, _ = oracle_tokens(tokenizer, [row["text"] for row in itertools.islice(reference, 300)])
    np.testing.assert_array_equal(large, expect[:12_000])
    # the loader's unique pools over the two directories are the same tokens (nested unique budgets)
    pools = [TokenBudget.from_config(DataConfig(dir=str(tmp_path / d), unique_tokens=4_096, seq_len=64, epochs=1.0,
                                                val_tokens=0, verify="size")) for d in ("a", "large")]
    np.testing.assert_array_equal(*(p.read_sequences(np.arange(64)) for p in pools))


def test_parquet_folder_with_a_validation_split(tmp_path, parquet_folder, documents):
    out = tmp_path / "pq"
    manifest = prepare_stream(PrepareConfig(hf_dataset=str(parquet_folder), out=str(out), max_tokens=20_000,
                                            val_split="validation", val_tokens=3_000, vocab_size=400,
                                            tokenizer_docs=150, shard_tokens=8_000, workers=2))
    assert manifest["tokenizer"]["source"] == "trained on the first 150 documents of the stream"
    tokenizer = str(out / "tokenizer.model")
    train, _ = oracle_tokens(tokenizer, documents[:600])
    held_out, _ = oracle_tokens(tokenizer, documents[600:])
    np.testing.assert_array_equal(tokens_of(out), train[:20_000])
    stream = open_stream(str(out))
    validation = open_validation(str(out), stream.manifest)
    assert manifest["validation"]["tokens"] == validation.total_tokens == 3_000
    np.testing.assert_array_equal(np.concatenate(validation.pieces), held_out[:3_000])
    assert manifest["validation"]["source"]["split"] == "validation"
    assert manifest["validation"]["description"] == f"{parquet_folder} split validation"
    # training evaluates on the held-out split, and its pool starts at token 0 of the training stream
    budget = TokenBudget.from_config(DataConfig(dir=str(out), unique_tokens=16_384, seq_len=64, epochs=2.0,
                                                val_tokens=2_560))
    plan = budget.plan
    assert (plan.val_source, plan.train_start, plan.val_tokens) == ("heldout", 0, 2_560)
    assert plan.val_from == manifest["validation"]["description"]
    np.testing.assert_array_equal(budget.read_sequences(np.arange(256)).reshape(-1), train[:16_384])
    np.testing.assert_array_equal(budget.validation_batch(np.arange(budget.validation_sequences())).reshape(-1),
                                  held_out[:2_560])
    with pytest.raises(DataError, match=r"val_tokens=4000 exceeds the held-out validation set \(3000 tokens"):
        TokenBudget.from_config(DataConfig(dir=str(out), unique_tokens=4_096, seq_len=64, epochs=1.0,
                                           val_tokens=4_000))
    # a validation split smaller than asked: one clear error, nothing left behind
    with pytest.raises(DataError, match=r"holds \d+ tokens: expected at least --val-tokens 1000000"):
        prepare_stream(PrepareConfig(hf_dataset=str(parquet_folder), out=str(tmp_path / "x"), max_tokens=2_000,
                                     val_split="validation", val_tokens=1_000_000, tokenizer=tokenizer))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.partial")


@pytest.mark.parametrize("shuffle_buffer", [0, 64])
def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, jsonl_files, tokenizer, monkeypatch, caplog,
                                                       shuffle_buffer):
    reference = stream_json(jsonl_files, tokenizer, tmp_path / "ref", 9_000, shuffle_buffer=shuffle_buffer)
    close_shard = ShardWriter._close_shard
    closed = []

    def interrupt_after_two(self):  # Ctrl-C right after the second shard is finished
        close_shard(self)
        closed.append(self.entries[-1]["file"])
        if len(closed) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "_close_shard", interrupt_after_two)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        stream_json(jsonl_files, tokenizer, out, 9_000, shuffle_buffer=shuffle_buffer)
    monkeypatch.undo()
    partial = tmp_path / "s.partial"
    progress = json.loads((partial / "progress.json").read_text())
    assert not out.exists() and [s["file"] for s in progress["shards"]] == closed
    # other settings: refused, the folder is kept
    with pytest.raises(DataError, match=r"other settings \(shard_tokens: 2000 -> 3000\)"):
        stream_json(jsonl_files, tokenizer, out, 9_000, shard_tokens=3_000, shuffle_buffer=shuffle_buffer)
    caplog.set_level("INFO")
    resumed = stream_json(jsonl_files, tokenizer, out, 9_000, shuffle_buffer=shuffle_buffer)
    assert f"skipping {progress['records_consumed']} records" in caplog.text
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert not partial.exists() and sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))


def test_interrupted_before_a_finished_shard_leaves_nothing(tmp_path, jsonl_files, tokenizer, monkeypatch):
    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        stream_json(jsonl_files, tokenizer, tmp_path / "s", 9_000)
    assert os.listdir(tmp_path) == []


def test_bad_stream_settings_are_one_line_errors(tmp_path, jsonl_files, parquet_folder, tokenizer):
    with pytest.raises(DataError, match=r"no field 'body'; fields are \['id', 'text'\]"):
        stream_json(jsonl_files, tokenizer, tmp_path / "s", 1_000, text_field="body")
    with pytest.raises(DataError, match=r"split 'test': Bad split: test. Available splits: \['train', 'validation'\]"):
        prepare_stream(PrepareConfig(hf_dataset=str(parquet_folder), hf_split="test", out=str(tmp_path / "s"),
                                     max_tokens=1_000, tokenizer=tokenizer))
    with pytest.raises(DataError, match=r"ends after \d+ tokens: expected at least --max-tokens 10000000"):
        stream_json(jsonl_files, tokenizer, tmp_path / "s", 10_000_000)
    assert os.listdir(tmp_path) == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cli_progress_and_unreachable_hub(tmp_path, jsonl_files, tokenizer):
    cli = [sys.executable, "-m", "sparse_dc.cli", "data", "prepare"]
    run = subprocess.run([*cli, "--hf-dataset", "json", "--hf-data-files", str(jsonl_files / "part-a.jsonl"),
                          "--tokenizer", tokenizer, "--max-tokens", "5K", "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "5000 tokens" in run.stdout and "streaming json" in run.stderr and "/5.00k" in run.stderr
    # a hub that cannot be reached (connection refused): one line saying so and how to use local files
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    run = subprocess.run([*cli, "--hf-dataset", "allenai/c4", "--hf-config", "en", "--max-tokens", "2.6B",
                          "--out", str(tmp_path / "c4")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "cannot reach the Hugging Face hub" in run.stderr and "--hf-data-files" in run.stderr
    assert not any(p.startswith("c4") for p in os.listdir(tmp_path))


@pytest.mark.parametrize("fields, message", [
    (dict(hf_dataset="json"), "max_tokens=None: expected an integer >= 1 with --hf-dataset"),
    (dict(inputs=["a.txt"], max_tokens=5), "max_tokens=5: expected only with --hf-dataset"),
    (dict(inputs=["a.txt"], hf_dataset="json", max_tokens=5), "expected one of --input, --builtin and --hf-dataset"),
    (dict(hf_dataset="json", max_tokens=5, val_split="validation"),
     "val_tokens=None: expected a token count for the 'validation' split"),
    (dict(inputs=["a.txt"], val_tokens=5), "val_tokens=5: expected a validation source too"),
    (dict(inputs=["a.txt"], val_split="validation"), "val_split='validation': expected --hf-dataset"),
    (dict(hf_dataset="json", max_tokens=5, shuffle_buffer=-1), "shuffle_buffer=-1: expected an integer >= 0"),
])
def test_prepare_config_errors_name_the_field(fields, message):
    from sparse_dc.config.base import ConfigError

    with pytest.raises(ConfigError, match=message):
        PrepareConfig(out="x", **fields).validate()
