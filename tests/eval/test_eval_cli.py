"""`sparse-dc eval` from the command line: scores join the run's ledger row in place (re-evaluation replaces, never
duplicates), two ranks over gloo split the requests and give the single-process scores, and every bad input is
one error line."""
import json
import subprocess
import sys

import pytest

from eval_tasks import ITEMS, TASK
from sparse_dc.cli import main as sparse_dc_main
from sparse_dc.eval.config import EvalConfig
from sparse_dc.eval.run import evaluate
from sparse_dc.train.ledger import read_ledger
from train_harness import train_env

pytestmark = pytest.mark.slow


def eval_cli(capsys, *args):
    code = sparse_dc_main(["eval", *map(str, args)])
    return code, capsys.readouterr()


def test_scores_join_the_ledger_row_in_place(eval_run, exported, tasks_dir, tmp_path, capsys):
    ledger = eval_run.dir.parent.parent / "ledger.jsonl"  # the run's own train.ledger
    before = read_ledger(str(ledger))
    out = tmp_path / "a.json"
    code, io = eval_cli(capsys, "--checkpoint", eval_run.dir, "--tasks", TASK, "--include-path", tasks_dir,
                        "--out", out)
    assert code == 0, io.err[-2000:]
    assert f"scores joined to run 'ev' in {ledger}" in io.out and f"{TASK:<24} acc " in io.out
    first = json.loads(out.read_text())["scores"]
    assert json.loads(out.read_text())["model"] == "native"
    assert "Building contexts for sdc_mc" in (tmp_path / "eval.log").read_text()  # the harness's log, beside --out
    # again, on the run's export (which names its run) and with a group: the row is updated in place, the first
    # task's scores replaced by equal ones, and the group kept as its aggregate (not its member tasks)
    code, io = eval_cli(capsys, "--checkpoint", exported, "--tasks", f"{TASK},sdc_group",
                        "--include-path", tasks_dir, "--out", tmp_path / "b.json")
    assert code == 0, io.err[-2000:]
    after = read_ledger(str(ledger))
    assert len(after) == len(before) == 1
    row = after[0]
    assert row["downstream"][TASK] == first[TASK] and set(row["downstream"]) == {TASK, "sdc_group"}
    assert row["downstream"]["sdc_group"]["acc"]["value"] == pytest.approx(first[TASK]["acc"]["value"])
    assert row["downstream_meta"][TASK]["n"] == row["downstream_meta"]["sdc_group"]["n"] == len(ITEMS)
    assert row["downstream_meta"][TASK]["model"] == "hf" and row["downstream_meta"][TASK]["step"] == row["steps"]
    assert {k: v for k, v in row.items() if not k.startswith("downstream")} == before[0]


def test_two_ranks_split_the_requests_and_match_one(eval_run, tasks_dir, tmp_path):
    out = tmp_path / "dp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "sparse_dc.cli", "eval", "--checkpoint", str(eval_run.dir), "--tasks", TASK, "--include-path",
           str(tasks_dir), "--out", str(out), "--no-ledger", "--log-samples", "--batch-size", "2"]
    proc = subprocess.run(cmd, env=train_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = evaluate(EvalConfig(checkpoint=str(eval_run.dir), tasks=[TASK], include_path=str(tasks_dir),
                              update_ledger=False, log_samples=True, out=str(tmp_path / "one.json")))
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert two["scores"] == one["scores"] and two["meta"][TASK]["n"] == len(ITEMS)
    by_doc = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in two["samples"][TASK]}
    assert sorted(by_doc) == list(range(len(ITEMS)))  # rank 0 gathered both ranks' documents
    for s in one["samples"][TASK]:
        assert by_doc[s["doc_id"]] == pytest.approx([ll for ll, _ in s["filtered_resps"]], rel=1e-5)


def _ledger_copy(eval_run, tmp_path, **change):
    (row,) = read_ledger(str(eval_run.dir.parent.parent / "ledger.jsonl"))
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps({**row, **change}) + "\n")
    return path


@pytest.mark.parametrize("case", ["unknown task", "unreadable data", "data not here", "not a run", "generative",
                                  "ledger without the run", "not the final step"])
def test_bad_input_is_one_error_line(case, eval_run, tasks_dir, tmp_path, capsys):
    args, expected = {
        "unknown task": (["--tasks", "sdc_mcq"], "--tasks sdc_mcq: no such lm-eval task, group or tag; did you "
                                                 "mean sdc_mc"),
        "unreadable data": (["--tasks", "sdc_broken"], "task sdc_broken: its data could not be read "
                                                       "(DatasetGenerationError"),
        "data not here": (["--tasks", "boolq"], "task boolq: its data is not on this machine and sparse-dc eval "
                                                "does not download"),  # one of the paper's tasks, offline
        "not a run": (["--checkpoint", tmp_path], "expected a run folder (or its checkpoints/ or a step_* folder)"),
        "generative": (["--tasks", "sdc_generate"], "--tasks sdc_generate: these generate text"),
        "ledger without the run": (["--ledger", tmp_path / "ledger.jsonl"], "has no row of run 'ev'"),
        "not the final step": (["--ledger", tmp_path / "ledger.jsonl"],
                               "checkpoint step 25 is not the final step 99 of run 'ev'"),
    }[case]
    after_evaluating = case in ("ledger without the run", "not the final step")
    if after_evaluating:
        _ledger_copy(eval_run, tmp_path, **({"name": "other"} if case.startswith("ledger") else {"steps": 99}))
    base = {"--checkpoint": eval_run.dir, "--tasks": TASK, "--include-path": tasks_dir, "--out": tmp_path / "r.json"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, io = eval_cli(capsys, *[x for item in base.items() for x in item])
    last = io.err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("sparse-dc eval: error: ") and expected in last, io.err[-2000:]
    if case == "data not here":
        assert "--include-path DIR" in last  # says how to point the task at local data
    if after_evaluating:  # the results are kept
        assert f"scores not joined to the ledger (they are in {tmp_path / 'r.json'})" in last
        assert json.loads((tmp_path / "r.json").read_text())["scores"][TASK]
    else:
        assert not (tmp_path / "r.json").exists()  # refused before anything was written
