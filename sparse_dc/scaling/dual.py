"""Forward-mode derivatives for numpy code: a `Dual` carries a value and its derivatives w.r.t. K parameters.

The law forms are written once in plain numpy (`np.exp`, `np.log`, `np.minimum`, ...). Passing `Dual` parameters
through the same code yields the Jacobian of every prediction w.r.t. the free parameters, which the fitter needs
(L-BFGS gradients, least-squares Jacobians) without an autograd framework: numpy dispatches each ufunc to
`Dual.__array_ufunc__`. Cost: about K+1 times the plain evaluation, all vectorised over runs.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class Dual:
    """`v`: values, any shape S. `d`: derivatives d[k] = dv / dtheta_k, shape (K,) + a shape of S's rank that
    broadcasts to S (kept unexpanded: expanding every intermediate would dominate the cost). `jacobian()`
    expands."""

    __slots__ = ("v", "d")
    __array_priority__ = 1000  # ndarray (op) Dual defers to Dual's reflected operators

    def __init__(self, v: Any, d: np.ndarray):
        self.v = np.asarray(v, dtype=float)
        self.d = d

    @classmethod
    def seed(cls, values: np.ndarray) -> list["Dual"]:
        """One Dual per entry of the 1-D `values`, with identity derivatives (the free parameters)."""
        eye = np.eye(len(values))
        return [cls(v, eye[k]) for k, v in enumerate(np.asarray(values, dtype=float))]

    # numpy calls this for every ufunc that has a Dual among its inputs (np.exp(x), x * y, ...).
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        rule = _RULES.get(ufunc)
        if method != "__call__" or kwargs or rule is None:
            return NotImplemented
        return rule(*inputs)

    def __add__(self, o): return np.add(self, o)
    def __radd__(self, o): return np.add(o, self)
    def __sub__(self, o): return np.subtract(self, o)
    def __rsub__(self, o): return np.subtract(o, self)
    def __mul__(self, o): return np.multiply(self, o)
    def __rmul__(self, o): return np.multiply(o, self)
    def __truediv__(self, o): return np.true_divide(self, o)
    def __rtruediv__(self, o): return np.true_divide(o, self)
    def __pow__(self, o): return np.power(self, o)
    def __rpow__(self, o): return np.power(o, self)
    def __neg__(self): return np.negative(self)

    def jacobian(self) -> np.ndarray:
        """Derivatives expanded to shape (K,) + v.shape."""
        return np.broadcast_to(self.d, self.d.shape[:1] + self.v.shape)

    def __repr__(self) -> str:
        return f"Dual(v={self.v!r}, d.shape={self.d.shape})"


def value(x: Any) -> np.ndarray:
    """The plain values of a Dual (or of an array / number)."""
    return x.v if isinstance(x, Dual) else np.asarray(x, dtype=float)


def _split(x: Any) -> tuple[np.ndarray, np.ndarray | None]:
    return (x.v, x.d) if isinstance(x, Dual) else (np.asarray(x, dtype=float), None)


def _lift(d: np.ndarray | None, ndim: int) -> np.ndarray | None:
    """Pad derivatives (K,)+s to (K,)+(1,..)+s of rank 1+ndim, so they broadcast against an output of `ndim`
    dims (numpy aligns trailing axes; the leading K axis must stay first)."""
    if d is None or d.ndim == ndim + 1:
        return d
    return d.reshape(d.shape[:1] + (1,) * (ndim + 1 - d.ndim) + d.shape[1:])


def _binary(fn):
    def rule(x: Any, y: Any) -> Dual:
        xv, xd = _split(x)
        yv, yd = _split(y)
        ndim = max(xv.ndim, yv.ndim)
        return fn(xv, _lift(xd, ndim), yv, _lift(yd, ndim))
    return rule


def _unary(fn):
    def rule(x: Any) -> Dual:
        xv, xd = _split(x)
        return fn(xv, xd)
    return rule


def _combine(out: np.ndarray, dx: np.ndarray | None, dy: np.ndarray | None) -> Dual:
    return Dual(out, dx if dy is None else dy if dx is None else dx + dy)


def _add(xv, xd, yv, yd): return _combine(xv + yv, xd, yd)
def _sub(xv, xd, yv, yd): return _combine(xv - yv, xd, None if yd is None else -yd)
def _mul(xv, xd, yv, yd): return _combine(xv * yv, None if xd is None else xd * yv, None if yd is None else xv * yd)


def _div(xv, xd, yv, yd):
    out = xv / yv
    return _combine(out, None if xd is None else xd / yv, None if yd is None else -out / yv * yd)


def _pow(xv, xd, yv, yd):
    out = xv ** yv
    dx = None if xd is None else yv * xv ** (yv - 1) * xd
    dy = None if yd is None else out * np.log(xv) * yd
    return _combine(out, dx, dy)


def _select(take_x: np.ndarray, xv, xd, yv, yd) -> Dual:
    out = np.where(take_x, xv, yv)
    dx = 0.0 if xd is None else xd
    dy = 0.0 if yd is None else yd
    return Dual(out, np.where(take_x, dx, dy))


def _minimum(xv, xd, yv, yd): return _select(xv <= yv, xv, xd, yv, yd)
def _maximum(xv, xd, yv, yd): return _select(xv >= yv, xv, xd, yv, yd)


def _exp(xv, xd):
    out = np.exp(xv)
    return Dual(out, out * xd)


def _expm1(xv, xd): return Dual(np.expm1(xv), np.exp(xv) * xd)
def _log(xv, xd): return Dual(np.log(xv), xd / xv)
def _log1p(xv, xd): return Dual(np.log1p(xv), xd / (1.0 + xv))
def _neg(xv, xd): return Dual(-xv, -xd)


_RULES = {
    np.add: _binary(_add), np.subtract: _binary(_sub), np.multiply: _binary(_mul),
    np.true_divide: _binary(_div), np.power: _binary(_pow),
    np.minimum: _binary(_minimum), np.maximum: _binary(_maximum),
    np.exp: _unary(_exp), np.expm1: _unary(_expm1), np.log: _unary(_log), np.log1p: _unary(_log1p),
    np.negative: _unary(_neg),
}
