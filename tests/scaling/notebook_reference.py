"""The official notebook's fitting loop written out in torch, one start after another (the test oracle of
sparse_dc.scaling.notebook): its four stage losses, torch.optim.LBFGS(lr=0.1, history_size=10, max_iter=20,
line_search_fn="strong_wolfe") stepped 50 times per start, the lowest final loss kept with `<`.

Independent of the code under test: the losses are torch expressions (autograd gradients), the optimiser is
torch's own. The notebook pinned torch 2.1, whose line search always had 25 evaluations; newer torch caps it at what
is left of the step's budget, so `torch_2_1_line_search()` restores the old call while the reference runs.
"""
from __future__ import annotations

import contextlib
import itertools
from unittest import mock

import numpy as np
import torch
import torch.optim.lbfgs as torch_lbfgs

F64 = torch.float64


@contextlib.contextmanager
def torch_2_1_line_search():
    original = torch_lbfgs._strong_wolfe

    def strong_wolfe(*args, **kwargs):
        kwargs.pop("max_ls", None)  # torch 2.1 passed none: the default 25
        return original(*args, **kwargs)

    with mock.patch.object(torch_lbfgs, "_strong_wolfe", strong_wolfe):
        yield


def _huber_sum(pred, y):
    return torch.nn.functional.huber_loss(pred, torch.log(torch.clamp(y, min=1e-8)), delta=1e-3, reduction="sum")


def loss_stage1(inp, theta):  # inp columns: N, D, loss
    a, b, e, alpha = theta
    pre = torch.stack([a - alpha * torch.log(inp[:, 0]), b - alpha * torch.log(inp[:, 1]), e.expand(inp.shape[0])])
    return _huber_sum(torch.logsumexp(pre, dim=0), inp[:, 2])


def loss_stage2(inp, theta):  # inp columns: N_raw, D, loss, density
    a, b, e, alpha, eps, mu, c = theta
    s = torch.clamp(inp[:, 3], min=1e-8, max=1 - 1e-8)
    n_eff = torch.clamp(inp[:, 0] * s, min=1e-8)
    factor = torch.clamp(s ** eps + c * (1 - s) ** mu, min=1e-12)
    pre = torch.stack([a - alpha * torch.log(n_eff) + torch.log(factor), b - alpha * torch.log(inp[:, 1]),
                       e.expand(inp.shape[0])])
    return _huber_sum(torch.logsumexp(pre, dim=0), inp[:, 2])


def _repeated(inp, rn_star, rd_star, p2):  # inp columns: N_star, U, rn, rd, loss, density
    a, b, e, alpha, eps, mu, c = p2
    s = torch.clamp(inp[:, 5], min=1e-8, max=1 - 1e-8)
    n_eff = torch.clamp(inp[:, 0] + inp[:, 0] * rn_star * (1 - torch.exp(-inp[:, 2] / rn_star)), min=1e-8)
    d_eff = torch.clamp(inp[:, 1] + inp[:, 1] * rd_star * (1 - torch.exp(-inp[:, 3] / rd_star)), min=1e-8)
    factor = torch.clamp(s ** eps + c * (1 - s) ** mu, min=1e-12)
    pre = torch.stack([a - alpha * torch.log(n_eff) + torch.log(factor), b - alpha * torch.log(d_eff),
                       torch.zeros_like(n_eff) + e])
    return _huber_sum(torch.logsumexp(pre, dim=0), inp[:, 4])


def loss_stage3(inp, theta, p2):
    return _repeated(inp, theta[0], theta[1], p2)


def loss_stage4(inp, theta, p2, gammas):
    c11, c12, c21, c22 = theta
    oms = 1 - torch.clamp(inp[:, 5], min=1e-8, max=1 - 1e-8)
    rn_star = torch.clamp(gammas[0] * (1 + oms * c11 - c21 * oms ** 2), min=1e-8)
    rd_star = torch.clamp(gammas[1] * (1 + oms * c12 - c22 * oms ** 2), min=1e-8)
    return _repeated(inp, rn_star, rd_star, p2)


def minimize(loss, init, steps=50):
    theta = torch.nn.Parameter(torch.tensor(init, dtype=F64))
    opt = torch.optim.LBFGS([theta], lr=1e-1, history_size=10, max_iter=20, line_search_fn="strong_wolfe")
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            value = loss(theta)
            value.backward()
            return value
        opt.step(closure)
    return loss(theta).item(), theta.detach().numpy().copy()


def best_of(loss, starts, steps=50):
    """(best final loss, its parameters, every start's final (loss, params)) in the notebook's loop order."""
    best, finals = (float("inf"), None), []
    for init in starts:
        cur = minimize(loss, list(init), steps)
        finals.append(cur)
        if cur[0] < best[0]:
            best = cur
    return best[0], best[1], finals


def repetition_rows(rows, p2):
    """The notebook's stage-3/4 precomputation, row by row in numpy (cells 6 and 9)."""
    a, b, e, alpha, eps, mu, c = p2
    beta, A, B = alpha, np.exp(a), np.exp(b)
    out = []
    for p_eff, t, ut, loss, s in rows:
        factor = s ** eps + c * (1 - s) ** mu
        G = ((alpha * factor * A) / (beta * B)) ** (1 / (alpha + beta))
        C = ((G * ut) ** (1 / (alpha / (alpha + beta)))) * 6
        n_star = min(G * (C / 6) ** (beta / (alpha + beta)), p_eff)
        out.append([n_star, ut, max(p_eff / n_star - 1, 0), max(t / ut - 1, 0), loss, s])
    return torch.tensor(out, dtype=F64)


def notebook_fit(runs, grids, steps=50):
    """The four stages on a sparse_dc Runs; grids: four dicts of initial values (the notebook's loop order).
    Returns (13 coefficients, [(stage best loss, its parameters, all finals)] per stage)."""
    one = runs.tokens <= runs.unique_tokens * (1 + 1e-6)
    dense = runs.density >= 1 - 1e-12
    col = lambda *arrays: torch.tensor(np.stack(arrays, axis=1), dtype=F64)  # noqa: E731
    r1 = runs.subset(dense & one)
    r2 = runs.subset(one)
    g = grids
    with torch_2_1_line_search():
        s1 = best_of(lambda th: loss_stage1(col(r1.dense_params, r1.tokens, r1.val_loss), th),
                     itertools.product(g[0]["a"], g[0]["b"], g[0]["e"], g[0]["alpha"]), steps)
        inp2 = col(r2.dense_params, r2.tokens, r2.val_loss, r2.density)
        s2 = best_of(lambda th: loss_stage2(inp2, th),
                     [[*s1[1], *point] for point in itertools.product(g[1]["eps"], g[1]["mu"], g[1]["c"])], steps)
        p2 = [float(v) for v in s2[1]]
        rows = lambda r: zip(r.active_params, r.tokens, r.unique_tokens, r.val_loss, r.density)  # noqa: E731
        inp3 = repetition_rows(rows(runs.subset(dense & ~one)), p2)
        s3 = best_of(lambda th: loss_stage3(inp3, th, p2), itertools.product(g[2]["g1"], g[2]["g2"]), steps)
        gammas = [float(v) for v in s3[1]]
        inp4 = repetition_rows(rows(runs.subset(~dense & ~one)), p2)
        s4 = best_of(lambda th: loss_stage4(inp4, th, p2, gammas),
                     itertools.product(g[3]["c11"], g[3]["c12"], g[3]["c21"], g[3]["c22"]), steps)
    names = ("a", "b", "e", "alpha", "eps", "mu", "c", "g1", "g2", "c11", "c12", "c21", "c22")
    return dict(zip(names, [*p2, *gammas, *map(float, s4[1])])), [s1, s2, s3, s4]
