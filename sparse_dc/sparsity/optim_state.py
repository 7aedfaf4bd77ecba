"""Optimizer-state accessor: read and write a parameter and its optimizer moments as full fp32 tensors.

The DST engine resets regrown weights and their Adam moments through this small interface, so the same code works
with a plain torch optimizer and under DeepSpeed ZeRO 1, 2 and 3 (where the fp32 master weights and the moments
are partitioned across ranks and the module's parameter may be a low-precision copy or, under ZeRO 3, an empty
placeholder). This is the only module of `sparse_dc.sparsity` that knows about DeepSpeed; it imports it lazily.

Under DeepSpeed every method is a collective (all-gather / all-reduce inside DeepSpeed's safe_get/safe_set
helpers): every rank must call them for the same parameters in the same order. Under ZeRO 3 full tensors are
written back by `set_zero3_partition`, not DeepSpeed's safe_set helpers (see there: they fail whenever the world
size does not divide a parameter's size); its safe_get helpers are exact at any world size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

# Per-parameter optimizer states that have the parameter's shape and must be reset with it (Adam/AdamW).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class OptimizerState(Protocol):
    def get_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        """A full fp32 copy of the parameter (the optimizer's master weights where they exist)."""

    def zero_entries(self, p: torch.nn.Parameter, where: torch.Tensor, param: bool = True,
                     fill: torch.Tensor | None = None) -> None:
        """Set p[where] = 0 in the parameter (when `param`, in the model copy and the fp32 master) and in every
        moment; `where` is a bool mask of p's shape or long indices into p's first dim. `fill`: the values the
        parameter gets at `where` instead of 0 (p[where] = fill); the moments are zeroed either way."""

    def fill_state(self, p: torch.nn.Parameter, where: torch.Tensor, key: str, value: float) -> None:
        """Set the optimizer state `key` (a tensor of p's shape, e.g. AdamDST's per-weight step) to `value` at
        `where` (as in zero_entries); a no-op when the optimizer keeps no such state."""


class TorchOptimizerState:
    """A plain torch optimizer (or None: the parameters only, e.g. before any optimizer exists)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.optimizer = optimizer

    def get_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.detach().float().clone()

    @torch.no_grad()
    def zero_entries(self, p: torch.nn.Parameter, where: torch.Tensor, param: bool = True,
                     fill: torch.Tensor | None = None) -> None:
        if param:
            p[where] = 0 if fill is None else fill.to(p)
        state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
        for key in MOMENT_KEYS:
            if torch.is_tensor(state.get(key)) and state[key].shape == p.shape:
                state[key][where] = 0

    @torch.no_grad()
    def fill_state(self, p: torch.nn.Parameter, where: torch.Tensor, key: str, value: float) -> None:
        state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
        if torch.is_tensor(state.get(key)) and state[key].shape == p.shape:
            state[key][where] = value


class DeepSpeedOptimizerState:
    """A DeepSpeed engine under ZeRO 1, 2 or 3 (fp32, bf16 or fp16): reads through deepspeed.utils.safe_get_*,
    writes through safe_set_* under ZeRO 1/2 and `set_zero3_partition` under ZeRO 3."""

    def __init__(self, engine: Any):
        self.engine = engine

    def _state_keys(self, wanted: tuple[str, ...]) -> list[str]:
        """Which of `wanted` the wrapped torch optimizer keeps (none before its first step). Decided from the inner
        optimizer's state, which every rank holds for its own partition, so all ranks agree (a per-parameter
        test would not: under ZeRO 1/2 a rank may own no fragment of a given parameter)."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        state = next(iter(inner.state.values()), {}) if getattr(inner, "state", None) else {}
        return [k for k in wanted if torch.is_tensor(state.get(k))]

    def get_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)
        return (full if full is not None else p.detach()).float().reshape(self._shape(p)).clone()

    @staticmethod
    def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape))

    @torch.no_grad()
    def zero_entries(self, p: torch.nn.Parameter, where: torch.Tensor, param: bool = True,
                     fill: torch.Tensor | None = None) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        if param:
            full = safe_get_full_fp32_param(p)
            if full is not None:  # the fp32 master, which the next step copies into the model's copy
                full = full.reshape(self._shape(p)).clone()
                full[where] = 0 if fill is None else fill.to(full)
                self._set_full(p, full)
            self._set_model_copy(p, where, fill)
        for key in self._state_keys(MOMENT_KEYS):
            self._set_state(p, where, key, 0.0)

    @torch.no_grad()
    def fill_state(self, p: torch.nn.Parameter, where: torch.Tensor, key: str, value: float) -> None:
        if self._state_keys((key,)):
            self._set_state(p, where, key, value)

    def _set_state(self, p: torch.nn.Parameter, where: torch.Tensor, key: str, value: float) -> None:
        from deepspeed.utils import safe_get_full_optimizer_state

        full = safe_get_full_optimizer_state(p, key).reshape(self._shape(p)).clone()
        full[where] = value
        self._set_full(p, full, key)

    @staticmethod
    def _set_full(p: torch.nn.Parameter, full: torch.Tensor, key: str | None = None) -> None:
        """Write a full tensor of p's shape into the fp32 master (key None) or the optimizer state `key`."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if hasattr(p, "ds_id"):  # ZeRO 3
            set_zero3_partition(p, full, key)
        elif key is None:
            safe_set_full_fp32_param(p, full)
        else:
            safe_set_full_optimizer_state(p, full, key)

    @staticmethod
    def _set_model_copy(p: torch.nn.Parameter, where: torch.Tensor, fill: torch.Tensor | None) -> None:
        """Write the model's (possibly low-precision) copy, which the next forward reads before any step."""
        if hasattr(p, "ds_id"):  # ZeRO 3: gather the partitions, edit on every rank, re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data[where] = 0 if fill is None else fill.to(p.data)
        else:
            p.data[where] = 0 if fill is None else fill.to(p.data)


def optimizer_state(optimizer_or_engine: Any) -> OptimizerState:
    """The accessor for a torch optimizer, a DeepSpeed engine, or None (parameters only)."""
    if type(optimizer_or_engine).__module__.startswith("deepspeed"):
        return DeepSpeedOptimizerState(optimizer_or_engine)
    if optimizer_or_engine is None or isinstance(optimizer_or_engine, torch.optim.Optimizer):
        return TorchOptimizerState(optimizer_or_engine)
    raise TypeError(f"Expected a torch optimizer, a DeepSpeed engine or None. Got {type(optimizer_or_engine)}.")


@torch.no_grad()
def set_zero3_partition(p: torch.nn.Parameter, full: torch.Tensor, key: str | None = None) -> None:
    """Copy this rank's slice of `full` (a tensor of p's full shape) into its ZeRO-3 partition of the fp32 master
    weights (key None) or of the optimizer state `key` (created as zeros if the optimizer keeps none yet, as after
    a universal-checkpoint load). Not a collective.

    What deepspeed.utils.safe_set_full_fp32_param / safe_set_full_optimizer_state do under ZeRO 3, without their
    slip (DeepSpeed 0.19.8; upstream's master has the same code): ZeRO 3 gives rank r of R a slot of
    ceil(numel / R) elements of every parameter, holding the elements from r x slot on, min(slot, numel - r x slot)
    of them (possibly none), then padding. DeepSpeed copies a whole slot from r x slot, which runs past the end of
    the value on the last rank whenever R does not divide numel: that rank raises while the others go on (and hang
    in their next collective). Only the parameter's own elements are copied here; the padding is left alone."""
    zero = p._z3_optimizer
    group, _, slot = zero.grad_position[zero.get_param_id(p)]
    if key is not None:
        flat = zero.fp32_partitioned_groups_flat[group]
        zero.optimizer.state[flat].setdefault(key, torch.zeros_like(flat, dtype=torch.float32))
    # DeepSpeed's own view of this rank's slot (it waits for pending gradient reductions and swaps NVMe-offloaded
    # state in first)
    partition, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    start = zero._get_param_partition_rank(p) * slot
    size = max(0, min(slot, full.numel() - start))
    partition.narrow(0, 0, size).copy_(full.reshape(-1).narrow(0, start, size))
    if zero._swappable_optimizer_subgroup(group):
        zero._optimizer_states_and_gradient_swap_out(group)


def fix_deepspeed_state_after_load(engine: Any) -> None:
    """DeepSpeed 0.19.8 bug: after load_checkpoint under ZeRO 1/2, safe_get/set optimizer-state helpers raise
    TypeError (the fragments' optim state is unlinked). Re-link it; harmless under ZeRO 3. Call on every rank
    right after engine.load_checkpoint()."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
