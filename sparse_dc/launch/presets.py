"""Run presets for the paper's model sizes: the config tree `sparse-dc train` reads, with the paper's defaults.

    paper_preset("120m", 0.5)  -> {"name": "120m-d0.5", "data": {...}, "model": {"preset": "120m"}, ...}

`launch/make_configs.py` writes one YAML per (size, density) under launch/configs/; `sparse-dc law plan
--write-config` uses the same function, so a planned run and a preset differ only in size, density and budget.
Pure Python (no torch): the scaling toolkit imports it.
"""
from __future__ import annotations

from typing import Any

SIZES = ("20m", "40m", "60m", "120m", "240m", "480m", "960m", "1b92", "3b84")
DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)  # the paper's grid: dense down to 93.75% sparse
# Block size of the sparse presets. 64 divides every paper hidden size (256 ... 3072) and every SwiGLU width but
# 20m's 688, which block-sparse runs round up to 704 (model_shape): 20m sparse presets have ~1.4% more
# dense-equivalent parameters than 20m dense (the ledger records the exact counts). sparsity.block_size=1 gives
# the paper's unstructured masks instead.
BLOCK_SIZE = 64
# Sequences per rank per forward/backward (activation memory grows with width x depth). At most 32 so the global
# batch of 256 sequences (65,536 tokens) splits evenly over 1, 2, 4 or 8 ranks; on more ranks lower it.
_MICRO_BATCH = {"20m": 32, "40m": 32, "60m": 32, "120m": 32, "240m": 32, "480m": 16, "960m": 16, "1b92": 8,
                "3b84": 8}


def run_name(size: str, density: float) -> str:
    return f"{size}-d{density:g}"


def paper_preset(size: str, density: float, *, data_dir: str = "runs/data/corpus",
                 unique_tokens: int = 100_000_000, epochs: float | None = 4.0, total_tokens: int | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """The run config (as a YAML-ready mapping) of one paper-size model at `density`, with the paper's training
    and DST defaults (reference/model-sizes.md): sequence length 256, bf16, 1000 warmup steps; SET with prune
    rate 0.1 decayed by cosine, a topology update every 100 steps, uniform layer densities (attention/MLP 1.0)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")
    sparse = density < 1.0
    return {
        "name": name or run_name(size, density),
        "output_dir": "runs",
        "data": {"dir": data_dir, "unique_tokens": int(unique_tokens), "seq_len": 256, "epochs": epochs,
                 "total_tokens": total_tokens, "val_tokens": 1_048_576, "seed": 1234},
        "model": {"preset": size},
        "sparsity": {"density": float(density), "block_size": BLOCK_SIZE if sparse else 1, "method": "set",
                     "distribution": "uniform", "update_frequency": 100, "prune_rate": 0.1,
                     "prune_rate_decay": "cosine"},
        "train": {"micro_batch": _MICRO_BATCH[size], "global_batch": 256, "precision": "bf16",
                  "optimizer": {"lr": 3.0e-4, "weight_decay": 0.1},
                  "schedule": {"warmup_steps": 1000, "decay": "cosine", "min_lr_ratio": 0.1},
                  "deepspeed": {"zero_stage": 2},
                  "eval_interval": 1000, "checkpoint_interval": 1000, "ledger": "runs/ledger.jsonl"},
    }
