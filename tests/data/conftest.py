"""A small real corpus (built-in documents written as JSONL), prepared once per test session."""
import itertools
import json

import pytest

from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for doc in itertools.islice(builtin_documents(), 700):
            fh.write(json.dumps({"text": doc}) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_jsonl):
    """A prepared directory with two shards (~60K tokens, vocab 512)."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    manifest = prepare(PrepareConfig(inputs=[str(corpus_jsonl)], out=str(out), vocab_size=512,
                                     shard_tokens=40_000, workers=2))
    assert len(manifest["shards"]) >= 2
    return out
