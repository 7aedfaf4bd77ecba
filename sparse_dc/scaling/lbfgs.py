"""torch.optim.LBFGS with the strong-Wolfe line search, in numpy, for many independent starts at once.

The official notebook minimises every stage from every point of a grid with

    torch.optim.LBFGS([theta], lr=0.1, history_size=10, max_iter=20, line_search_fn="strong_wolfe")

stepped 50 times, one start after another. `minimize_starts` runs the same algorithm (same branches, same float64
arithmetic, same tolerances; the line search of torch 2.1, which the notebook pinned) on all starts together: each
start is a small state machine whose waiting states are the places where torch calls the closure, and every round
evaluates the objective of all waiting starts in one vectorised call. A start that has converged (zero gradient
or no descent direction left) stops; the others go on.

Differences from torch are rounding only: the objective's gradient comes from the caller (not autograd) and dot
products / in-place `add_(alpha=...)` may round differently in the last bit, which over hundreds of iterations
can send a start down another branch of the line search. tests/scaling/test_lbfgs.py measures the agreement.

States, per start (`pc`): waiting for an evaluation at x (the step's closure) or at x + t d (line search), or one
of the control points of torch's `step` / `_strong_wolfe` between two evaluations.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Objective = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(m, K) points -> (values (m,), gradients (m, K))."""

C1, C2 = 1e-4, 0.9  # strong-Wolfe constants of torch's _strong_wolfe
MAX_LS_TORCH_2_1 = 25  # torch <= 2.5 gave every line search 25 evaluations whatever the step had left

# waiting for an evaluation
(WAIT_CLOSURE, WAIT_LS_FIRST, WAIT_LS_BRACKET, WAIT_ZOOM,
 # control points between evaluations
 STEP_START, ITER, BRACKET_CHECK, ZOOM_ENTRY, ZOOM_HEAD, ZOOM_UPDATE, LS_FINISH, STEP_END, DONE) = range(13)


def _pymax(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Python's max(a, b): b only if b > a (so a NaN first argument survives, as in torch's code)."""
    return np.where(b > a, b, a)


def _pymin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b < a, b, a)


def cubic_interpolate(x1, f1, g1, x2, f2, g2, lo=None, hi=None) -> np.ndarray:
    """torch.optim.lbfgs._cubic_interpolate, elementwise: the minimiser of the cubic through two points with
    slopes, clipped to [lo, hi] (default: the two points); the midpoint of the bounds if the cubic has none."""
    if lo is None:
        lo, hi = np.where(x1 <= x2, x1, x2), np.where(x1 <= x2, x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    real = d2_square >= 0
    d2 = np.sqrt(np.where(real, d2_square, 0.0))
    min_pos = np.where(x1 <= x2, x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2)),
                       x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2)))
    return np.where(real, _pymin(_pymax(min_pos, lo), hi), (lo + hi) / 2.0)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=-1)


class _Starts:
    """The state of G independent torch LBFGS optimisers (one per row)."""

    def __init__(self, x0: np.ndarray, history: int):
        G, K = x0.shape
        z, zk = np.zeros(G), np.zeros((G, K))
        self.x = np.array(x0, dtype=float)
        self.f, self.g = z.copy(), zk.copy()  # loss and gradient at x
        self.d, self.t, self.h_diag = zk.copy(), z.copy(), np.ones(G)
        self.old_y, self.old_s = np.zeros((G, history, K)), np.zeros((G, history, K))
        self.ro, self.n_old = np.zeros((G, history)), np.zeros(G, dtype=int)
        self.prev_g, self.prev_f = zk.copy(), z.copy()
        self.n_iter_total, self.n_iter, self.steps_done = (np.zeros(G, dtype=int) for _ in range(3))
        self.evals, self.total_evals = np.zeros(G, dtype=int), np.zeros(G, dtype=int)
        # line search (x, f, g stay at its start point until it finishes)
        self.gtd, self.d_norm, self.max_ls = z.copy(), z.copy(), np.zeros(G, dtype=int)
        self.t_prev, self.f_prev, self.g_prev, self.gtd_prev = z.copy(), z.copy(), zk.copy(), z.copy()
        self.f_new, self.g_new, self.gtd_new = z.copy(), zk.copy(), z.copy()
        self.ls_iter, self.ls_evals = np.zeros(G, dtype=int), np.zeros(G, dtype=int)
        self.bt, self.bf, self.bg, self.bgtd = np.zeros((G, 2)), np.zeros((G, 2)), np.zeros((G, 2, K)), np.zeros((G, 2))
        self.low = np.zeros(G, dtype=int)
        self.done, self.insuf = np.zeros(G, dtype=bool), np.zeros(G, dtype=bool)
        self.pc = np.full(G, WAIT_CLOSURE)


def minimize_starts(fun: Objective, x0: np.ndarray, steps: int = 50, lr: float = 0.1, history_size: int = 10,
                    max_iter: int = 20, max_eval: int | None = None, tolerance_grad: float = 1e-7,
                    tolerance_change: float = 1e-9, max_ls: int | None = MAX_LS_TORCH_2_1) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Run `steps` calls of torch LBFGS(strong_wolfe).step from every row of `x0` (G, K) independently.

    `max_ls`: evaluations per line search; 25 (the default) is torch <= 2.5, None is torch >= 2.6 (what is left
    of the step's `max_eval`). Returns (final points (G, K), objective evaluations per start (G,)).
    """
    max_eval = max_eval if max_eval is not None else max_iter * 5 // 4
    st = _Starts(np.atleast_2d(x0), history_size)
    H = history_size

    def request(idx: np.ndarray, state: int) -> None:
        st.pc[idx] = state

    # ------------------------------------------------------------------ torch LBFGS.step: between evaluations
    def step_start(i: np.ndarray) -> None:  # the closure's value is known: f, g at x
        st.evals[i] = 1
        converged = np.abs(st.g[i]).max(axis=1) <= tolerance_grad
        st.pc[i[converged]] = DONE  # every later step returns here as well: x never moves again
        rest = i[~converged]
        st.n_iter[rest] = 0
        st.pc[rest] = ITER

    def iterate(i: np.ndarray) -> None:
        st.n_iter[i] += 1
        st.n_iter_total[i] += 1
        g = st.g[i]
        first = st.n_iter_total[i] == 1
        d = -g
        later = i[~first]
        if later.size:
            gl = st.g[later]
            y = gl - st.prev_g[later]
            s = st.d[later] * st.t[later, None]
            ys = _dot(y, s)
            upd = ys > 1e-10
            u = later[upd]
            if u.size:
                full = st.n_old[u] == H
                uf = u[full]
                st.old_y[uf, :-1], st.old_s[uf, :-1], st.ro[uf, :-1] = st.old_y[uf, 1:], st.old_s[uf, 1:], st.ro[uf, 1:]
                pos = np.where(full, H - 1, st.n_old[u])
                st.old_y[u, pos], st.old_s[u, pos], st.ro[u, pos] = y[upd], s[upd], 1.0 / ys[upd]
                st.n_old[u[~full]] += 1
                st.h_diag[u] = ys[upd] / _dot(y[upd], y[upd])
            # two-loop recursion over each start's own history (rows with fewer entries skip the empty slots)
            n_old, old_y, old_s, ro = st.n_old[later], st.old_y[later], st.old_s[later], st.ro[later]
            q = -gl
            al = np.zeros((len(later), H))
            for k in range(H - 1, -1, -1):
                on = k < n_old
                al[:, k] = np.where(on, _dot(old_s[:, k], q) * ro[:, k], 0.0)
                q = np.where(on[:, None], q - al[:, k, None] * old_y[:, k], q)
            r = q * st.h_diag[later, None]
            for k in range(H):
                on = k < n_old
                be = _dot(old_y[:, k], r) * ro[:, k]
                r = np.where(on[:, None], r + (al[:, k] - be)[:, None] * old_s[:, k], r)
            d[~first] = r
        st.d[i] = d
        st.prev_g[i], st.prev_f[i] = g, st.f[i]
        inv = 1.0 / np.abs(g).sum(axis=1)
        st.t[i] = np.where(first, np.where(inv < 1.0, inv, 1.0) * lr, lr)
        gtd = _dot(g, d)
        st.gtd[i] = gtd
        # no descent direction: torch breaks out of the step; the next step recomputes the same direction from the
        # same gradient and history (y = 0 adds nothing), so the start is finished
        flat = gtd > -tolerance_change
        st.pc[i[flat]] = DONE
        ls = i[~flat]
        st.d_norm[ls] = np.abs(st.d[ls]).max(axis=1)
        st.t_prev[ls], st.f_prev[ls], st.g_prev[ls], st.gtd_prev[ls] = 0.0, st.f[ls], st.g[ls], st.gtd[ls]
        st.ls_iter[ls], st.ls_evals[ls], st.done[ls] = 0, 0, False
        st.max_ls[ls] = max_ls if max_ls is not None else max_eval - st.evals[ls]
        request(ls, WAIT_LS_FIRST)

    # ------------------------------------------------------------------ torch _strong_wolfe: bracketing phase
    def bracket_check(i: np.ndarray) -> None:
        t, f_new, gtd_new, gtd = st.t[i], st.f_new[i], st.gtd_new[i], st.gtd[i]
        armijo = (f_new > (st.f[i] + C1 * t * gtd)) | ((st.ls_iter[i] > 1) & (f_new >= st.f_prev[i]))
        wolfe = ~armijo & (np.abs(gtd_new) <= -C2 * gtd)
        rising = ~armijo & ~wolfe & (gtd_new >= 0)
        b = i[armijo | rising]  # bracket [t_prev, t]
        st.bt[b] = np.stack([st.t_prev[b], st.t[b]], axis=1)
        st.bf[b] = np.stack([st.f_prev[b], st.f_new[b]], axis=1)
        st.bg[b] = np.stack([st.g_prev[b], st.g_new[b]], axis=1)
        st.bgtd[b] = np.stack([st.gtd_prev[b], st.gtd_new[b]], axis=1)
        st.pc[b] = ZOOM_ENTRY
        w = i[wolfe]  # a one-point bracket, done
        st.bt[w, 0], st.bf[w, 0], st.bg[w, 0] = st.t[w], st.f_new[w], st.g_new[w]
        st.low[w], st.done[w] = 0, True
        st.pc[w] = LS_FINISH
        c = i[~(armijo | rising | wolfe)]  # extrapolate
        if c.size:
            t, t_prev = st.t[c], st.t_prev[c]
            min_step, max_step = t + 0.01 * (t - t_prev), t * 10
            new_t = cubic_interpolate(t_prev, st.f_prev[c], st.gtd_prev[c], t, st.f_new[c], st.gtd_new[c],
                                      min_step, max_step)
            st.t_prev[c], st.f_prev[c], st.g_prev[c], st.gtd_prev[c] = t, st.f_new[c], st.g_new[c], st.gtd_new[c]
            st.t[c] = new_t
            request(c, WAIT_LS_BRACKET)

    def bracket_evaluated(i: np.ndarray) -> None:  # after an extrapolation step was evaluated
        st.ls_iter[i] += 1
        out = st.ls_iter[i] >= st.max_ls[i]
        st.pc[i[~out]] = BRACKET_CHECK
        m = i[out]  # out of evaluations: bracket [0, t], checked no further
        st.bt[m] = np.stack([np.zeros(len(m)), st.t[m]], axis=1)
        st.bf[m] = np.stack([st.f[m], st.f_new[m]], axis=1)
        st.bg[m] = np.stack([st.g[m], st.g_new[m]], axis=1)
        st.pc[m] = ZOOM_ENTRY

    # ------------------------------------------------------------------ torch _strong_wolfe: zoom phase
    def zoom_entry(i: np.ndarray) -> None:
        st.low[i] = np.where(st.bf[i, 0] <= st.bf[i, 1], 0, 1)
        st.insuf[i] = False
        st.pc[i] = ZOOM_HEAD

    def zoom_head(i: np.ndarray) -> None:
        bt = st.bt[i]
        stop = st.done[i] | (st.ls_iter[i] >= st.max_ls[i]) | (np.abs(bt[:, 1] - bt[:, 0]) * st.d_norm[i]
                                                                 < tolerance_change)
        st.pc[i[stop]] = LS_FINISH
        z = i[~stop]
        if not z.size:
            return
        bt, bf, bgtd = st.bt[z], st.bf[z], st.bgtd[z]
        t = cubic_interpolate(bt[:, 0], bf[:, 0], bgtd[:, 0], bt[:, 1], bf[:, 1], bgtd[:, 1])
        b_max, b_min = _pymax(bt[:, 0], bt[:, 1]), _pymin(bt[:, 0], bt[:, 1])
        eps = 0.1 * (b_max - b_min)
        near = _pymin(b_max - t, t - b_min) < eps
        insuf = st.insuf[z]
        move = near & (insuf | (t >= b_max) | (t <= b_min))  # too close to an end: 0.1 of the bracket away
        t = np.where(move, np.where(np.abs(t - b_max) < np.abs(t - b_min), b_max - eps, b_min + eps), t)
        st.insuf[z] = near & ~move
        st.t[z] = t
        request(z, WAIT_ZOOM)

    def zoom_update(i: np.ndarray) -> None:
        st.ls_iter[i] += 1
        low = st.low[i]
        high = 1 - low
        rows = np.arange(len(i))
        t, f_new, gtd_new = st.t[i], st.f_new[i], st.gtd_new[i]
        bt, bf, bg, bgtd = st.bt[i], st.bf[i], st.bg[i], st.bgtd[i]
        worse = (f_new > (st.f[i] + C1 * t * st.gtd[i])) | (f_new >= bf[rows, low])
        # Armijo fails or no lower than the low end: the new point replaces the high end
        w = rows[worse]
        bt[w, high[w]], bf[w, high[w]], bg[w, high[w]], bgtd[w, high[w]] = t[w], f_new[w], st.g_new[i[w]], gtd_new[w]
        low[w] = np.where(bf[w, 0] <= bf[w, 1], 0, 1)
        # otherwise it becomes the low end (the old low end becomes the high end if the slope says so)
        b = rows[~worse]
        wolfe = np.abs(gtd_new[b]) <= -C2 * st.gtd[i[b]]
        st.done[i[b[wolfe]]] = True
        swap = b[~wolfe & (gtd_new[b] * (bt[b, high[b]] - bt[b, low[b]]) >= 0)]
        bt[swap, high[swap]], bf[swap, high[swap]] = bt[swap, low[swap]], bf[swap, low[swap]]
        bg[swap, high[swap]], bgtd[swap, high[swap]] = bg[swap, low[swap]], bgtd[swap, low[swap]]
        bt[b, low[b]], bf[b, low[b]], bg[b, low[b]], bgtd[b, low[b]] = t[b], f_new[b], st.g_new[i[b]], gtd_new[b]
        st.bt[i], st.bf[i], st.bg[i], st.bgtd[i], st.low[i] = bt, bf, bg, bgtd, low
        st.pc[i] = ZOOM_HEAD

    # ------------------------------------------------------------------ back in LBFGS.step after the line search
    def ls_finish(i: np.ndarray) -> None:
        rows, low = np.arange(len(i)), st.low[i]
        t = st.bt[i][rows, low]
        st.t[i], st.f[i], st.g[i] = t, st.bf[i][rows, low], st.bg[i][rows, low]
        st.x[i] = st.x[i] + t[:, None] * st.d[i]
        st.evals[i] += st.ls_evals[i]
        stop = ((st.n_iter[i] == max_iter) | (st.evals[i] >= max_eval)
                | (np.abs(st.g[i]).max(axis=1) <= tolerance_grad)
                | (np.abs(st.d[i] * t[:, None]).max(axis=1) <= tolerance_change)
                | (np.abs(st.f[i] - st.prev_f[i]) < tolerance_change))
        st.pc[i[stop]] = STEP_END
        st.pc[i[~stop]] = ITER

    def step_end(i: np.ndarray) -> None:
        st.steps_done[i] += 1
        st.pc[i] = np.where(st.steps_done[i] >= steps, DONE, STEP_START)  # the closure at x: f, g already known

    control = ((STEP_START, step_start), (ITER, iterate), (BRACKET_CHECK, bracket_check), (ZOOM_ENTRY, zoom_entry),
               (ZOOM_HEAD, zoom_head), (ZOOM_UPDATE, zoom_update), (LS_FINISH, ls_finish), (STEP_END, step_end))
    with np.errstate(all="ignore"):  # torch computes on through inf/nan; so do the comparisons below
        while True:
            moved = True
            while moved:
                moved = False
                for state, handler in control:
                    i = np.flatnonzero(st.pc == state)
                    if i.size:
                        handler(i)
                        moved = True
            wait = np.flatnonzero(st.pc <= WAIT_ZOOM)
            if not wait.size:
                break
            at_x = st.pc[wait] == WAIT_CLOSURE
            points = np.where(at_x[:, None], st.x[wait], st.x[wait] + st.t[wait, None] * st.d[wait])
            f, g = fun(points)
            st.total_evals[wait] += 1
            c = wait[at_x]
            st.f[c], st.g[c] = f[at_x], g[at_x]
            st.pc[c] = STEP_START
            ls = wait[~at_x]
            st.f_new[ls], st.g_new[ls] = f[~at_x], g[~at_x]
            st.gtd_new[ls] = _dot(st.g_new[ls], st.d[ls])
            st.ls_evals[ls] += 1
            state = st.pc[ls]
            st.pc[ls[state == WAIT_LS_FIRST]] = BRACKET_CHECK
            bracket_evaluated(ls[state == WAIT_LS_BRACKET])
            st.pc[ls[state == WAIT_ZOOM]] = ZOOM_UPDATE
    return st.x, st.total_evals
