"""Session fixtures: a small prepared corpus, and finished 2-rank ZeRO runs shared by several tests."""
from pathlib import Path

import pytest

from train_harness import Run, check_ok, prepare_corpus, run_train, write_config


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """~150K tokens of built-in documents, vocab 512."""
    return prepare_corpus(tmp_path_factory.mktemp("train_data"))


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
