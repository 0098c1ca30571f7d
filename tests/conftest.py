"""Shared helpers of the npgpt unit tests, as session fixtures (they hold no state).

Every comparison prints the name, the max absolute and the normwise relative error of each
array it checks before it asserts, so a failure shows the whole picture and not only the first
offender (pytest shows captured output of failing tests). The comparison itself is npgpt.compare,
the one the parity suite uses.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

from npgpt import compare, layers
from npgpt.gradcheck import finite_diff_bound


def _errors_below(errors: dict, what: str, *, n: int, depth: int, amplification: float = 1.0,
                  h: float = 1e-5) -> None:
    """errors: {name: npgpt.gradcheck.Check} as gradcheck_layer / gradcheck_model return them (already
    computed, so a table of errors rather than of tensors). Each is held to its own finite_diff bound
    (npgpt.gradcheck.finite_diff_bound): f is a `depth`-stage float64 computation whose longest sum
    has n terms, carried with `amplification`, differenced with step h."""
    assert errors, f"{what}: nothing was checked"
    limits = {name: finite_diff_bound(err, h, n, depth, amplification) for name, err in errors.items()}
    width = max(len(name) for name in errors)
    print(f"\n{what}: normwise relative error of each gradient against finite differences "
          f"(n={n}, depth={depth}, amplification={amplification:g}, h={h:g})")
    for name, err in errors.items():
        flag = "" if err <= limits[name] else "  <-- too large"
        print(f"  {name:<{width}}  {err:.3e}  bound {limits[name]:.2e}  (rms gradient {err.gradient:.2e}, "
              f"terms {err.terms:.2e}){flag}")
    bad = {name: f"{err:.3e} > {limits[name]:.2e}" for name, err in errors.items()
           if not err <= limits[name]}  # `not <=` also catches NaN
    assert not bad, f"{what}: gradients off by more than their finite_diff bound: {bad}"


@contextmanager
def _recording_relu():
    """Within the block, every input that reaches relu_forward is appended (copied) to the list.

    Used to assert that no ReLU pre-activation lies within a few finite-difference steps of the
    kink, where centred differences straddle it and measure a slope that is neither 0 nor 1.
    """
    seen: list[np.ndarray] = []
    fwd, bwd = layers.ACTIVATION_FUNCTIONS["relu"]

    def recording_forward(x):
        seen.append(np.array(x, copy=True))
        return fwd(x)

    layers.ACTIVATION_FUNCTIONS["relu"] = (recording_forward, bwd)
    try:
        yield seen
    finally:
        layers.ACTIVATION_FUNCTIONS["relu"] = (fwd, bwd)


@contextmanager
def _recording_norm_stds():
    """Within the block, the smallest standard deviation of any row that reaches the reference
    layer set's layernorm_forward
    is appended to the list (see npgpt.gradcheck.NORM_STD_MIN)."""
    seen: list[float] = []
    forward = layers.REFERENCE.layernorm_forward

    def recording_forward(x, *args, **kwargs):
        seen.append(float(np.std(x, axis=-1).min()))
        return forward(x, *args, **kwargs)

    layers.REFERENCE.layernorm_forward = recording_forward
    try:
        yield seen
    finally:
        layers.REFERENCE.layernorm_forward = forward


@pytest.fixture(scope="session")
def recording_norm_stds():
    return _recording_norm_stds


@pytest.fixture(scope="session")
def errors_below():
    return _errors_below


@pytest.fixture(scope="session")
def assert_close():
    """npgpt.compare.assert_close(name, actual, expected, rtol): normwise relative error <= rtol."""
    return compare.assert_close


@pytest.fixture(scope="session")
def recording_relu():
    return _recording_relu
