"""The reproduce report shows downstream scores (joined to ledger rows by `sparse-dc eval`) when runs have them."""
import json

from sparse_dc.reproduce.report import _downstream, write_report
from sparse_dc.reproduce.scales import get_scale


def test_report_has_a_downstream_section_only_when_runs_were_scored(tmp_path, synthetic):
    scale = get_scale("tiny")
    path = tmp_path / "ledger.jsonl"
    names = synthetic(path, scale)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert _downstream(rows, str(tmp_path / "plain")) == [] and not (tmp_path / "plain").exists()
    rows[0]["downstream"] = {"arc_easy": {"acc": {"value": 0.41, "stderr": 0.012}},
                             "piqa": {"acc": {"value": 0.55, "stderr": None}}}
    rows[1]["downstream"] = {"arc_easy": {"acc": {"value": 0.38, "stderr": 0.011}}}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = open(write_report(scale, str(path), names, str(tmp_path / "scored"), 0)).read()
    assert "## Downstream accuracy" in text and f"2 of {len(names)} runs scored" in text
    assert "| run | val loss | arc_easy | piqa |" in text
    assert f"| {rows[0]['name']} | {rows[0]['val_loss']:.4f} | 0.410 ± 0.012 | 0.550 |" in text
    assert f"| {rows[1]['name']} | {rows[1]['val_loss']:.4f} | 0.380 ± 0.011 | - |" in text
    assert "![downstream](downstream.png)" in text and (tmp_path / "scored" / "downstream.png").stat().st_size > 1000
