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
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparse_dc.config.base import write_text_atomic
from sparse_dc.config.run import RunConfig
from sparse_dc.data.loader import TokenBudget, TokenBudgetDataset
from sparse_dc.errors import SparseDCError, reporting_disk_full
from sparse_dc.kernels.ops import resolve_backend, set_default_backend
from sparse_dc.model import build_model, count_params, flops_per_token
from sparse_dc.sparsity import AdamDST, DSTEngine, optimizer_state
from sparse_dc.sparsity.paths import dead_path_warning
from sparse_dc.train import ledger
from sparse_dc.train.checkpoint import Checkpointer, ResumeError, StopSignal
from sparse_dc.train.dist import DistEnv
from sparse_dc.train.metrics import Metrics, device_peak_flops, perplexity


class TrainingDiverged(SparseDCError):
    """The loss became NaN or Inf; the run stopped without saving over the last good checkpoint."""


def optimizer_steps(micro_batches: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """The loader's micro-batches grouped into optimizer steps: each list is the `micro_batches` micro-batches of
    one global batch, in order. A batch that ends early or runs into the next is an error, never a step that mixes
    two global batches."""
    step: list[dict[str, Any]] = []
    for mb in micro_batches:
        if mb["micro"] != len(step) or (step and mb["batch"] != step[0]["batch"]):
            where = f"global batch {step[0]['batch']} after {len(step)}" if step else "the start of a step"
            raise SparseDCError(f"micro-batch {mb['micro']} of global batch {mb['batch']} arrived at {where} "
                                f"micro-batches: expected micro-batches 0..{mb['micro_batches'] - 1} of one batch")
        step.append(mb)
        if len(step) == mb["micro_batches"]:
            yield step
            step = []
    if step:
        raise SparseDCError(f"the data ended inside global batch {step[0]['batch']} ({len(step)} of "
                            f"{step[0]['micro_batches']} micro-batches)")


def token_loss_sum(model: Any, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of tokens [B, L] in fp32: B x (L - 1) predictions, or with `loss_mask`
    (bool [B, L], True = real token) only those whose target token is real."""
    logits = model(tokens[:, :-1])  # (B, L - 1, vocab)
    targets = tokens[:, 1:]
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask[:, 1:], -100)  # cross_entropy's ignore_index
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and block-sparse `values`), none on norm gains (the GPT-2/Llama convention)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer | None:
    """The torch optimizer handed to DeepSpeed, or None when DeepSpeed builds its own ("AdamW", torch_adam): AdamDST
    for a sparse run with sparsity.regrow_optimizer=adamdst, torch's AdamW for optimizer.impl=client."""
    opt, sparsity = cfg.train.optimizer, cfg.sparsity
    if sparsity.sparse and sparsity.regrow_optimizer == "adamdst":
        return AdamDST(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                       momentum_ramp_steps=sparsity.momentum_ramp_steps)
    if opt.impl == "client":
        return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
    return None


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int, total_steps: int) -> Any:
    """A DeepSpeed engine over `model` with the generated ZeRO config and a warmup + decay LambdaLR."""
    import deepspeed

    tc = cfg.train
    groups = param_groups(model, tc.optimizer.weight_decay)
    optimizer = build_optimizer(cfg, groups)
    ds_config = tc.deepspeed_config(world_size)
    if optimizer is not None:
        ds_config.pop("optimizer", None)
        ds_config["zero_allow_untested_optimizer"] = True  # DeepSpeed vets only its own list of optimizer types

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: tc.schedule.lr_factor(s, total_steps))

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                           lr_scheduler=schedule, config=ds_config)
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
        if cfg.sparsity.sparse and cfg.sparsity.block_size > 1:  # the kernels of the block-sparse layers
            set_default_backend(cfg.sparsity.kernel_backend)
            resolve_backend("auto", torch.device(device))  # one line now if they cannot run on this device
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
        self.last_val_paper: float | None = None
        # the run's identity in the ledger (one row per run_id); a resume takes the checkpoint's
        self.run_id: str | None = self._shared(uuid.uuid4().hex)
        self.ledger_row: dict[str, Any] | None = None  # set once the run finished (saved in its last checkpoint)

    def _shared(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (collective)."""
        if dist.is_initialized() and self.denv.world_size > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return value

    # --- resume -----------------------------------------------------------------------------------------
    def marker(self) -> dict[str, Any]:
        """What a checkpoint records about the run (checked on resume; export rebuilds the model from it)."""
        return {"resume_fingerprint": self.cfg.fingerprint(results_only=True),
                "zero_stage": self.tc.deepspeed.zero_stage, "config": self.cfg.to_dict(), "vocab_size": self.vocab_size}

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint, if any (collective; damaged newer ones are set aside,
        see checkpoint.py). Returns whether one was found."""
        latest = self.checkpointer.newest_intact()
        if latest is None:
            return False
        expect = {k: v for k, v in self.marker().items() if k in ("resume_fingerprint", "zero_stage")}
        state = self.checkpointer.load(self.engine, latest[1], expect)
        if state.get("samples") is None:
            raise ResumeError(f"checkpoint {latest[1]} has no sparse-dc client state")
        self.step, self.samples, self.train_time = state["step"], state["samples"], state["train_time"]
        self.wall_time, self._wall_start = state["wall_time"], time.perf_counter()
        self.last_val = state.get("val_loss")
        self.run_id, self.ledger_row = state.get("run_id"), state.get("ledger_row")
        self.dst.load_state_dict(state["dst"])
        return True

    def elapsed(self) -> float:
        """Seconds of this run so far, over all its resumed segments (startup excluded)."""
        return self.wall_time + time.perf_counter() - self._wall_start

    def save(self) -> None:
        state = {"step": self.step, "samples": self.samples, "train_time": self.train_time,
                 "wall_time": self.elapsed(), "val_loss": self.last_val, "dst": self.dst.state_dict(),
                 "run_id": self.run_id, "ledger_row": self.ledger_row}
        self.checkpointer.save(self.engine, self.step, state, self.marker())

    # --- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any] | None:
        """Train to the end of the token budget; returns the ledger row (None if stopped by a signal)."""
        tc, denv = self.tc, self.denv
        if self.step >= self.total_steps:
            return self.finished_already()
        if tc.stop_at_step is not None and self.step >= tc.stop_at_step:
            if denv.is_main:
                print(f"run {self.cfg.name!r} is at step {self.step} >= train.stop_at_step={tc.stop_at_step}; "
                      "nothing to do (raise or drop train.stop_at_step to continue)")
            return None
        if denv.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with reporting_disk_full(self.run_dir):
                write_text_atomic(os.path.join(self.run_dir, "config.yaml"), self.cfg.to_yaml())
        self.metrics = self.open_metrics()
        self.warn_dead_paths(self.dst.stats())
        stop = StopSignal(self.device)
        dataset = TokenBudgetDataset(self.budget, tc.global_batch, tc.micro_batch, denv.rank, denv.world_size,
                                     self.samples)
        workers = self.cfg.data.num_workers  # reads overlap compute; the order is unchanged (see the loader)
        steps = optimizer_steps(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                            pin_memory=self.device.startswith("cuda"))
                                if workers else dataset)
        try:
            while self.step < self.total_steps:
                micro_batches = next(steps)
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

    def open_metrics(self) -> Metrics:
        tc, shape = self.tc, self.engine.module.shape
        return Metrics(
            self.run_dir, self.denv.is_main, self.total_steps, self.step, tc.global_batch * self.plan.seq_len,
            flops_per_token(self.counts, shape, self.plan.seq_len, active=False),
            flops_per_token(self.counts, shape, self.plan.seq_len, active=True),
            device_peak_flops(tc.precision, tc.peak_flops), self.denv.world_size, tc.progress, tc.tensorboard,
            wandb=tc.wandb, run_name=self.cfg.name, run_config={**self.cfg.to_dict(), "plan": self.plan.to_dict()})

    def train_step(self, micro_batches: list[dict[str, Any]]) -> tuple[float, float | None]:
        """One optimizer step over this rank's micro-batches; returns (global mean token loss, grad norm)."""
        step = self.step + 1
        # targets the loss counts in this global batch, all ranks (a partial final batch has fewer; document
        # packing counts real targets only): the normaliser, so the gradient is the same at any world size
        n_tokens = micro_batches[-1]["batch_targets"]
        self.dst.begin_step(step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, mb in enumerate(micro_batches):
            loss_sum += self.forward_backward_step(mb["tokens"], n_tokens, mb.get("loss_mask"))
            if k < len(micro_batches) - 1:
                self.engine.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary below
        if dist.is_initialized() and self.denv.world_size > 1:
            dist.all_reduce(loss_sum)
        loss = float(loss_sum) / max(n_tokens, 1)
        if not math.isfinite(loss):
            intact = self.checkpointer.last_intact
            kept = f"the last checkpoint is step {intact[0]}, {intact[1]}" if intact else "no checkpoint was saved yet"
            raise TrainingDiverged(f"loss is {loss} at step {step}: stopping ({kept}; lower train.optimizer.lr "
                                   "or lengthen the warmup)")
        self.engine.step()  # the accumulation boundary: clip, optimizer, LR schedule
        self.step = step
        stats = self.dst.end_step(step)
        if stats is not None:
            self.metrics.log({k: v for k, v in stats.items() if k != "layer_density"}, prefix="dst")
            self.warn_dead_paths(stats)
        norm = self.engine.get_global_grad_norm()
        return loss, (float(norm) if norm is not None else None)

    def warn_dead_paths(self, stats: dict[str, Any]) -> None:
        """One line when fewer than 95% of the active parameters lie on a live gradient path."""
        warning = dead_path_warning(stats, self.counts.law_active)
        if warning is not None:
            self.metrics.message(warning)

    def forward_backward_step(self, tokens: torch.Tensor, n_tokens: int,
                              loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Forward + backward of one micro-batch tokens [micro, L] (loss_mask: bool [micro, L] under document
        packing); returns its summed token loss (float64).

        Scaled so the optimizer sees d(sum of token losses over the global batch)/dθ / n_tokens exactly,
        also for a partial final batch: DeepSpeed divides by accumulation steps and averages over ranks, so
        the summed loss is multiplied back by both. An empty micro-batch still runs (ZeRO 3 gathers parameters
        in forward, a collective) on one dummy row with weight 0."""
        weight = 1.0
        if tokens.shape[0] == 0:
            tokens, loss_mask, weight = torch.zeros(1, self.plan.seq_len, dtype=torch.long), None, 0.0
        if loss_mask is not None:
            loss_mask = loss_mask.to(self.device, non_blocking=True)
        loss_sum = token_loss_sum(self.engine, tokens.to(self.device, non_blocking=True), loss_mask) * weight
        self.engine.backward(loss_sum * (self.accumulation * self.denv.world_size / max(n_tokens, 1)))
        return loss_sum.detach().double()

    # --- evaluation and the end of a run -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation loss on the held-out sequences (collective; None without validation data), two ways on the
        same batches: `val_loss`, the mean over every predicted token (real targets only under document packing),
        returned; `val_loss_paper`, the paper code's estimator: the sum of per-batch mean losses / (batches + 1),
        biased low by a factor batches / (batches + 1) (docs/fidelity.md). Batch j is validation sequences
        [j x micro_batch, (j + 1) x micro_batch), whatever the world size; ranks take batches round-robin."""
        n = self.budget.validation_sequences()
        if self.tc.eval_sequences is not None:
            n = min(n, self.tc.eval_sequences)
        if n == 0:
            return None
        size, world, rank = self.tc.micro_batch, self.denv.world_size, self.denv.rank
        batches = math.ceil(n / size)
        total = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, targets, sum of means, batches
        for first in range(0, batches, world):  # the same number of forwards on every rank (ZeRO 3 gathers)
            j = first + rank
            if j < batches:
                mb = self.budget.validation_micro_batch(np.arange(j * size, min((j + 1) * size, n)))
                tokens, mask = mb["tokens"].to(self.device), mb.get("loss_mask")
                mask = mask.to(self.device) if mask is not None else None
            else:
                tokens, mask = torch.zeros(1, self.plan.seq_len, dtype=torch.long, device=self.device), None
            loss = token_loss_sum(self.engine, tokens, mask).double()
            targets = float(mask[:, 1:].sum()) if mask is not None else float(tokens[:, 1:].numel())
            if j < batches and targets > 0:
                total += torch.stack([loss, loss.new_tensor(targets), loss / targets, loss.new_tensor(1.0)])
        if dist.is_initialized() and world > 1:
            dist.all_reduce(total)
        if float(total[1]) == 0:  # every validation sequence is a single token: nothing to predict
            return None
        self.last_val = float(total[0] / total[1])
        self.last_val_paper = float(total[2] / (total[3] + 1))
        self.metrics.log({"step": self.step, "val_loss": self.last_val, "val_ppl": perplexity(self.last_val),
                          "val_loss_paper": self.last_val_paper}, prefix="eval")
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

    def finish(self, save: bool = True) -> dict[str, Any]:
        """Final evaluation, replica check, checkpoint and the ledger row (collective; rank 0 records it). The
        row travels in the final checkpoint, written before the ledger, so a run stopped between the two (a
        kill, a full disk) records it on its next `--resume auto` instead of losing it."""
        val = self.evaluate()
        stats = self.dst.stats()  # also a dense model's: its dead-path count (0 unless projections are missing)
        record: dict[str, Any] = {"step": self.step, "dst": stats if self.dst.layers else None}
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
        self.ledger_row = ledger.make_row(self.cfg, self.counts, self.plan, val_loss=val,
                                          val_loss_paper=self.last_val_paper,
                                          tokens_per_s=self.plan.total_tokens / max(self.train_time, 1e-9),
                                          wall_time_s=self.elapsed(), steps=self.step,
                                          world_size=self.denv.world_size, run_id=self.run_id,
                                          effective_active_params=stats["effective_active_params"],
                                          dead_path_params=stats["dead_path_params"])
        self.metrics.summary(self.ledger_row)
        if save and self.tc.save_final:
            self.save()
        if self.denv.is_main:
            appended = ledger.record_run(self.tc.ledger, self.ledger_row)
            self.metrics.message(f"done: {self.step} steps, val_loss {val}, ledger row "
                                 + (f"appended to {self.tc.ledger}" if appended else f"already in {self.tc.ledger}"))
        return self.ledger_row

    def finished_already(self) -> None:
        """A resume of a finished run: make sure its ledger row exists (collective), then nothing to do."""
        if self.ledger_row is None:  # a checkpoint from before the row travelled in it: evaluate again
            self.metrics = self.open_metrics()
            try:
                self.finish(save=False)
            finally:
                self.metrics.close()
        elif self.denv.is_main:
            appended = ledger.record_run(self.tc.ledger, self.ledger_row)
            print(f"run {self.cfg.name!r} already finished ({self.step} steps); "
                  + (f"its missing ledger row is now appended to {self.tc.ledger}" if appended else
                     f"its ledger row is in {self.tc.ledger}; nothing to do"), flush=True)
