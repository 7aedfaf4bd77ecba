"""Dynamic sparse training: the engine that updates every SparseLinear's topology on schedule.

The training loop calls, for each optimizer step s = 1, 2, ... (s counts completed optimizer steps):

    dst.begin_step(s)      # RigL: arms dense-gradient capture when s is an update step (no cost otherwise)
    ... forward / backward over the micro-batches, optimizer step ...
    dst.end_step(s)        # applies the topology update if s is an update step; returns its stats or None

An update (SET or RigL, Evci et al. 2020 / Mocanu et al. 2018) drops, in every layer, the
round(rate(s) x live units) live units of smallest magnitude (|w| or block Frobenius norm of the fp32 master
weights) and grows as many units that were dead before the update: random ones (SET) or those of largest
dense-gradient score (RigL). With the path-aware block topology (the default for B > 1) open lines of a projection
stay open and blocks grow only into open lines (sparse_dc.sparsity.paths). RigL's score is |dL/dW| of the step's
gradient summed over all micro-batches and ranks: B = 1: |Σ dL/dW| per entry; blocks with rigl_scores="exact"
(default): ‖Σ dYᵀX‖_F per dead block, the blocks summed in fp32 by the sampled-dW kernel over the step's backwards
and over ranks before the norm (memory: see sparse_dc.sparsity.layer); with rigl_scores="norm_sum": Σ ‖dYᵀX‖_F per
backward (and rank), exact only for one micro-batch on one rank. Regrown units start at 0 (regrow_init=zero) or at
small normal values drawn from a generator keyed by (seed, step, layer) (regrow_init=normal); the moments of
dropped and grown units are reset through the optimizer-state accessor; with regrow_optimizer="adamdst" the grown
units' per-weight step count of the AdamDST optimizer restarts at sparsity.regrow_step.

Identical topology on every rank: SET draws from a generator keyed by (seed, step, layer), RigL's scores are
all-reduced, and the decided masks are then broadcast from rank 0, so ranks agree even if reductions differ in
the last bit. Checkpoint state: `state_dict()` (seed, last update, ever-active masks, last stats); the masks
themselves are module buffers in the model's state dict.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparse_dc.errors import SparseDCError
from sparse_dc.sparsity.adamdst import ELEMENT_STEP
from sparse_dc.sparsity.config import SparsityConfig
from sparse_dc.sparsity.layer import SparseLinear
from sparse_dc.sparsity.optim_state import OptimizerState, TorchOptimizerState
from sparse_dc.sparsity.paths import (PathAwareUpdate, dead_path_params, keyed_generator, model_projections,
                                      parse_projection, path_aware)
from sparse_dc.sparsity.topology import drop_grow, prune_rate_at, unit_generator


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DSTEngine:
    def __init__(self, model: nn.Module, cfg: SparsityConfig, total_steps: int,
                 state: OptimizerState | None = None, active_params: int | None = None):
        """`model`: the module holding the SparseLinear layers (for DeepSpeed, engine.module); `total_steps`:
        the run's optimizer steps (the stop step is stop_fraction x total_steps); `state`: the accessor from
        `optimizer_state(optimizer or engine)` (None = parameters only, no moments to reset); `active_params`:
        the run's active parameter count, from which stats() subtracts the live parameters on dead paths."""
        if total_steps < 1:
            raise SparseDCError(f"total_steps={total_steps}: expected an integer >= 1")
        self.cfg, self.total_steps = cfg, total_steps
        self.stop_step = int(cfg.stop_fraction * total_steps)
        self.state = state if state is not None else TorchOptimizerState(None)
        self.model, self.active_params = model, active_params
        self.layers: dict[str, SparseLinear] = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        # path-aware: (transformer block, kind) of each Llama projection (layers of other models: none)
        sites = {n: parse_projection(n) for n in self.layers} if path_aware(cfg) else {}
        self.sites = {n: site for n, site in sites.items() if site is not None}
        self.ever_active = {n: m.unit_mask().cpu().clone() for n, m in self.layers.items()}
        self.last_update_step = 0
        self.last_changed: dict[str, float] = {n: 0.0 for n in self.layers}

    # --- schedule ---------------------------------------------------------------------------------------
    def prune_rate(self, step: int) -> float:
        return prune_rate_at(step, self.cfg.prune_rate, self.stop_step, self.cfg.prune_rate_decay,
                             self.cfg.min_prune_rate)

    def is_update_step(self, step: int) -> bool:
        return (self.cfg.method != "static" and bool(self.layers) and step % self.cfg.update_frequency == 0
                and self.prune_rate(step) > 0)

    def begin_step(self, step: int) -> None:
        if self.cfg.method == "rigl" and self.is_update_step(step):
            for layer in self.layers.values():
                layer.arm_scores(True, self.cfg.rigl_scores)

    def end_step(self, step: int) -> dict[str, Any] | None:
        if not self.is_update_step(step):
            return None
        return self.update(step)

    # --- the update -------------------------------------------------------------------------------------
    def update(self, step: int) -> dict[str, Any]:
        """Drop/grow every layer at `step` (collective under DeepSpeed/torch.distributed: all ranks call it)."""
        rate = self.prune_rate(step)
        paths = PathAwareUpdate(self.sites)
        for index, (name, layer) in enumerate(self.layers.items()):
            old = layer.unit_mask().clone()
            magnitude = layer.unit_magnitude(self.state.get_param(layer.param).to(old.device))
            grow_score = self._grow_score(layer, step, index)
            magnitude, grow_score = magnitude.to(old.device), grow_score.to(old.device)
            n = round(rate * int(old.sum()))
            regrow_dropped = self.cfg.grow_candidates == "dead_after_drop"
            if name in self.sites:  # every open line stays open; blocks grow only into open lines
                new, grown = paths.decide(name, old, magnitude, grow_score, n, regrow_dropped)
            else:
                new, grown = drop_grow(old, magnitude, grow_score, n, regrow_dropped=regrow_dropped)
            if _distributed():  # rank 0's decision is the decision: 0 dead, 1 kept, 2 grown
                code = new.to(torch.uint8) + grown.to(torch.uint8)
                dist.broadcast(code, src=0)
                new, grown = code > 0, code == 2
            if name in self.sites:  # from the broadcast decision, so every rank locks the same lines
                paths.record(name, old, new, grown)
            reset = layer.with_revived(layer.set_topology(new), grown & old)
            # B = 1: zero the dropped entries in the weight; blocks: zero the grown slots' values (or give grown
            # units their regrow_init values). Moments of both reset, so the optimizer neither moves a pruned
            # weight nor carries stale momentum into a regrown one.
            self.state.zero_entries(layer.param, reset, fill=self._regrown_values(layer, grown, reset, step, index))
            if self.cfg.regrow_optimizer == "adamdst":  # regrown weights restart their per-weight step count
                self.state.fill_state(layer.param, layer.grown_entries(grown, reset), ELEMENT_STEP,
                                      float(self.cfg.regrow_step))
            changed = int((old & ~new).sum())
            self.last_changed[name] = changed / max(1, int(old.sum()))
            self.ever_active[name] |= new.cpu()
        self.last_update_step = step
        return self.stats(step)

    def _regrown_values(self, layer: SparseLinear, grown: torch.Tensor, reset: torch.Tensor, step: int,
                        index: int) -> torch.Tensor | None:
        """What `zero_entries` writes at `reset` (None: zeros): normal values at grown units, zeros at dropped
        ones (B = 1). Drawn on the CPU from a generator keyed by (seed, step, layer): the same on every rank."""
        if self.cfg.regrow_init == "zero":
            return None
        gen = keyed_generator("regrow", self.cfg.seed, step, index)
        return layer.regrown_values(grown, reset, gen, self.cfg.regrow_init_scale * layer.init_std)

    def _grow_score(self, layer: SparseLinear, step: int, index: int) -> torch.Tensor:
        shape = layer.unit_mask().shape
        if self.cfg.method == "set":
            return torch.rand(shape, generator=unit_generator(self.cfg.seed, step, index))
        capture = layer.take_scores()
        if capture is None:
            raise SparseDCError(f"RigL update at step {step} found no captured gradients for a layer: call "
                                "dst.begin_step(step) before that step's forward/backward")
        if _distributed():  # sum the gradient (not its norms) over ranks, as DDP's all-reduce would
            dist.all_reduce(capture.acc)
        return capture.scores()

    # --- statistics and checkpoint state ----------------------------------------------------------------
    def dead_path_params(self) -> int:
        """Live parameters on a dead gradient path (sparse_dc.sparsity.paths), over the model's Llama blocks."""
        n_heads = getattr(getattr(self.model, "shape", None), "n_heads", None)
        if n_heads is None:  # not a Llama: no path structure known
            return 0
        return sum(sum(dead_path_params(block, n_heads).values())
                   for block in model_projections(self.model).values())

    def effective_active_params(self, dead: int) -> int:
        """`active_params` counted over the live sparse weights on a live path only: active_params x (1 - dead /
        live sparse weights), which in the paper's N convention (active = dense x live fraction) is dense x the
        effective live fraction."""
        live = sum(layer.active_numel for layer in self.layers.values())
        return self.active_params if not live else max(0, round(self.active_params * (1 - dead / live)))

    def stats(self, step: int | None = None) -> dict[str, Any]:
        """Scalars for logs: global density over sparse layers, fraction of live units changed at the last
        update, fraction of units ever active, live parameters on dead paths and the effective active count
        (when the engine knows the active count), and per-layer densities."""
        live = {n: int(m.unit_mask().sum()) for n, m in self.layers.items()}
        units = {n: m.unit_mask().numel() for n, m in self.layers.items()}
        total, total_units = sum(live.values()), sum(units.values())
        if not total_units:  # a dense model: nothing is sparse
            total = total_units = 1
        dead = self.dead_path_params()
        return {
            "step": self.last_update_step if step is None else step,
            "prune_rate": self.prune_rate(self.last_update_step if step is None else step),
            "density": total / total_units,
            "changed_fraction": sum(self.last_changed[n] * live[n] for n in live) / max(1, total),
            "ever_active_fraction": sum(int(e.sum()) for e in self.ever_active.values()) / total_units,
            "dead_path_params": dead,
            **({"effective_active_params": self.effective_active_params(dead)} if self.active_params is not None
               else {}),
            "layer_density": {n: live[n] / units[n] for n in live},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "method": self.cfg.method, "last_update_step": self.last_update_step,
                "ever_active": {n: e.clone() for n, e in self.ever_active.items()},
                "last_changed": dict(self.last_changed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.cfg.seed or state["method"] != self.cfg.method:
            raise SparseDCError(f"DST checkpoint has seed={state['seed']}, method={state['method']!r}; the config "
                                f"has seed={self.cfg.seed}, method={self.cfg.method!r}: expected them to match")
        if set(state["ever_active"]) != set(self.layers):
            raise SparseDCError("DST checkpoint's sparse layers differ from the model's: expected the same "
                                "model/sparsity config")
        self.last_update_step = int(state["last_update_step"])
        self.ever_active = {n: e.clone().bool().cpu() for n, e in state["ever_active"].items()}
        self.last_changed = dict(state["last_changed"])
