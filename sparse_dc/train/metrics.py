"""Run metrics on rank 0: a tqdm progress bar, <run>/metrics.jsonl, TensorBoard scalars, Weights & Biases
(`train.wandb`, see wandb_log.py); MFU and peak memory.

MFU = achieved FLOP/s / (peak FLOP/s per device x devices), with training FLOPs per token from
`sparse_dc.model.flops_per_token` (PaLM appendix B), reported twice: on dense-equivalent FLOPs (`mfu_dense`, the
work of the dense model the run stands in for) and on active FLOPs (`mfu_active`, the block-sparse kernels' work).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch

from sparse_dc.errors import reporting_disk_full
from sparse_dc.train.config import WandbConfig
from sparse_dc.train.wandb_log import WandbLogger, scalars

# Dense bf16/fp16 tensor-core peak FLOP/s per device (vendor datasheets, SXM parts, no sparsity). fp32 runs on
# CUDA use TF32 tensor cores for matmuls; we do not guess an fp32 peak: set train.peak_flops.
PEAK_FLOPS_16BIT = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                    "V100": 125e12}


def device_peak_flops(precision: str, configured: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else a datasheet lookup by CUDA device name, else None."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available() or precision == "fp32":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS_16BIT.items() if key in name), None)


class Metrics:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int, tokens_per_step: int,
                 flops_dense: float, flops_active: float, peak_flops: float | None, world_size: int,
                 progress: bool, tensorboard: bool, wandb: WandbConfig | None = None, run_name: str = "",
                 run_config: dict[str, Any] | None = None):
        """`flops_*`: training FLOPs per token; `peak_flops`: per device (None = MFU not reported); `wandb` with
        `run_config` (the resolved config) also logs to Weights & Biases unless its mode is disabled."""
        self.enabled, self.tokens_per_step = enabled, tokens_per_step
        self.flops_dense, self.flops_active = flops_dense, flops_active
        self.peak_total = peak_flops * world_size if peak_flops else None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = self.tb = self.wandb = None
        self._window_start, self._window_steps, self._window_tokens = time.perf_counter(), 0, 0
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb is not None and wandb.mode != "disabled":
            self.wandb = WandbLogger(wandb, run_dir, run_name, run_config or {})

    def step_done(self, tokens: int) -> None:
        """Count one optimizer step of `tokens` trained tokens into the throughput window."""
        self._window_steps += 1
        self._window_tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def throughput(self) -> dict[str, Any]:
        """tokens/s and MFU over the steps since the last call (then a new window starts)."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        tps = self._window_tokens / elapsed
        self._window_start, self._window_steps, self._window_tokens = now, 0, 0
        out: dict[str, Any] = {"tokens_per_s": tps}
        if self.peak_total:
            out["mfu_dense"] = tps * self.flops_dense / self.peak_total
            out["mfu_active"] = tps * self.flops_active / self.peak_total
        if torch.cuda.is_available():
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        return out

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        """Append `record` (must hold `step`) to metrics.jsonl and TensorBoard; show it on the bar."""
        if not self.enabled:
            return
        record = {"kind": prefix, **record}
        with reporting_disk_full(self.path), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, value in scalars(record).items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(record, prefix)
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "val_loss", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def message(self, text: str) -> None:
        """A line for the user (through tqdm so the bar is not broken)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def summary(self, row: dict[str, Any]) -> None:
        """The run's ledger row, as the W&B run summary."""
        if self.wandb is not None:
            self.wandb.summary(row)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
