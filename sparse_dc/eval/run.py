"""`sparse-dc eval`'s pipeline: what is evaluated -> its tasks checked -> the harness model (native or HF) ->
`lm_eval.simple_evaluate` -> scores `{task: {metric: {value, stderr}}}` -> the results JSON and the run's ledger row.

Ledger row fields added (and replaced task by task on re-evaluation, never as a second row):
    downstream:      {task: {metric: {"value": float, "stderr": float | null}}}   e.g. arc_easy.acc.value
    downstream_meta: {task: {n, num_fewshot, limit, model, step, lm_eval, evaluated_at}}
Metrics are the harness's names; a filter other than "none" is kept after a comma ("exact_match,strict-match").
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

from sparse_dc.config.base import write_text_atomic
from sparse_dc.errors import SparseDCError
from sparse_dc.eval import tasks as task_lib
from sparse_dc.eval.config import EvalConfig

log = logging.getLogger(__name__)
Scores = dict[str, dict[str, dict[str, float | None]]]


@dataclass(frozen=True)
class Source:
    """What `--checkpoint` names: a run's complete checkpoint, or a folder written by `sparse-dc export`."""

    kind: str
    """"run" or "hf"."""
    path: str
    """The step_* checkpoint folder, or the export folder."""
    home: str
    """Folder whose eval/ receives results and logs by default: the run folder, or the export folder."""
    record: dict[str, Any] | None
    """export.run_record: the run's name, config_hash, ledger and step (None for an export that lacks one)."""


def resolve_source(path: str) -> Source:
    from sparse_dc.train.export import RUN_RECORD, resolve_checkpoint, run_record

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise SparseDCError(f"--checkpoint {path}: no such folder")
    config = os.path.join(path, "config.json")
    if os.path.isfile(config) and os.path.isfile(os.path.join(path, "model.safetensors")):
        try:
            with open(config, encoding="utf-8") as fh:
                record = json.load(fh).get(RUN_RECORD)
        except (OSError, ValueError, AttributeError) as exc:
            raise SparseDCError(f"--checkpoint {path}: config.json is not a JSON object ({exc})") from None
        return Source("hf", path, path, record)
    try:
        root, tag = resolve_checkpoint(path)
    except SparseDCError:
        raise SparseDCError(f"--checkpoint {path}: expected a run folder (or its checkpoints/ or a step_* folder) "
                            "holding a complete checkpoint, or a folder written by `sparse-dc export` (config.json + "
                            "model.safetensors)") from None
    home = os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root
    return Source("run", os.path.join(root, tag), home, run_record(root, tag))


# --- the harness model ------------------------------------------------------------------------------------
def model_kind(cfg: EvalConfig, source: Source) -> str:
    if cfg.model == "auto":
        return "native" if source.kind == "run" else "hf"
    if cfg.model == "native" and source.kind != "run":
        raise SparseDCError(f"--model native: {source.path} is an exported Hugging Face folder; expected a run's "
                            "checkpoint (or --model hf)")
    return cfg.model


@contextlib.contextmanager
def harness_model(cfg: EvalConfig, source: Source, kind: str) -> Iterator[Any]:
    """The lm-eval LM; a run evaluated on the HF path is exported to a temporary folder first."""
    if kind == "native":
        from sparse_dc.eval.native import SparseDCLM

        yield SparseDCLM(checkpoint=source.path, tokenizer=cfg.tokenizer, batch_size=cfg.batch_size,
                         device=cfg.device, dtype=cfg.dtype)
    elif source.kind == "hf":
        yield hf_model(source.path, cfg)
    else:
        from sparse_dc.train.export import export

        with tempfile.TemporaryDirectory(prefix="sparse-dc-eval-") as tmp:
            yield hf_model(export(source.path, os.path.join(tmp, "hf"), cfg.tokenizer), cfg)


def hf_model(folder: str, cfg: EvalConfig) -> Any:
    """The harness's own HFLM on an export; the empty-context prefix is EOS, as on the native path."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise SparseDCError(f"{folder} has no tokenizer.model: export again with `sparse-dc export --tokenizer FILE`")
    from lm_eval.models.huggingface import HFLM

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        eos = json.load(fh).get("eos_token_id")
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HFLM(pretrained=folder, tokenizer=folder, backend="causal", batch_size=cfg.batch_size, device=device,
                dtype=cfg.dtype, prefix_token_id=eos)


# --- scores -----------------------------------------------------------------------------------------------
def _members(results: dict[str, Any], group: str) -> set[str]:
    """Every task and subgroup under `group` (the harness lists direct children only)."""
    out: set[str] = set()
    for child in results.get("group_subtasks", {}).get(group, []):
        out |= {child} | _members(results, child)
    return out


def scored_names(results: dict[str, Any], names: list[str]) -> list[str]:
    """The rows to keep: each requested task or group (a group's aggregate, not its subtasks); a tag has no
    aggregate row, so its tasks are kept one by one."""
    table = {**results.get("results", {}), **results.get("groups", {})}
    chosen = [n for n in names if n in table]
    if len(chosen) < len(names):
        grouped = set().union(*(_members(results, g) for g in results.get("group_subtasks", {})))
        chosen += [k for k in results.get("results", {}) if k not in chosen and k not in grouped]
    return chosen


def downstream_scores(results: dict[str, Any], names: list[str]) -> Scores:
    """{task: {metric: {"value", "stderr"}}} from the harness's "metric,filter" / "metric_stderr,filter" keys."""
    table = {**results.get("results", {}), **results.get("groups", {})}
    out: Scores = {}
    for name in scored_names(results, names):
        row, metrics = table[name], {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{filt}")
            label = metric if filt == "none" else f"{metric},{filt}"
            metrics[label] = {"value": float(value),
                              "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        out[name] = metrics
    return out


def sample_counts(results: dict[str, Any], names: list[str]) -> dict[str, int]:
    """Documents evaluated per kept task (a group: summed over its tasks)."""
    counts = {k: int(v.get("effective", 0)) for k, v in results.get("n-samples", {}).items()}
    return {n: counts.get(n, sum(counts.get(m, 0) for m in _members(results, n))) for n in names}


# --- ledger -----------------------------------------------------------------------------------------------
def join_ledger(cfg: EvalConfig, source: Source, scores: Scores, meta: dict[str, Any], out: str) -> str:
    """Merge the scores into the run's ledger row in place; returns what happened, in a sentence. An explicit
    --ledger that cannot take them is an error; the run's own ledger missing or lacking the row is a warning.
    Either way the scores are already in the results JSON `out`."""
    from sparse_dc.train.ledger import update_row

    if not cfg.update_ledger:
        return "ledger not updated (--no-ledger)"
    record = source.record
    if record is None:
        return _skip(cfg, f"{source.path} does not name the run it was exported from; evaluate the run folder "
                          "to join its ledger row")
    path, name, digest = cfg.ledger or record["ledger"], record["name"], record["config_hash"]

    def match(row: dict[str, Any]) -> bool:
        return row.get("name") == name and row.get("config_hash", digest) == digest

    def change(row: dict[str, Any]) -> dict[str, Any]:
        if row.get("steps") != record["step"]:
            raise SparseDCError(f"checkpoint step {record['step']} is not the final step {row.get('steps')} of run "
                                f"{name!r} in {path}")
        return {**row, "downstream": {**row.get("downstream", {}), **scores},
                "downstream_meta": {**row.get("downstream_meta", {}), **meta}}

    try:
        update_row(path, match, change, what=f"row of run {name!r} (config {digest})")
    except SparseDCError as exc:
        return _skip(cfg, f"{exc}: scores not joined to the ledger (they are in {out})")
    return f"scores joined to run {name!r} in {path}"


def _skip(cfg: EvalConfig, message: str) -> str:
    if cfg.ledger is not None:
        raise SparseDCError(f"--ledger {cfg.ledger}: {message}")
    log.warning(message)
    return message


# --- the pipeline -----------------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig) -> dict[str, Any] | None:
    """Evaluate, write the results JSON, join the ledger. Returns the report on rank 0, None on other ranks."""
    task_lib.go_offline()
    source = resolve_source(cfg.checkpoint)
    kind = model_kind(cfg, source)
    manager = task_lib.task_manager(cfg.tasks, cfg.include_path)
    generative = [n for n, kinds in task_lib.check_tasks(manager, cfg.tasks).items() if "generate_until" in kinds]
    if generative and kind == "native":
        raise SparseDCError(f"--tasks {','.join(generative)}: these generate text and the native model scores "
                            "log-likelihoods only; expected --model hf for them")
    import lm_eval

    with harness_model(cfg, source, kind) as lm:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
            log_samples=cfg.log_samples, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        ranks = lm.world_size
    if results is None:
        return None
    scores = downstream_scores(results, cfg.tasks)
    counts = sample_counts(results, list(scores))
    step = source.record["step"] if source.record else None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta = {name: {"n": counts[name], "num_fewshot": results.get("n-shot", {}).get(name, cfg.num_fewshot),
                   "limit": cfg.limit, "model": kind, "step": step, "lm_eval": lm_eval.__version__,
                   "evaluated_at": stamp} for name in scores}
    report = {"checkpoint": source.path, "model": kind, "ranks": ranks,
              "run": source.record["name"] if source.record else None, "step": step, "tasks": list(cfg.tasks),
              "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "scores": scores, "meta": meta,
              "harness": {k: results.get(k) for k in ("results", "groups", "n-samples", "config", "versions")}}
    if cfg.log_samples:
        report["samples"] = results.get("samples")
    out = cfg.out or os.path.join(source.home, "eval", "results.json")
    write_text_atomic(out, json.dumps(report, indent=1, default=str) + "\n")
    report["out"] = out
    report["ledger"] = join_ledger(cfg, source, scores, meta, out)
    return report
