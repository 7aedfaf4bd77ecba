"""The reproduction grids: model sizes x densities x epochs at one fixed unique-token budget U, per scale.

Every scale trains the paper's grid shape (densities {1, 0.5, 0.25, 0.125} x epochs {1, 2, 4, 8, 16} for each
size) except `ci`, a much reduced grid that exists only so the test suite can run the whole pipeline. The
largest size of a scale is held out of the fit and used to score the law's extrapolation.

Timings (2-core CPU, 1 thread per rank; see README): tiny trained 60 runs in 15 minutes (up to 30 on a busy machine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparse_dc.errors import SparseDCError

PAPER_DENSITIES = (1.0, 0.5, 0.25, 0.125)
PAPER_EPOCHS = (1, 2, 4, 8, 16)


class ReproduceError(SparseDCError):
    """A reproduction that cannot be planned, run or analysed (unknown scale, too little data, too few runs)."""


@dataclass(frozen=True)
class Scale:
    """One reproduction grid and the settings every run of it shares."""

    name: str
    sizes: dict[str, dict[str, Any]]
    """Size name -> `model.*` overrides (a preset plus optional shape fields), smallest first."""
    unique_tokens: int
    """U, the same for every run: the paper's data-constrained axis is epochs at fixed U."""
    densities: tuple[float, ...] = PAPER_DENSITIES
    epochs: tuple[float, ...] = PAPER_EPOCHS
    seq_len: int = 64
    val_tokens: int = 16_384
    vocab_size: int = 512
    """Vocabulary of the built-in corpus when `--data` is not given (small: embeddings stay a minor share)."""
    train: dict[str, Any] = field(default_factory=dict)
    """`train.*` section of the base config (batch sizes, optimizer, schedule, precision, intervals)."""
    sparsity: dict[str, Any] = field(default_factory=dict)
    needs_data: bool = False
    """True when the built-in corpus is too small and `--data DIR` is required."""
    bootstrap: int = 200
    """Bootstrap resamples for the coefficient intervals."""
    description: str = ""

    @property
    def n_runs(self) -> int:
        return len(self.sizes) * len(self.densities) * len(self.epochs)

    @property
    def max_tokens(self) -> int:
        return int(self.unique_tokens * max(self.epochs))


def _cpu_train(global_batch: int, lr: float, warmup: int) -> dict[str, Any]:
    # eval only at the end and no intermediate checkpoints: these runs last seconds to a minute; an interrupted
    # run simply starts again (the sweep skips the finished ones)
    return {"micro_batch": global_batch, "global_batch": global_batch, "precision": "fp32",
            "optimizer": {"lr": lr, "weight_decay": 0.1},
            "schedule": {"warmup_steps": warmup, "decay": "cosine", "min_lr_ratio": 0.1},
            "deepspeed": {"zero_stage": 1}, "log_interval": 10, "eval_interval": 0, "checkpoint_interval": 0,
            "save_final": False, "tensorboard": False, "progress": False}


def _gpu_train(global_batch: int, micro_batch: int, lr: float, warmup: int, checkpoint: int) -> dict[str, Any]:
    return {"micro_batch": micro_batch, "global_batch": global_batch, "precision": "bf16",
            "optimizer": {"lr": lr, "weight_decay": 0.1},
            "schedule": {"warmup_steps": warmup, "decay": "cosine", "min_lr_ratio": 0.1},
            "deepspeed": {"zero_stage": 2}, "log_interval": 50, "eval_interval": 0,
            "checkpoint_interval": checkpoint, "save_final": False, "tensorboard": True, "progress": False}


def _shape(hidden: int, ffn: int, heads: int, layers: int) -> dict[str, Any]:
    return {"preset": "tiny", "hidden_size": hidden, "intermediate_size": ffn, "n_heads": heads, "n_layers": layers}


# SET with the paper's prune rate; updates every half epoch of the CPU grids (the paper: every 100 steps)
_SET = {"block_size": 1, "method": "set", "prune_rate": 0.1, "update_frequency": 16}

SCALES: dict[str, Scale] = {
    "ci": Scale(
        name="ci", description="test-only smoke grid: 2 sizes x 2 densities x 2 epochs (not a reproduction)",
        sizes={"h16": _shape(16, 32, 2, 1), "h32": _shape(32, 64, 2, 1)},
        unique_tokens=2048, densities=(1.0, 0.5), epochs=(1, 2), seq_len=32, val_tokens=2048,
        train=_cpu_train(8, 3e-3, 2), sparsity={**_SET, "update_frequency": 4}, bootstrap=10),
    "tiny": Scale(
        name="tiny", description="2-core CPU, built-in corpus: 3 tiny Llamas (4e4..4e5 dense parameters), "
                                 "U = 32K tokens; about 15 minutes",
        sizes={"h32": _shape(32, 64, 2, 2), "h64": _shape(64, 128, 4, 2), "h128": _shape(128, 256, 4, 2)},
        unique_tokens=32_768, train=_cpu_train(16, 3e-3, 10), sparsity=_SET),
    "small": Scale(
        name="small", description="one GPU: the paper's 20m and 40m shapes, U = 800K tokens of the built-in "
                                  "corpus (vocab 512); untested here (no GPU was lent)",
        sizes={"20m": {"preset": "20m"}, "40m": {"preset": "40m"}}, unique_tokens=800_000, seq_len=256,
        val_tokens=65_536, train=_gpu_train(64, 16, 1e-3, 50, 200),
        sparsity={**_SET, "update_frequency": 50}, bootstrap=500),
    "medium": Scale(
        name="medium", description="a SLURM cluster (--launcher slurm, --data required): the paper's 60m..480m "
                                   "shapes at U = 100M tokens",
        sizes={"60m": {"preset": "60m"}, "120m": {"preset": "120m"}, "240m": {"preset": "240m"},
               "480m": {"preset": "480m"}},
        unique_tokens=100_000_000, seq_len=256, val_tokens=1_048_576, vocab_size=32_000,
        train=_gpu_train(256, 32, 6e-4, 1000, 1000), sparsity={**_SET, "update_frequency": 100},
        needs_data=True, bootstrap=1000),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ReproduceError(f"--scale {name!r}: expected one of {', '.join(SCALES)}")
    return SCALES[name]


def base_config(scale: Scale, data_dir: str, out_dir: str) -> dict[str, Any]:
    """The run config every grid point starts from (the sweep adds name, model, density and epochs)."""
    return {"name": f"{scale.name}-base", "output_dir": f"{out_dir}/runs",
            "data": {"dir": data_dir, "unique_tokens": scale.unique_tokens, "seq_len": scale.seq_len, "epochs": 1,
                     "val_tokens": scale.val_tokens, "seed": 1234},
            "model": dict(next(iter(scale.sizes.values()))),
            "sparsity": dict(scale.sparsity),
            "train": {**scale.train, "ledger": f"{out_dir}/ledger.jsonl"}}
