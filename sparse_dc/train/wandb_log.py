"""Weights & Biases logging for `train.wandb` (rank 0): the scalars of metrics.jsonl under the same `<kind>/<key>`
names as TensorBoard, the resolved config, and the ledger row as the run summary.

A resumed run continues the same W&B run: the run id is kept in `<run>/wandb_run.json` (written before `wandb.init`,
so even a run killed during its first steps is continued) and passed back with resume="allow". Steps replayed after
a resume are logged again; charts use our `step` as their x-axis (`define_metric`), not W&B's internal counter, which
would refuse to go back.
"""
from __future__ import annotations

import json
import os
import secrets
import string
from typing import Any

from sparse_dc.config.base import write_text_atomic
from sparse_dc.errors import SparseDCError
from sparse_dc.train.config import WandbConfig

RUN_ID_FILE = "wandb_run.json"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record except `step` (what TensorBoard and W&B chart)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class WandbLogger:
    def __init__(self, cfg: WandbConfig, run_dir: str, run_name: str, config: dict[str, Any]):
        import wandb

        id_path = os.path.join(run_dir, RUN_ID_FILE)
        if os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as fh:
                run_id = json.load(fh)["id"]
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
            write_text_atomic(id_path, json.dumps({"id": run_id, "project": cfg.project, "entity": cfg.entity}))
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, mode=cfg.mode,
                                  id=run_id, resume="allow", dir=run_dir, config=config)
        except Exception as exc:  # not logged in, server unreachable, bad entity: say so in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SparseDCError(f"train.wandb.mode={cfg.mode}: wandb.init failed ({first}); log in with "
                                "`wandb login`, or use train.wandb.mode=offline") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any], prefix: str) -> None:
        values = {f"{prefix}/{k}": v for k, v in scalars(record).items()}
        if values:
            self.run.log({"step": record["step"], **values})

    def summary(self, row: dict[str, Any]) -> None:
        self.run.summary.update(row)

    def close(self) -> None:
        self.run.finish()
