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


def gamma(dtype, n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the worst case of n roundings, deterministic (Higham,
    Lemma 3.1): for short chains of correctly rounded elementwise operations."""
    if n < 1:
        raise ValueError(f"gamma: n must be >= 1, got {n}")
    u = unit_roundoff(dtype)
    return n * u / (1.0 - n * u)


def sum_error(dtype, n: int) -> float:
    """LAMBDA sqrt(n) u: the error of a sum or dot product of n terms added in any order, relative to
    its largest partial sum (Azuma-Hoeffding on the first-order error; see the module docstring).
    For n < LAMBDA^2 = 64 this exceeds the worst case gamma_n; that margin is kept on purpose: the
    few operations of such short chains include exp, tanh, erf and sigmoid, which libm, SLEEF and
    numba's vector code round to within a few ulps (up to ~4 u) rather than to u."""
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


# --- muon
# The quintic Newton-Schulz iteration of Muon (npgpt/muon.py) maps x = U S V^T to U p(S) V^T with
# p(s) = a s + b s^3 + c s^5, so the whole error analysis lives on the singular values of its input.


def _newton_schulz_gains(s: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """The eigenvalues of one step's Jacobian at x = U diag(s) V^T, in the basis of x's singular
    vectors: for a pair (i, j) of singular values, on (E_ij + E_ji) the divided difference
    (p(s_i) - p(s_j)) / (s_i - s_j), on (E_ij - E_ji) (p(s_i) + p(s_j)) / (s_i + s_j) (the diagonal
    gives p'(s_i)); on a direction outside x's row space p(s_i) / s_i. As alpha +- beta with
    alpha = a + b (s_i^2 + s_j^2) + c (s_i^4 + s_i^2 s_j^2 + s_j^4), beta = s_i s_j (b + c (s_i^2 + s_j^2)),
    which holds at s = 0 too. Returns every mode's gain in one flat array: r^2 + r^2 pair ones, then r."""
    si, sj = s[:, None], s[None, :]
    alpha = a + b * (si ** 2 + sj ** 2) + c * (si ** 4 + si ** 2 * sj ** 2 + sj ** 4)
    beta = si * sj * (b + c * (si ** 2 + sj ** 2))
    return np.concatenate([(alpha + beta).ravel(), (alpha - beta).ravel(), a + b * s ** 2 + c * s ** 4])


def newton_schulz(dtype, shape: tuple, singular_values, steps: int = 5,
                  coefficients: tuple = (3.4445, -4.775, 2.0315)) -> float:
    """Muon's Newton-Schulz iteration run in `dtype` against the exact one, normwise relative to the
    result, for an input of `shape` with these singular values (any scale: the iteration divides by
    the Frobenius norm). The caller computes them in float64 from its data, as it states a chain's
    amplification; the bound runs the iteration on them (torch's coefficients by default).

    Step k takes x_k = U diag(s_k) V^T (||x_0||_F = 1) to x_{k+1} = a x_k + (b A + c A^2) x_k, A = x_k x_k^T:
    three matmuls of at most n = max(shape) terms, whose roundings scale with the three terms'
    sizes before they cancel, T_k = ||a s_k + |b| s_k^3 + |c| s_k^5||_2; so a fresh error of at most
    sqrt(3) reordered(dtype, n) T_k (the normalisation: reordered(dtype, rows * cols, 1), one sign).
    Each later step carries an error with its Jacobian, whose eigenvalues in the singular vectors'
    basis are known exactly (_newton_schulz_gains), and the singular vectors do not move: an error
    made at step k reaches the end multiplied by at most G_k = max over the modes of the product of
    their gains over steps k + 1 ... steps - 1. First order, stages in quadrature as `chain`:
        sqrt(sum_k (G_k E_k)^2) / ||p^steps(s_0)||_2.
    Where a singular value is tiny (a near-low-rank update), p'(0) = a ~ 3.4 per step makes G large,
    as it is: the iteration inflates that direction's error with the direction itself.
    """
    a, b, c = coefficients
    s = np.asarray(singular_values, dtype=np.float64)
    s = s / np.linalg.norm(s)
    trajectory = [s]
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
        trajectory.append(s)
    gains = [np.abs(_newton_schulz_gains(t, a, b, c)) for t in trajectory[:steps]]  # step k's Jacobian
    errors = [reordered(dtype, shape[0] * shape[1], cancellation=1.0)]  # the normalisation, ||x_0|| = 1
    carried = [np.prod(gains, axis=0).max() if steps else 1.0]
    for k in range(steps):
        t = trajectory[k]
        errors.append(math.sqrt(3.0) * reordered(dtype, max(shape)) *
                      float(np.linalg.norm(abs(a) * t + abs(b) * t ** 3 + abs(c) * t ** 5)))
        later = gains[k + 1:]
        carried.append(np.prod(later, axis=0).max() if later else 1.0)
    total = math.sqrt(sum((g * e) ** 2 for g, e in zip(carried, errors)))
    return total / float(np.linalg.norm(trajectory[-1]))

# --- parity
# Kinds the parity suite needs beyond parity(dtype, n, depth): per-element bounds from a worst-case
# analysis of one formula (where the result cancels far below the terms it is computed from, so a
# relative bound has no meaning), and a count of roundings in a format NumPy does not have.

BFLOAT16_UNIT_ROUNDOFF = 2.0 ** -8
"""u of bfloat16 (8 significant bits): torch.optim.Muon runs its Newton-Schulz iteration in it."""


def elementwise(dtype, rounded, subnormals: int = 0):
    """A per-element bound on |ours - theirs| for one formula, from a worst-case analysis: each side's
    error is at most u times `rounded` (an array or number: the sum, over the formula's roundings, of
    the magnitude each one rounds, weighted by how far it is carried to the result), so the two
    differ by at most 2 u rounded; plus `subnormals` times the smallest subnormal number (below the
    normal range rounding is absolute, not relative). For results that cancel to far below their
    terms (a near one-hot softmax row, a confidently right cross-entropy row, a layernorm over two
    channels), where only the terms' magnitudes bound the error."""
    tiny = float(np.finfo(np.dtype(dtype)).smallest_subnormal)
    return 2.0 * unit_roundoff(dtype) * np.asarray(rounded, dtype=np.float64) + subnormals * tiny


def roundings(unit: float, k: int) -> float:
    """k roundings of unit roundoff `unit` (a float, for formats NumPy lacks: BFLOAT16_UNIT_ROUNDOFF)
    added at worst linearly: gamma_k ~ k u, the relative error of a result that passes k times
    through that format when nothing is known of the errors' signs."""
    if k < 1:
        raise ValueError(f"roundings: k must be >= 1, got {k}")
    return float(k) * float(unit)

# --- fast path and kernels
#
# npgpt.fast against npgpt.layers (tests/test_fastpath.py, tests/test_numba_kernels.py) and
# npgpt.optim against its formula (tests/test_optim.py): the sizes
# of those comparisons, counted from a GPTConfig, and the error of the float32 approximations.

ERF32_MAX_ERROR = 5e-7
"""Absolute error of npgpt.fast's float32 erf (Eigen's and XLA's rational approximation x P(x^2) /
Q(x^2) on [-4, 4], evaluated in float32), its float32 rounding included. Established by
tests/test_fastpath.py's sweep over every 101st float32 of [0, 6] (3.9e-7 at x = 3.25, where erf
is 0.99999... and one float32 ulp is 6e-8), rounded up: the approximation's own error plus a few
ulps of Horner evaluation and the division."""

PHI32_MAX_ERROR = (ERF32_MAX_ERROR + unit_roundoff(np.float32)) / 2.0
"""Absolute error of the float32 normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2: the erf's, plus
the rounding of 1 + erf (at most u, half the float32 spacing 2^-23 of [1, 2)), halved exactly."""

EXP32_MAX_ERROR = 2.0 * float(np.finfo(np.float32).eps)
"""Relative error of the float32 kernels' polynomial exp: two float32 ulps (2 * 2^-23). The
argument reduction r = x - k ln 2 is exact (ln 2 split in two, the first part exact in float32
times any k), the Taylor series to r^7 truncates at 3e-9 relative, and Horner's rule in float32
leaves about one ulp (npgpt/fast/numba_kernels.py; tests/test_numba_kernels.py sweeps [-87, 88])."""

MODEL_AMPLIFICATION = PARITY_AMPLIFICATION
"""How much a GPT's forward and backward amplify one stage's relative error on the suite's
unit-scale data: layernorm's 1/std, softmax's Jacobian, the residual adds (as PARITY_AMPLIFICATION;
the fast-path tests run the same small models as the parity suite)."""

NEWTON_SCHULZ_MATMULS = 3
"""Matrix products per Newton-Schulz step of Muon: gram = x x^T, gram @ gram, poly @ x."""


def reassociated(dtype, k: int, cancellation: float = 1.0) -> float:
    """Kind ``reordered`` for an elementwise formula that two programs evaluate with at most k
    roundings an element each, in another association (a * (b / c) against (a * b) / c, a scalar
    folded differently): both sides carry min(gamma_k, sum_error(k)) relative to the largest
    intermediate, which is `cancellation` times the result (1.0 for terms of one sign)."""
    return 2.0 * min(gamma(dtype, k), sum_error(dtype, k)) * float(cancellation)


def mlp_width(config) -> int:
    """The MLP's hidden width H (config.mlp_hidden, or 4 * n_embd)."""
    return config.mlp_hidden if config.mlp_hidden is not None else 4 * config.n_embd


def linear_sum_length(config) -> int:
    """The longest sum of a GPT's linear layers, forward (over a layer's input width) or dx (over
    its output width): 3C (c_attn's output), H (mlp.c_proj's input) or 2H (SwiGLU's c_fc output),
    V (lm_head's output)."""
    fc_out = 2 * mlp_width(config) if config.activation == "swiglu" else mlp_width(config)
    return max(3 * config.n_embd, fc_out, config.vocab_size)


def linear_depth(config, backward: bool = True) -> int:
    """Stages of npgpt.fast's NumPy model whose sums the reference adds in another order: each linear
    layer (4 a block, and lm_head) as one 2-D matmul against the reference's batched one, forward
    and, with `backward`, its dx (dw is the same 2-D product on both sides). Every other layer runs
    the reference's operations in the reference's order (tests/test_fastpath.py checks each)."""
    linears = 4 * config.n_layer + 1
    return 2 * linears if backward else linears


def stages_per_block(config) -> int:
    """Stages of one block's forward that round: 2 norms, c_attn, q k^T, softmax, att v,
    attn.c_proj, c_fc, the activation, mlp.c_proj (10), plus QK-norm's two RMSNorms and RoPE's two
    rotations where the config has them."""
    return 10 + (2 if config.qk_norm else 0) + (2 if config.pos_emb == "rope" else 0)


def model_depth(config, backward: bool = True) -> int:
    """Stages of a GPT's forward (and, with `backward`, its backward) that round: every block's
    (stages_per_block), and the embedding, ln_f, lm_head and the loss. For the parity suite's
    2-layer model, 2 * (2 * 10 + 4) = 48 = PARITY_DEPTH."""
    forward = config.n_layer * stages_per_block(config) + 4
    return 2 * forward if backward else forward


def fast_model(dtype, config, numpy_only: bool, backward: bool = True, steps: int = 1,
               extra_stages: int = 0, blocks_only: bool = False) -> float:
    """Kind ``chain``: npgpt.fast's GPT (`steps` forward and backward passes, `extra_stages` more a
    step: an optimizer's) against the reference's, or in float32 with the kernels against the same
    run in float64.

    numpy_only: the fast path without numba, where only the linears' sums are reordered
    (linear_depth); otherwise every stage rounds in its own order (model_depth). The longest sum is
    linear_sum_length (or the block size T, summed by attention, if longer). blocks_only: the
    blocks alone (no embedding, ln_f, lm_head, loss). In float32, the float32 approximations add
    their own error at every stage that uses one, carried with MODEL_AMPLIFICATION: on the NumPy
    path the GELU's erf (activation "gelu"), with the kernels every activation's erf or exp, every
    softmax's and the loss's exp. Against a float64 run only the float32 side rounds, so there the
    chain (which counts both sides) holds with a factor 2 to spare.
    """
    per_pass = 2 if backward else 1
    if numpy_only:
        depth = linear_depth(config, backward) - (per_pass if blocks_only else 0)
    else:
        depth = model_depth(config, backward) - (4 * per_pass if blocks_only else 0)
    n = max(linear_sum_length(config), config.block_size)
    bound = chain(dtype, n, steps * (depth + extra_stages), MODEL_AMPLIFICATION)
    if np.dtype(dtype) == np.float32:
        if numpy_only:
            approximated = config.n_layer if config.activation == "gelu" else 0
        else:
            approximated = 2 * config.n_layer + (0 if blocks_only else 1)
        bound += steps * per_pass * approximated * MODEL_AMPLIFICATION * max(ERF32_MAX_ERROR,
                                                                           EXP32_MAX_ERROR)
    return bound


LIBM64_MAX_ERROR = 2.0 * float(np.finfo(np.float64).eps)
"""Relative difference of two float64 implementations of exp, erf or tanh (libm's, scipy's, NumPy's
SIMD ones), each within an ulp (2u) of the exact value: two ulps."""

ADAMW_ROUNDINGS = 14
"""Roundings of one AdamW step for one element of p: the decay (1), m = b1 m + (1 - b1) g (3),
v = b2 v + (1 - b2) g^2 (4), the denominator sqrt(v) / sqrt(1 - b2^t) + eps (3), the step
lr / (1 - b1^t) * m / denominator and its subtraction (3). Two programs of the same formula in
another association (or FMA-contracted) differ by reassociated(dtype, ADAMW_ROUNDINGS * steps)."""


def global_norm(dtype, n: int) -> float:
    """Kind ``reordered``: a global L2 norm sqrt(sum of squares) against the same norm summed in
    another order (or exactly), its squares (of one sign) added in sums of at most n terms in
    `dtype`: reordered(dtype, n, 1.0) for the sum, halved by the square root, plus the square
    root's own rounding."""
    return reordered(dtype, n, cancellation=1.0) / 2.0 + unit_roundoff(dtype)

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
