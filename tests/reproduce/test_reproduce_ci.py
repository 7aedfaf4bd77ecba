"""`sparse-dc reproduce --scale ci --nproc 2` end to end: built-in corpus, 2-rank DeepSpeed runs, fit, report;
then a re-run that trains only the run missing from the ledger."""
import json
import os

import pytest

from sparse_dc.cli import main as cli_main
from sparse_dc.reproduce.scales import get_scale

FIGURES = ("saturation.png", "loss_vs_density.png", "pred_vs_obs.png", "optimal_density.png")


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.slow
def test_ci_grid_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # torchrun's /tmp/torchelastic_* folders
    out = tmp_path / "out"
    args = ["reproduce", "--scale", "ci", "--out", str(out), "--nproc", "2"]
    assert cli_main(args) == 0
    scale = get_scale("ci")
    rows = _rows(out / "ledger.jsonl")
    names = {f"{s}-d{d:g}-e{e:g}" for s in scale.sizes for d in scale.densities for e in scale.epochs}
    assert {r["name"] for r in rows} == names and len(rows) == scale.n_runs
    assert all(r["world_size"] == 2 and r["val_loss"] > 0 for r in rows)
    assert {r["unique_tokens"] for r in rows} == {scale.unique_tokens}
    report = (out / "report" / "report.md").read_text()
    for section in ("## What was run", "## Fit", "**Held out**", "**1. ", "**2. ", "**3. ", "## Figures"):
        assert section in report
    for name in FIGURES:
        assert (out / "report" / name).stat().st_size > 1000 and f"({name})" in report
    analysis = json.loads((out / "report" / "analysis.json").read_text())
    assert analysis["holdout"]["n_test"] == len(scale.densities) * len(scale.epochs)
    assert len(analysis["fit"]["bootstrap"]) == scale.bootstrap

    # drop one finished run from the ledger (and its run folder): the re-run trains it and skips the rest
    dropped = rows[-1]["name"]
    with open(out / "ledger.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows[:-1])
    capsys.readouterr()
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert f"{scale.n_runs} runs: 1 done, {scale.n_runs - 1} skipped" in printed
    again = _rows(out / "ledger.jsonl")
    assert again[:-1] == rows[:-1] and again[-1]["name"] == dropped  # old rows untouched, one new row
    assert os.path.getsize(out / "report" / "report.md") > 0
