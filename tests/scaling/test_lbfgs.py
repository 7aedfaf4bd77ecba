"""The vectorised L-BFGS against torch.optim.LBFGS itself, start by start."""
import contextlib

import numpy as np
import pytest
import torch

from sparse_dc.scaling.lbfgs import cubic_interpolate, minimize_starts
from notebook_reference import torch_2_1_line_search  # tests/scaling is on sys.path (pytest rootdir mode)


def rosenbrock(X):
    x, y = X[:, 0], X[:, 1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2, np.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)], 1)


def torch_lbfgs(x0, steps, old_line_search):
    p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = torch.optim.LBFGS([p], lr=0.1, history_size=10, max_iter=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
        loss.backward()
        return loss

    with torch_2_1_line_search() if old_line_search else contextlib.nullcontext():
        for _ in range(steps):
            opt.step(closure)
    # torch re-evaluates the closure at the start of every step; the vectorised version reuses the known value
    return p.detach().numpy(), opt.state[p]["func_evals"] - (steps - 1)


@pytest.mark.parametrize("max_ls,steps", [(25, 2), (None, 1)], ids=["torch-2.1-line-search", "torch-2.6-line-search"])
def test_every_start_follows_torch(max_ls, steps):
    """20 Rosenbrock starts: same evaluations per start (so the same branches of the line search; the two torch
    versions differ in how many a line search may take) and the same points. Points differ by rounding only
    (torch fuses x + t d, sums in another order), which this ill-conditioned valley amplifies to ~1e-9 after one
    step (20 iterations) and ~1e-6 after two."""
    x0 = np.random.default_rng(0).uniform(-2, 2, (20, 2))
    ours, evals = minimize_starts(rosenbrock, x0, steps=steps, max_ls=max_ls)
    ref = [torch_lbfgs(x, steps, max_ls == 25) for x in x0]
    np.testing.assert_array_equal(evals, [n for _, n in ref])
    np.testing.assert_allclose(ours, np.array([x for x, _ in ref]), atol=1e-8 if steps == 1 else 1e-5)


def test_converged_starts_stop_and_keep_their_point():
    quad = lambda X: ((X ** 2).sum(1), 2 * X)  # noqa: E731
    x0 = np.array([[0.0, 0.0], [3.0, -1.0]])
    x, evals = minimize_starts(quad, x0, steps=50)
    assert evals[0] == 1 and np.all(x[0] == 0)  # zero gradient: torch returns before its first iteration
    assert np.abs(x[1]).max() < 1e-6 and evals[1] < 50


def test_cubic_interpolation_is_torchs():
    from torch.optim.lbfgs import _cubic_interpolate

    rng = np.random.default_rng(1)
    for _ in range(50):
        x1, f1, g1, x2, f2, g2 = rng.normal(size=6)
        want = float(_cubic_interpolate(x1, f1, torch.tensor(g1), x2, f2, torch.tensor(g2)))
        assert float(cubic_interpolate(np.array(x1), f1, g1, np.array(x2), f2, g2)) == pytest.approx(want, abs=1e-15)


def test_the_two_torch_line_search_budgets_differ():
    """torch <= 2.5 let each line search take 25 evaluations; later torch only what the step has left (of 25)."""
    x0 = np.random.default_rng(0).uniform(-2, 2, (20, 2))
    _, old = minimize_starts(rosenbrock, x0, steps=1, max_ls=25)
    _, new = minimize_starts(rosenbrock, x0, steps=1, max_ls=None)
    assert (old > new).any() and (old >= new).all() and new.max() <= 1 + 25 < old.max()  # + the step's closure
