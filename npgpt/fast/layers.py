"""npgpt.layers rewritten for speed: the same functions, signatures and cache types.

The plain formulas are in npgpt/layers.py (and derived in docs/gradients.md); each function here
computes the same thing with fewer fresh arrays. bench/RESULTS.md has the measurements. The
rewrites, and how they compare with the reference (tests/test_fastpath.py checks each):

- In place: `a * b + c` becomes `out = a * b; out += c` wherever the operands need not survive,
  because a new large array costs page faults on memory the allocator has just taken from the OS
  (an elementwise op on fresh memory can take ~4x as long as on warm memory). The same
  floating-point operations in the same order: bit for bit the reference's result.
- Attention writes y and dq, dk, dv straight into their (B, T, C) / (B, T, 3C) arrays (matmul
  with out= into head views): no merge_heads copy, no concatenate. Bit for bit.
- Linear layers as one 2-D (N, in) @ (in, out) matmul: on a 3-D x, matmul would loop over the
  batch with B smaller products (~20% slower here). BLAS may block the sums differently, so equal
  to rounding (1e-13 normwise in float64), not bit for bit.
- float32 erf: a rational approximation (Eigen's and XLA's) instead of scipy's scalar loop
  (~15 ns an element, most of a float32 step's non-matmul time; this is ~7x faster). Error below
  5e-7 everywhere. float64 keeps scipy's erf, so float64 GELU is bit for bit the reference's.
- The block drops the MLP's hidden activation (B, T, 4C), its largest array, after the forward
  and rebuilds it in the backward from the activation's cache with the forward's own last
  operation (bit for bit the same array).
- The modern block (RMSNorm, RoPE, QK-norm, ReLU², SwiGLU): the same operations in place (RoPE
  half by half, with no rotate_half copy), bit for bit. QK-norm and RoPE turn qkv into the q and k
  the scores see before the attention runs, so the fused attention kernel serves them too.
- With numba installed (npgpt.fast.numba_kernels.ENABLED), layernorm, RMSNorm, GELU, SwiGLU, RoPE
  (bit for bit), softmax, attention
  (without a KV slot) and cross-entropy run as fused, threaded kernels instead of the NumPy code
  below: one pass per row or per head, the same cache types. They sum in another order (and
  float32 uses a polynomial exp), so they equal the reference to rounding (float64 1e-13
  normwise, float32 1e-6), not bit for bit; tests/test_numba_kernels.py checks them, and
  tests/test_fastpath.py checks the NumPy code with the kernels switched off.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erf as _scipy_erf

from . import numba_kernels as _kernels

from ..layers import (  # the layers with nothing to speed up, and every cache type
    LAYERNORM_EPS,
    AttentionCache,
    BlockCache,
    CrossEntropyCache,
    DropoutCache,
    GeluCache,
    GeluTanhCache,
    KVSlot,
    LayerNormCache,
    LinearCache,
    RMSNORM_EPS,
    Relu2Cache,
    RMSNormCache,
    RopeAngles,
    RopeCache,
    SoftmaxCache,
    SwigluCache,
    _sum_to_last_axis,
    block_dropout_masks,
    causal_mask,
    dropout_backward,
    dropout_forward,
    dropout_mask,
    EmbeddingCache,
    embedding_backward,
    gelu_tanh_backward,
    gelu_tanh_forward,
    merge_heads,
    relu_backward,
    relu_forward,
    rope_angles,
    rotate_half,
    split_heads,
)

__all__ = [
    "covers_config", "LAYERNORM_EPS", "ACTIVATION_FUNCTIONS", "ACTIVATION_OUTPUT_FROM_CACHE", "erf",
    "embedding_forward", "embedding_backward", "linear_forward", "linear_backward",
    "layernorm_forward", "layernorm_backward", "relu_forward", "relu_backward",
    "gelu_forward", "gelu_backward", "gelu_tanh_forward", "gelu_tanh_backward",
    "dropout_mask", "dropout_forward", "dropout_backward", "softmax_forward", "softmax_backward",
    "split_heads", "merge_heads", "causal_mask", "attention_probs", "attention_forward",
    "attention_backward", "cross_entropy_forward", "cross_entropy_backward",
    "block_forward", "block_backward", "block_dropout_masks", "KVSlot",
    "RMSNORM_EPS", "rmsnorm_forward", "rmsnorm_backward", "RopeAngles", "rope_angles", "rotate_half",
    "rope_forward", "rope_backward", "relu2_forward", "relu2_backward", "swiglu_forward", "swiglu_backward",
]

def covers_config(config) -> bool:
    """Whether these layers implement the config's block: every switch of GPTConfig (the lecture's
    block and the modern one of issue 11) with an activation these layers know."""
    return config.norm in ("layernorm", "rmsnorm") and config.activation in ACTIVATION_FUNCTIONS


# --------------------------------------------------------------------------------------------
# The error function for float32: the rational approximation of Eigen and XLA (their float32 erf),
# erf(x) ~= x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) rounds to 1 in float32).
# --------------------------------------------------------------------------------------------

ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
           -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
           -1.60960333262415e-02)  # coefficients of x^12, x^10, ..., x^0 in P
ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
           -7.37332916720468e-03, -1.42647390514189e-02)  # of x^8, ..., x^0 in Q
ERF32_CHUNK = 65536  # elements per pass: a chunk and its three scratch arrays fit a 1 MB L2 cache


def _horner(coefficients, x2: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = (..(c0 x2 + c1) x2 + ..) x2 + c_last, in place (Horner's rule)."""
    np.multiply(x2, coefficients[0], out=out)
    for c in coefficients[1:-1]:
        out += c
        out *= x2
    out += coefficients[-1]
    return out


def erf(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The error function elementwise: scipy's for float64, Eigen's approximation for float32.

    `out`, if given, must be C-contiguous (it may be x itself).
    """
    if x.dtype != np.float32:
        return _scipy_erf(x, out=out)
    out = np.clip(x, -4.0, 4.0, out=out)  # the clamped x, overwritten chunk by chunk with erf(x)
    flat = out.reshape(-1)  # a view
    n = min(ERF32_CHUNK, flat.size)
    x2, p, q = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    for start in range(0, flat.size, ERF32_CHUNK):
        v = flat[start:start + ERF32_CHUNK]
        m = v.size
        np.multiply(v, v, out=x2[:m])
        v *= _horner(ERF32_P, x2[:m], p[:m])  # x P(x^2)
        v /= _horner(ERF32_Q, x2[:m], q[:m])  # x P(x^2) / Q(x^2)
    return out


# --------------------------------------------------------------------------------------------
# Embedding: the position rows added in place
# --------------------------------------------------------------------------------------------

def embedding_forward(idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray | None = None):
    """wte[idx] + wpe[:T], the sum taken in the gather's fresh array."""
    B, T = idx.shape
    out = wte[idx]  # (B, T, C)
    if wpe is not None:
        out += wpe[:T]
    return out, EmbeddingCache(idx, wte.shape, None if wpe is None else wpe.shape)


# --------------------------------------------------------------------------------------------
# Linear: one 2-D matmul
# --------------------------------------------------------------------------------------------

def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None):
    """out = x @ w.T + b as one (N, in) @ (in, out) product. The reshapes are views."""
    out = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
    if b is not None:
        out += b
    return out, LinearCache(x, w, b is not None)


def linear_backward(dout: np.ndarray, cache: LinearCache):
    """Returns (dx, dw, db) as npgpt.layers.linear_backward, dx as one 2-D product."""
    x, w = cache.x, cache.w
    dout2d = dout.reshape(-1, dout.shape[-1])  # (N, out)
    dx = (dout2d @ w).reshape(x.shape)  # (N, out) @ (out, in) -> (N, in) -> (..., in)
    dw = dout2d.T @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in) -> (out, in)
    db = dout2d.sum(axis=0) if cache.has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Layer normalisation, in place
# --------------------------------------------------------------------------------------------

def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                      eps: float = LAYERNORM_EPS):
    """npgpt.layers.layernorm_forward with two fresh (..., C) arrays instead of five."""
    if _kernels.ENABLED:
        return _kernels.layernorm_forward(x, w, b, eps)
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    sq = xc * xc  # (..., C) scratch, reused as the output below
    var = sq.mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    xhat = xc
    xhat *= rstd  # (..., C) xc * rstd, in place: xc is not needed again
    out = np.multiply(xhat, w, out=sq)
    if b is not None:
        out += b
    return out, LayerNormCache(xhat, rstd, w, b is not None)


def layernorm_backward(dout: np.ndarray, cache: LayerNormCache):
    """npgpt.layers.layernorm_backward with the chain built in place in g's memory."""
    if _kernels.ENABLED:
        return _kernels.layernorm_backward(dout, cache)
    xhat, rstd = cache.xhat, cache.rstd
    g = dout * cache.w  # (..., C) gradient w.r.t. xhat
    scratch = g * xhat  # (..., C)
    mean_gx = scratch.mean(axis=-1, keepdims=True)  # (..., 1)
    dx = g  # rstd * (g - mean(g) - xhat * mean_gx)
    dx -= g.mean(axis=-1, keepdims=True)
    dx -= np.multiply(xhat, mean_gx, out=scratch)
    dx *= rstd
    dw = _sum_to_last_axis(np.multiply(dout, xhat, out=scratch))
    db = _sum_to_last_axis(dout) if cache.has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# GELU, in place, with the float32 erf
# --------------------------------------------------------------------------------------------

_SQRT_2 = math.sqrt(2.0)
_SQRT_2PI = math.sqrt(2.0 * math.pi)


def gelu_forward(x: np.ndarray):
    """x * Phi(x) with one fresh array for the whole of Phi."""
    if _kernels.ENABLED:
        return _kernels.gelu_forward(x)
    phi = x / _SQRT_2
    erf(phi, out=phi)
    phi += 1.0
    phi *= 0.5  # standard normal CDF
    return x * phi, GeluCache(x, phi)


def gelu_backward(dout: np.ndarray, cache: GeluCache):
    """dout * (phi + x * pdf), built in one fresh array."""
    if _kernels.ENABLED:
        return _kernels.gelu_backward(dout, cache)
    x, phi = cache.x, cache.phi
    dx = -0.5 * x
    dx *= x
    np.exp(dx, out=dx)
    dx /= _SQRT_2PI  # pdf
    dx *= x
    dx += phi
    dx *= dout
    return (dx,)


ACTIVATION_FUNCTIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
}

# An activation whose cache determines its output: the output rebuilt from the cache with the
# forward's own last operation (so bit for bit the same array). block_forward uses this to drop the
# MLP's hidden activation (B, T, 4C) after the forward; block_backward rebuilds it for mlp.c_proj's
# weight gradient. relu's cache (a boolean mask) does not determine x, so relu keeps it.
ACTIVATION_OUTPUT_FROM_CACHE = {
    "gelu": lambda cache: cache.x * cache.phi,
    "gelu_tanh": lambda cache: 0.5 * cache.x * (1.0 + cache.th),
}


# --------------------------------------------------------------------------------------------
# The modern block (issue 11): RMSNorm, RoPE, ReLU², SwiGLU, in place
# --------------------------------------------------------------------------------------------
# The same floating-point operations as npgpt.layers in the same order (a * b + c as out = a * b;
# out += c; negations folded into the sign of a sum, which IEEE arithmetic does exactly), so bit for
# bit the reference's results. With numba, RMSNorm, RoPE and SwiGLU run as kernels (RoPE still bit
# for bit; RMSNorm and SwiGLU to rounding).

def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float = RMSNORM_EPS):
    """npgpt.layers.rmsnorm_forward with two fresh (..., C) arrays instead of three."""
    if _kernels.ENABLED:
        return _kernels.rmsnorm_forward(x, w, eps)
    sq = x * x  # (..., C) scratch, reused as xhat below
    rstd = 1.0 / np.sqrt(sq.mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = np.multiply(x, rstd, out=sq)
    return xhat * w, RMSNormCache(xhat, rstd, w)


def rmsnorm_backward(dout: np.ndarray, cache: RMSNormCache):
    """npgpt.layers.rmsnorm_backward with the chain built in place in g's memory."""
    if _kernels.ENABLED:
        return _kernels.rmsnorm_backward(dout, cache)
    xhat = cache.xhat
    g = dout * cache.w  # (..., C) gradient w.r.t. xhat
    scratch = g * xhat
    mean_gx = scratch.mean(axis=-1, keepdims=True)  # (..., 1)
    dx = g  # rstd * (g - xhat * mean_gx)
    dx -= np.multiply(xhat, mean_gx, out=scratch)
    dx *= cache.rstd
    dw = _sum_to_last_axis(np.multiply(dout, xhat, out=scratch))
    return dx, dw


def rope_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray | None = None):
    """npgpt.layers.rope_forward without rotate_half's concatenated copy: the halves in place.

    x * cos + rotate_half(x) * sin is, half by half (x1 = x[..., :hs/2], x2 = x[..., hs/2:]),
    x1 * cos - x2 * sin and x2 * cos + x1 * sin. `out` (x's shape, not x) receives the result.
    With numba: one pass over x (any strides), the same operations, bit for bit.
    """
    if _kernels.ENABLED:
        return _kernels.rope_forward(x, cos, sin, out)
    half = x.shape[-1] // 2
    out = np.multiply(x, cos, out=out)  # (B, nh, T, hs)
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out, RopeCache(cos, sin)


def rope_backward(dout: np.ndarray, cache: RopeCache):
    """npgpt.layers.rope_backward, the rotation by -angle, half by half: (dx,)."""
    if _kernels.ENABLED:
        return _kernels.rope_backward(dout, cache)
    half = dout.shape[-1] // 2
    sin = cache.sin
    dx = dout * cache.cos
    dx[..., :half] += dout[..., half:] * sin[..., :half]
    dx[..., half:] -= dout[..., :half] * sin[..., half:]
    return (dx,)


def relu2_forward(x: np.ndarray):
    """relu(x)^2 with the square taken in place: the cache keeps relu(x), the output is rebuilt."""
    relu_x = np.maximum(x, 0)
    return relu_x * relu_x, Relu2Cache(relu_x)


def relu2_backward(dout: np.ndarray, cache: Relu2Cache):
    """dout * 2 relu(x) in one fresh array."""
    dx = dout * 2.0
    dx *= cache.relu_x
    return (dx,)


def swiglu_forward(x: np.ndarray):
    """silu(gate) * up with sigmoid built in place in one fresh (..., H) array; gate and up are views.
    With numba: one pass (sigmoid as 1 / (1 + exp(-gate)), so equal to rounding)."""
    if _kernels.ENABLED:
        return _kernels.swiglu_forward(x)
    H = x.shape[-1] // 2
    gate, up = x[..., :H], x[..., H:]  # (..., H) views
    sig = np.multiply(gate, 0.5)
    np.tanh(sig, out=sig)
    sig += 1.0
    sig *= 0.5  # sigmoid(gate) = (1 + tanh(gate / 2)) / 2
    out = gate * sig
    out *= up
    return out, SwigluCache(gate, up, sig)


def swiglu_backward(dout: np.ndarray, cache: SwigluCache):
    """dgate and dup written straight into the two halves of one (..., 2H) array."""
    if _kernels.ENABLED:
        return _kernels.swiglu_backward(dout, cache)
    gate, up, sig = cache
    H = gate.shape[-1]
    dx = np.empty(dout.shape[:-1] + (2 * H,), dtype=dout.dtype)
    dgate, dup = dx[..., :H], dx[..., H:]  # views
    dsilu = 1.0 - sig  # sig * (1 + gate * (1 - sig)), built in place
    dsilu *= gate
    dsilu += 1.0
    dsilu *= sig
    np.multiply(dout, up, out=dgate)
    dgate *= dsilu
    np.multiply(dout, gate, out=dup)
    dup *= sig
    return (dx,)


ACTIVATION_FUNCTIONS["relu2"] = (relu2_forward, relu2_backward)
ACTIVATION_FUNCTIONS["swiglu"] = (swiglu_forward, swiglu_backward)
ACTIVATION_OUTPUT_FROM_CACHE["relu2"] = lambda cache: cache.relu_x * cache.relu_x
ACTIVATION_OUTPUT_FROM_CACHE["swiglu"] = lambda cache: cache.gate * cache.sig * cache.up


def _norm_forward(x: np.ndarray, p: dict, prefix: str, norm: str, eps: float):
    """The block's ln_1 / ln_2: layernorm_forward (bias if p has one) or rmsnorm_forward."""
    if norm == "rmsnorm":
        return rmsnorm_forward(x, p[prefix + ".weight"], eps)
    return layernorm_forward(x, p[prefix + ".weight"], p.get(prefix + ".bias"), eps)


def _norm_backward(dout: np.ndarray, cache):
    """(dx, dw, db) of either norm, chosen by its cache; db is None for RMSNorm (no bias)."""
    if isinstance(cache, RMSNormCache):
        dx, dw = rmsnorm_backward(dout, cache)
        return dx, dw, None
    return layernorm_backward(dout, cache)


# --------------------------------------------------------------------------------------------
# Softmax, in place
# --------------------------------------------------------------------------------------------

def softmax_forward(x: np.ndarray):
    """exp(x - max x) / sum, with one fresh array."""
    if _kernels.ENABLED:
        return _kernels.softmax_forward(x)
    out = x - x.max(axis=-1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out, SoftmaxCache(out)


def softmax_backward(dout: np.ndarray, cache: SoftmaxCache):
    """y * (dout - sum(dout * y)), with one fresh array."""
    if _kernels.ENABLED:
        return _kernels.softmax_backward(dout, cache)
    y = cache.y
    dx = dout * y
    row_sum = dx.sum(axis=-1, keepdims=True)  # (..., 1)
    np.subtract(dout, row_sum, out=dx)
    dx *= y
    return (dx,)


# --------------------------------------------------------------------------------------------
# Attention, written straight into its outputs
# --------------------------------------------------------------------------------------------

def attention_probs(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q k^T * scale) with the future masked, in the scores' own memory."""
    scores = q @ k.transpose(0, 1, 3, 2)  # (B, nh, Tq, Tk)
    scores *= scale
    # copyto broadcasts the (Tq, Tk) mask over (B, nh), ~4x faster than boolean indexing
    np.copyto(scores, -np.inf, where=causal_mask(q.shape[2], k.shape[2]))
    att, _ = softmax_forward(scores)
    return att


# The fused per-head attention kernel calls BLAS from inside numba's parallel loop. With small heads
# each of those products runs on one thread and the kernel wins (cpu preset, T=64, hs=32: ~8 ms a
# step faster than the batched NumPy products at 2 threads). With larger heads OpenBLAS threads each
# product itself, nested inside numba's threads: the two pools fight over the cores and a step of the
# large config (T=128, hs=64) took 1.5-2 s instead of ~0.45 s (bench/RESULTS.md). Above this size the
# batched np.matmul path runs instead (with the numba softmax kernel).
FUSED_ATTENTION_MAX_T2HS = 1 << 18  # T * T * hs of one head


def _fused_attention_pays(T: int, hs: int) -> bool:
    return T * T * hs <= FUSED_ATTENTION_MAX_T2HS


def _qk_prepared(qkv: np.ndarray, n_head: int, q_norm, k_norm, norm_eps: float, rope):
    """qkv (B, T, 3C) with q and k as the scores see them: QK-normed (if gains are given), then
    rotated (if rope), in a fresh array; v copied. Returns (qkv', caches) with caches
    [(norm cache or None, rope cache or None) for q, for k]. The attention below then runs on qkv'
    as on any qkv, so the fused kernel serves the modern block too."""
    C = qkv.shape[-1] // 3
    out = np.empty_like(qkv)
    out[..., 2 * C:] = qkv[..., 2 * C:]
    caches = []
    for i, gain in enumerate((q_norm, k_norm)):
        x = split_heads(qkv[..., i * C:(i + 1) * C], n_head)  # (B, nh, T, hs) view
        dest = split_heads(out[..., i * C:(i + 1) * C], n_head)  # its place in qkv'
        c_norm = c_rope = None
        if gain is not None:
            x, c_norm = rmsnorm_forward(x, gain, norm_eps)
        if rope is not None:
            _, c_rope = rope_forward(x, rope.cos, rope.sin, out=dest)
        else:
            dest[...] = x
        caches.append((c_norm, c_rope))
    return out, caches


def attention_forward(qkv: np.ndarray, n_head: int, dropout_p: float = 0.0,
                      rng: np.random.Generator | None = None, mask: np.ndarray | None = None,
                      kv: KVSlot | None = None, q_norm: np.ndarray | None = None,
                      k_norm: np.ndarray | None = None, norm_eps: float = RMSNORM_EPS, rope=None):
    """npgpt.layers.attention_forward with each head written straight into its channels of y.

    QK-norm and RoPE (the modern block) first turn qkv into the q and k the scores see
    (_qk_prepared); their caches join the AttentionCache as in the reference.
    """
    if q_norm is not None or rope is not None:
        qkv, ((c_qnorm, c_qrope), (c_knorm, c_krope)) = _qk_prepared(qkv, n_head, q_norm, k_norm,
                                                                      norm_eps, rope)
        y, cache = attention_forward(qkv, n_head, dropout_p, rng, mask, kv)
        return y, cache._replace(q_norm=c_qnorm, k_norm=c_knorm, q_rope=c_qrope, k_rope=c_krope)
    if _kernels.ENABLED and kv is None and _fused_attention_pays(qkv.shape[1], qkv.shape[2] // 3 // n_head):
        return _kernels.attention_forward(qkv, n_head, dropout_p, rng, mask)
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))  # (B, nh, T, hs)
    if kv is not None:
        end = kv.length + q.shape[2]
        kv.k[:, :, kv.length:end] = k
        kv.v[:, :, kv.length:end] = v
        k, v = kv.k[:, :, :end], kv.v[:, :, :end]  # (B, nh, Tk, hs)
    scale = 1.0 / math.sqrt(C // n_head)
    att = attention_probs(q, k, scale)  # (B, nh, T, Tk)
    att_mask = None
    att_used = att
    if dropout_p > 0.0 or mask is not None:
        att_used, drop_cache = dropout_forward(att, dropout_p, rng, mask)
        att_mask = drop_cache.mask
    # split_heads(y) is a view of y (B, T, C), so the matmul writes each head into its channels
    y = np.empty(qkv.shape[:-1] + (C,), dtype=qkv.dtype)
    np.matmul(att_used, v, out=split_heads(y, n_head))
    return y, AttentionCache(q, k, v, att, att_mask, scale)


def attention_backward(dout: np.ndarray, cache: AttentionCache):
    """npgpt.layers.attention_backward with dq, dk, dv written straight into one (B, T, 3C).

    With RoPE and QK-norm, dq and dk are then taken back through them in their place in dqkv; with
    QK-norm the result is (dqkv, dq_norm, dk_norm), as the reference's.
    """
    (dqkv,) = _attention_core_backward(dout, cache)
    if cache.q_rope is None and cache.q_norm is None:
        return (dqkv,)
    C = dout.shape[-1]
    n_head = cache.q.shape[1]
    dgains = []
    for i, (c_norm, c_rope) in enumerate(((cache.q_norm, cache.q_rope), (cache.k_norm, cache.k_rope))):
        place = split_heads(dqkv[..., i * C:(i + 1) * C], n_head)  # (B, nh, T, hs) view
        d = place
        if c_rope is not None:
            (d,) = rope_backward(d, c_rope)
        if c_norm is not None:
            d, dgain = rmsnorm_backward(d, c_norm)
            dgains.append(dgain)
        place[...] = d
    return (dqkv, *dgains)


def _attention_core_backward(dout: np.ndarray, cache: AttentionCache):
    """(dqkv,) of the scores' q, k and v: the fused kernel's or the batched products'."""
    if _kernels.ENABLED and _fused_attention_pays(cache.q.shape[2], cache.q.shape[3]):
        return _kernels.attention_backward(dout, cache)
    q, k, v, att, att_mask, scale = cache.q, cache.k, cache.v, cache.att, cache.att_mask, cache.scale
    n_head = q.shape[1]
    dy = split_heads(dout, n_head)  # (B, nh, T, hs)
    dqkv = np.empty(dout.shape[:-1] + (3 * dout.shape[-1],), dtype=dout.dtype)  # (B, T, 3C)
    dq, dk, dv = (split_heads(part, n_head) for part in np.split(dqkv, 3, axis=-1))  # views
    att_used = att if att_mask is None else att * att_mask
    np.matmul(att_used.transpose(0, 1, 3, 2), dy, out=dv)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, nh, T, T)
    if att_mask is not None:
        datt *= att_mask
    (dscores,) = softmax_backward(datt, SoftmaxCache(att))
    np.matmul(dscores, k, out=dq)
    dq *= scale
    np.matmul(dscores.transpose(0, 1, 3, 2), q, out=dk)
    dk *= scale
    return (dqkv,)


# --------------------------------------------------------------------------------------------
# Cross-entropy, in place
# --------------------------------------------------------------------------------------------

def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray):
    """npgpt.layers.cross_entropy_forward with the softmax built in the shifted logits' memory."""
    if _kernels.ENABLED:
        return _kernels.cross_entropy_forward(logits, targets)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)  # (N, V)
    t = targets.reshape(-1)  # (N,)
    shifted = flat - flat.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))  # (N,)
    rows = np.arange(flat.shape[0])
    loss = (log_z - shifted[rows, t]).mean()
    probs = shifted  # exp(shifted - log_z), in place
    probs -= log_z[:, None]
    np.exp(probs, out=probs)
    return loss, CrossEntropyCache(probs, t, logits.shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """(probs - onehot) / N * dloss in one fresh array."""
    if _kernels.ENABLED:
        return _kernels.cross_entropy_backward(dloss, cache)
    probs, t = cache.probs, cache.targets
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[np.arange(n), t] -= 1.0
    dlogits *= dlogits.dtype.type(dloss / n)
    return (dlogits.reshape(cache.logits_shape),)


# --------------------------------------------------------------------------------------------
# The block: residuals summed in place, the MLP's hidden activation dropped and rebuilt
# --------------------------------------------------------------------------------------------

def block_forward(x: np.ndarray, p: dict, n_head: int, activation: str = "gelu",
                  dropout_p: float = 0.0, rng: np.random.Generator | None = None,
                  masks: list | None = None, kv: KVSlot | None = None, norm: str = "layernorm",
                  norm_eps: float = LAYERNORM_EPS, rope=None):
    """npgpt.layers.block_forward on the fast layers. The cache's mlp_c_proj.x is None where the
    activation's cache determines it (ACTIVATION_OUTPUT_FROM_CACHE). Every switch of the reference
    (norm, norm_eps, rope, QK-norm when p has "attn.q_norm.weight", relu2, swiglu) is here too.
    """
    act_forward, _ = ACTIVATION_FUNCTIONS[activation]
    m_att, m_res1, m_res2 = masks if masks is not None else (None, None, None)
    use_dropout = dropout_p > 0.0 or masks is not None

    h, c_ln1 = _norm_forward(x, p, "ln_1", norm, norm_eps)
    qkv, c_attn = linear_forward(h, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # (B, T, 3C)
    a, c_att = attention_forward(qkv, n_head, dropout_p, rng, m_att, kv, p.get("attn.q_norm.weight"),
                                 p.get("attn.k_norm.weight"), norm_eps, rope)  # (B, T, C)
    a, c_aproj = linear_forward(a, p["attn.c_proj.weight"], p.get("attn.c_proj.bias"))
    c_drop1 = None
    if use_dropout:
        a, c_drop1 = dropout_forward(a, dropout_p, rng, m_res1)
    a += x  # residual, summed into the branch's fresh output
    x_mid = a

    h, c_ln2 = _norm_forward(x_mid, p, "ln_2", norm, norm_eps)
    h, c_fc = linear_forward(h, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"))  # (B, T, H) or (B, T, 2H)
    h, c_act = act_forward(h)
    h, c_mproj = linear_forward(h, p["mlp.c_proj.weight"], p.get("mlp.c_proj.bias"))  # (B, T, C)
    if activation in ACTIVATION_OUTPUT_FROM_CACHE:  # keep c_act only: saves (B, T, H) per block
        c_mproj = c_mproj._replace(x=None)
    c_drop2 = None
    if use_dropout:
        h, c_drop2 = dropout_forward(h, dropout_p, rng, m_res2)
    h += x_mid  # residual, in place as above
    return h, BlockCache(activation, c_ln1, c_attn, c_att, c_aproj, c_drop1,
                         c_ln2, c_fc, c_act, c_mproj, c_drop2)


def block_backward(dout: np.ndarray, cache: BlockCache):
    """npgpt.layers.block_backward on the fast layers, rebuilding a dropped MLP activation."""
    _, act_backward = ACTIVATION_FUNCTIONS[cache.activation]
    grads = {}

    def put(prefix, dw, db):
        grads[prefix + ".weight"] = dw
        if db is not None:
            grads[prefix + ".bias"] = db

    dh = dout
    if cache.mlp_dropout is not None:
        (dh,) = dropout_backward(dh, cache.mlp_dropout)
    c_mproj = cache.mlp_c_proj
    if c_mproj.x is None:  # the forward dropped the activation's output: rebuild it
        c_mproj = c_mproj._replace(x=ACTIVATION_OUTPUT_FROM_CACHE[cache.activation](cache.act))
    dh, dw, db = linear_backward(dh, c_mproj); put("mlp.c_proj", dw, db)
    (dh,) = act_backward(dh, cache.act)
    dh, dw, db = linear_backward(dh, cache.c_fc); put("mlp.c_fc", dw, db)
    dh, dw, db = _norm_backward(dh, cache.ln_2); put("ln_2", dw, db)
    dh += dout  # residual fan-in (dh is fresh, dout is not ours)
    dx_mid = dh

    da = dx_mid
    if cache.attn_dropout is not None:
        (da,) = dropout_backward(da, cache.attn_dropout)
    da, dw, db = linear_backward(da, cache.attn_c_proj); put("attn.c_proj", dw, db)
    dqkv, *dqk_norm = attention_backward(da, cache.attention)
    if dqk_norm:  # QK-norm's gains
        grads["attn.q_norm.weight"], grads["attn.k_norm.weight"] = dqk_norm
    dh, dw, db = linear_backward(dqkv, cache.c_attn); put("attn.c_attn", dw, db)
    dh, dw, db = _norm_backward(dh, cache.ln_1); put("ln_1", dw, db)
    dh += dx_mid  # residual fan-in
    return dh, grads
