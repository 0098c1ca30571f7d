"""Centred finite differences in float64: the independent check of every hand-written backward.

    df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / (2h),   error O(h^2) plus rounding O(u / h).

A layer's output is a tensor, so we check the scalar L = sum(out * dout) for a random dout:
its gradient w.r.t. an input is exactly what the backward computes from dout. A random dout
matters: with dout = ones, sum(layernorm(x)) does not depend on x at all and the check is vacuous.

Each check returns, per tensor, a `Check`: the normwise relative error ||analytic - numeric|| /
||numeric|| (a float), carrying the two scales its bound needs (`finite_diff_bound`):

- ``gradient``: the rms of the numeric gradient, ||numeric|| / sqrt(size). The error of each entry
  is at most (truncation + rounding), so ||analytic - numeric|| <= sqrt(size) (truncation +
  rounding) and the normwise relative error is at most (truncation + rounding) / gradient.
- ``terms``: the size of the terms f sums, on which its rounding error rests: ||out * dout|| (the
  2-norm over the terms of sum(out * dout): random-sign terms, as dout is random) for a layer, the
  loss (a mean of positive per-position losses) for a model.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from . import bounds
from .compare import rel_error  # the normwise error every check reports

SMOOTHNESS = 50.0
"""1 / l, the length l over which a checked function's derivative changes at the suite's unit-scale
inputs: |f'''| <= |f'| / l^2, with |f'| the gradient's rms. This is the one assumption about the
data (not about rounding) in a gradcheck's bound: a layer's output changes on the scale of its
inputs (1), a layernorm divides by a standard deviation of NORM_STD_MIN or more, attention's scores
are products of two such vectors, and a block or a model chains a few of these; each derivative
brings at most a factor 1 / l = 50 (Richardson estimates of f''' over the fixed checks of tests/
stay below 900 |f'|_rms)."""

NORM_STD_MIN = 0.25
"""The smallest standard deviation of a row entering a layernorm for which SMOOTHNESS holds. A row
of nearly equal channels (n_embd = 4 draws them) has 1 / std up to 1 / sqrt(eps) = 316, and f'''
grows as 1 / std^2 relative to f': a drawn model with a row of std 0.085 measured |f'''| = 1.6e5
|f'|_rms. Drawn cases below NORM_STD_MIN are discarded, as those near a ReLU kink are."""


class Check(float):
    """A normwise relative error (the float itself) with the scales of its bound: gradient (rms of
    the numeric gradient) and terms (the size of the terms f sums)."""

    gradient: float
    terms: float

    def __new__(cls, error: float, gradient: float, terms: float):
        self = super().__new__(cls, error)
        self.gradient, self.terms = float(gradient), float(terms)
        return self


def finite_diff_bound(check: Check, h: float, n: int, depth: int, amplification: float = 1.0) -> float:
    """The bound of one gradcheck: bounds.finite_diff with every argument derived.

    Rounding: f is a `depth`-stage computation whose longest sum has n terms (the final
    sum(out * dout) included), so each evaluation carries at most chain(float64, n, depth,
    amplification) / 2 (one side of a reordered pair) times the size of its terms; that is
    finite_diff's `value` in units of u. Truncation: |f'''| <= SMOOTHNESS^2 * gradient. The result
    is relative to the gradient's rms (see the module docstring).
    """
    u = bounds.unit_roundoff(np.float64)
    value = bounds.chain(np.float64, n, depth, amplification) / 2.0 * check.terms / u
    return bounds.finite_diff(h=h, third_derivative=SMOOTHNESS ** 2 * check.gradient, value=value,
                              gradient=check.gradient)


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = 1e-5,
                       entries=None) -> np.ndarray:
    """Gradient of the scalar f() w.r.t. the array x, which f reads and which is perturbed in place.

    entries: flat indices of x to visit (CS231n's sparse gradient check on a large tensor), NaN
    elsewhere; None visits every entry.
    """
    if x.dtype != np.float64:
        raise TypeError(f"gradcheck needs float64 arrays, got {x.dtype}")
    grad = np.zeros_like(x) if entries is None else np.full_like(x, np.nan)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views onto x and grad
    for i in (range(flat.size) if entries is None else entries):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2.0 * h)
    return grad


def _check(analytic: np.ndarray, numeric: np.ndarray, terms: float) -> Check:
    rms = float(np.linalg.norm(numeric)) / math.sqrt(max(numeric.size, 1))
    return Check(rel_error(analytic, numeric), rms, terms)


def gradcheck_layer(forward: Callable, backward: Callable, inputs: dict[str, np.ndarray],
                rng: np.random.Generator | None = None, h: float = 1e-5, **kwargs) -> dict[str, Check]:
    """Compare backward(dout, cache) with finite differences for every array in `inputs`.

    `inputs` are the forward's array arguments, in order, by name (None entries are skipped, so a
    missing bias works); kwargs are passed to forward unchanged. Returns {name: Check}, each a
    float: the normwise relative error.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    args = list(inputs.values())
    out, cache = forward(*args, **kwargs)
    dout = rng.standard_normal(np.shape(out))
    terms = float(np.linalg.norm(np.asarray(out, dtype=np.float64) * dout))  # the terms of L
    analytic = backward(dout, cache)
    errors = {}
    # Integer inputs (token ids) have no gradient slot: a backward returns gradients only for
    # the float arguments, in order (embedding_backward -> (dwte, dwpe) for (idx, wte, wpe)).
    differentiable = [(name, x) for name, x in inputs.items()
                      if x is None or np.issubdtype(np.asarray(x).dtype, np.floating)]
    for (name, x), g in zip(differentiable, analytic):
        if x is None or g is None:
            continue
        loss = lambda: float(np.sum(forward(*args, **kwargs)[0] * dout))  # noqa: E731
        errors[name] = _check(g, numerical_gradient(loss, x, h), terms)
    return errors


def gradcheck_model(model, idx: np.ndarray, targets: np.ndarray, h: float = 1e-5,
                dropout_masks: list | None = None) -> dict[str, Check]:
    """Compare model.backward() with finite differences of the loss for every parameter.

    The model must hold float64 parameters. With dropout on, pass the masks (for example
    model.last_dropout_masks after one forward) so every evaluation sees the same ones.
    Returns {parameter name: Check}, each a float: the normwise relative error.
    """
    _, value = model.forward(idx, targets, dropout_masks=dropout_masks)
    analytic = model.backward()
    loss = lambda: model.forward(idx, targets, dropout_masks=dropout_masks)[1]  # noqa: E731
    return {name: _check(analytic[name], numerical_gradient(loss, p, h), abs(value))
            for name, p in model.params.items()}
