"""`sparse-dc law downstream`: downstream accuracy (the ledger's `downstream` scores) against validation loss."""
import json

from sparse_dc.cli import main
from sparse_dc.scaling.plots import downstream_points


def ledger_rows(train_runs):
    rows = train_runs.to_rows()[:5]
    for i, row in enumerate(rows[:3]):  # three scored runs; arc_easy on all three, piqa on the first two
        row["downstream"] = {"arc_easy": {"acc": {"value": 0.3 + 0.1 * i, "stderr": 0.02},
                                          "acc_norm": {"value": 0.35, "stderr": None}}}
        if i < 2:
            row["downstream"]["piqa"] = {"acc": {"value": 0.55 + 0.01 * i, "stderr": 0.01}}
    return rows


def test_points_pair_each_scored_run_with_its_loss(train_runs):
    rows = ledger_rows(train_runs)
    points = downstream_points(rows)
    assert list(points) == ["arc_easy", "piqa"]
    assert points["arc_easy"] == [(r["name"], r["val_loss"], 0.3 + 0.1 * i, 0.02, r["density"])
                                  for i, r in enumerate(rows[:3])]
    assert [p[2] for p in points["piqa"]] == [0.55, 0.56]
    assert [p[3] for p in downstream_points(rows, metric="acc_norm")["arc_easy"]] == [None] * 3
    assert downstream_points(rows, loss="val_loss_paper") == {}  # runs without that loss are left out


def test_cli_writes_the_figure_and_refuses_a_ledger_without_scores(tmp_path, capsys, train_runs):
    ledger, png = tmp_path / "ledger.jsonl", tmp_path / "downstream.png"
    rows = ledger_rows(train_runs)
    ledger.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["law", "downstream", str(ledger), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"{rows[0]['name']} val_loss {rows[0]['val_loss']:.4f} acc 0.3000" in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "downstream"}) + "\n" for r in rows))
    assert main(["law", "downstream", str(bare), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no run has downstream acc scores" in err and err.count("\n") == 1 and not (tmp_path / "x.png").exists()
