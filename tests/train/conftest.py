"""Session fixture: a small prepared corpus for the training tests."""
import itertools
import json
from pathlib import Path

import pytest

from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """~150K tokens of built-in documents, vocab 512."""
    root = tmp_path_factory.mktemp("train_data")
    docs = root / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as fh:
        for doc in itertools.islice(builtin_documents(), 700):
            fh.write(json.dumps({"text": doc}) + "\n")
    prepare(PrepareConfig(inputs=[str(docs)], out=str(root / "data"), vocab_size=512, shard_tokens=40_000,
                          workers=2))
    return root / "data"
