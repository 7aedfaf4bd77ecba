"""A faithful re-implementation of the paper's notebook fitting procedure in torch (the benchmark's baseline).

Per stage: one full coefficient vector as an nn.Parameter; frozen entries get their gradient zeroed in the
closure (the notebook's way of freezing); for every point of the stage's grid, torch.optim.LBFGS(lr=0.1,
history_size=10, max_iter=20, line_search_fn='strong_wolfe') is stepped 50 times and the lowest loss is kept.
Objective: sum of huber_loss(logsumexp(three terms), log L, delta=1e-3). float64 (the notebook used float32;
float64 gives the baseline its best objective at the same speed).
"""
from __future__ import annotations

import itertools

import torch

NAMES = ("a", "b", "e", "alpha", "eps", "mu", "c", "g1", "g2", "c11", "c12", "c21", "c22")


def log_pred(p: torch.Tensor, n, u, d, s_dense):
    """The sparse data-constrained law (scaling-law.md) written independently in torch; p is the 13-vector."""
    a, b, e, alpha, eps, mu, c, g1, g2, c11, c12, c21, c22 = p
    beta = alpha
    s = 1 - s_dense
    u = torch.minimum(u, d)  # unique tokens seen (= U for every run of >= 1 epoch)
    f = s_dense ** eps + c * torch.clamp(s, min=1e-300) ** mu
    log_f = torch.log(torch.clamp(f, min=1e-9))
    G = torch.exp((torch.log(alpha) - torch.log(beta) + a - b + log_f) / (alpha + beta))
    C_of_U = 6 * (G * u) ** ((alpha + beta) / alpha)
    n_opt = G * (C_of_U / 6) ** (beta / (alpha + beta))
    u_n = torch.minimum(n, n_opt)
    r_n = torch.clamp(n / u_n - 1, min=0)
    r_d = torch.clamp(d / u - 1, min=0)
    rn_star = torch.clamp(g1 * (1 + s * c11 - c21 * s ** 2), min=1e-3)
    rd_star = torch.clamp(g2 * (1 + s * c12 - c22 * s ** 2), min=1e-3)
    n_eff = u_n + u_n * rn_star * (1 - torch.exp(-r_n / rn_star))
    d_eff = u + u * rd_star * (1 - torch.exp(-r_d / rd_star))
    terms = torch.stack([a + log_f - alpha * torch.log(n_eff), b - beta * torch.log(d_eff), e.expand(n.shape)])
    return torch.logsumexp(terms, dim=0)


def minimize_loss(data, init, free_mask, steps=50):
    params = torch.nn.Parameter(torch.tensor(init, dtype=torch.float64))
    lbfgs = torch.optim.LBFGS([params], lr=1e-1, history_size=10, max_iter=20, line_search_fn="strong_wolfe")
    log_l = torch.log(data[4])

    def closure():
        lbfgs.zero_grad()
        loss = torch.nn.functional.huber_loss(log_pred(params, *data[:4]), log_l, delta=1e-3, reduction="none").sum()
        loss.backward()
        params.grad[~free_mask] = 0
        return loss

    for _ in range(steps):
        lbfgs.step(closure)
    with torch.no_grad():
        loss = torch.nn.functional.huber_loss(log_pred(params, *data[:4]), log_l, delta=1e-3, reduction="none").sum()
    return float(loss), params.detach().clone()


def staged_fit(stages, runs_arrays, init: dict[str, float], steps: int = 50, max_starts: int | None = None):
    """stages: list of (free names, boolean mask over runs, grid dict). Returns (params dict, per-stage info)."""
    current = torch.tensor([init[k] for k in NAMES], dtype=torch.float64)
    info = []
    for free, mask, grid in stages:
        idx = torch.as_tensor(mask)
        data = [torch.as_tensor(arr, dtype=torch.float64)[idx] for arr in runs_arrays]
        free_mask = torch.tensor([k in free for k in NAMES])
        axes = [grid.get(k, (float(current[NAMES.index(k)]),)) for k in free]
        best, best_p, n = float("inf"), current, 0
        for point in itertools.product(*axes):
            if max_starts is not None and n >= max_starts:
                break
            init_vec = current.clone()
            for k, v in zip(free, point):
                init_vec[NAMES.index(k)] = v
            loss, p = minimize_loss(data, init_vec.tolist(), free_mask, steps)
            n += 1
            if loss < best:
                best, best_p = loss, p
        current = best_p
        info.append({"free": list(free), "starts": n, "objective": best})
    return dict(zip(NAMES, map(float, current))), info
