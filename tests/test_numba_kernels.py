"""npgpt.fast.numba_kernels against the plain formulas of npgpt.layers.

float64: each kernel computes the reference's formula with libm's functions (within
bounds.LIBM64_MAX_ERROR of NumPy's and scipy's), summed in another order. float32: the kernels use a
rational erf, a polynomial exp (bounds.ERF32_MAX_ERROR, EXP32_MAX_ERROR) and float64 row sums; they
are compared with the exact result (the reference run in float64 on the same float32 inputs). Each
check's bound comes from npgpt.bounds: a chain over the kernel's stages and its longest sum, plus the
approximation's error where it uses one. (The float32 reference is printed beside it for scale.)

numba is a test dependency (the `test` extra), so these tests run by default and fail, rather than
skip, when it cannot be imported. The last tests hide numba in a fresh interpreter and check that
the module still imports and computes the same numbers with the reference layers.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from scipy.special import erf as scipy_erf

from npgpt import GPTConfig, fast, optim
from npgpt import layers as L
from npgpt.bounds import (ADAMW_ROUNDINGS, CANCELLATION, ERF32_MAX_ERROR, EXP32_MAX_ERROR, LIBM64_MAX_ERROR,
                          MODEL_AMPLIFICATION, NEWTON_SCHULZ_MATMULS, PHI32_MAX_ERROR, approximation, bitwise, chain,
                          reassociated, fast_model, gamma, reordered)
from npgpt.compare import compare_all
from npgpt.fast import layers as fast_layers
from npgpt.fast import numba_kernels as K
from npgpt.gradcheck import rel_error
from npgpt.muon import Muon
from npgpt.optim import AdamW

# the kernels' own attention core, split, merge and the rest the reference's
KERNELS = L.LayerSet(**{**vars(L.REFERENCE), "causal_attention_forward": K.causal_attention_forward,
                         "causal_attention_backward": K.causal_attention_backward})
from functools import partial
from fast_helpers import (MODEL_CONFIGS, MODERN_CONFIGS, arrays_of, batch, block_params, check, check_equal, compare_pair, compare_to_reference,
                          exact_twin, noisy_pair, small_config)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [np.float64, np.float32]


def exp_error(dtype) -> float:
    """The kernels' exp (float32: the polynomial; float64: libm's) against NumPy's, relative."""
    return EXP32_MAX_ERROR if np.dtype(dtype) == np.float32 else LIBM64_MAX_ERROR


def erf_error(dtype) -> float:
    """The kernels' erf (float32: the rational approximation; float64: libm's) against scipy's."""
    return ERF32_MAX_ERROR if np.dtype(dtype) == np.float32 else LIBM64_MAX_ERROR


def attention_bound(dtype, T: int, hs: int, backward: bool = True) -> float:
    """Kind chain: attention's sums run over hs (q k^T) and T (softmax, att v, the backward's
    products); the forward is 3 stages (scores, softmax, att v), the backward 3 more, through
    softmax's Jacobian (MODEL_AMPLIFICATION); plus the exp's error."""
    return chain(dtype, max(T, hs), 6 if backward else 3, MODEL_AMPLIFICATION) + exp_error(dtype)


def cross_entropy_bound(dtype, V: int, N: int) -> float:
    """Kind chain: the log-sum-exp over V and the mean over N positions, 3 stages (max-shifted exp,
    the sums, the log or the division), plus the exp's error."""
    return chain(dtype, max(V, N), 3) + exp_error(dtype)


def test_numba_is_available():
    assert K.AVAILABLE, (f"{K.UNAVAILABLE_REASON}: the kernels are untested without numba; "
                         "install the test extra (pip install -e '.[test]')")
    assert K.threads() >= 1


def random(rng, shape, dtype, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


def as64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


# --------------------------------------------------------------------------------------------
# Layer norm
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 24), (12, 64, 128), (5, 33)])
def test_layernorm(dtype, bias, shape):
    """The forward is a chain of 3 stages over C (mean, variance, normalisation), dx 5 (and the
    backward's two means), dw and db 4 (and their sums over the N rows)."""
    rng = np.random.default_rng(1)
    C = shape[-1]
    x, dout = random(rng, shape, dtype, 3.0, 1.5), random(rng, shape, dtype)
    w, b = random(rng, C, dtype, 0.5, 1.0), (random(rng, C, dtype) if bias else None)
    out, cache = K.layernorm_forward(x, w, b)
    dx, dw, db = K.layernorm_backward(dout, cache)
    ref_out, ref_cache = L.layernorm_forward(*as64(x, w, b))
    ref_dx, ref_dw, ref_db = L.layernorm_backward(*as64(dout), ref_cache)
    r32 = {}
    if dtype == np.float32:
        r32_out, r32_cache = L.layernorm_forward(x, w, b)
        r32 = dict(zip(("out", "dx", "dw", "db"), (r32_out, *L.layernorm_backward(dout, r32_cache))))
    N = int(np.prod(shape[:-1]))
    check("out", out, ref_out, dtype, chain(dtype, C, 3), r32.get("out"))
    check("dx", dx, ref_dx, dtype, chain(dtype, C, 5), r32.get("dx"))
    check("dw", dw, ref_dw, dtype, chain(dtype, max(C, N), 4), r32.get("dw"))
    if bias:
        check("db", db, ref_db, dtype, chain(dtype, max(C, N), 4), r32.get("db"))
    else:
        assert db is None and ref_db is None


def test_layernorm_eps_is_used():
    rng = np.random.default_rng(2)
    x = random(rng, (4, 16), np.float64, 1e-3)  # variance ~1e-6: eps matters
    w = np.ones(16)
    out, _ = K.layernorm_forward(x, w, None, eps=1e-2)
    ref, _ = L.layernorm_forward(x, w, None, eps=1e-2)
    bound = chain(np.float64, 16, 3)
    check("out", out, ref, np.float64, bound)
    assert rel_error(K.layernorm_forward(x, w, None)[0], ref) > bound  # the default eps gives another result


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_layernorm_weight_gradient_does_not_depend_on_the_split_into_parts(parts):
    """dw, db are summed in one partial per thread; any number of parts gives the same sums."""
    rng = np.random.default_rng(3)
    x, dout = random(rng, (10, 12), np.float64), random(rng, (10, 12), np.float64)
    w = random(rng, 12, np.float64)
    _, cache = K.layernorm_forward(x, w, np.zeros(12))
    dx = np.empty_like(dout)
    dw_parts, db_parts = np.empty((parts, 12)), np.empty((parts, 12))
    K._layernorm_backward_rows(dout, cache.xhat, cache.rstd.reshape(-1), w, dx, dw_parts, db_parts)
    _, ref_cache = L.layernorm_forward(x, w, np.zeros(12))
    ref_dx, ref_dw, ref_db = L.layernorm_backward(dout, ref_cache)
    check("dx", dx, ref_dx, np.float64, chain(np.float64, 12, 5))
    check("dw", dw_parts.sum(axis=0), ref_dw, np.float64, chain(np.float64, 12, 4))
    check("db", db_parts.sum(axis=0), ref_db, np.float64, chain(np.float64, 12, 4))


# --------------------------------------------------------------------------------------------
# GELU and softmax
# --------------------------------------------------------------------------------------------

def gelu_inputs(rng, dtype):
    """Normal inputs, wide ones, and the points where the float32 erf and exp change regime."""
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-4, 2.8, -2.8, 5.65, -5.65, 5.7, -5.7, 8.0, -8.0,
                        13.0, -13.0, 14.0, -14.0, 30.0, -30.0, 1e4, -1e4])
    x = np.concatenate([rng.standard_normal(4000) * 1.5, rng.standard_normal(500) * 8, special])
    return x.astype(dtype).reshape(-1, 137)  # (33, 137): rows of an odd length


def gelu_bound(dtype, what: str) -> float:
    """Kind approximation. out = x Phi(x): Phi's absolute error e (half the erf's, PHI32_MAX_ERROR
    in float32) gives ||x e|| <= 2 e ||x Phi(x)|| for inputs symmetric about 0 (Phi(x)^2 + Phi(-x)^2
    >= 1/2), so the erf's error relative; 3 roundings. dx = dout (Phi + x phi): twice that
    ((Phi + x phi)(x)^2 + (Phi + x phi)(-x)^2 >= 1/2 likewise, and the pdf term's error), 8 roundings."""
    if what == "out":
        return approximation(dtype, erf_error(dtype), 3)
    return approximation(dtype, 2 * erf_error(dtype), 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype):
    rng = np.random.default_rng(4)
    x = gelu_inputs(rng, dtype)
    dout = random(rng, x.shape, dtype)
    out, cache = K.gelu_forward(x)
    (dx,) = K.gelu_backward(dout, cache)
    ref_out, ref_cache = L.gelu_forward(*as64(x))
    (ref_dx,) = L.gelu_backward(*as64(dout), ref_cache)
    check("out", out, ref_out, dtype, gelu_bound(dtype, "out"))
    check("dx", dx, ref_dx, dtype, gelu_bound(dtype, "dx"))
    # elementwise too. float64: two libm-quality erfs and exps, a few ulps (gamma_4) of |x Phi| and
    # |x|; dx likewise, times |dout|. float32: Phi's error PHI32_MAX_ERROR times |x|, plus the
    # product's roundings (gamma_2); dx: twice Phi's error (the pdf term x phi(x) <= 0.25 adds exp's
    # two ulps and the rounding of x^2 / 2, together below PHI32_MAX_ERROR) times |dout|.
    if dtype == np.float64:
        out_bound = gamma(dtype, 4) * (np.abs(ref_out) + np.abs(x))
        dx_bound = gamma(dtype, 4) * np.abs(dout) * (1.0 + np.abs(x))
    else:
        out_bound = PHI32_MAX_ERROR * np.abs(x) + gamma(dtype, 2) * np.abs(ref_out)
        dx_bound = np.abs(dout) * (2 * PHI32_MAX_ERROR
                                   + gamma(dtype, 2) * np.abs(ref_dx / np.where(dout == 0, 1, dout)))
    assert np.all(np.abs(out - ref_out) <= out_bound), f"out: worst entry at x = {x.flat[np.argmax(np.abs(out - ref_out) - out_bound)]}"
    assert np.all(np.abs(dx - ref_dx) <= dx_bound), f"dx: worst entry at x = {x.flat[np.argmax(np.abs(dx - ref_dx) - dx_bound)]}"


def test_gelu_on_a_model_sized_array_float32():
    rng = np.random.default_rng(5)
    x, dout = random(rng, (12, 64, 512), np.float32, 1.2), random(rng, (12, 64, 512), np.float32)
    out, cache = K.gelu_forward(x)
    (dx,) = K.gelu_backward(dout, cache)
    ref_out, ref_cache = L.gelu_forward(*as64(x))
    check("out", out, ref_out, np.float32, gelu_bound(np.float32, "out"))
    check("dx", dx, L.gelu_backward(*as64(dout), ref_cache)[0], np.float32, gelu_bound(np.float32, "dx"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(dtype):
    rng = np.random.default_rng(6)
    x = random(rng, (6, 9, 37), dtype, 4.0)
    x[0, 0, :5] = -np.inf  # masked entries: probability exactly 0
    x[1, 1] += 500.0  # large logits: the row max keeps exp finite
    x[2, 2, 3] = -200.0  # exp underflows to 0
    dout = random(rng, x.shape, dtype)
    y, cache = K.softmax_forward(x)
    (dx,) = K.softmax_backward(dout, cache)
    ref_y, ref_cache = L.softmax_forward(*as64(x))
    (ref_dx,) = L.softmax_backward(*as64(dout), ref_cache)
    # kind chain over the row (K = 37): the forward 3 stages (exp, sum, division), the backward 2
    # more (sum(dout y), the product), plus the exp's error
    K_ = x.shape[-1]
    check("y", y, ref_y, dtype, chain(dtype, K_, 3) + exp_error(dtype))
    check("dx", dx, ref_dx, dtype, chain(dtype, K_, 5) + exp_error(dtype))
    assert np.all(y[0, 0, :5] == 0.0)
    # each row of y sums to 1 up to y's own error (its entries are of one sign) and this sum's
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=approximation(dtype, exp_error(dtype), K_))


def scalar_function_over(function, z):
    """function (one of the kernels' scalar helpers, as numba compiles it for z's dtype) at each z."""
    import numba  # here, not at the top: the module's other tests import without it

    @numba.njit
    def each(z, out):
        for i in range(z.shape[0]):
            out[i] = function(z[i])
    out = np.empty_like(z)
    each(z, out)
    return out


def test_float32_exp_across_its_range():
    """The polynomial exp of the float32 kernels, over [-87, 88]: within ~2 ulps of exp; below
    that, (nearly) 0, never NaN; NaN stays NaN."""
    z = np.concatenate([np.linspace(-87.0, 88.0, 20001), -np.logspace(-8, 1.9, 2000), [0.0]]).astype(np.float32)
    got = scalar_function_over(K.exp_, z)
    exact = np.exp(z.astype(np.float64))
    rel = np.abs(got.astype(np.float64) - exact) / exact
    print(f"  float32 exp: worst relative error {rel.max():.2e} over {len(z)} points")
    assert rel.max() <= EXP32_MAX_ERROR
    assert got[-1] == 1.0  # exp(0) exactly
    edge = scalar_function_over(K.exp_, np.array([-88.0, -1e4, -np.inf, np.nan], np.float32))
    assert np.all(edge[:2] <= np.exp(-87.0)) and edge[2] == 0.0 and np.isnan(edge[3])


def test_float32_normal_cdf_and_pdf():
    """Phi and pdf as the float32 GELU computes them, against float64 formulas over [-12, 12]. Phi:
    PHI32_MAX_ERROR and the rounding of erf's argument x / sqrt 2 (two roundings of z, times
    erf'(z) z <= 0.49: below u, halved in Phi)."""
    x = np.linspace(-12.0, 12.0, 48001).astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = scalar_function_over(K.normal_cdf_, x)
    pdf = scalar_function_over(K.normal_pdf_, x)
    cdf_bound = PHI32_MAX_ERROR + gamma(np.float32, 1) / 2
    assert np.max(np.abs(cdf - 0.5 * (1.0 + scipy_erf(x64 / math.sqrt(2.0))))) <= cdf_bound
    exact_pdf = np.exp(-0.5 * x64 * x64) / math.sqrt(2.0 * math.pi)
    # relative error: the float32 roundings of x^2 / 2 (gamma_2 |x^2 / 2|, the exponent's own
    # conditioning), the exp's error, and the product with 1 / sqrt(2 pi) and its rounding (gamma_2)
    rel = np.abs(pdf - exact_pdf) / exact_pdf
    bound = 0.5 * x64 * x64 * gamma(np.float32, 2) + EXP32_MAX_ERROR + gamma(np.float32, 2)
    assert np.all(rel <= bound), f"worst at x = {x[np.argmax(rel)]}"


def test_erf_float32_within_its_max_error_of_scipy_everywhere():
    """Establishes bounds.ERF32_MAX_ERROR (the kernels' float32 erf, written once, in
    numba_kernels), which the float32 GELU's bounds build on."""
    # every 101st float32 in [0, 6], both signs, plus the edges
    bits = np.arange(0, np.float32(6.0).view(np.int32) + 1, 101, dtype=np.int32)
    x = bits.view(np.float32)
    x = np.concatenate([x, -x, np.float32([0.0, 4.0, -4.0, 1e30, -1e30, np.inf, -np.inf])])
    got = scalar_function_over(K.erf_, x)
    exact = scipy_erf(x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact)
    print(f"  float32 erf: max abs error {err.max():.3e} at x = {x[err.argmax()]}")
    assert got.dtype == np.float32
    assert err.max() <= ERF32_MAX_ERROR
    assert np.array_equal(got[-4:], np.float32([1, -1, 1, -1])), "saturates to +-1"
    assert np.array_equal(scalar_function_over(K.erf_, -x), -got), "odd"
    assert np.isnan(scalar_function_over(K.erf_, np.float32([np.nan]))).all()


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,n_head", [(2, 9, 12, 3), (12, 64, 128, 4), (1, 1, 8, 2), (3, 17, 64, 1)])
def test_attention(dtype, B, T, C, n_head):
    rng = np.random.default_rng(7)
    qkv, dout = random(rng, (B, T, 3 * C), dtype, 1.5), random(rng, (B, T, C), dtype)
    y, cache = L.attention_forward(qkv, n_head, layers=KERNELS)
    (dqkv,) = L.attention_backward(dout, cache, layers=KERNELS)
    ref_y, ref_cache = L.attention_forward(*as64(qkv), n_head)
    (ref_dqkv,) = L.attention_backward(*as64(dout), ref_cache)
    check("y", y, ref_y, dtype, attention_bound(dtype, T, C // n_head, backward=False))
    for part, a, r in zip("qkv", np.split(dqkv, 3, axis=-1), np.split(ref_dqkv, 3, axis=-1)):
        check(f"d{part}", a, r, dtype, attention_bound(dtype, T, C // n_head))
    assert np.all(np.triu(cache.att, k=1) == 0.0), "attention to the future"


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_with_dropout(dtype):
    B, T, C, n_head, p = 3, 11, 16, 2, 0.3
    rng = np.random.default_rng(8)
    qkv, dout = random(rng, (B, T, 3 * C), dtype), random(rng, (B, T, C), dtype)
    mask = L.dropout_mask((B, n_head, T, T), p, rng, dtype)
    for kwargs in (dict(mask=mask), dict(rng=np.random.default_rng(9))):
        y, cache = L.attention_forward(qkv, n_head, p, **kwargs, layers=KERNELS)
        (dqkv,) = L.attention_backward(dout, cache, layers=KERNELS)
        ref_kwargs = dict(mask=mask.astype(np.float64)) if "mask" in kwargs else dict(rng=np.random.default_rng(9))
        ref_y, ref_cache = L.attention_forward(*as64(qkv), n_head, p, **ref_kwargs)
        (ref_dqkv,) = L.attention_backward(*as64(dout), ref_cache)
        check("y", y, ref_y, dtype, attention_bound(dtype, T, C // n_head, backward=False))
        check("dqkv", dqkv, ref_dqkv, dtype, attention_bound(dtype, T, C // n_head))
    with pytest.raises(ValueError, match="rng or mask"):
        L.attention_forward(qkv, n_head, p, layers=KERNELS)


# --------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(12, 64, 65), (3, 5, 7), (4, 1000)])
def test_cross_entropy(dtype, shape):
    rng = np.random.default_rng(10)
    V = shape[-1]
    logits = random(rng, shape, dtype, 3.0)
    targets = rng.integers(0, V, shape[:-1])
    targets.reshape(-1)[:2] = (0, V - 1)
    dloss = 0.37
    loss, cache = K.cross_entropy_forward(logits, targets)
    (dlogits,) = K.cross_entropy_backward(dloss, cache)
    ref_loss, ref_cache = L.cross_entropy_forward(*as64(logits), targets)
    (ref_dlogits,) = L.cross_entropy_backward(dloss, ref_cache)
    bound = cross_entropy_bound(dtype, V, int(np.prod(shape[:-1])))
    check("loss", np.asarray(loss), ref_loss, dtype, bound)
    check("dlogits", dlogits, ref_dlogits, dtype, bound)


def test_cross_entropy_rejects_targets_outside_the_vocabulary():
    logits = np.zeros((2, 3, 5))
    for bad in (5, -1):
        targets = np.zeros((2, 3), dtype=np.int64)
        targets[1, 2] = bad
        with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
            K.cross_entropy_forward(logits, targets)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nan_logit_gives_a_nan_loss(dtype):
    """fastmath leaves NaN alone, so the training loop's non-finite check still fires."""
    logits = np.random.default_rng(11).standard_normal((4, 9)).astype(dtype)
    logits[2, 3] = np.nan
    loss, _ = K.cross_entropy_forward(logits, np.arange(4))
    assert np.isnan(loss)


# --------------------------------------------------------------------------------------------
# AdamW and the gradient norm
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_update_equals_the_reference_optimizer(dtype, weight_decay):
    rng = np.random.default_rng(12)
    w0 = random(rng, (37, 23), dtype, 0.02)
    settings = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    reference = AdamW({"w": w0.astype(np.float64)}, **settings)
    p, m, v = w0.reshape(-1).copy(), np.zeros(w0.size, dtype), np.zeros(w0.size, dtype)
    for step in range(1, 6):
        g = random(rng, w0.shape, dtype, 0.1)
        g.reshape(-1)[:3] = 0.0  # a parameter with no gradient still decays
        lr = settings["lr"] * (1.0 - 0.1 * step)  # a schedule: lr changes every step
        reference.step({"w": g.astype(np.float64)}, lr=lr)
        K.adamw_update(p, g.reshape(-1), m, v, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8,
                       weight_decay=weight_decay, step=step)
        # kind reordered, elementwise: AdamW's formula (ADAMW_ROUNDINGS an element a step),
        # FMA-contracted in the kernel, the errors of earlier steps carried in p, m and v; m and the
        # update of random sign (CANCELLATION)
        check(f"p step {step}", p.reshape(w0.shape), reference.params["w"], dtype,
              reassociated(dtype, ADAMW_ROUNDINGS * step, CANCELLATION))


def test_adamw_update_rejects_mismatched_buffers():
    a = np.zeros(4)
    with pytest.raises(ValueError, match="1-D buffers"):
        K.adamw_update(a, np.zeros(5), a.copy(), a.copy(), lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="dtype"):
        K.adamw_update(a, np.zeros(4, np.float32), a.copy(), a.copy(), lr=1e-3, beta1=0.9, beta2=0.99,
                       eps=1e-8, weight_decay=0.0, step=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_adamw_per_parameter_equals_the_gathered_update(dtype, kernels_on, monkeypatch):
    """fast.AdamW on a group above GATHER_MAX runs the kernel once per parameter on its slices of the
    flat buffers instead of once on gathered gradients: the same update of every element."""
    def run(gather_max):
        monkeypatch.setattr(fast.optim, "GATHER_MAX", gather_max)
        model = fast.GPT(small_config(), seed=2, dtype=dtype)
        opt = fast.AdamW(model.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        rng = np.random.default_rng(21)
        for _ in range(3):
            opt.step({n: random(rng, p.shape, dtype, 0.1) for n, p in model.params.items()})
        return model.params, opt.moments("exp_avg"), opt.moments("exp_avg_sq"), opt._grad_flat
    per_parameter, gathered = run(0), run(1 << 40)
    assert per_parameter[3] == {} and set(gathered[3]) == {"decay", "no_decay"}  # no gathered copy made
    for i, what in enumerate(("params", "exp_avg", "exp_avg_sq")):
        check_equal(f"{what} [{np.dtype(dtype).name}]", per_parameter[i], gathered[i],
                    bitwise("one elementwise kernel on the same elements, called per parameter or per group"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_backward_is_a_scatter_add_in_position_order(dtype, kernels_on):
    rng = np.random.default_rng(22)
    B, T, V, C = 3, 37, 11, 20  # few ids, many positions: every id repeats
    idx = rng.integers(0, V - 1, (B, T))  # id V - 1 never occurs: its row stays 0
    dout = random(rng, (B, T, C), dtype)
    cache = L.EmbeddingCache(idx, (V, C), (T + 4, C))
    dwte, dwpe = K.embedding_backward(dout, cache)
    expected = np.zeros((V, C), dtype)
    np.add.at(expected, idx.reshape(-1), dout.reshape(-1, C))
    ref_dwte, ref_dwpe = L.embedding_backward(dout, cache)
    check_equal(f"embedding [{np.dtype(dtype).name}]", {"dwte": dwte, "dwpe": dwpe},
                {"dwte": expected, "dwpe": ref_dwpe},
                bitwise("np.add.at's sums in position order; dwpe the reference's own sum"))
    # the reference's one-hot product adds the same rows in BLAS's order
    check("dwte", dwte, L.embedding_backward(dout.astype(np.float64), cache)[0], dtype, reordered(dtype, B * T))
    assert not dwte[V - 1].any() and dwte.dtype == ref_dwte.dtype
    assert K.embedding_backward(dout, cache._replace(wpe_shape=None))[1] is None
    assert fast_layers.layer_set(kernels=True).embedding_backward is K.embedding_backward


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_and_scale(dtype):
    rng = np.random.default_rng(13)
    g = random(rng, 100003, dtype)
    exact = float(np.sum(g.astype(np.float64) ** 2))
    # squares of float32 or float64 entries summed in float64 on both sides, in another order;
    # terms of one sign
    assert abs(K.sum_of_squares(g) - exact) <= reordered(np.float64, g.size, cancellation=1.0) * exact
    expected = g.astype(np.float64) * 0.25
    K.scale_in_place(g, 0.25)
    check("scaled", g, expected, dtype, bitwise("a product with 0.25, a power of two: exact in binary floating point"))


# --------------------------------------------------------------------------------------------
# The modern block's kernels: RMSNorm, SwiGLU, RoPE
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(3, 7, 24), (12, 64, 128), (2, 4, 9, 32)])
def test_rmsnorm_kernel(dtype, shape, kernels_on):
    """The row kernel against the float64 formula (a strided view of heads included, as QK-norm
    passes it): the forward a chain of 2 stages (the mean square over C, the scaling), dx 4 (and
    the backward's mean over C), dw 3 (and its sum over the N rows)."""
    rng = np.random.default_rng(6)
    C = shape[-1]
    x, dout = random(rng, shape, dtype, 3.0) + dtype(1.5), random(rng, shape, dtype)
    if len(shape) == 4:  # (B, nh, T, hs) heads split out of a (B, T, 3C) array: not contiguous
        x = L.split_heads(random(rng, (shape[0], shape[2], 3 * shape[1] * C), dtype)[..., :shape[1] * C], shape[1])
    w = random(rng, C, dtype, 0.5) + dtype(1.0)
    out, cache = K.rmsnorm_forward(x, w, 1e-5)
    dx, dw = K.rmsnorm_backward(dout, cache)
    ref_out, ref_cache = L.rmsnorm_forward(*(np.asarray(a, np.float64) for a in (x, w)))
    ref_dx, ref_dw = L.rmsnorm_backward(np.asarray(dout, np.float64), ref_cache)
    assert type(cache) is L.RMSNormCache
    N = int(np.prod(shape[:-1]))
    check("out", out, ref_out, dtype, chain(dtype, C, 2))
    check("xhat", cache.xhat, ref_cache.xhat, dtype, chain(dtype, C, 2))
    check("dx", dx, ref_dx, dtype, chain(dtype, C, 4))
    check("dw", dw, ref_dw, dtype, chain(dtype, max(C, N), 3))


def test_rmsnorm_kernel_uses_eps(kernels_on):
    rng = np.random.default_rng(7)
    x = random(rng, (4, 16), np.float64, 1e-3)  # mean square ~1e-6: eps matters
    out, _ = K.rmsnorm_forward(x, np.ones(16), eps=1e-2)
    bound = chain(np.float64, 16, 2)
    compare_all({"out": out}, {"out": L.rmsnorm_forward(x, np.ones(16), 1e-2)[0]}, rtol=bound)
    assert np.abs(K.rmsnorm_forward(x, np.ones(16))[0] - out).max() > bound  # the default eps: another result


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_swiglu_kernel(dtype, kernels_on):
    """One pass per row (sigmoid as 1 / (1 + exp(-g)), float32's polynomial exp) against the float64
    formula (sigmoid as (1 + tanh(g / 2)) / 2), wide gates included (no NaN, no overflow): the
    exp's error (float32: EXP32_MAX_ERROR; float64: two libm functions, LIBM64_MAX_ERROR) and
    the formulas' roundings, 3 for sig, 5 for out, 9 for dx (dsilu's 4, two products), with
    CANCELLATION (1 - sig, random-sign dout). The output the block rebuilds from the cache is the
    kernel's own, bit for bit."""
    rng = np.random.default_rng(8)
    x = random(rng, (3, 5, 2 * 24), dtype, 3.0)
    x[0, 0, :6] = np.array([-100.0, -30.0, 0.0, 30.0, 100.0, -0.0], dtype)  # gates at the extremes
    dout = random(rng, (3, 5, 24), dtype)
    out, cache = K.swiglu_forward(x)
    (dx,) = K.swiglu_backward(dout, cache)
    ref_out, ref_cache = L.swiglu_forward(x.astype(np.float64))
    (ref_dx,) = L.swiglu_backward(dout.astype(np.float64), ref_cache)
    assert type(cache) is L.SwigluCache and np.isfinite(out).all() and np.isfinite(dx).all()
    approx = EXP32_MAX_ERROR if np.dtype(dtype) == np.float32 else LIBM64_MAX_ERROR
    check("out", out, ref_out, dtype, approximation(dtype, approx, 5))
    check("sig", cache.sig, ref_cache.sig, dtype, approximation(dtype, approx, 3))
    check("dx", dx, ref_dx, dtype, approximation(dtype, approx, 9))
    assert np.array_equal(fast_layers.ACTIVATION_OUTPUT_FROM_CACHE["swiglu"](cache), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kernel_is_bit_for_bit_the_reference(dtype, kernels_on, monkeypatch):
    """The one-pass kernel (no FMA contraction) on a strided head view of qkv: the reference's
    result exactly, forward and backward, into `out` when given."""
    calls = []
    for name in ("rope_forward", "rope_backward"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name: (calls.append(_n), _f(*a))[1])
    rng = np.random.default_rng(9)
    B, nh, T, hs = 2, 3, 7, 8
    qkv = random(rng, (B, T, 3 * nh * hs), dtype)
    x = L.split_heads(qkv[..., nh * hs:2 * nh * hs], nh)  # k's heads: not contiguous
    angles = L.rope_angles(T, hs, 100.0, offset=5, dtype=dtype)
    compare_pair("rope kernel", (K.rope_forward, K.rope_backward), (L.rope_forward, L.rope_backward),
                 (x, angles.cos, angles.sin), dtype,
                 bitwise("the kernel's loop runs ROPE_HALVES' products and sums, FMA contraction off"))
    assert set(calls) == {"rope_forward", "rope_backward"}, calls


# --------------------------------------------------------------------------------------------
# npgpt.fast with the kernels on, against the reference (tests/test_fastpath.py: with them off)
# --------------------------------------------------------------------------------------------

FAST_DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]


@pytest.fixture
def kernels_on(monkeypatch):
    assert K.AVAILABLE, K.UNAVAILABLE_REASON
    monkeypatch.setattr(K, "ENABLED", True)


def test_the_fast_model_runs_the_kernel_set_for_every_switch(kernels_on):
    """fast.GPT runs npgpt.fast's layer set, kernels included, for the modern block too."""
    for name, config in MODERN_CONFIGS.items():
        assert fast.GPT(config).layers == fast_layers.FAST, name


@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_large_heads_take_the_batched_attention_and_equal_the_reference(dtype, kernels_on, monkeypatch):
    """Above FUSED_ATTENTION_MAX_T2HS the fused per-head kernel is skipped (nested BLAS threads);
    the batched path with the numba softmax must give the reference's attention too."""
    calls = []
    for name in ("causal_attention_forward", "causal_attention_backward", "softmax_forward", "softmax_backward"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    rng = np.random.default_rng(21)
    B, T, C, nh = 2, 9, 12, 3
    assert fast_layers._fused_attention_pays(T, C // nh)
    monkeypatch.setattr(fast_layers, "FUSED_ATTENTION_MAX_T2HS", T * T * (C // nh) - 1)
    qkv = random(rng, (B, T, 3 * C), dtype)
    fast_set = fast_layers.layer_set(kernels=True)
    compare_pair("attention (batched)", (partial(L.attention_forward, layers=fast_set),
                                         partial(L.attention_backward, layers=fast_set)),
                 (L.attention_forward, L.attention_backward), (qkv, nh), dtype, attention_bound(dtype, T, C // nh))
    assert "causal_attention_forward" not in calls and "causal_attention_backward" not in calls, calls
    assert "softmax_forward" in calls and "softmax_backward" in calls, calls


@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_fast_layers_call_the_kernels_and_equal_the_reference(dtype, kernels_on, monkeypatch):
    rng = np.random.default_rng(20)
    calls = []
    for name in ("layernorm_forward", "gelu_forward", "softmax_forward", "causal_attention_forward",
                 "cross_entropy_forward"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    fl = fast_layers.layer_set(kernels=True)  # built after the patching above: it holds the recorders
    attention = (partial(L.attention_forward, layers=fl), partial(L.attention_backward, layers=fl))
    B, T, C, nh = 3, 7, 12, 3
    x, w, b = random(rng, (B, T, C), dtype, 2.0, 1.0), random(rng, C, dtype), random(rng, C, dtype)
    qkv = random(rng, (B, T, 3 * C), dtype)
    mask = L.dropout_mask((B, nh, T, T), 0.25, rng, dtype)
    pairs = {  # name: (fast pair, reference pair, args, kwargs, bound)
        "layernorm": ((fl.layernorm_forward, fl.layernorm_backward),
                      (L.layernorm_forward, L.layernorm_backward), (x, w, b), {}, chain(dtype, max(C, B * T), 5)),
        "gelu": (fl.activations["gelu"], L.ACTIVATION_FUNCTIONS["gelu"], (x,), {},
                 gelu_bound(dtype, "dx")),
        "softmax": ((K.softmax_forward, K.softmax_backward),
                    (L.softmax_forward, L.softmax_backward), (x,), {}, chain(dtype, C, 5) + exp_error(dtype)),
        "attention": (attention,
                      (L.attention_forward, L.attention_backward), (qkv, nh), {}, attention_bound(dtype, T, C // nh)),
        "attention+dropout": (attention,
                              (L.attention_forward, L.attention_backward), (qkv, nh), {"mask": mask},
                              attention_bound(dtype, T, C // nh)),
    }
    for name, (fast_pair, ref_pair, args, kwargs, bound) in pairs.items():
        compare_pair(name, fast_pair, ref_pair, args, dtype, bound, **kwargs)
    logits, targets = random(rng, (B, T, 11), dtype, 4.0), rng.integers(0, 11, (B, T))
    f_loss, f_cache = fl.cross_entropy_forward(logits, targets)
    r_loss, r_cache = L.cross_entropy_forward(logits, targets)
    assert type(f_cache) is type(r_cache)
    compare_all({"loss": f_loss, **arrays_of("cache", f_cache), "dlogits": fl.cross_entropy_backward(0.7, f_cache)[0]},
                {"loss": r_loss, **arrays_of("cache", r_cache), "dlogits": L.cross_entropy_backward(0.7, r_cache)[0]},
                rtol=cross_entropy_bound(dtype, 11, B * T), header=f"cross-entropy [{np.dtype(dtype).name}]")
    assert set(calls) == {"layernorm_forward", "gelu_forward", "softmax_forward", "causal_attention_forward",
                          "cross_entropy_forward"}, calls


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_fast_block_with_kernels_equals_reference(dtype, activation, dropout, kernels_on):
    C, nh, B, T = 8, 2, 2, 6
    config = GPTConfig(vocab_size=5, block_size=T, n_layer=1, n_head=nh, n_embd=C, bias=True, activation=activation)
    p = block_params(config, dtype)
    rng = np.random.default_rng(21)
    x, dout = random(rng, (B, T, C), dtype), random(rng, (B, T, C), dtype)
    masks = [L.dropout_mask(s, 0.2, rng, dtype) for s in [(B, nh, T, T), (B, T, C), (B, T, C)]] if dropout else None
    options = L.BlockOptions(nh, activation, 0.2 if dropout else 0.0)
    f_out, f_cache = L.block_forward(x, p, options, masks, layers=fast_layers.layer_set(kernels=True))
    r_out, r_cache = L.block_forward(x, p, options, masks)
    f_dx, f_grads = L.block_backward(dout, f_cache)
    r_dx, r_grads = L.block_backward(dout, r_cache)
    compare_all({"out": f_out, "dx": f_dx, **f_grads}, {"out": r_out, "dx": r_dx, **r_grads},
                rtol=fast_model(dtype, config, numpy_only=False, blocks_only=True),
                header=f"block {activation} dropout={dropout} [{np.dtype(dtype).name}]")
    if activation == "gelu":  # the dropped activation is rebuilt bit for bit from the kernel's cache
        act_out, _ = K.gelu_forward(f_cache.act.x)
        assert np.array_equal(fast_layers.ACTIVATION_OUTPUT_FROM_CACHE["gelu"](f_cache.act), act_out)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_fast_model_with_kernels_equals_reference(dtype, name, kernels_on):
    config = MODEL_CONFIGS[name]
    reference, quick = noisy_pair(config, dtype)
    idx, targets = batch(config)
    r_logits, r_loss = reference.forward(idx, targets)
    masks = reference.last_dropout_masks or None
    f_logits, f_loss = quick.forward(idx, targets, dropout_masks=masks)
    ours = {"logits": f_logits, "loss": f_loss, **quick.backward()}
    theirs = {"logits": r_logits, "loss": r_loss, **reference.backward()}
    exact = None
    if np.dtype(dtype) == np.float32:
        twin = exact_twin(reference, config)
        e_logits, e_loss = twin.forward(idx, targets, dropout_masks=masks)
        exact = {"logits": e_logits, "loss": e_loss, **twin.backward()}
    compare_to_reference(f"model {name} with kernels [{np.dtype(dtype).name}]", ours, theirs, exact, dtype,
                         fast_model(dtype, config, numpy_only=False))


@pytest.mark.parametrize("bug", ["scaled", "dropped"])
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_kernel_model_bound_catches_a_planted_bug(dtype, bug, kernels_on):
    """The bound of the model with kernels still fails a wrong backward: one gradient scaled by
    1 + 1e-3 or dropped is over it, against the reference (float64) or the exact run (float32)."""
    config = small_config(dropout=0.2, activation="gelu_tanh")
    reference, quick = noisy_pair(config, dtype)
    idx, targets = batch(config)
    reference.forward(idx, targets)
    masks = reference.last_dropout_masks
    quick.forward(idx, targets, dropout_masks=masks)
    ours, theirs = quick.backward(), reference.backward()
    exact = None
    if np.dtype(dtype) == np.float32:
        twin = exact_twin(reference, config)
        twin.forward(idx, targets, dropout_masks=masks)
        exact = twin.backward()
    name = "transformer.h.1.attn.c_proj.weight"
    ours[name] = ours[name] * (1.0 + 1e-3) if bug == "scaled" else np.zeros_like(ours[name])
    with pytest.raises(AssertionError, match=name):
        compare_to_reference(f"planted bug [{np.dtype(dtype).name}]", ours, theirs, exact, dtype,
                             fast_model(dtype, config, numpy_only=False))


@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_fast_training_steps_with_kernels_equal_reference(dtype, kernels_on):
    """Five steps of forward, backward, clip and AdamW (the kernels' update) on each side (and,
    in float32, an exact float64 run from the same start): a chain over the steps, the clipping
    norm and AdamW's update two more stages a step."""
    config = small_config(bias=False)
    reference, quick = noisy_pair(config, dtype)
    runs = {"ours": (quick, fast.AdamW, fast.clip_grad_norm), "reference": (reference, optim.AdamW, optim.clip_grad_norm)}
    if np.dtype(dtype) == np.float32:
        runs["exact"] = (exact_twin(reference, config), optim.AdamW, optim.clip_grad_norm)
    opts = {k: opt(m.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1) for k, (m, opt, _) in runs.items()}
    for step in range(5):
        idx, targets = batch(config, seed=step)
        lr = optim.cosine_lr(step, 1e-2, 2, 5, 1e-3)
        state = {}
        for k, (model, _, clip) in runs.items():
            _, loss = model.forward(idx, targets)
            norm = clip(g := model.backward(), 0.5)
            opts[k].step(g, lr=lr)
            state[k] = {"loss": loss, "grad norm": norm, **{n: p.copy() for n, p in model.params.items()}}
        compare_to_reference(f"step {step} with kernels [{np.dtype(dtype).name}]", state["ours"],
                             state["reference"], state.get("exact"), dtype,
                             fast_model(dtype, config, numpy_only=False, steps=step + 1, extra_stages=2))


def test_fast_generate_with_kernels_equals_reference(kernels_on):
    config = small_config()
    reference, quick = noisy_pair(config, np.float64)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    r_ids = reference.generate(idx, 8, temperature=0.0)
    f_ids = quick.generate(idx, 8, temperature=0.0)
    assert np.array_equal(f_ids, r_ids)
    kv_r, kv_f = reference.new_kv_cache(2), quick.new_kv_cache(2)
    compare_all({"logits": quick.forward_cached(idx, kv_f)}, {"logits": reference.forward_cached(idx, kv_r)},
                rtol=fast_model(np.float64, config, numpy_only=False, backward=False),
                header="forward_cached with kernels")


@pytest.mark.parametrize("dtype", DTYPES)
def test_modern_training_with_muon_equals_reference(dtype, kernels_on):
    """Steps of the fast modern model (kernels on) with Muon + AdamW, against the reference: five in
    float64, two in float32, within a chain over the steps (each a forward, backward, clip, AdamW
    and Newton-Schulz's 5 x 3 products). Newton-Schulz raises every singular value of the momentum
    towards 1, however small: a direction in which the gradient is little more than rounding noise
    gets as large an update as the main ones. So the two float32 runs' different summation orders
    (each ~5e-7 from the exact run) turn into parameter differences of order lr * 1e-6 / sigma, and
    from the third step the gradient norms differ at a few 1e-6: that would test the amplification,
    not the layers."""
    from gptapp.optimizers import MuonAdamW

    config = MODEL_CONFIGS["modern"]
    reference, quick = noisy_pair(config, dtype)
    runs = {"ours": (quick, fast.AdamW, fast.clip_grad_norm), "reference": (reference, optim.AdamW, optim.clip_grad_norm)}
    if np.dtype(dtype) == np.float32:
        runs["exact"] = (exact_twin(reference, config), optim.AdamW, optim.clip_grad_norm)
    opts = {k: MuonAdamW(m.params, adamw, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, muon_lr=0.05,
                         muon_class=fast.Muon if k == "ours" else Muon)
            for k, (m, adamw, _) in runs.items()}
    assert opts["ours"].muon.params and isinstance(opts["ours"].muon, fast.Muon)
    for step in range(5 if np.dtype(dtype) == np.float64 else 2):
        idx, targets = batch(config, seed=step)
        state = {}
        for k, (model, _, clip) in runs.items():
            _, loss = model.forward(idx, targets)
            norm = clip(g := model.backward(), 0.5)
            opts[k].step(g, lr=optim.cosine_lr(step, 1e-2, 2, 5, 1e-3))
            state[k] = {"loss": loss, "grad norm": norm, **{n: p.copy() for n, p in model.params.items()}}
        bound = fast_model(dtype, config, numpy_only=False, steps=step + 1,
                           extra_stages=2 + 5 * NEWTON_SCHULZ_MATMULS)
        compare_to_reference(f"muon step {step} [{np.dtype(dtype).name}]", state["ours"], state["reference"],
                             state.get("exact"), dtype, bound)


@pytest.mark.parametrize("name", ["modern", "modern-relu2-bias-eps"])
def test_modern_generate_with_kernels_equals_reference(name, kernels_on):
    """KV-cache decoding with RoPE offsets on the fast layers: the reference's tokens and logits."""
    config = MODEL_CONFIGS[name]
    reference, quick = noisy_pair(config, np.float64)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    assert np.array_equal(quick.generate(idx, 9, temperature=0.0), reference.generate(idx, 9, temperature=0.0))
    kv_r, kv_f = reference.new_kv_cache(2), quick.new_kv_cache(2)
    first = {"logits": quick.forward_cached(idx, kv_f)}, {"logits": reference.forward_cached(idx, kv_r)}
    nxt = np.array([[0], [2]])
    second = {"logits": quick.forward_cached(nxt, kv_f)}, {"logits": reference.forward_cached(nxt, kv_r)}
    bound = fast_model(np.float64, config, numpy_only=False, backward=False)
    compare_all(first[0], first[1], rtol=bound, header="forward_cached, prompt")
    compare_all(second[0], second[1], rtol=bound, header="forward_cached, next token")


def test_npgpt_numba_0_keeps_the_fast_path_on_numpy():
    code = "from npgpt.fast import numba_kernels as K; print(K.AVAILABLE, K.ENABLED)"
    on = run_python(code, {"NPGPT_NUMBA": "1"})
    off = run_python(code, {"NPGPT_NUMBA": "0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout.split()[-2:] == ["True", "True"]
    assert off.stdout.split()[-2:] == ["True", "False"]


# --------------------------------------------------------------------------------------------
# The on-disk cache, the thread count, and the module without numba
# --------------------------------------------------------------------------------------------

def run_python(code: str, env_extra: dict | None = None, env_drop=()) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter at the project root: this environment plus env_extra, less env_drop."""
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_second_process_loads_the_kernels_from_the_disk_cache(tmp_path):
    code = """
        import json, time, numpy as np
        from npgpt.fast import numba_kernels as K
        t = time.perf_counter()
        K.layernorm_forward(np.ones((2, 8), np.float32), np.ones(8, np.float32))
        stats = K._layernorm_forward_rows.stats
        print(json.dumps(dict(dir=K.CACHE_DIR, hits=sum(stats.cache_hits.values()),
                              misses=sum(stats.cache_misses.values()), seconds=time.perf_counter() - t)))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    first, second = run_python(code, env), run_python(code, env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout.splitlines()[-1]), json.loads(second.stdout.splitlines()[-1])
    print(f"  first process {a}, second {b}")
    assert a["dir"] == b["dir"] == str(tmp_path / "cache")
    assert (a["hits"], a["misses"]) == (0, 1), "the first process should compile"
    assert (b["hits"], b["misses"]) == (1, 0), "the second process should load the compiled kernel"
    assert any(p.suffix == ".nbi" for p in (tmp_path / "cache").rglob("*")), "no index file written"


def test_cache_falls_back_to_a_private_temp_folder_when_nothing_else_is_writable(monkeypatch, tmp_path):
    monkeypatch.setattr(K.numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(K.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(K, "_writable_dir", lambda path: path.startswith(str(tmp_path)))
    chosen = K._choose_cache_dir()
    assert chosen is not None and chosen.startswith(str(tmp_path))
    assert K.numba.config.CACHE_DIR == chosen  # so numba's own locator writes there
    monkeypatch.setattr(K, "_writable_dir", lambda path: False)
    monkeypatch.setattr(K.numba.config, "CACHE_DIR", "")
    assert K._choose_cache_dir() is None  # nothing writable: compile in memory, no error


def test_thread_count_follows_omp_num_threads_unless_numba_num_threads_is_set():
    code = "from npgpt.fast import numba_kernels as K; print(K.threads())"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    one = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert one.stdout.split()[-1] == "1"
    pinned = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                            env=dict(env, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2"),
                            capture_output=True, text=True, timeout=300)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.split()[-1] == "2"


def test_the_thread_pool_starts_passive_without_leaving_the_setting_behind():
    """OMP_WAIT_POLICY is PASSIVE only while numba's pool starts (later OpenMP users keep their
    defaults), and a policy the user set is kept."""
    code = ("import os; from npgpt.fast import numba_kernels as K; "
            "print(os.environ.get('OMP_WAIT_POLICY', '-'), K.numba.threading_layer())")
    plain = run_python(code, env_drop=("OMP_WAIT_POLICY",))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split()[0] == "-"  # removed again after the pool started
    assert plain.stdout.split()[1] in ("omp", "tbb", "workqueue")  # started at import
    code = "import os; from npgpt.fast import numba_kernels as K; print(os.environ.get('OMP_WAIT_POLICY', '-'))"
    chosen = run_python(code, {"OMP_WAIT_POLICY": "ACTIVE"})
    assert chosen.returncode == 0 and chosen.stdout.split()[0] == "ACTIVE", chosen.stderr


def test_with_openmp_already_loaded_the_pool_is_numbas_workqueue():
    """torch imported first maps its libgomp, whose spinning idle threads a numba OpenMP pool would
    join: with 2 threads the kernels then run on numba's workqueue layer (sleeping idle threads)
    and still agree with the reference; NUMBA_THREADING_LAYER, if set, is kept, and so is the
    plain layer with one thread (nothing to spin)."""
    code = """
        if {torch_first}:
            import torch
        import numpy as np
        from npgpt import layers as L
        from npgpt.fast import numba_kernels as K
        from npgpt.bounds import chain
        x = np.random.default_rng(0).standard_normal((64, 32))
        out, _ = K.rmsnorm_forward(x, np.ones(32))
        ok = np.allclose(out, L.rmsnorm_forward(x, np.ones(32))[0], rtol=chain(np.float64, 32, 2), atol=0)
        print(K.numba.threading_layer(), ok)
    """

    def run(first, **extra):
        # the kernels' thread count follows OMP_NUM_THREADS (make test sets 1): 2 unless given
        done = run_python(code.format(torch_first=first == "torch"), {"OMP_NUM_THREADS": "2", **extra},
                          env_drop=("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS"))
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    plain = run("none")  # OpenMP where the machine has it (numba falls back to workqueue otherwise)
    assert plain[1] == "True" and plain[0] in ("omp", "tbb", "workqueue"), plain
    assert run("torch") == ["workqueue", "True"]
    assert run("torch", NUMBA_THREADING_LAYER=plain[0]) == [plain[0], "True"]  # the user's choice stands
    assert run("torch", OMP_NUM_THREADS="1") == plain  # one thread: the plain layer

HIDE_NUMBA = """
    import sys
    class HideNumba:  # a meta path finder that refuses numba and llvmlite, as if not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("numba", "llvmlite"):
                raise ImportError(f"{name} hidden by the test")
            return None
    sys.meta_path.insert(0, HideNumba())
"""

FALLBACK_RUN = """
    import numpy as np
    from npgpt import layers as L
    from npgpt.fast import numba_kernels as K
    assert not K.AVAILABLE and "numba" in K.UNAVAILABLE_REASON, K.UNAVAILABLE_REASON
    assert "numba" not in sys.modules and K.threads() == 1 and K.CACHE_DIR is None
    x = dict(np.load(sys.argv[1]))
    out = {}
    o, c = K.layernorm_forward(x["x"], x["w"], x["b"]); out["ln"] = o
    out["ln_dx"], out["ln_dw"], out["ln_db"] = K.layernorm_backward(x["dx_up"], c)
    o, c = K.gelu_forward(x["h"]); out["gelu"] = o; (out["gelu_dx"],) = K.gelu_backward(x["dh"], c)
    o, c = K.softmax_forward(x["h"]); out["sm"] = o; (out["sm_dx"],) = K.softmax_backward(x["dh"], c)
    q, k, v = L.split_qkv(x["qkv"], 2); o, c = K.causal_attention_forward(q, k, v); out["att"] = L.merge_heads(o)
    out["att_dqkv"] = L.merge_qkv(*K.causal_attention_backward(L.split_heads(x["dy"], 2), c))
    o, c = K.cross_entropy_forward(x["logits"], x["targets"]); out["ce"] = np.asarray(o)
    (out["ce_dlogits"],) = K.cross_entropy_backward(0.5, c)
    p, m, v = x["p"].copy(), np.zeros_like(x["p"]), np.zeros_like(x["p"])
    for step in (1, 2):
        K.adamw_update(p, x["g"], m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=step)
    out["adamw"] = p
    out["sumsq"] = np.asarray(K.sum_of_squares(x["g"]))
    np.savez(sys.argv[2], **out)
    # and the whole fast path runs on NumPy: a training step of npgpt.fast equals the reference's
    import npgpt
    from npgpt import fast
    from npgpt.bounds import fast_model
    from npgpt.gradcheck import rel_error
    assert not fast.numba_kernels.ENABLED
    cfg = npgpt.GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8)
    models = [cls(cfg, seed=1, dtype=np.float64) for cls in (npgpt.GPT, fast.GPT)]
    idx = np.random.default_rng(0).integers(0, 7, (3, 6))
    losses = [m.forward(idx, idx)[1] for m in models]
    grads = [m.backward() for m in models]
    bound = fast_model(np.float64, cfg, numpy_only=True)
    assert abs(losses[0] - losses[1]) <= bound * abs(losses[0]), losses
    assert all(rel_error(grads[1][n], grads[0][n]) <= bound for n in grads[0])
"""


def test_without_numba_the_module_imports_and_computes_the_same_results(tmp_path):
    rng = np.random.default_rng(14)
    f64 = np.float64
    x = dict(x=random(rng, (3, 5, 16), f64), w=random(rng, 16, f64), b=random(rng, 16, f64),
             dx_up=random(rng, (3, 5, 16), f64), h=random(rng, (3, 5, 20), f64), dh=random(rng, (3, 5, 20), f64),
             qkv=random(rng, (2, 6, 24), f64), dy=random(rng, (2, 6, 8), f64),
             logits=random(rng, (2, 6, 11), f64), targets=rng.integers(0, 11, (2, 6)),
             p=random(rng, 50, f64), g=random(rng, 50, f64))
    np.savez(tmp_path / "in.npz", **x)
    script = tmp_path / "fallback.py"
    script.write_text(textwrap.dedent(HIDE_NUMBA) + textwrap.dedent(FALLBACK_RUN))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    fallback = dict(np.load(tmp_path / "out.npz"))

    ours = {}
    o, c = K.layernorm_forward(x["x"], x["w"], x["b"]); ours["ln"] = o
    ours["ln_dx"], ours["ln_dw"], ours["ln_db"] = K.layernorm_backward(x["dx_up"], c)
    o, c = K.gelu_forward(x["h"]); ours["gelu"] = o; (ours["gelu_dx"],) = K.gelu_backward(x["dh"], c)
    o, c = K.softmax_forward(x["h"]); ours["sm"] = o; (ours["sm_dx"],) = K.softmax_backward(x["dh"], c)
    q, k, v = L.split_qkv(x["qkv"], 2); o, c = K.causal_attention_forward(q, k, v); ours["att"] = L.merge_heads(o)
    ours["att_dqkv"] = L.merge_qkv(*K.causal_attention_backward(L.split_heads(x["dy"], 2), c))
    o, c = K.cross_entropy_forward(x["logits"], x["targets"]); ours["ce"] = np.asarray(o)
    (ours["ce_dlogits"],) = K.cross_entropy_backward(0.5, c)
    p, m, v = x["p"].copy(), np.zeros_like(x["p"]), np.zeros_like(x["p"])
    for step in (1, 2):
        K.adamw_update(p, x["g"], m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=step)
    ours["adamw"] = p
    ours["sumsq"] = np.asarray(K.sum_of_squares(x["g"]))
    assert sorted(ours) == sorted(fallback)
    # kind chain, one bound for all: the longest sum (the 50 squares), the deepest chain (attention's
    # backward, 6 stages through softmax's Jacobian), and libm's exp and erf against NumPy's and scipy's
    bound = chain(np.float64, 50, 6, MODEL_AMPLIFICATION) + LIBM64_MAX_ERROR
    for name in ours:
        check(name, ours[name], fallback[name], np.float64, bound)


def test_the_blocker_really_hides_numba():
    """Guards the test above: with the blocker, `import numba` fails in that interpreter."""
    run = run_python(textwrap.dedent(HIDE_NUMBA) + "\ntry:\n    import numba\nexcept ImportError as e:\n    print('hidden:', e)\n")
    assert run.returncode == 0, run.stderr
    assert "hidden: numba hidden by the test" in run.stdout
