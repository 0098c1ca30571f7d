"""The comparison helper itself: it must fail, and name the tensor, whenever a bound is broken."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from npgpt import bounds as kinds
from npgpt.compare import (PARITY_FORWARD_DEPTH, RTOL, assert_close, bounds, compare_all,
                           compare_outputs_and_grads, errors, to_numpy64)


def test_errors_are_max_abs_and_normwise_relative():
    b = np.array([3.0, 4.0])  # ||b|| = 5
    max_abs, rel = errors(b + np.array([0.0, 1e-3]), b)
    assert max_abs == pytest.approx(1e-3) and rel == pytest.approx(2e-4)
    assert errors(np.zeros(3), np.zeros(3)) == (0.0, 0.0)
    assert errors(np.ones(3), np.zeros(3))[1] == np.inf
    assert np.isnan(errors(np.array([np.nan]), np.array([1.0]))[1])


def test_torch_tensors_become_float64_numpy():
    t = torch.tensor([1.5, 2.5], dtype=torch.float32, requires_grad=True) * 2
    x = to_numpy64(t)
    assert x.dtype == np.float64 and np.array_equal(x, [3.0, 5.0])


def test_failure_names_the_tensor_and_prints_a_table(capsys):
    ours = {"good": np.ones(4), "bad": np.array([1.0, 2.0, 3.0 + 1e-9])}
    theirs = {"good": torch.ones(4, dtype=torch.float64),
              "bad": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    expected = r"demo: 1 of 2 tensor\(s\) over the bound: bad \(3,\): max abs 1\.0"
    with pytest.raises(AssertionError, match=expected):
        compare_all(ours, theirs, rtol=1e-12, header="demo")
    table = capsys.readouterr().out
    assert "good" in table and "bad" in table and "FAIL" in table and "max abs" in table
    compare_all(ours, theirs, rtol=1e-9, header="demo")  # within a looser bound: passes


def test_missing_or_extra_tensors_fail():
    with pytest.raises(AssertionError, match="missing from ours"):
        compare_all({"a": np.ones(2)}, {"a": np.ones(2), "b": np.ones(2)}, rtol=1e-12)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close("a", np.ones(2), np.ones(3), rtol=1e-12)
    with pytest.raises(ValueError, match="no bound"):
        compare_all({"a": np.ones(2)}, {"a": np.ones(2)})


def test_nan_fails_even_with_a_loose_bound():
    with pytest.raises(AssertionError, match="x"):
        assert_close("x", np.array([np.nan, 1.0]), np.array([1.0, 1.0]), rtol=1e3)


def test_elementwise_absolute_bound():
    theirs = np.array([1.0, 1e-20, 0.0])
    ours = theirs + np.array([1e-17, 1e-30, 0.0])
    compare_all({"g": ours}, {"g": theirs}, atol={"g": np.array([1e-16, 1e-29, 0.0])})  # 0/0 is within
    with pytest.raises(AssertionError, match=r"g \(3,\).*elementwise"):
        compare_all({"g": ours}, {"g": theirs}, atol={"g": np.array([1e-16, 1e-31, 0.0])})


def test_scale_replaces_the_denominator():
    theirs = np.array([1e-13])  # a sum whose terms (size 1) cancelled
    ours = theirs + 1e-16
    with pytest.raises(AssertionError):
        compare_all({"s": ours}, {"s": theirs}, rtol=1e-12)
    rows = compare_all({"s": ours}, {"s": theirs}, rtol=1e-12, scale={"s": np.array([1.0])})
    assert rows[0].rel == pytest.approx(1e-16) and "vs ||scale||" in rows[0].bound


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bounds_are_npgpt_bounds_parity_of_the_sizes(dtype):
    """Outputs at parity(n, depth), gradients at parity(n, 2 depth); more terms or stages loosen them;
    the defaults are the suite's largest shapes, whose float64 gradient bound is the README's 1e-12."""
    b = bounds(dtype, 24, 5)
    assert b == {"forward": kinds.parity(dtype, 24, 5), "grad": kinds.parity(dtype, 24, 10)}
    assert b["forward"] < b["grad"] < bounds(dtype, 96, 5)["grad"] < bounds(dtype, 96, 20)["grad"]
    assert bounds(dtype) == RTOL[np.dtype(dtype)]
    assert bounds(dtype)["grad"] == kinds.parity(dtype) and 2 * PARITY_FORWARD_DEPTH == kinds.PARITY_DEPTH
    assert RTOL[np.dtype(np.float64)]["grad"] <= 1e-12 < RTOL[np.dtype(np.float32)]["forward"]


def test_outputs_and_gradients_get_their_own_bounds():
    """An error between the forward's and the gradients' bound fails as an output, passes as a
    gradient; the table names the sizes the bounds came from."""
    b = bounds(np.float32, 16, 3)
    theirs = np.ones(4)
    ours = theirs * (1 + (b["forward"] + b["grad"]) / 2)  # rel between the two bounds
    compare_outputs_and_grads({}, {}, {"g": ours}, {"g": theirs}, np.float32, "grad", n=16, depth=3)
    with pytest.raises(AssertionError, match=r"out \(4,\)"):
        compare_outputs_and_grads({"out": ours}, {"out": theirs}, {}, {}, np.float32, "out", n=16, depth=3)
    rows = compare_outputs_and_grads({"out": theirs}, {"out": theirs}, {"g": ours}, {"g": theirs},
                                     np.float32, "both", n=16, depth=3)
    assert [r.rtol for r in rows] == [b["forward"], b["grad"]]


def test_elementwise_bound_is_twice_u_times_the_rounded_terms():
    """bounds.elementwise: two sides, each within u of the terms it rounds, plus subnormals."""
    u = kinds.unit_roundoff(np.float32)
    got = kinds.elementwise(np.float32, np.array([1.0, 4.0]), subnormals=2)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    assert np.array_equal(got, np.array([2 * u + 2 * tiny, 8 * u + 2 * tiny]))
    assert kinds.roundings(kinds.BFLOAT16_UNIT_ROUNDOFF, 17) == 17 * 2.0 ** -8
    with pytest.raises(ValueError, match="k must be"):
        kinds.roundings(kinds.BFLOAT16_UNIT_ROUNDOFF, 0)
