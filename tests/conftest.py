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


def _errors_below(errors: dict[str, float], tol: float, what: str = "") -> None:
    """errors: {name: relative error} as gradcheck_layer / gradcheck_model return them (already
    computed, so a table of errors rather than of tensors)."""
    assert errors, f"{what}: nothing was checked"
    width = max(len(n) for n in errors)
    print(f"\n{what}: normwise relative error of each gradient (limit {tol:.0e})")
    for name, err in errors.items():
        print(f"  {name:<{width}}  {err:.3e}{'  <-- too large' if not err <= tol else ''}")
    bad = {n: e for n, e in errors.items() if not e <= tol}  # `not <=` also catches NaN
    assert not bad, f"{what}: gradients off by more than {tol:g}: {bad}"


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
