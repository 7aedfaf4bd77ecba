"""AdamDST: Adam with a step count per weight, the optimizer of the paper's sparse runs (`sparsity.regrow_optimizer:
adamdst`; the official code's `sparselearning/optimizer_new.py`, reimplemented).

Per weight w with gradient g, step count t_w (incremented every step) and learning rate lr:

    m_w = beta1 m_w + (1 - beta1) g          v_w = beta2 v_w + (1 - beta2) g^2
    m_w = m_w x min(t_w / ramp, 1)           # in place, every step: the damping compounds while t_w < ramp
    w  -= lr x (m_w / (1 - beta1^t_w)) / (sqrt(v_w / (1 - beta2^t_w)) + eps)

Without DST this is Adam whose first moment is damped during the first `ramp` steps (a hidden ~20-40-step warmup
on every parameter, embeddings and norms included: the paper's code does exactly this). A topology update that
regrows w zeroes m_w and v_w and sets t_w to `restart` (5 in the paper's code), so the regrown weight's first
updates are small (under a constant gradient 0.16 / 0.17 / 0.27 / 0.78 x lr at the 1st / 5th / 10th / 20th step
after regrowth, where plain Adam with its global step moves it ~0.5-3 x lr from the first step on;
tests/sparsity/test_sparsity_recipe.py computes the sequence independently).

Weight decay, when a param group has any, is decoupled (AdamW's form, as sparse-dc's default optimizer); the
paper's runs use none.

State per parameter: `step` (a scalar tensor, the number of steps taken, kept so tools that expect Adam's scalar
step work), `exp_avg`, `exp_avg_sq` and `element_step` (float32, the parameter's shape: t_w). DeepSpeed ZeRO
1/2/3 wraps it like any torch optimizer: it then sees flat fp32 partitions, and every state is elementwise, so a
partition's states are the partition of the full ones. `element_step` is read and written per weight through the
optimizer-state accessor (sparse_dc/sparsity/optim_state.py) and carried across world-size changes by
sparse_dc/train/reshard.py.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

ELEMENT_STEP = "element_step"
"""Optimizer-state key of the per-weight step count."""


class AdamDST(torch.optim.Optimizer):
    EXTRA_STATE_KEYS = (ELEMENT_STEP,)
    """Elementwise states beyond Adam's, which a world-size change must carry (sparse_dc/train/extra_states.py)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum_ramp_steps: int = 20):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Expected lr, eps, weight_decay >= 0. Got {lr}, {eps}, {weight_decay}.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Expected betas in [0, 1). Got {betas}.")
        if momentum_ramp_steps < 1:
            raise ValueError(f"Expected momentum_ramp_steps >= 1. Got {momentum_ramp_steps}.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        momentum_ramp_steps=momentum_ramp_steps)
        super().__init__(params, defaults)

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[ELEMENT_STEP] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, ramp = group["lr"], group["eps"], group["weight_decay"], group["momentum_ramp_steps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self._state_of(p)
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state[ELEMENT_STEP]
                state["step"] += 1
                t += 1
                if wd:
                    p.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m.mul_(torch.clamp(t / ramp, max=1.0).to(m.dtype))
                bias1 = 1 - torch.pow(beta1, t)
                bias2 = 1 - torch.pow(beta2, t)
                denom = (v / bias2).sqrt_().add_(eps)
                p.addcdiv_(m / bias1, denom, value=-lr)
        return loss
