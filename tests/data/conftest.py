"""A small real corpus (built-in documents written as JSONL), prepared once per test session.

SPARSE_DC_TEST_PREPARED=<dir> keeps the prepared corpus in <dir> and reuses it in later sessions (it is prepared
there the first time): for runs that start the same tests many times over, as mutation testing does, where
preparing it (training the tokenizer) would otherwise cost seconds per run. The tests only read it, or copy it
before damaging it."""
import itertools
import json
import os
from pathlib import Path

import pytest

from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.prepare import PrepareConfig, prepare


KEEP = os.environ.get("SPARSE_DC_TEST_PREPARED")


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory):
    path = Path(KEEP) / "docs.jsonl" if KEEP else tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for doc in itertools.islice(builtin_documents(), 700):
                fh.write(json.dumps({"text": doc}) + "\n")
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_jsonl):
    """A prepared directory with several shards (~160K tokens, vocab 512)."""
    out = Path(KEEP) / "data" if KEEP else tmp_path_factory.mktemp("prepared") / "data"
    if not (out / "manifest.json").exists():  # prepare writes a temporary directory, then renames it
        prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(out), vocab_size=512, shard_tokens=40_000,
                              workers=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 2
    return out
