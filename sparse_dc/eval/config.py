"""Config of `sparse-dc eval`: what to evaluate, on which lm-evaluation-harness tasks, and where scores go.

Imports neither torch nor the harness, so a bad flag is reported before anything heavy loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparse_dc.config.base import Config

# The paper's zero-shot downstream suite (its evals/downstream_tasks_evaluation.py: six tasks, then MMLU).
PAPER_TASKS = ("boolq", "arc_easy", "piqa", "hellaswag", "openbookqa", "winogrande", "mmlu")


@dataclass(kw_only=True)
class EvalConfig(Config):
    checkpoint: str
    """A run folder (or its checkpoints/ or a step_* folder) or a folder written by `sparse-dc export`."""
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    """lm-eval task, group or tag names (the paper's suite by default)."""
    num_fewshot: int = 0
    """In-context examples per prompt (the paper: 0)."""
    limit: int | None = None
    """Evaluate only the first N documents of each task (quick checks; scores are then not comparable)."""
    batch_size: int = 8
    """Requests per forward pass, per rank."""
    include_path: str | None = None
    """A folder of the harness's task YAMLs (custom tasks, local datasets); searched before the built-in tasks."""
    out: str | None = None
    """Results JSON; null = <run or export folder>/eval/results.json."""
    model: Literal["auto", "native", "hf"] = "auto"
    """native: our model (block-sparse kernels) from a run's checkpoint; hf: transformers on an exported folder
    (a run is exported to a temporary folder first); auto: native for a run, hf for an exported folder."""
    device: str | None = None
    """cpu, cuda or cuda:N; null = this rank's GPU if there is one, else cpu."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the evaluated model."""
    tokenizer: str | None = None
    """SentencePiece model for the native path; null = the one in the run's prepared data directory."""
    ledger: str | None = None
    """Ledger whose row of the run receives the scores; null = the run's train.ledger (if it has a row there)."""
    update_ledger: bool = True
    """Join the scores to the run's ledger row (in place: re-evaluating replaces a task's scores)."""
    log_samples: bool = False
    """Keep the harness's per-document outputs in the results JSON."""
    seed: int = 0
    """Seed of the harness's random, numpy and torch generators (few-shot sampling)."""

    def validate(self, path: str = "") -> None:
        self.check(bool(self.checkpoint), path, "checkpoint", "a run folder or an exported Hugging Face folder")
        self.check(bool(self.tasks) and all(t.strip() for t in self.tasks), path, "tasks",
                   "one or more lm-eval task names, comma-separated")
        self.check(self.num_fewshot >= 0, path, "num_fewshot", "an integer >= 0")
        self.check(self.limit is None or self.limit >= 1, path, "limit", "null or an integer >= 1")
        self.check(self.batch_size >= 1, path, "batch_size", "an integer >= 1")
        super().validate(path)
