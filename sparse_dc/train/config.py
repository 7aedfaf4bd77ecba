"""Config of the training stage: batch sizes, optimizer + LR schedule, precision, DeepSpeed ZeRO, and when the
loop logs, evaluates and checkpoints.

    train:
      micro_batch: 8          # sequences per rank per forward/backward
      global_batch: 64        # sequences per optimizer step (gradient accumulation = global / (micro x ranks))
      precision: bf16
      optimizer: {lr: 3e-4, weight_decay: 0.1}
      schedule: {warmup_steps: 100, decay: cosine, min_lr_ratio: 0.1}
      deepspeed: {zero_stage: 2}

The DeepSpeed JSON is generated from this section (`deepspeed_config`), never maintained by hand.
Importing this module does not import torch or DeepSpeed.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sparse_dc.config.base import Config, ConfigError


@dataclass(kw_only=True)
class OptimizerConfig(Config):
    lr: float = 3e-4
    """Peak learning rate (reached at the end of warmup)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (>= 2-dim parameters, sparse `values` included); norms get none."""
    impl: Literal["torch_adam", "client"] = "torch_adam"
    """torch_adam: DeepSpeed's "AdamW" with torch_adam=true; client: a torch.optim.AdamW handed to DeepSpeed.
    Both use torch's implementation, so neither triggers a C++ JIT build (FusedAdam/cpu_adam). A sparse run with
    sparsity.regrow_optimizer=adamdst always hands DeepSpeed an AdamDST (sparse_dc/sparsity/adamdst.py) with
    these lr, betas, eps and weight_decay."""

    def validate(self, path: str = "") -> None:
        self.check(self.lr > 0, path, "lr", "a number > 0")
        self.check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), path, "betas",
                   "two numbers in [0, 1)")
        self.check(self.eps > 0, path, "eps", "a number > 0")
        self.check(self.weight_decay >= 0, path, "weight_decay", "a number >= 0")
        super().validate(path)


@dataclass(kw_only=True)
class ScheduleConfig(Config):
    warmup_steps: int | None = 100
    """Linear warmup from 0 to optimizer.lr over this many optimizer steps. Give exactly one of warmup_steps and
    warmup_fraction (the other null)."""
    warmup_fraction: float | None = None
    """Warmup as a fraction of the run's optimizer steps: int(fraction x total steps) steps (the paper's code:
    0.05, whatever its `--warmup_steps` says)."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from optimizer.lr after warmup to min_lr_ratio x lr at the last step."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    step_convention: Literal["shifted", "hf"] = "shifted"
    """Where the curve sits on the optimizer steps s = 0 .. T-1 (s = updates done before this one). shifted:
    warmup (s + 1) / (w + 1), so no update has LR 0, and the decay reaches min_lr_ratio at the last update. hf:
    the Hugging Face convention of the paper's scheduler: warmup s / w (the first update has LR 0) and decay
    progress (s - w) / (T - w)."""

    def validate(self, path: str = "") -> None:
        self.check((self.warmup_steps is None) != (self.warmup_fraction is None), path, "warmup_steps",
                   "exactly one of warmup_steps and warmup_fraction (the other null)")
        if self.warmup_steps is not None:
            self.check(self.warmup_steps >= 0, path, "warmup_steps", "an integer >= 0")
        if self.warmup_fraction is not None:
            self.check(0 <= self.warmup_fraction < 1, path, "warmup_fraction", "a number in [0, 1)")
        self.check(0 <= self.min_lr_ratio <= 1, path, "min_lr_ratio", "a number in [0, 1]")
        super().validate(path)

    def warmup(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of `total_steps`."""
        if self.warmup_fraction is not None:
            return int(self.warmup_fraction * total_steps)
        return int(self.warmup_steps or 0)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of the peak LR for the update that follows `step` completed optimizer steps."""
        warmup, hf = self.warmup(total_steps), self.step_convention == "hf"
        if step < warmup:
            return step / warmup if hf else (step + 1) / (warmup + 1)
        if self.decay == "constant" or total_steps <= warmup:
            return 1.0
        span = total_steps - warmup if hf else total_steps - 1 - warmup
        progress = min(1.0, (step - warmup) / max(1, span))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


@dataclass(kw_only=True)
class DeepSpeedConfig(Config):
    zero_stage: int = 2
    """ZeRO stage 1 (optimizer state partitioned), 2 (+ gradients) or 3 (+ parameters). Stage 0 is not offered:
    the DST moment resets go through ZeRO's optimizer-state helpers, and stage 1 costs nothing extra."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (helps on GPU clusters; off keeps CPU runs simple)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket (ZeRO 1/2)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed JSON merged last (recursively) over the generated config, for knobs not modelled here."""

    def validate(self, path: str = "") -> None:
        self.check(self.zero_stage in (1, 2, 3), path, "zero_stage", "1, 2 or 3")
        self.check(self.reduce_bucket_size >= 1, path, "reduce_bucket_size", "an integer >= 1")
        self.check(self.allgather_bucket_size >= 1, path, "allgather_bucket_size", "an integer >= 1")
        super().validate(path)


@dataclass(kw_only=True)
class WandbConfig(Config):
    """Weights & Biases logging on rank 0 (needs the optional `wandb` package: pip install "sparse-dc[wandb]")."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online: stream to the W&B server; offline: write <run>/wandb/ only (upload later with `wandb sync`)."""
    project: str = "sparse-dc"
    entity: str | None = None
    """W&B team or user (null = the logged-in user's default)."""
    name: str | None = None
    """Display name (null = the run's name)."""

    def validate(self, path: str = "") -> None:
        self.check(bool(self.project), path, "project", "a W&B project name")
        if self.mode != "disabled":
            self.check(importlib.util.find_spec("wandb") is not None, path, "mode",
                       "disabled, or the wandb package installed (pip install \"sparse-dc[wandb]\")")
        super().validate(path)


@dataclass(kw_only=True)
class TrainConfig(Config):
    micro_batch: int = 8
    """Sequences per rank per forward/backward pass."""
    global_batch: int = 64
    """Sequences per optimizer step, fixed whatever the world size (gradient accumulation makes up the rest)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Compute precision; master weights and Adam moments stay fp32 under every setting."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    seed: int = 0
    """Seeds torch's RNG before the dense weights are drawn (the sparse topology has sparsity.seed)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log_interval: int = 10
    """Optimizer steps between metric records (metrics.jsonl, TensorBoard, progress bar postfix)."""
    eval_interval: int = 500
    """Optimizer steps between validation passes (0 = only at the end)."""
    eval_sequences: int | None = None
    """Cap on validation sequences per pass (null = all of data.val_tokens)."""
    checkpoint_interval: int = 1000
    """Optimizer steps between checkpoints (0 = only at the end); SIGTERM also triggers one."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones are deleted once a newer one is complete)."""
    stop_at_step: int | None = None
    """Save a checkpoint and exit (status 0) after this optimizer step, leaving the LR/DST schedules those of the
    whole run: a long schedule trained in pieces, each continued with `--resume auto` (OLMo-core's hard stop).
    null = train to the end."""
    save_final: bool = True
    """Save a checkpoint at the end of the run (export reads it)."""
    ledger: str = "runs/ledger.jsonl"
    """The run ledger: one JSON line appended per finished run (read by `sparse-dc law`)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under <run>/tensorboard."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases: the metrics.jsonl scalars, the config, the ledger row as summary; resumes continue the run."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null = looked up from the CUDA device name (none on CPU)."""
    verify_replicas: bool = True
    """At the end, compare a digest of every rank's parameters and topology and record it in metrics."""

    def validate(self, path: str = "") -> None:
        self.check(self.micro_batch >= 1, path, "micro_batch", "an integer >= 1")
        self.check(self.global_batch >= self.micro_batch and self.global_batch % self.micro_batch == 0, path,
                   "global_batch", f"a positive multiple of micro_batch={self.micro_batch}")
        self.check(self.grad_clip >= 0, path, "grad_clip", "a number >= 0")
        for name in ("log_interval",):
            self.check(getattr(self, name) >= 1, path, name, "an integer >= 1")
        for name in ("eval_interval", "checkpoint_interval"):
            self.check(getattr(self, name) >= 0, path, name, "an integer >= 0 (0 = only at the end)")
        self.check(self.eval_sequences is None or self.eval_sequences >= 1, path, "eval_sequences",
                   "null or an integer >= 1")
        self.check(self.keep_checkpoints >= 1, path, "keep_checkpoints", "an integer >= 1")
        self.check(self.stop_at_step is None or self.stop_at_step >= 1, path, "stop_at_step",
                   "null or an integer >= 1")
        self.check(bool(self.ledger), path, "ledger", "a file path")
        self.check(self.peak_flops is None or self.peak_flops > 0, path, "peak_flops", "null or a number > 0")
        super().validate(path)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step; ConfigError if the global batch does not split evenly."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(f"train.global_batch={self.global_batch}: expected a multiple of micro_batch x "
                              f"world size = {self.micro_batch} x {world_size}")
        return self.global_batch // per_step

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON for this run (the optimizer entry only when impl=torch_adam)."""
        opt, zero = self.optimizer, self.deepspeed
        ds: dict[str, Any] = {
            "train_batch_size": self.global_batch,
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.accumulation_steps(world_size),
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": zero.zero_stage, "overlap_comm": zero.overlap_comm,
                                  "contiguous_gradients": True, "reduce_bucket_size": zero.reduce_bucket_size,
                                  "allgather_bucket_size": zero.allgather_bucket_size},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 2 ** 31 - 1,  # we log; keep DeepSpeed's own step prints out of the output
            "wall_clock_breakdown": False,
        }
        if opt.impl == "torch_adam":
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
                                                           "weight_decay": opt.weight_decay, "torch_adam": True}}
        return _merge(ds, zero.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
