"""Session fixtures: a small finished block-sparse run (one process) with its ledger row, its HF export, and a
folder of custom lm-eval tasks on local JSON written here (multiple-choice tasks, a group, broken ones)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from train_harness import check_ok, prepare_corpus, run_train, write_config  # noqa: E402

from eval_tasks import ITEMS, TASK, task_yaml  # noqa: E402


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_tasks")
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in ITEMS))
    lines = items.read_text().splitlines(keepends=True)
    (root / "first3.jsonl").write_text("".join(lines[:3]))
    (root / "last5.jsonl").write_text("".join(lines[3:]))
    (root / "broken.jsonl").write_text('{"question": "a", "choices": ["x"\n')
    folder = root / "tasks"
    folder.mkdir()
    for name, data, kind in ((TASK, items, "multiple_choice"),
                             ("sdc_mc_first3", root / "first3.jsonl", "multiple_choice"),
                             ("sdc_mc_last5", root / "last5.jsonl", "multiple_choice"),
                             ("sdc_broken", root / "broken.jsonl", "multiple_choice"),
                             ("sdc_generate", items, "generate_until")):
        (folder / f"{name}.yaml").write_text(task_yaml(name, data, kind))
    # a group of two tasks that together hold TASK's items: its size-weighted accuracy is TASK's
    (folder / "sdc_group.yaml").write_text("group: sdc_group\ntask: [sdc_mc_first3, sdc_mc_last5]\n"
                                           "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    return folder


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """The datasets cache in the test's tmp folder, never the user's (json datasets are cached there too)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory):
    """A finished single-process block-sparse SET run (ZeRO 2, 25 steps) and its ledger row."""
    tmp = tmp_path_factory.mktemp("eval_run")
    data = prepare_corpus(tmp, n_docs=300)
    run = run_train(tmp, write_config(tmp, data, "ev", "block"), nproc=1)
    check_ok(run)
    return run


@pytest.fixture(scope="session")
def exported(eval_run, tmp_path_factory) -> Path:
    from sparse_dc.train.export import export

    return Path(export(str(eval_run.dir), str(tmp_path_factory.mktemp("eval_export") / "hf")))
