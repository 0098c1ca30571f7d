"""Every tolerance of the test suite, derived from rounding-error analysis in one place.

A test never writes a bare number: it names the kind of comparison it makes and the sizes that
matter (the dtype, the longest sum, the depth of the computation), and this module turns them into a
bound. The kinds, from strictest to loosest:

==================  ==========================================================================
kind                when it applies
==================  ==========================================================================
``bitwise``         the very same operations in the same order on the same machine (one function
                    run twice, resume, determinism, an in-place rewrite of the same formula).
``reordered``       the same formula, with its sums added in another order: BLAS blocking and
                    SIMD width, a 2-D matmul against a batched one, a numba loop against NumPy's
                    pairwise sum, torch's kernels against NumPy's.
``chain``           a whole computation of several such stages (a block, a model's forward and
                    backward, optimizer steps): each stage's rounding error is carried to the end.
``parity``          npgpt against torchgpt (parity_tests/): a ``chain`` over the suite's shapes.
``finite_diff``     a hand-written gradient against centred finite differences in float64.
``approximation``   a formula against a different one that approximates it (a float32 erf, the
                    tanh GELU): the approximation's own error, plus the rounding of both.
==================  ==========================================================================

The model of rounding (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 2-3):
every operation returns ``(a op b)(1 + d)`` with ``|d| <= u``, the unit roundoff of the dtype
(2^-53 for float64, 2^-24 for float32; ``unit_roundoff``). To first order in u, a sum of n terms
added in any order (any blocking, SIMD width or thread split) carries the error
``E = sum_k d_k s_k``, one rounding ``d_k`` per addition times the partial sum ``s_k`` it rounds.
The worst case (every ``d_k = u``) gives the classical ``gamma_n = n u / (1 - n u)``. Higham and
Mary (SIAM J. Sci. Comput. 41(5), 2019) model the ``d_k`` as independent with mean zero, as they are
for any data that is not built to hit rounding ties; then Azuma-Hoeffding's inequality gives
``|E| <= lam u sqrt(sum_k s_k^2) <= lam sqrt(n) u max_k |s_k|`` with probability at least
``1 - 2 exp(-lam^2 / 2)``. With ``LAMBDA = 8`` that is ``1 - 2.5e-14`` a sum: never seen on any CPU,
whatever its SIMD width or BLAS kernel, since none of that enters the model. This is ``sum_error``.

Relative to the result, ``max_k |s_k|`` must be compared with ``|s_n|``. For terms of one sign the
two are equal. For terms of random sign (a matmul of random weights, a gradient summed over
positions: test data), the partial sums are a martingale and Doob's maximal inequality bounds
``E max_k s_k^2 <= 4 E s_n^2``: normwise over a tensor of such sums, ``max_k |s_k|`` is at most
twice ``|s_n|``. ``reordered`` takes that factor 2 (``CANCELLATION``), and twice the error, since
both programs round. A computation of several stages (``chain``) adds each stage's roundings to the
same kind of sum, so the stages' errors add in quadrature: ``sqrt(depth)`` times one stage's, each
carried to the output with at most the stated ``amplification`` (the condition number of the rest of
the computation: layernorm's division by a standard deviation, softmax's Jacobian, the residual
adds; near 1 for the suite's unit-scale data, and the caller says what it passes).

What a bound must still catch: a wrong backward (a missing term, a wrong axis, a dropped
gradient, a factor of 2) is off by 1e-3 to 1 in normwise relative error, while these bounds stay
below 1e-11 in float64 and below 1e-3 in float32 for the suite's shapes. tests/test_bounds.py plants
such bugs and checks that each fails its bound.
"""
from __future__ import annotations

import math

import numpy as np

LAMBDA = 8.0
"""Higham-Mary's confidence parameter: a sum's bound fails with probability < 2 exp(-LAMBDA^2 / 2)."""

CANCELLATION = 2.0
"""max_k |s_k| / |s_n| normwise for sums of random-sign terms (Doob's L2 maximal inequality)."""


def unit_roundoff(dtype) -> float:
    """u = 2^-p for a p-bit significand: 2^-53 (float64), 2^-24 (float32). Half of np.finfo.eps."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2.0


def sum_error(dtype, n: int) -> float:
    """LAMBDA sqrt(n) u: the error of a sum or dot product of n terms added in any order, relative to
    its largest partial sum (Azuma-Hoeffding on the first-order error; see the module docstring)."""
    if n < 1:
        raise ValueError(f"sum_error: n must be >= 1, got {n}")
    return LAMBDA * math.sqrt(n) * unit_roundoff(dtype)


def bitwise(why: str) -> float:
    """0: the two results must be equal bit for bit. Only where the very same operations run in the
    same order on the same machine; `why` says which operations those are (it is the test's claim,
    kept beside the assertion)."""
    if not why or not why.strip():
        raise ValueError("bitwise: say why the two results run the same operations in the same order")
    return 0.0


def reordered(dtype, n: int, cancellation: float = CANCELLATION) -> float:
    """The same formula with its sums of at most n terms added in another order: both sides carry
    sum_error(n) times their largest partial sums, which are `cancellation` times the result
    (CANCELLATION for random-sign terms, 1.0 for terms of one sign)."""
    return 2.0 * sum_error(dtype, n) * float(cancellation)


def chain(dtype, n: int, depth: int, amplification: float = 1.0,
          cancellation: float = CANCELLATION) -> float:
    """A computation of `depth` stages, each a reordered(n) result (a forward and backward through a
    block or a model, several optimizer steps): independent stage errors add in quadrature, each
    carried to the output with at most `amplification`: sqrt(depth) * amplification * reordered(n)."""
    if depth < 1:
        raise ValueError(f"chain: depth must be >= 1, got {depth}")
    return math.sqrt(depth) * float(amplification) * reordered(dtype, n, cancellation)


def finite_diff(h: float = 1e-5, third_derivative: float = 1e3, value: float = 1e3,
                gradient: float = 1e-2) -> float:
    """A float64 backward against centred differences (f(x + h) - f(x - h)) / 2h.

    The truncation error is h^2 / 6 * |f'''| and the rounding error u |f| / h (each of f(x +- h)
    rounds at u |f|). `third_derivative` and `value` bound |f'''| and |f| for the suite's
    unit-scale inputs and a random upstream gradient (sums of up to ~1e3 terms of size ~1), and
    `gradient` bounds the norm of the gradient compared, from below. With the defaults:
    (1e-10 / 6 * 1e3 + 1.1e-16 * 1e3 / 1e-5) / 1e-2 ~ 2.8e-6.
    """
    u = unit_roundoff(np.float64)
    return (h * h / 6.0 * third_derivative + u * value / h) / gradient


def approximation(dtype, max_error: float, n: int = 1) -> float:
    """A formula against an approximation of it whose own relative error is at most `max_error` (the
    float32 erf's, the tanh GELU's), plus the reordered rounding of sums of n terms on both sides."""
    return float(max_error) + reordered(dtype, n)


# The parity suite (parity_tests/) compares npgpt with torchgpt on shapes whose longest sum has at
# most PARITY_N terms (4 * n_embd for the MLP's second matmul, B * T positions for a weight's
# gradient); a model's forward and backward is PARITY_DEPTH such stages (per layer: 2 norms, 4
# attention matmuls, softmax, 2 MLP matmuls, the activation, each forward and backward; two layers;
# the embedding, head and loss), carried with PARITY_AMPLIFICATION (layernorm's 1/std on unit-scale
# inputs, softmax's Jacobian, the residual adds).
PARITY_N = 128
PARITY_DEPTH = 48
PARITY_AMPLIFICATION = 3.0


def parity(dtype, n: int = PARITY_N, depth: int = PARITY_DEPTH) -> float:
    """npgpt against torchgpt: chain(n, depth, PARITY_AMPLIFICATION). At the defaults, 8.3e-13 in
    float64 (the README's "to 1e-12") and 4.5e-4 in float32; smaller for fewer terms or stages."""
    return chain(dtype, n, depth, PARITY_AMPLIFICATION)


# --- reference layers
# The sizes the unit tests of the reference layers (tests/test_layers.py, test_model.py and their
# modern twins) pass to the kinds above.

BLOCK_DEPTH = 14
"""Stages of one block's forward, each a sum or a rounding carried on: ln_1 (mean, variance,
normalise), c_attn, attention (scores, softmax, probabilities @ v), c_proj, the residual add,
ln_2 (mean, variance, normalise), c_fc, c_proj and the residual add; the activation rounds in place."""


def forward_depth(n_layer: int) -> int:
    """Stages of a model's forward up to its loss: the embedding add, n_layer blocks, ln_f (3), the
    head and the loss (log-sum-exp and the mean over positions)."""
    return 1 + n_layer * BLOCK_DEPTH + 3 + 1 + 2


GELU_TANH_MAX_ERROR = 4.8e-4
"""max over real x of |gelu_tanh(x) - gelu(x)|: 4.73e-4, at x = +-2.70 (the tanh form's error
x (tanh(u(x)) - erf(x / sqrt 2)) / 2 has its extremes there and tends to 0 in both tails; evaluated
on a grid of step 1e-5 over [-10, 10], where beyond |x| = 6 it is below 1e-9). An absolute error:
compare it with max |difference| of unit-scale inputs."""
