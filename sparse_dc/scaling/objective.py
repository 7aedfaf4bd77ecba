"""The fitting objective of the paper (after Besiroglu et al. 2024): sum over runs of Huber_delta(log L_pred - log L_obs),
delta = 1e-3, log L_pred = logsumexp of three log-terms; and its value and gradient for many parameter vectors at
once (a grid of starts).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DELTA = 1e-3

Partials = Sequence[np.ndarray | float | None]
"""d t / d theta_k for k = 1..K (None: 0), each broadcasting against (m starts, n runs)."""
LogTerms = Callable[[list[np.ndarray]], tuple[tuple[np.ndarray, np.ndarray, np.ndarray],
                                               tuple[Partials, Partials, Partials]]]
"""K parameter columns (m, 1) -> ((t1, t2, t3) log-terms (m, n), their partials)."""


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Elementwise Huber loss, as torch.nn.functional.huber_loss(reduction='none')."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_objective(log_terms: LogTerms, log_y: np.ndarray, n_params: int, delta: float = DELTA
                    ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """fun(theta (m, K)) -> (objective (m,), gradient (m, K)) of sum_runs Huber(logsumexp(t1, t2, t3) - log_y).

    The value is computed as torch.logsumexp does (max shift); the gradient is torch's: Huber's slope
    clip(r, -delta, delta) times the softmax weights of the terms times their partials.
    """
    def fun(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = np.asarray(theta, dtype=float)
        with np.errstate(all="ignore"):
            terms, partials = log_terms([theta[:, k:k + 1] for k in range(n_params)])
            top = np.maximum(np.maximum(terms[0], terms[1]), terms[2])
            e = [np.exp(t - top) for t in terms]
            total = e[0] + e[1] + e[2]
            r = np.log(total) + top - log_y
            slope = np.clip(r, -delta, delta) / total
            grad = np.zeros((len(theta), n_params))
            for weight, dt in zip(e, partials):
                w = slope * weight
                for k, d in enumerate(dt):
                    if d is not None:
                        grad[:, k] += (w * d).sum(axis=-1)
            return huber(r, delta).sum(axis=-1), grad
    return fun
