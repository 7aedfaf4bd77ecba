"""`train.wandb` in offline mode (no network), on a directory with a held-out validation set: the W&B run files
hold the steps of metrics.jsonl, the resolved config and the ledger row as summary, and a resumed run continues the
same W&B run. The ledger row says which validation set val_loss was measured on."""
import glob
import itertools
import json

import pytest
import yaml

from sparse_dc.data.corpus import builtin_documents
from sparse_dc.data.prepare import PrepareConfig, prepare
from train_harness import check_ok, run_train, write_config
from wandb_file import read_run

pytest.importorskip("wandb")


@pytest.mark.slow
def test_wandb_offline_logs_the_run_and_a_resume_continues_it(prepared_data, tmp_path):
    held_out = tmp_path / "val.jsonl"
    with open(held_out, "w", encoding="utf-8") as fh:  # documents after the 700 the training corpus holds
        fh.writelines(json.dumps({"text": d}) + "\n" for d in itertools.islice(builtin_documents(), 700, 900))
    data = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(prepared_data.parent / "docs.jsonl")], out=str(data),
                          tokenizer=str(prepared_data / "tokenizer.model"), shard_tokens=40_000,
                          val_inputs=[str(held_out)], val_tokens=4_096))
    config = write_config(tmp_path, data, "wb", "block", 1, stop_at_step=10,
                          wandb={"mode": "offline", "project": "sparse-dc-tests"})
    first = run_train(tmp_path, config, 1)
    check_ok(first)
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["stop_at_step"] = None  # not part of the resume fingerprint: continue to the end
    config.write_text(yaml.safe_dump(cfg))
    run = run_train(tmp_path, config, 1, "--resume", "auto")
    check_ok(run)

    run_id = json.loads((run.dir / "wandb_run.json").read_text())["id"]
    files = sorted(glob.glob(str(run.dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2  # one W&B run, written by two processes (the second resumed it)
    parts = [read_run(f) for f in files]
    assert {p["id"] for p in parts} == {run_id}
    logged = {h["step"]: h["train/loss"] for p in parts for h in p["history"] if "train/loss" in h}
    assert sorted(logged) == list(range(1, 26))  # the first process to step 10, the resumed one 11..25
    assert logged == pytest.approx(run.losses(), rel=1e-12, abs=0)
    evals = {h["step"]: h["eval/val_loss"] for p in parts for h in p["history"] if "eval/val_loss" in h}
    assert evals == {r["step"]: pytest.approx(r["val_loss"]) for r in run.records if r["kind"] == "eval"}
    config_logged = parts[-1]["config"]
    assert config_logged["name"] == "wb" and config_logged["train"]["wandb"]["mode"] == "offline"
    assert config_logged["plan"]["val_source"] == "heldout"
    # the ledger row is the summary; it records the held-out validation set
    row = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[-1])
    assert (row["val_source"], row["val_tokens"], row["val_from"]) == ("heldout", 2048, "files val.jsonl")
    summary = parts[-1]["summary"]
    for key in ("name", "val_loss", "active_params", "unique_tokens", "tokens", "val_source", "val_from"):
        assert summary[key] == row[key], key


@pytest.mark.parametrize("override, message", [
    ("train.wandb.mode=cloud", "train.wandb.mode='cloud': expected one of 'online', 'offline', 'disabled'"),
    ("train.wandb.project=", "train.wandb.project='': expected a W&B project name"),
])
def test_wandb_config_errors(override, message):
    from sparse_dc.config.base import ConfigError, load_config
    from sparse_dc.config.run import RunConfig

    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])


def test_wandb_settings_do_not_change_the_resume_fingerprint():
    from sparse_dc.config.base import load_config
    from sparse_dc.config.run import RunConfig
    from sparse_dc.train.trainer import resume_fingerprint

    plain = load_config(RunConfig, None, [])
    logged = load_config(RunConfig, None, ["train.wandb.mode=offline", "train.wandb.name=other"])
    assert resume_fingerprint(plain) == resume_fingerprint(logged)
