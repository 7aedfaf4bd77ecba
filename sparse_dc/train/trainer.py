"""The training loop: train() -> train_step() -> forward_backward_step(), torchtitan-style.

One optimizer step = one global batch of `train.global_batch` sequences, split over ranks and micro-batches by
the TokenBudget loader. Each component decides when it runs: the DST engine (topology updates on its schedule),
evaluation, metrics and the checkpointer. Everything a resume needs (samples consumed, DST state, RNG, wall time)
travels in the checkpoint's client state.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparse_dc.config.base import write_text_atomic
from sparse_dc.config.run import RunConfig
from sparse_dc.data.loader import TokenBudget, TokenBudgetDataset
from sparse_dc.errors import SparseDCError
from sparse_dc.model import build_model, count_params, flops_per_token
from sparse_dc.sparsity import DSTEngine, optimizer_state
from sparse_dc.sparsity.paths import dead_path_warning
from sparse_dc.train import ledger
from sparse_dc.train.checkpoint import Checkpointer, ResumeError, StopSignal
from sparse_dc.train.dist import DistEnv
from sparse_dc.train.metrics import Metrics, device_peak_flops, perplexity


class TrainingDiverged(SparseDCError):
    """The loss became NaN or Inf; the run stopped without saving over the last good checkpoint."""


def resume_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that shapes the loss trajectory (not logging, eval or checkpoint cadence, ledger path):
    a resume must match it."""
    data = cfg.to_dict()
    for key in ("log_interval", "eval_interval", "eval_sequences", "checkpoint_interval", "keep_checkpoints",
                "save_final", "stop_at_step", "ledger", "tensorboard", "wandb", "progress", "peak_flops",
                "verify_replicas"):
        data["train"].pop(key)
    data["data"].pop("num_workers")
    data["data"].pop("verify")
    return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:16]


def token_loss_sum(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of tokens [B, L] (B x (L - 1) predictions), computed in fp32."""
    logits = model(tokens[:, :-1])  # (B, L - 1, vocab)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and block-sparse `values`), none on norm gains (the GPT-2/Llama convention)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int, total_steps: int) -> Any:
    """A DeepSpeed engine over `model` with the generated ZeRO config and a warmup + decay LambdaLR."""
    import deepspeed

    tc = cfg.train
    groups = param_groups(model, tc.optimizer.weight_decay)
    optimizer = None
    if tc.optimizer.impl == "client":
        optimizer = torch.optim.AdamW(groups, lr=tc.optimizer.lr, betas=tuple(tc.optimizer.betas),
                                      eps=tc.optimizer.eps)

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: tc.schedule.lr_factor(s, total_steps))

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                           lr_scheduler=schedule, config=tc.deepspeed_config(world_size))
    return engine


class Trainer:
    def __init__(self, cfg: RunConfig, denv: DistEnv, device: str):
        self.cfg, self.tc, self.denv, self.device = cfg, cfg.train, denv, device
        self.run_dir = os.path.join(cfg.output_dir, cfg.name)
        self.stopped_by_signal = False  # set when SIGTERM/SIGUSR1 made train() save and return early
        self.budget = TokenBudget.from_config(cfg.data)
        self.plan = self.budget.plan
        self.total_steps = self.budget.num_batches(self.tc.global_batch)
        self.accumulation = self.tc.accumulation_steps(denv.world_size)
        torch.manual_seed(self.tc.seed)  # dense weights; the sparse topology is seeded by sparsity.seed
        model = build_model(cfg.model, cfg.sparsity, self.budget.vocab_size)
        self.vocab_size = model.vocab_size
        self.counts = count_params(model)
        self.engine = build_engine(cfg, model, denv.world_size, self.total_steps)
        self.dst = DSTEngine(self.engine.module, cfg.sparsity, self.total_steps, optimizer_state(self.engine),
                             active_params=self.counts.law_active)
        self.checkpointer = Checkpointer(self.run_dir, denv.rank, denv.world_size, self.tc.keep_checkpoints,
                                         self.tc.seed)
        self.step, self.samples, self.train_time, self.wall_time = 0, 0, 0.0, 0.0
        self._wall_start = time.perf_counter()
        self.last_val: float | None = None

    # --- resume -----------------------------------------------------------------------------------------
    def marker(self) -> dict[str, Any]:
        """What a checkpoint records about the run (checked on resume; export rebuilds the model from it)."""
        return {"resume_fingerprint": resume_fingerprint(self.cfg), "zero_stage": self.tc.deepspeed.zero_stage,
                "config": self.cfg.to_dict(), "vocab_size": self.vocab_size}

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if any (collective). Returns whether one was found."""
        latest = self.checkpointer.latest()
        if latest is None:
            return False
        expect = {k: v for k, v in self.marker().items() if k in ("resume_fingerprint", "zero_stage")}
        state = self.checkpointer.load(self.engine, latest[1], expect)
        if state.get("samples") is None:
            raise ResumeError(f"checkpoint {latest[1]} has no sparse-dc client state")
        self.step, self.samples, self.train_time = state["step"], state["samples"], state["train_time"]
        self.wall_time, self._wall_start = state["wall_time"], time.perf_counter()
        self.last_val = state.get("val_loss")
        self.dst.load_state_dict(state["dst"])
        return True

    def elapsed(self) -> float:
        """Seconds of this run so far, over all its resumed segments (startup excluded)."""
        return self.wall_time + time.perf_counter() - self._wall_start

    def save(self) -> None:
        state = {"step": self.step, "samples": self.samples, "train_time": self.train_time,
                 "wall_time": self.elapsed(), "val_loss": self.last_val, "dst": self.dst.state_dict()}
        self.checkpointer.save(self.engine, self.step, state, self.marker())

    # --- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any] | None:
        """Train to the end of the token budget; returns the ledger row (None if stopped by a signal)."""
        tc, denv = self.tc, self.denv
        if self.step >= self.total_steps:
            if denv.is_main:
                print(f"run {self.cfg.name!r} already finished ({self.step} steps); nothing to do")
            return None
        if tc.stop_at_step is not None and self.step >= tc.stop_at_step:
            if denv.is_main:
                print(f"run {self.cfg.name!r} is at step {self.step} >= train.stop_at_step={tc.stop_at_step}; "
                      "nothing to do (raise or drop train.stop_at_step to continue)")
            return None
        if denv.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            write_text_atomic(os.path.join(self.run_dir, "config.yaml"), self.cfg.to_yaml())
        tokens_per_step = tc.global_batch * self.plan.seq_len
        shape = self.engine.module.shape
        self.metrics = Metrics(
            self.run_dir, denv.is_main, self.total_steps, self.step, tokens_per_step,
            flops_per_token(self.counts, shape, self.plan.seq_len, active=False),
            flops_per_token(self.counts, shape, self.plan.seq_len, active=True),
            device_peak_flops(tc.precision, tc.peak_flops), denv.world_size, tc.progress, tc.tensorboard,
            wandb=tc.wandb, run_name=self.cfg.name, run_config={**self.cfg.to_dict(), "plan": self.plan.to_dict()})
        self.warn_dead_paths(self.dst.stats())
        stop = StopSignal(self.device)
        dataset = TokenBudgetDataset(self.budget, tc.global_batch, tc.micro_batch, denv.rank, denv.world_size,
                                     self.samples)
        workers = self.cfg.data.num_workers  # reads overlap compute; the order is unchanged (see the loader)
        data = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                pin_memory=self.device.startswith("cuda")) if workers else dataset)
        try:
            while self.step < self.total_steps:
                micro_batches = [next(data) for _ in range(self.accumulation)]
                start = time.perf_counter()
                loss, grad_norm = self.train_step(micro_batches)
                self.train_time += time.perf_counter() - start
                self.metrics.step_done(micro_batches[-1]["samples_end"] * self.plan.seq_len
                                       - self.samples * self.plan.seq_len)
                self.samples = micro_batches[-1]["samples_end"]
                if self.step % tc.log_interval == 0 or self.step == self.total_steps:
                    self.metrics.log({"step": self.step, "loss": loss, "lr": self.engine.get_lr()[0],
                                      "grad_norm": grad_norm, "samples": self.samples,
                                      "tokens": self.samples * self.plan.seq_len, **self.metrics.throughput()})
                if tc.eval_interval and self.step % tc.eval_interval == 0 and self.step < self.total_steps:
                    self.evaluate()
                if stop.requested():
                    self.stopped_by_signal = True
                    self.save()
                    self.metrics.message(f"{stop.name()}: saved step {self.step} and stopped; continue with "
                                         "--resume auto")
                    return None
                if self.step == tc.stop_at_step and self.step < self.total_steps:
                    self.save()
                    self.metrics.message(f"train.stop_at_step={self.step}: saved step {self.step} of "
                                         f"{self.total_steps} and stopped; continue with --resume auto")
                    return None
                if tc.checkpoint_interval and self.step % tc.checkpoint_interval == 0 \
                        and self.step < self.total_steps:
                    self.save()
            return self.finish()
        finally:
            stop.restore()
            self.metrics.close()

    def train_step(self, micro_batches: list[dict[str, Any]]) -> tuple[float, float | None]:
        """One optimizer step over this rank's micro-batches; returns (global mean token loss, grad norm)."""
        step = self.step + 1
        # tokens predicted in this global batch, all ranks (the final batch of a run may be partial)
        batch_samples = micro_batches[-1]["samples_end"] - self.samples
        n_tokens = batch_samples * (self.plan.seq_len - 1)
        self.dst.begin_step(step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, mb in enumerate(micro_batches):
            loss_sum += self.forward_backward_step(mb["tokens"], n_tokens)
            if k < len(micro_batches) - 1:
                self.engine.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary below
        if dist.is_initialized() and self.denv.world_size > 1:
            dist.all_reduce(loss_sum)
        loss = float(loss_sum) / n_tokens
        if not math.isfinite(loss):
            latest = self.checkpointer.latest()
            kept = f"the last good checkpoint is step {latest[0]}" if latest else "no checkpoint was saved yet"
            raise TrainingDiverged(f"loss is {loss} at step {step}: stopping ({kept}; lower train.optimizer.lr "
                                   "or raise schedule.warmup_steps)")
        self.engine.step()  # the accumulation boundary: clip, AdamW, LR schedule
        self.step = step
        stats = self.dst.end_step(step)
        if stats is not None:
            self.metrics.log({k: v for k, v in stats.items() if k != "layer_density"}, prefix="dst")
            self.warn_dead_paths(stats)
        norm = self.engine.get_global_grad_norm()
        return loss, (float(norm) if norm is not None else None)

    def warn_dead_paths(self, stats: dict[str, Any]) -> None:
        """One line when fewer than 95% of the active parameters lie on a live gradient path."""
        warning = dead_path_warning(stats)
        if warning is not None:
            self.metrics.message(warning)

    def forward_backward_step(self, tokens: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Forward + backward of one micro-batch tokens [micro, L]; returns its summed token loss (float64).

        Scaled so the optimizer sees d(sum of token losses over the global batch)/dθ / n_tokens exactly,
        also for a partial final batch: DeepSpeed divides by accumulation steps and averages over ranks, so
        the summed loss is multiplied back by both. An empty micro-batch still runs (ZeRO 3 gathers parameters
        in forward, a collective) on one dummy row with weight 0."""
        weight = 1.0
        if tokens.shape[0] == 0:
            tokens, weight = torch.zeros(1, self.plan.seq_len, dtype=torch.long), 0.0
        loss_sum = token_loss_sum(self.engine, tokens.to(self.device, non_blocking=True)) * weight
        self.engine.backward(loss_sum * (self.accumulation * self.denv.world_size / n_tokens))
        return loss_sum.detach().double()

    # --- evaluation and the end of a run -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss on the held-out validation sequences (collective; None without validation data)."""
        n = self.budget.validation_sequences()
        if self.tc.eval_sequences is not None:
            n = min(n, self.tc.eval_sequences)
        if n == 0:
            return None
        share = np.array_split(np.arange(n), self.denv.world_size)[self.denv.rank]
        chunks = math.ceil(math.ceil(n / self.denv.world_size) / self.tc.micro_batch)  # same count on every rank
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, tokens)
        for c in range(chunks):
            ids = share[c * self.tc.micro_batch:(c + 1) * self.tc.micro_batch]
            weight = 1.0 if len(ids) else 0.0
            tokens = torch.from_numpy(self.budget.validation_batch(ids if len(ids) else share[:0]))
            if not len(ids):
                tokens = torch.zeros(1, self.plan.seq_len, dtype=torch.long)
            tokens = tokens.to(self.device)
            loss = token_loss_sum(self.engine, tokens)
            total += torch.stack([loss.double() * weight, torch.tensor(weight * tokens[:, 1:].numel(),
                                                                       dtype=torch.float64, device=self.device)])
        if dist.is_initialized() and self.denv.world_size > 1:
            dist.all_reduce(total)
        self.last_val = float(total[0] / total[1])
        self.metrics.log({"step": self.step, "val_loss": self.last_val, "val_ppl": perplexity(self.last_val)},
                         prefix="eval")
        return self.last_val

    def replica_digest(self) -> str:
        """sha256 over this rank's full parameters and buffers (topology included), in module order
        (collective under ZeRO 3, which gathers the partitions)."""
        import deepspeed

        module, digest = self.engine.module, hashlib.sha256()
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.tc.deepspeed.zero_stage == 3):
            for tensor in [*params, *module.buffers()]:
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def finish(self) -> dict[str, Any]:
        """Final evaluation, checkpoint, replica check and the ledger row (rank 0 appends it)."""
        val = self.evaluate()
        if self.tc.save_final:
            self.save()
        record: dict[str, Any] = {"step": self.step, "dst": self.dst.stats() if self.dst.layers else None}
        if self.tc.verify_replicas:
            digests: list[Any] = [None] * self.denv.world_size
            mine = self.replica_digest()
            if dist.is_initialized() and self.denv.world_size > 1:
                dist.all_gather_object(digests, mine)
            else:
                digests = [mine]
            record["replica_digests"] = digests
            if len(set(digests)) > 1:
                self.metrics.message(f"WARNING: ranks hold different parameters/topology: {digests}")
        self.metrics.log(record, prefix="final")
        row = ledger.make_row(self.cfg, self.counts, self.plan, val_loss=val,
                              dead_path_params=self.dst.dead_path_params(),
                              tokens_per_s=self.plan.total_tokens / max(self.train_time, 1e-9),
                              wall_time_s=self.elapsed(), steps=self.step, world_size=self.denv.world_size)
        self.metrics.summary(row)
        if self.denv.is_main:
            ledger.append_row(self.tc.ledger, row)
            self.metrics.message(f"done: {self.step} steps, val_loss {val}, ledger row appended to "
                                 f"{self.tc.ledger}")
        return row
