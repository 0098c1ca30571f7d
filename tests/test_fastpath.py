"""The speed-ups of issue 5 against the plain formulas they replace (bench/RESULTS.md has the numbers).

The layers compute their formulas in place, with `out=` and views, to avoid fresh large arrays.
Each such rewrite does the same floating-point operations in the same order, so in float64 it must
give the one-line formula's result bit for bit; the reference functions below are those one-line
formulas (the layers as they were before the speed-ups). Two changes are not bit for bit and are
tested with tolerances: the float32 erf (Eigen's rational approximation instead of scipy's) and
linear layers done as one 2-D matmul (BLAS may block the sum differently).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf as scipy_erf

from npgpt import GPT, GPTConfig
from npgpt import layers as L
from npgpt.model import init_params, keep_freed_memory, pack_params
from npgpt.optim import AdamW


def same(name, actual, expected):
    """Bit-for-bit equality, with the largest difference printed when it fails."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    print(f"  {name}: max abs difference {diff:.3e}")
    assert np.array_equal(actual, expected, equal_nan=True), f"{name}: not bit for bit (max abs {diff:.3e})"


# --------------------------------------------------------------------------------------------
# The plain formulas (the layers before issue 5)
# --------------------------------------------------------------------------------------------

def ref_layernorm_forward(x, w, b, eps=L.LAYERNORM_EPS):
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    out = xhat * w + b
    return out, (xhat, rstd, w, True)


def ref_layernorm_backward(dout, cache):
    xhat, rstd, w, _ = cache
    g = dout * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dout * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0), dout.reshape(-1, dout.shape[-1]).sum(axis=0)


def ref_gelu_forward(x):
    phi = 0.5 * (1.0 + scipy_erf(x * (1.0 / math.sqrt(2.0))))
    return x * phi, (x, phi)


def ref_gelu_backward(dout, cache):
    x, phi = cache
    pdf = np.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return dout * (phi + x * pdf)


def ref_softmax_forward(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_softmax_backward(dout, y):
    return y * (dout - (dout * y).sum(axis=-1, keepdims=True))


def ref_attention(qkv, n_head):
    """Forward with merge_heads, backward with np.concatenate: returns (y, backward function)."""
    C = qkv.shape[-1] // 3
    q, k, v = (L.split_heads(p, n_head) for p in np.split(qkv, 3, axis=-1))
    scale = 1.0 / math.sqrt(C // n_head)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    scores[..., L.causal_mask(q.shape[2], k.shape[2])] = -np.inf
    att = ref_softmax_forward(scores)
    y = L.merge_heads(att @ v)

    def backward(dout):
        dy = L.split_heads(dout, n_head)
        dv = att.transpose(0, 1, 3, 2) @ dy
        dscores = ref_softmax_backward(dy @ v.transpose(0, 1, 3, 2), att)
        dq = (dscores @ k) * scale
        dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale
        return np.concatenate([L.merge_heads(dq), L.merge_heads(dk), L.merge_heads(dv)], axis=-1)

    return y, backward


def ref_cross_entropy_probs(logits):
    flat = logits.reshape(-1, logits.shape[-1])
    shifted = flat - flat.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return np.exp(shifted - log_z[:, None])


# --------------------------------------------------------------------------------------------
# In-place rewrites: bit for bit in float64 (and in float32, where no approximation is involved)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layernorm_in_place_equals_formula(dtype):
    rng = np.random.default_rng(0)
    x, dout = (rng.standard_normal((3, 5, 16)).astype(dtype) * 3 + 1 for _ in range(2))
    w, b = rng.standard_normal(16).astype(dtype), rng.standard_normal(16).astype(dtype)
    out, cache = L.layernorm_forward(x, w, b)
    ref_out, ref_cache = ref_layernorm_forward(x, w, b)
    same("out", out, ref_out)
    same("xhat", cache[0], ref_cache[0])
    for name, a, r in zip(("dx", "dw", "db"), L.layernorm_backward(dout, cache), ref_layernorm_backward(dout, ref_cache)):
        same(name, a, r)


def test_gelu_in_place_equals_formula_float64():
    rng = np.random.default_rng(1)
    x, dout = rng.standard_normal((4, 6, 32)) * 2, rng.standard_normal((4, 6, 32))
    out, cache = L.gelu_forward(x)
    ref_out, ref_cache = ref_gelu_forward(x)
    same("out", out, ref_out)
    same("phi", cache[1], ref_cache[1])
    same("dx", L.gelu_backward(dout, cache)[0], ref_gelu_backward(dout, ref_cache))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_in_place_equals_formula(dtype):
    rng = np.random.default_rng(2)
    x, dout = (rng.standard_normal((3, 4, 7, 7)).astype(dtype) * 4 for _ in range(2))
    y, cache = L.softmax_forward(x)
    same("y", y, ref_softmax_forward(x))
    same("dx", L.softmax_backward(dout, cache)[0], ref_softmax_backward(dout, y))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_without_merge_copies_equals_formula(dtype):
    """y written head by head into (B, T, C), dq/dk/dv straight into (B, T, 3C): no merge, no concat."""
    rng = np.random.default_rng(3)
    B, T, C, nh = 2, 9, 12, 3
    qkv, dout = rng.standard_normal((B, T, 3 * C)).astype(dtype), rng.standard_normal((B, T, C)).astype(dtype)
    y, cache = L.attention_forward(qkv, nh)
    ref_y, ref_backward = ref_attention(qkv, nh)
    same("y", y, ref_y)
    same("dqkv", L.attention_backward(dout, cache)[0], ref_backward(dout))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_probs_in_place_equal_formula(dtype):
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((3, 5, 11)) * 5).astype(dtype)
    _, (probs, _, _) = L.cross_entropy_forward(logits, rng.integers(0, 11, (3, 5)))
    same("probs", probs, ref_cross_entropy_probs(logits))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_linear_as_one_2d_matmul(dtype):
    """(B*T, in) @ (in, out) instead of a batched (B, T, in) @ (in, out): the same sums, maybe
    blocked differently by BLAS, so equal to rounding only."""
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((4, 7, 24)), rng.standard_normal((10, 24)), rng.standard_normal(10)
    dout = rng.standard_normal((4, 7, 10))
    x, w, b, dout = (a.astype(dtype) for a in (x, w, b, dout))
    tol = 1e-13 if dtype == np.float64 else 1e-5
    out, cache = L.linear_forward(x, w, b)
    np.testing.assert_allclose(out, x @ w.T + b, rtol=tol, atol=tol)
    dx, dw, db = L.linear_backward(dout, cache)
    np.testing.assert_allclose(dx, dout @ w, rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, dout.reshape(-1, 10).T @ x.reshape(-1, 24), rtol=tol, atol=tol)
    assert dx.shape == x.shape and dx.dtype == dtype


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_block_rebuilds_the_dropped_mlp_activation_exactly(activation):
    """block_forward drops the MLP's hidden activation (B, T, 4C) when its cache determines it;
    the backward's rebuilt copy gives the same gradients as the kept one, bit for bit."""
    rng = np.random.default_rng(6)
    C, nh = 8, 2
    p = {k[len("transformer.h.0."):]: v for k, v in
         init_params(GPTConfig(vocab_size=5, block_size=6, n_layer=1, n_head=nh, n_embd=C), 1, np.float64).items()
         if k.startswith("transformer.h.0.")}
    x, dout = rng.standard_normal((2, 6, C)), rng.standard_normal((2, 6, C))
    _, cache = L.block_forward(x, p, nh, activation)
    c_act, c_mproj = cache[8], cache[9]
    if activation == "relu":
        assert c_mproj[0] is not None  # relu keeps only its mask: nothing to rebuild from
        return
    assert c_mproj[0] is None, "the (B, T, 4C) activation should not be kept"
    act_out, _ = L.ACTIVATION_FUNCTIONS[activation][0](c_act[0])
    same("rebuilt activation", L.ACTIVATION_OUTPUT_FROM_CACHE[activation](c_act), act_out)
    kept = cache[:9] + ((act_out,) + c_mproj[1:],) + cache[10:]
    dx, grads = L.block_backward(dout, cache)
    dx_kept, grads_kept = L.block_backward(dout, kept)
    same("dx", dx, dx_kept)
    for name in grads:
        same(name, grads[name], grads_kept[name])


# --------------------------------------------------------------------------------------------
# The float32 erf
# --------------------------------------------------------------------------------------------

def test_erf_float64_is_scipys():
    x = np.random.default_rng(7).standard_normal(1000) * 3
    same("erf float64", L.erf(x), scipy_erf(x))


def test_erf_float32_within_5e7_of_scipy_everywhere():
    # every 101st float32 in [0, 6], both signs, plus the edges
    bits = np.arange(0, np.float32(6.0).view(np.int32) + 1, 101, dtype=np.int32)
    x = bits.view(np.float32)
    x = np.concatenate([x, -x, np.float32([0.0, 4.0, -4.0, 1e30, -1e30, np.inf, -np.inf])])
    got = L.erf(x)
    exact = scipy_erf(x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact)
    print(f"  float32 erf: max abs error {err.max():.3e} at x = {x[err.argmax()]}")
    assert got.dtype == np.float32
    assert err.max() < 5e-7
    assert np.array_equal(got[-4:], np.float32([1, -1, 1, -1])), "saturates to +-1"
    assert np.array_equal(L.erf(-x), -got), "odd"
    assert np.isnan(L.erf(np.float32([np.nan]))).all()


def test_erf_float32_out_and_shapes():
    rng = np.random.default_rng(8)
    for shape in [(0,), (3,), (5, 7), (2, 3, L._ERF32_CHUNK // 3 + 5)]:  # the last spans chunks
        x = rng.standard_normal(shape).astype(np.float32)
        expected = L.erf(x.copy())
        buf = x.copy()
        assert L.erf(buf, out=buf) is buf
        same(f"in place {shape}", buf, expected)


def test_gelu_float32_close_to_exact():
    """The float32 GELU with the approximate erf stays within a few float32 ulps of the exact one."""
    x = np.linspace(-8, 8, 100_001).astype(np.float32)
    out, (_, phi) = L.gelu_forward(x)
    exact_phi = 0.5 * (1.0 + scipy_erf(x.astype(np.float64) / math.sqrt(2.0)))
    print(f"  phi max abs error {np.abs(phi - exact_phi).max():.3e}")
    assert np.abs(phi - exact_phi).max() < 3e-7
    assert np.abs(out - x.astype(np.float64) * exact_phi).max() < 2e-6


# --------------------------------------------------------------------------------------------
# Parameters as views of one buffer; AdamW without gather/scatter
# --------------------------------------------------------------------------------------------

def small_config(**kw):
    return GPTConfig(**{**dict(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, tie_weights=False,
                              bias=True), **kw})


def test_pack_params_are_views_of_one_buffer_with_the_same_values():
    params = init_params(small_config(), seed=3)
    packed = pack_params(params)
    assert list(packed) == list(params), "keys keep nanoGPT's order"
    base = next(iter(packed.values())).base
    for n, p in packed.items():
        same(n, p, params[n])
        assert p.base is base and p.shape == params[n].shape and p.dtype == params[n].dtype
        assert p.flags.c_contiguous and p.flags.writeable
    model = GPT(small_config(), seed=3)
    assert all(np.array_equal(model.params[n], params[n]) for n in params)


def test_writing_into_a_packed_parameter_reaches_the_buffer():
    model = GPT(small_config())
    w = model.params["transformer.h.1.mlp.c_fc.weight"]
    w[...] = 0.25
    base = w.base
    assert np.count_nonzero(base == np.float32(0.25)) >= w.size


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_view_path_equals_gather_path(dtype):
    """AdamW on a GPT's packed params (flat views, no gather/scatter) against the same params as
    separate arrays (gathered and scattered every step): identical, bit for bit."""
    model = GPT(small_config(), seed=1, dtype=dtype)
    loose = {n: p.copy() for n, p in model.params.items()}  # separate arrays: the gather path
    opt_view = AdamW(model.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_gather = AdamW(loose, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert all(v is not None for v in opt_view._param_views.values())
    assert opt_gather._param_views["decay"] is None
    rng = np.random.default_rng(9)
    for lr in (1e-2, 3e-3, 1e-2):
        grads = {n: rng.standard_normal(p.shape).astype(dtype) for n, p in loose.items()}
        opt_view.step(grads, lr=lr)
        opt_gather.step(grads, lr=lr)
    for n in loose:
        same(n, model.params[n], loose[n])


def test_adamw_falls_back_when_a_parameter_is_replaced():
    model = GPT(small_config(), seed=2, dtype=np.float64)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
    name = "transformer.h.0.attn.c_attn.weight"
    model.params[name] = model.params[name].copy()  # no longer a view of the buffer
    before = model.params[name].copy()
    grads = {n: np.ones_like(p) for n, p in model.params.items()}
    opt.step(grads)
    assert not np.array_equal(model.params[name], before), "the replaced array must be updated too"
    reference = GPT(small_config(), seed=2, dtype=np.float64)
    AdamW(reference.params, lr=1e-2, weight_decay=0.1).step(grads)
    for n in model.params:
        same(n, model.params[n], reference.params[n])


def test_forward_frees_the_previous_cache_but_backward_still_repeats():
    model = GPT(small_config(), seed=4)
    rng = np.random.default_rng(10)
    idx, targets = rng.integers(0, 7, (2, 6)), rng.integers(0, 7, (2, 6))
    model.forward(idx, targets)
    g1, g2 = model.backward(), model.backward()
    assert all(np.array_equal(g1[n], g2[n]) for n in g1)


def test_keep_freed_memory_is_idempotent():
    first = keep_freed_memory()
    assert isinstance(first, bool) and keep_freed_memory() == first
