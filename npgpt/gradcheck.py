"""Centred finite differences in float64: the independent check of every hand-written backward.

    df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / (2h),   error O(h^2) plus rounding O(eps / h).

A layer's output is a tensor, so we check the scalar L = sum(out * dout) for a random dout:
its gradient w.r.t. an input is exactly what the backward computes from dout. A random dout
matters: with dout = ones, sum(layernorm(x)) does not depend on x at all and the check is vacuous.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .compare import rel_error  # the normwise error every check reports


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Gradient of the scalar f() w.r.t. the array x, which f reads and which is perturbed in place."""
    if x.dtype != np.float64:
        raise TypeError(f"gradcheck needs float64 arrays, got {x.dtype}")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views onto x and grad
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2.0 * h)
    return grad


def gradcheck_layer(forward: Callable, backward: Callable, inputs: dict[str, np.ndarray],
                rng: np.random.Generator | None = None, h: float = 1e-5, **kwargs) -> dict[str, float]:
    """Compare backward(dout, cache) with finite differences for every array in `inputs`.

    `inputs` are the forward's array arguments, in order, by name (None entries are skipped, so a
    missing bias works); kwargs are passed to forward unchanged. Returns {name: relative error}.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    args = list(inputs.values())
    out, cache = forward(*args, **kwargs)
    dout = rng.standard_normal(np.shape(out))
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
        errors[name] = rel_error(g, numerical_gradient(loss, x, h))
    return errors


def gradcheck_model(model, idx: np.ndarray, targets: np.ndarray, h: float = 1e-5,
                dropout_masks: list | None = None) -> dict[str, float]:
    """Compare model.backward() with finite differences of the loss for every parameter.

    The model must hold float64 parameters. With dropout on, pass the masks (for example
    model.last_dropout_masks after one forward) so every evaluation sees the same ones.
    Returns {parameter name: relative error}.
    """
    model.forward(idx, targets, dropout_masks=dropout_masks)
    analytic = model.backward()
    loss = lambda: model.forward(idx, targets, dropout_masks=dropout_masks)[1]  # noqa: E731
    return {name: rel_error(analytic[name], numerical_gradient(loss, p, h))
            for name, p in model.params.items()}
