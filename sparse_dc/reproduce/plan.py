"""Plan and run a reproduction grid: prepare the data, write the base config, expand it, hand it to the sweep.

    out/
      base.yaml          the run config every grid point starts from
      data/builtin-v512  the built-in corpus, when --data is not given (prepared once, then reused)
      ledger.jsonl       one row per finished run (the sweep skips these on a re-run)
      runs/<name>/       each run's metrics; logs/<name>.log its output
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import yaml

from sparse_dc.config.base import write_text_atomic
from sparse_dc.launch.sweep import Run, expand
from sparse_dc.reproduce.scales import ReproduceError, Scale, base_config

log = logging.getLogger(__name__)


def prepare_data(scale: Scale, data_dir: str | None, out_dir: str) -> str:
    """The prepared data directory: `data_dir` as given, or the built-in corpus prepared under `out_dir/data`.

    Checks up front that it holds U + validation tokens, so a too-small corpus fails before any run starts."""
    if data_dir is None:
        if scale.needs_data:
            raise ReproduceError(f"--scale {scale.name} needs U = {scale.unique_tokens:.3g} unique tokens, more "
                                 "than the built-in corpus holds: expected --data DIR (from `sparse-dc data prepare`)")
        data_dir = os.path.join(out_dir, "data", f"builtin-v{scale.vocab_size}")
        if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
            from sparse_dc.data.prepare import PrepareConfig, prepare

            log.info("preparing the built-in corpus (vocab %d) in %s", scale.vocab_size, data_dir)
            prepare(PrepareConfig(builtin=True, out=data_dir, vocab_size=scale.vocab_size, workers=1))
    manifest_path = os.path.join(data_dir, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            total = int(json.load(fh)["total_tokens"])
    except (OSError, KeyError, ValueError) as exc:
        raise ReproduceError(f"--data {data_dir!r}: expected a directory written by `sparse-dc data prepare` "
                             f"({manifest_path}: {exc})") from None
    need = scale.unique_tokens + scale.val_tokens
    if total < need:
        raise ReproduceError(f"--data {data_dir!r} holds {total} tokens; --scale {scale.name} needs at least "
                             f"{need} (U = {scale.unique_tokens} + {scale.val_tokens} validation)")
    return os.path.abspath(data_dir)


def plan_runs(scale: Scale, data_dir: str, out_dir: str, nproc: int = 1) -> tuple[str, list[Run]]:
    """Write `out_dir/base.yaml` and expand the grid: (base config path, runs), sizes in the scale's order.

    Run names are `<size>-d<density>-e<epochs>`; each size is one `expand` call whose `extra` overrides set the
    model shape, so all runs share one base config and one ledger."""
    cfg = base_config(scale, data_dir, os.path.abspath(out_dir))
    train = cfg["train"]
    if train["global_batch"] % (train["micro_batch"] * nproc):  # keep the global batch whatever the rank count
        if train["global_batch"] % nproc:
            raise ReproduceError(f"--nproc {nproc}: expected a divisor of the scale's global batch "
                                 f"{train['global_batch']}")
        train["micro_batch"] = train["global_batch"] // nproc
    base_path = os.path.join(out_dir, "base.yaml")
    write_text_atomic(base_path, yaml.safe_dump(cfg, sort_keys=False))
    grid: dict[str, list[Any]] = {"sparsity.density": list(scale.densities), "data.epochs": list(scale.epochs)}
    runs: list[Run] = []
    for size, model in scale.sizes.items():
        # keys the base sets but this size does not (a shape field of the first size) go back to the preset's
        shape = {k: model.get(k) for k in ("preset", "hidden_size", "intermediate_size", "n_heads", "n_layers")}
        extra = [f"model.{k}={'null' if v is None else v}" for k, v in shape.items()]
        runs += expand(base_path, grid, prefix=size, extra=extra)
    return base_path, runs


def size_of(run_name: str) -> str:
    """The size name a run name starts with (`h64-d0.5-e4` -> `h64`)."""
    return run_name.split("-", 1)[0]
