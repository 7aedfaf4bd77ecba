"""Run presets for the paper's model sizes x densities, in two recipes (the config tree `sparse-dc train` reads).

- `paper` (launch/configs/paper/<size>-d<density>.yaml): the training setup of the paper's official code, row by
  row (docs/fidelity.md): unstructured masks, Adam (0.9, 0.999) without weight decay or clipping, LR from
  `paper_lr`, 512 x 256 batches, warmup 5% of the steps from LR 0, cosine to 0.1x, SET with prune rate 0.1
  decayed by cosine to a floor of 0.005 over all steps, regrowth among the units dead after the drop, AdamDST for
  regrown weights, RMSNorm eps 1e-6, every weight N(0, 0.02), one document per sequence with padding masked out
  of the loss. Use it to reproduce or extend the paper's numbers.
- `fast` (launch/configs/<size>-d<density>.yaml): NOT the paper's setup. 64x64 block-sparse masks (weights,
  gradients and optimizer state scale with density; the Triton kernels skip dead blocks), AdamW (0.9, 0.95) with
  weight decay 0.1 and clipping 1.0, LR 3e-4, 256 x 256 batches, 1000 warmup steps, packed token streams, the
  prune rate decayed to 0 at 75% of the steps. Use it for sparse models that train fast at scale.

    fast_preset("120m", 0.5)    -> {"name": "120m-d0.5", "data": {...}, "model": {"preset": "120m"}, ...}
    paper_recipe("120m", 0.5)   -> {"name": "paper-120m-d0.5", ...}

`launch/make_configs.py` writes both families; `sparse-dc law plan --write-config` writes `recipe_preset` of its
`--recipe` (paper by default), so a planned run and a preset differ only in size, density and budget. Importing
this module does not import torch (the scaling toolkit imports it); `paper_recipe` counts parameters with
sparse_dc.model when called.
"""
from __future__ import annotations

from typing import Any

SIZES = ("20m", "40m", "60m", "120m", "240m", "480m", "960m", "1b92", "3b84")
DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)  # the paper's grid: dense down to 93.75% sparse
RECIPES = ("fast", "paper")
# Block size of the sparse fast presets. 64 divides every paper hidden size (256 ... 3072) and every SwiGLU width
# but 20m's 688, which block-sparse runs round up to 704 (model_shape): 20m sparse presets have ~1.4% more
# dense-equivalent parameters than 20m dense (the ledger records the exact counts).
BLOCK_SIZE = 64
# Sequences per rank per forward/backward (activation memory grows with width x depth). At most 32 so the global
# batch (256 or 512 sequences) splits evenly over 1, 2, 4 or 8 ranks; on more ranks lower it.
_MICRO_BATCH = {"20m": 32, "40m": 32, "60m": 32, "120m": 32, "240m": 32, "480m": 16, "960m": 16, "1b92": 8,
                "3b84": 8}
# The paper's LR rule. Its official scripts give one LR: 20m dense 1.95e-3, and sparse = dense / density (20m at
# 0.0625: 3.12e-2). Other sizes: dense LR ~ N^-0.25, the exponent of the LR fit its appendix follows (0.17 N^-0.25,
# Porian et al. 2024), anchored at the official 20m value; N = the law's dense N of the size. A rule, not a number
# the paper published (docs/fidelity.md).
PAPER_LR_20M = 1.95e-3
PAPER_LR_EXPONENT = -0.25
PAPER_VOCAB = 32000


def run_name(size: str, density: float, recipe: str = "fast") -> str:
    return f"{size}-d{density:g}" if recipe == "fast" else f"{recipe}-{size}-d{density:g}"


def _check(size: str, density: float) -> None:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")
    if not 0 < density <= 1:
        raise ValueError(f"density={density!r}: expected a number in (0, 1]")


def _data(data_dir: str, unique_tokens: int, epochs: float | None, total_tokens: int | None,
          val_tokens: int) -> dict[str, Any]:
    return {"dir": data_dir, "unique_tokens": int(unique_tokens), "seq_len": 256, "epochs": epochs,
            "total_tokens": total_tokens, "val_tokens": val_tokens, "seed": 1234}


def fast_preset(size: str, density: float, *, data_dir: str = "runs/data/corpus",
                unique_tokens: int = 100_000_000, epochs: float | None = 4.0, total_tokens: int | None = None,
                name: str | None = None) -> dict[str, Any]:
    """The `fast` recipe (module docstring; not the paper's setup) of one paper-size model at `density`, as a
    YAML-ready mapping."""
    _check(size, density)
    sparse = density < 1.0
    return {
        "name": name or run_name(size, density),
        "output_dir": "runs",
        "data": _data(data_dir, unique_tokens, epochs, total_tokens, 1_048_576),
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


def paper_lr(size: str, density: float) -> float:
    """The paper recipe's peak LR (3 significant digits): PAPER_LR_20M x (N / N_20m)^PAPER_LR_EXPONENT / density,
    N the law's dense N of the size at vocab 32000 (exactly the official values for 20m)."""
    from sparse_dc.model.build import param_counts
    from sparse_dc.model.config import ModelConfig
    from sparse_dc.sparsity.config import SparsityConfig

    _check(size, density)
    n = {s: param_counts(ModelConfig(preset=s), SparsityConfig(), PAPER_VOCAB).law_dense for s in ("20m", size)}
    return float(f"{PAPER_LR_20M * (n[size] / n['20m']) ** PAPER_LR_EXPONENT / density:.3g}")


def paper_recipe(size: str, density: float, *, data_dir: str = "runs/data/corpus",
                 unique_tokens: int = 100_000_000, epochs: float | None = 4.0, total_tokens: int | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """The `paper` recipe (module docstring, docs/fidelity.md) of one paper-size model at `density`, as a
    YAML-ready mapping. Every file carries the whole sparsity section; a dense run (density 1) trains with plain
    Adam as the official dense script does (AdamDST is used by sparse runs only)."""
    _check(size, density)
    return {
        "name": name or run_name(size, density, "paper"),
        "output_dir": "runs",
        "data": {**_data(data_dir, unique_tokens, epochs, total_tokens, 10_000_000), "packing": "document"},
        "model": {"preset": size, "norm_eps": 1.0e-6, "init_std": 0.02, "init": "normal"},
        "sparsity": {"density": float(density), "block_size": 1, "method": "set", "distribution": "uniform",
                     "update_frequency": 100, "prune_rate": 0.1, "prune_rate_decay": "cosine",
                     "min_prune_rate": 0.005, "stop_fraction": 1.0, "grow_candidates": "dead_after_drop",
                     "regrow_optimizer": "adamdst", "regrow_step": 5, "momentum_ramp_steps": 20},
        "train": {"micro_batch": _MICRO_BATCH[size], "global_batch": 512, "precision": "bf16", "grad_clip": 0.0,
                  "optimizer": {"lr": paper_lr(size, density), "betas": [0.9, 0.999], "eps": 1.0e-8,
                                "weight_decay": 0.0},
                  "schedule": {"warmup_steps": None, "warmup_fraction": 0.05, "decay": "cosine",
                               "min_lr_ratio": 0.1, "step_convention": "hf"},
                  "deepspeed": {"zero_stage": 2},
                  "eval_interval": 2000, "checkpoint_interval": 1000, "ledger": "runs/ledger.jsonl"},
    }


def recipe_preset(recipe: str, size: str, density: float, **budget: Any) -> dict[str, Any]:
    """`fast_preset` or `paper_recipe` by name (RECIPES)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {', '.join(RECIPES)}")
    return (paper_recipe if recipe == "paper" else fast_preset)(size, density, **budget)
