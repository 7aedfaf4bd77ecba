"""Session fixtures: a small prepared corpus, and finished 2-rank ZeRO runs shared by several tests."""
import itertools
import json
from pathlib import Path

import pytest

from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.prepare import PrepareConfig, prepare
from train_harness import Run, check_ok, run_train, write_config


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


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory, prepared_data):
    """zero_run(stage, sparsity) -> the finished 2-rank Run (cached: the resume test reuses one as reference)."""
    cache = {}

    def get(stage: int, sparsity: str) -> Run:
        if (stage, sparsity) not in cache:
            tmp = tmp_path_factory.mktemp(f"zero{stage}_{sparsity}")
            config = write_config(tmp, prepared_data, f"z{stage}-{sparsity}", sparsity, stage)
            run = run_train(tmp, config, launcher="slurm")
            check_ok(run)
            cache[stage, sparsity] = (run, config, tmp)
        return cache[stage, sparsity][0]

    get.cache = cache
    return get
