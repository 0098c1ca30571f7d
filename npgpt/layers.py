"""Every layer of the GPT as a forward/backward pair of plain NumPy functions.

Dimension legend
    B  batch size            T  time (sequence length)     C  channels (n_embd)
    nh number of heads       hs head size (C // nh)        V  vocabulary size
    N  any number of leading positions (B*T, or B, T separately)

Conventions (as in CS231n and llm.c)
    name_forward(inputs..., params...) -> (out, cache)
    name_backward(dout, cache)         -> gradients of the inputs, then of the parameters,
                                          in the order of the forward's arguments.
    `dout` is the gradient of the loss with respect to `out`; `dx` the gradient w.r.t. `x`.
    A backward returns fresh arrays and never writes into `dout` or into its cache.
    Every cache is a NamedTuple whose fields name what the backward needs.
    Every backward's docstring states its result; docs/gradients.md derives it.

This is the reference: each line is the formula of docs/gradients.md. npgpt.fast has the same
functions, rewritten for speed, and is tested equal to these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
from scipy.special import erf  # the error function itself; every derivative below is ours

LAYERNORM_EPS = 1e-5


def _sum_to_last_axis(a: np.ndarray) -> np.ndarray:
    """Sum over every axis but the last: (..., K) -> (K,). Used for bias and norm gains."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


# --------------------------------------------------------------------------------------------
# Token + position embedding
# --------------------------------------------------------------------------------------------

class EmbeddingCache(NamedTuple):
    idx: np.ndarray  # (B, T) token ids
    wte_shape: tuple
    wpe_shape: tuple | None  # None: no position table (the bigram model)


def embedding_forward(idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray | None = None):
    """x[b, t] = wte[idx[b, t]] + wpe[t].   idx (B, T) int, wte (V, C), wpe (block_size, C) or None.

    With wpe None this is a plain lookup table (the bigram model).
    """
    B, T = idx.shape
    out = wte[idx]  # (B, T, C) gather
    if wpe is not None:
        out = out + wpe[:T]  # (T, C) broadcast over the batch
    return out, EmbeddingCache(idx, wte.shape, None if wpe is None else wpe.shape)


def embedding_backward(dout: np.ndarray, cache: EmbeddingCache):
    """dwte[v] = sum of dout[b, t] over every (b, t) with idx[b, t] == v;  dwpe[t] = sum_b dout[b, t].

    Returns (dwte, dwpe), dwpe None without wpe; idx is integer and has no gradient. A repeated id
    collects the sum of its rows (a scatter-add) by one one-hot matmul, not the slow np.add.at; BLAS
    adds them in its own order: equal to np.add.at's to rounding (bounds.reordered), not bit for bit.
    See docs/gradients.md#embedding.
    """
    B, T, C = dout.shape
    V = cache.wte_shape[0]
    one_hot = np.zeros((B * T, V), dtype=dout.dtype)  # (B*T, V)
    one_hot[np.arange(B * T), cache.idx.reshape(-1)] = 1.0
    dwte = one_hot.T @ dout.reshape(B * T, C)  # (V, B*T) @ (B*T, C) -> (V, C)
    if cache.wpe_shape is None:
        return dwte, None
    dwpe = np.zeros(cache.wpe_shape, dtype=dout.dtype)  # positions >= T got no gradient
    dwpe[:T] = dout.sum(axis=0)  # (T, C)
    return dwte, dwpe


# --------------------------------------------------------------------------------------------
# Linear (nn.Linear layout: w is (out, in))
# --------------------------------------------------------------------------------------------

class LinearCache(NamedTuple):
    x: np.ndarray  # (..., in) the input
    w: np.ndarray  # (out, in)
    has_bias: bool


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None):
    """out = x @ w.T + b.   x (..., in), w (out, in), b (out,) or None -> out (..., out)."""
    out = x @ w.T  # (..., in) @ (in, out) -> (..., out)
    if b is not None:
        out = out + b
    return out, LinearCache(x, w, b is not None)


def linear_backward(dout: np.ndarray, cache: LinearCache):
    """dx = dout @ w;  dw = dout^T x (summed over positions);  db = dout summed over positions.

    Returns (dx, dw, db); db is None when the forward had no bias. See docs/gradients.md#linear.
    """
    x, w = cache.x, cache.w
    dx = dout @ w  # (..., out) @ (out, in) -> (..., in)
    dout2d = dout.reshape(-1, dout.shape[-1])  # (N, out)
    dw = dout2d.T @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in) -> (out, in)
    db = dout2d.sum(axis=0) if cache.has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Layer normalisation over the last axis
# --------------------------------------------------------------------------------------------

class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) the normalised input
    rstd: np.ndarray  # (..., 1) 1 / sqrt(var + eps)
    w: np.ndarray  # (C,) the gain
    has_bias: bool


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                      eps: float = LAYERNORM_EPS):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis (biased var)."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * w
    if b is not None:
        out = out + b
    return out, LayerNormCache(xhat, rstd, w, b is not None)


def layernorm_backward(dout: np.ndarray, cache: LayerNormCache):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w;  dw = sum dout*xhat.

    The two mean terms are the paths through the mean and the variance, which both depend on
    every x in the row. Returns (dx, dw, db). See docs/gradients.md#layernorm.
    """
    xhat, rstd = cache.xhat, cache.rstd
    g = dout * cache.w  # (..., C) gradient w.r.t. xhat
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = _sum_to_last_axis(dout * xhat)
    db = _sum_to_last_axis(dout) if cache.has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

class ReluCache(NamedTuple):
    positive: np.ndarray  # bool, x > 0


def relu_forward(x: np.ndarray):
    """out = max(x, 0)."""
    return np.maximum(x, 0), ReluCache(x > 0)


def relu_backward(dout: np.ndarray, cache: ReluCache):
    """dx = dout where x > 0, else 0 (torch's convention: the kink at 0 gets gradient 0).

    See docs/gradients.md#relu.
    """
    return (np.where(cache.positive, dout, 0),)


class GeluCache(NamedTuple):
    x: np.ndarray
    phi: np.ndarray  # Phi(x), the standard normal CDF


def gelu_forward(x: np.ndarray):
    """Exact GELU: out = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 (nn.GELU())."""
    phi = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))  # standard normal CDF
    return x * phi, GeluCache(x, phi)


def gelu_backward(dout: np.ndarray, cache: GeluCache):
    """dx = dout * (Phi(x) + x * pdf(x)), pdf(x) = exp(-x^2 / 2) / sqrt(2 pi).

    In the code `phi` is the CDF Phi and `pdf` its derivative. See docs/gradients.md#gelu.
    """
    x, phi = cache.x, cache.phi
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return (dout * (phi + x * pdf),)


_GELU_TANH_K = math.sqrt(2.0 / math.pi)


class GeluTanhCache(NamedTuple):
    x: np.ndarray
    th: np.ndarray  # tanh(u), u = sqrt(2/pi) * (x + 0.044715 x^3)


def gelu_tanh_forward(x: np.ndarray):
    """GPT-2's GELU: out = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3)."""
    th = np.tanh(_GELU_TANH_K * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1.0 + th), GeluTanhCache(x, th)


def gelu_tanh_backward(dout: np.ndarray, cache: GeluTanhCache):
    """dx = dout * (1/2 (1 + tanh u) + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3*0.044715 x^2)).

    See docs/gradients.md#tanh-gelu.
    """
    x, th = cache.x, cache.th
    du_dx = _GELU_TANH_K * (1.0 + 3 * 0.044715 * x * x)
    return (dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du_dx),)


ACTIVATION_FUNCTIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
}


# --------------------------------------------------------------------------------------------
# Dropout (inverted: kept activations are scaled by 1 / (1 - p) during training)
# --------------------------------------------------------------------------------------------

class DropoutCache(NamedTuple):
    mask: np.ndarray  # 0 where dropped, 1 / (1 - p) where kept


def dropout_mask(shape, p: float, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """A mask of values keep / (1 - p): 0 with probability p, else 1 / (1 - p)."""
    dtype = np.dtype(dtype)
    keep = rng.random(shape) >= p
    return keep.astype(dtype) / dtype.type(1.0 - p)


def dropout_forward(x: np.ndarray, p: float, rng: np.random.Generator | None = None,
                    mask: np.ndarray | None = None):
    """out = x * mask. The mask is given explicitly, or drawn from `rng` (reproducible)."""
    if mask is None:
        if rng is None:
            raise ValueError("dropout_forward needs either rng or mask")
        mask = dropout_mask(x.shape, p, rng, x.dtype)
    return x * mask, DropoutCache(mask)


def dropout_backward(dout: np.ndarray, cache: DropoutCache):
    """dx = dout * mask: dropped units pass no gradient, kept ones are scaled by 1 / (1 - p).

    See docs/gradients.md#dropout.
    """
    return (dout * cache.mask,)


# --------------------------------------------------------------------------------------------
# Softmax over the last axis
# --------------------------------------------------------------------------------------------

class SoftmaxCache(NamedTuple):
    y: np.ndarray  # the output


def softmax_forward(x: np.ndarray):
    """out = exp(x - max x) / sum exp(x - max x): subtracting the row max avoids overflow."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, SoftmaxCache(y)


def softmax_backward(dout: np.ndarray, cache: SoftmaxCache):
    """dx = y * (dout - sum(dout * y)): the Jacobian diag(y) - y y^T applied without forming it.

    See docs/gradients.md#softmax.
    """
    y = cache.y
    return (y * (dout - (dout * y).sum(axis=-1, keepdims=True)),)



# --------------------------------------------------------------------------------------------
# Causal self-attention: the head split, the attention core, the KV slot, all heads batched
# --------------------------------------------------------------------------------------------
# The block chains these with QK-norm (rmsnorm_forward over hs) and RoPE (rope_forward) between
# the split and the core: split_qkv, [q_norm, k_norm], [rope], [kv_append], causal_attention, merge_heads.

def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, C) -> (B, nh, T, hs): head j owns channels [j*hs, (j+1)*hs). A view."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, nh, T, hs) -> (B, T, C): the inverse of split_heads."""
    B, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


def split_qkv(qkv: np.ndarray, n_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fused qkv (B, T, 3C) -> q, k, v, each (B, nh, T, hs), views of it."""
    return tuple(split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))


def merge_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The inverse of split_qkv: q, k, v (B, nh, T, hs) -> (B, T, 3C). The backward uses it for dq, dk, dv."""
    return np.concatenate([merge_heads(q), merge_heads(k), merge_heads(v)], axis=-1)


def causal_mask(T_query: int, T_key: int) -> np.ndarray:
    """(Tq, Tk) boolean, True where query i may NOT see key j (j in its future).

    Queries are the last Tq positions of the Tk keys, so query i sits at position Tk - Tq + i.
    """
    offset = T_key - T_query
    return np.triu(np.ones((T_query, T_key), dtype=bool), k=1 + offset)


def attention_probs(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q k^T * scale) with the future masked: q (B, nh, Tq, hs), k (B, nh, Tk, hs).

    The Tq queries are the last Tq of the Tk positions (Tq < Tk when keys come from a KV cache).
    """
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, nh, Tq, Tk)
    scores = np.where(causal_mask(q.shape[2], k.shape[2]), -np.inf, scores)  # exp(-inf) = 0
    att, _ = softmax_forward(scores)
    return att


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, nh, T, hs) as the scores see it (after QK-norm and RoPE, if any)
    k: np.ndarray  # (B, nh, T, hs)
    v: np.ndarray  # (B, nh, T, hs)
    att: np.ndarray  # (B, nh, T, T) the attention probabilities
    att_mask: np.ndarray | None  # their dropout mask, None without dropout
    scale: float  # 1 / sqrt(hs)


def causal_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, dropout_p: float = 0.0,
                             rng: np.random.Generator | None = None, mask: np.ndarray | None = None):
    """y = dropout(att) v, att = softmax(q k^T / sqrt(hs) with the future masked to -inf), per head.

    q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> y (B, nh, Tq, hs); Tq < Tk when decoding with a
    KV cache. Dropout on att runs when dropout_p > 0 or `mask` is given (else drawn from `rng`).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = attention_probs(q, k, scale)  # (B, nh, Tq, Tk)
    att_used, att_mask = att, None
    if dropout_p > 0.0 or mask is not None:
        att_used, c_drop = dropout_forward(att, dropout_p, rng, mask)
        att_mask = c_drop.mask
    y = att_used @ v  # (B, nh, Tq, Tk) @ (B, nh, Tk, hs) -> (B, nh, Tq, hs)
    return y, AttentionCache(q, k, v, att, att_mask, scale)


def causal_attention_backward(dout: np.ndarray, cache: AttentionCache):
    """dV = A^T dY;  dA = dY V^T (through dropout);  dS = softmax_backward(dA);
    dQ = dS K * scale;  dK = dS^T Q * scale. Masked entries have A = 0, so they pass nothing back.

    Returns (dq, dk, dv), each (B, nh, T, hs). See docs/gradients.md#attention.
    """
    q, k, v, att, att_mask, scale = cache
    att_used = att if att_mask is None else att * att_mask
    dv = att_used.transpose(0, 1, 3, 2) @ dout  # (B, nh, T, hs)
    datt = dout @ v.transpose(0, 1, 3, 2)  # (B, nh, T, T)
    if att_mask is not None:
        datt = datt * att_mask
    (dscores,) = softmax_backward(datt, SoftmaxCache(att))  # (B, nh, T, T)
    dq = (dscores @ k) * scale  # (B, nh, T, hs)
    dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale  # (B, nh, T, hs)
    return dq, dk, dv


class KVSlot(NamedTuple):
    """One layer's keys and values for decoding: the first `length` positions of k, v are filled."""
    k: np.ndarray  # (B, nh, block_size, hs)
    v: np.ndarray  # (B, nh, block_size, hs)
    length: int


def kv_append(slot: KVSlot, k: np.ndarray, v: np.ndarray):
    """Store the T new keys and values k, v (B, nh, T, hs) after the slot's `length` cached ones.

    Returns the keys and values of every position so far, (B, nh, length + T, hs) views of the
    slot. Decoding only: nothing here has a backward.
    """
    end = slot.length + k.shape[2]
    slot.k[:, :, slot.length:end] = k
    slot.v[:, :, slot.length:end] = v
    return slot.k[:, :, :end], slot.v[:, :, :end]


# --------------------------------------------------------------------------------------------
# Cross-entropy fused with softmax, mean over all positions
# --------------------------------------------------------------------------------------------

class CrossEntropyCache(NamedTuple):
    probs: np.ndarray  # (N, V) softmax of the logits
    targets: np.ndarray  # (N,)
    logits_shape: tuple


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray):
    """loss = mean over the N = B*T positions of -log softmax(logits)[target]."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)  # (N, V)
    t = targets.reshape(-1)  # (N,)
    shifted = flat - flat.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))  # (N,) log of the partition function
    rows = np.arange(flat.shape[0])
    loss = (log_z - shifted[rows, t]).mean()
    probs = np.exp(shifted - log_z[:, None])  # (N, V) softmax, kept for the backward
    return loss, CrossEntropyCache(probs, t, logits.shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """dlogits = (softmax(logits) - onehot(target)) / N * dloss.  Returns (dlogits,).

    See docs/gradients.md#cross-entropy.
    """
    probs, t = cache.probs, cache.targets
    n = probs.shape[0]
    one_hot = np.zeros_like(probs)  # (N, V)
    one_hot[np.arange(n), t] = 1.0
    dlogits = (probs - one_hot) * probs.dtype.type(dloss / n)
    return (dlogits.reshape(cache.logits_shape),)


# --------------------------------------------------------------------------------------------
# The modern block: RMSNorm, rotary position embeddings (RoPE), ReLU², SwiGLU
# --------------------------------------------------------------------------------------------
# Plain formulas, one expression per line, each cache a NamedTuple. QK-norm is rmsnorm_forward
# applied over hs to q and to k of every head, so it has no pair of its own.


RMSNORM_EPS = 1e-5  # GPTConfig.norm_eps's default


class RMSNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) x * rstd
    rstd: np.ndarray  # (..., 1) 1 / sqrt(mean(x^2) + eps)
    w: np.ndarray  # (C,) the gain


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float = RMSNORM_EPS):
    """out = x / sqrt(mean(x^2) + eps) * w over the last axis. x (..., C), w (C,). No bias."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / np.sqrt(mean_square + eps)  # (..., 1)
    xhat = x * rstd  # (..., C)
    out = xhat * w  # (..., C)
    return out, RMSNormCache(xhat, rstd, w)


def rmsnorm_backward(dout: np.ndarray, cache: RMSNormCache):
    """dx = rstd * (g - xhat * mean(g * xhat)) with g = dout * w;  dw = sum over rows of dout * xhat.

    One mean term where layernorm has two: there is no mean subtracted, only the scale path.
    Returns (dx, dw). See docs/gradients.md#rmsnorm.
    """
    g = dout * cache.w  # (..., C) gradient w.r.t. xhat
    mean_gx = np.mean(g * cache.xhat, axis=-1, keepdims=True)  # (..., 1)
    dx = cache.rstd * (g - cache.xhat * mean_gx)
    dw = _sum_to_last_axis(dout * cache.xhat)
    return dx, dw


class RopeAngles(NamedTuple):
    cos: np.ndarray  # (T, hs) cos(angle[t]), angle duplicated to both halves
    sin: np.ndarray  # (T, hs)


def rope_angles(T: int, head_size: int, theta: float = 10000.0, offset: int = 0,
                dtype=np.float64) -> RopeAngles:
    """cos and sin (T, hs) of the rotation angles of positions offset .. offset + T - 1.

    inv_freq[i] = theta ** (-2i / hs) for i < hs/2;  angle[t] = t * inv_freq, duplicated to hs
    (cat(angle, angle), HF Llama's rotate-half layout). Computed in float64, then cast to dtype.
    """
    inv_freq = theta ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size)  # (hs/2,)
    positions = np.arange(offset, offset + T, dtype=np.float64)  # (T,)
    angle = np.outer(positions, inv_freq)  # (T, hs/2)
    angle = np.concatenate([angle, angle], axis=-1)  # (T, hs)
    return RopeAngles(np.cos(angle).astype(dtype), np.sin(angle).astype(dtype))


def rotate_half(x: np.ndarray) -> np.ndarray:
    """cat(-x[..., hs/2:], x[..., :hs/2]): turns each pair (x_i, x_{i+hs/2}) by +90 degrees."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RopeCache(NamedTuple):
    cos: np.ndarray  # (T, hs)
    sin: np.ndarray  # (T, hs)


def rope_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """out = x * cos + rotate_half(x) * sin.  x (B, nh, T, hs), cos and sin (T, hs) from rope_angles.

    Each pair (x_i, x_{i+hs/2}) at position t is rotated by angle[t, i].
    """
    out = x * cos + rotate_half(x) * sin  # (B, nh, T, hs)
    return out, RopeCache(cos, sin)


def rope_backward(dout: np.ndarray, cache: RopeCache):
    """dx = dout * cos - rotate_half(dout) * sin: the rotation by -angle (a rotation's transpose
    is its inverse). Returns (dx,); cos and sin are constants. See docs/gradients.md#rope.
    """
    dx = dout * cache.cos - rotate_half(dout) * cache.sin
    return (dx,)


class Relu2Cache(NamedTuple):
    relu_x: np.ndarray  # max(x, 0)


def relu2_forward(x: np.ndarray):
    """out = relu(x)^2 (the "squared ReLU" of Primer and the nanoGPT speedruns)."""
    relu_x = np.maximum(x, 0)
    out = relu_x * relu_x
    return out, Relu2Cache(relu_x)


def relu2_backward(dout: np.ndarray, cache: Relu2Cache):
    """dx = dout * 2 relu(x): continuous at 0, so no kink convention is needed.

    Returns (dx,). See docs/gradients.md#squared-relu.
    """
    dx = dout * 2.0 * cache.relu_x
    return (dx,)


class SwigluCache(NamedTuple):
    gate: np.ndarray  # (..., H) the first half of the input
    up: np.ndarray  # (..., H) the second half
    sig: np.ndarray  # (..., H) sigmoid(gate)


def swiglu_forward(x: np.ndarray):
    """out = silu(gate) * up with gate, up = x[..., :H], x[..., H:].  x (..., 2H) -> (..., H).

    silu(g) = g * sigmoid(g). sigmoid(g) = (1 + tanh(g / 2)) / 2 is the same function as
    1 / (1 + exp(-g)) but cannot overflow.
    """
    H = x.shape[-1] // 2
    gate = x[..., :H]  # (..., H)
    up = x[..., H:]  # (..., H)
    sig = 0.5 * (1.0 + np.tanh(0.5 * gate))  # (..., H)
    out = gate * sig * up  # (..., H)
    return out, SwigluCache(gate, up, sig)


def swiglu_backward(dout: np.ndarray, cache: SwigluCache):
    """dgate = dout * up * silu'(gate), silu'(g) = sig * (1 + g * (1 - sig));  dup = dout * silu(gate).

    The product rule on silu(gate) * up; dx = cat(dgate, dup) (..., 2H). Returns (dx,).
    See docs/gradients.md#swiglu.
    """
    gate, up, sig = cache
    dsilu = sig * (1.0 + gate * (1.0 - sig))  # (..., H) d silu / d gate
    dgate = dout * up * dsilu
    dup = dout * gate * sig
    dx = np.concatenate([dgate, dup], axis=-1)  # (..., 2H)
    return (dx,)


ACTIVATION_FUNCTIONS["relu2"] = (relu2_forward, relu2_backward)
ACTIVATION_FUNCTIONS["swiglu"] = (swiglu_forward, swiglu_backward)


# --------------------------------------------------------------------------------------------
# The layer set: the pairs the block and the model compose
# --------------------------------------------------------------------------------------------

def residual(x: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """x + branch: the residual stream's sum. Its backward hands dout to both terms."""
    return x + branch


@dataclass
class LayerSet:
    """Every pair block_forward and npgpt.GPT call, by the name they call it. REFERENCE holds this
    module's functions; npgpt.fast.layers.FAST is a copy with some of them replaced."""
    embedding_forward: Callable
    embedding_backward: Callable
    linear_forward: Callable
    linear_backward: Callable
    layernorm_forward: Callable
    layernorm_backward: Callable
    activations: dict  # name -> (forward, backward), as ACTIVATION_FUNCTIONS
    dropout_forward: Callable
    dropout_backward: Callable
    split_heads: Callable
    merge_heads: Callable
    split_qkv: Callable
    merge_qkv: Callable
    causal_attention_forward: Callable
    causal_attention_backward: Callable
    kv_append: Callable
    cross_entropy_forward: Callable
    cross_entropy_backward: Callable
    rmsnorm_forward: Callable
    rmsnorm_backward: Callable
    rope_forward: Callable
    rope_backward: Callable
    residual: Callable
    # activation name -> its output rebuilt from its cache. An activation listed here lets the
    # block drop the MLP's hidden activation (B, T, H) after the forward and rebuild it in the
    # backward; the reference keeps it (empty).
    activation_output_from_cache: dict = field(default_factory=dict)


REFERENCE = LayerSet(
    embedding_forward, embedding_backward, linear_forward, linear_backward,
    layernorm_forward, layernorm_backward, ACTIVATION_FUNCTIONS, dropout_forward, dropout_backward,
    split_heads, merge_heads, split_qkv, merge_qkv, causal_attention_forward, causal_attention_backward,
    kv_append, cross_entropy_forward, cross_entropy_backward, rmsnorm_forward, rmsnorm_backward,
    rope_forward, rope_backward, residual)


# --------------------------------------------------------------------------------------------
# Compositions over a layer set: the lecture's attention, the norms, the transformer block
# --------------------------------------------------------------------------------------------

def attention_forward(qkv: np.ndarray, n_head: int, dropout_p: float = 0.0,
                      rng: np.random.Generator | None = None, mask: np.ndarray | None = None,
                      layers: LayerSet = REFERENCE):
    """The lecture's attention on the fused qkv (B, T, 3C) -> y (B, T, C): split_qkv,
    causal_attention_forward, merge_heads. Returns (y, AttentionCache)."""
    q, k, v = layers.split_qkv(qkv, n_head)  # 3 x (B, nh, T, hs)
    y, cache = layers.causal_attention_forward(q, k, v, dropout_p, rng, mask)  # (B, nh, T, hs)
    return layers.merge_heads(y), cache  # (B, T, C)


def attention_backward(dout: np.ndarray, cache: AttentionCache, layers: LayerSet = REFERENCE):
    """(dqkv,), the gradient of the fused qkv (B, T, 3C): attention_forward's steps reversed.
    See docs/gradients.md#attention."""
    dy = layers.split_heads(dout, cache.q.shape[1])  # (B, nh, T, hs)
    dq, dk, dv = layers.causal_attention_backward(dy, cache)
    return (layers.merge_qkv(dq, dk, dv),)  # (B, T, 3C)


class BlockOptions(NamedTuple):
    """What a block's forward needs besides its input and parameters, set per call."""
    n_head: int
    activation: str = "gelu"  # a key of ACTIVATION_FUNCTIONS
    dropout_p: float = 0.0  # dropout runs when > 0 or when block_forward gets masks
    rng: np.random.Generator | None = None  # draws the dropout masks not given
    norm: str = "layernorm"  # ln_1, ln_2 (and the model's ln_f): "layernorm" or "rmsnorm"
    norm_eps: float = LAYERNORM_EPS  # every norm's eps, QK-norm's too
    rope: RopeAngles | None = None  # RoPE's cos, sin (T, hs) of the T positions; None: no RoPE

    @classmethod
    def of(cls, config, dropout_p: float = 0.0, rng: np.random.Generator | None = None,
           rope: RopeAngles | None = None) -> "BlockOptions":
        """The options a GPTConfig sets, with this call's dropout and RoPE angles."""
        return cls(config.n_head, config.activation, dropout_p, rng, config.norm, config.norm_eps, rope)


def norm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, options: BlockOptions,
                 layers: LayerSet = REFERENCE):
    """ln_1, ln_2, ln_f: layernorm_forward (with bias b if given) or rmsnorm_forward, by options.norm."""
    if options.norm == "rmsnorm":
        return layers.rmsnorm_forward(x, w, options.norm_eps)
    return layers.layernorm_forward(x, w, b, options.norm_eps)


def norm_backward(dout: np.ndarray, cache: LayerNormCache | RMSNormCache, layers: LayerSet = REFERENCE):
    """(dx, dw, db) of either norm, chosen by its cache; db is None for RMSNorm (no bias).
    See docs/gradients.md#layernorm and docs/gradients.md#rmsnorm."""
    if isinstance(cache, RMSNormCache):
        return (*layers.rmsnorm_backward(dout, cache), None)
    return layers.layernorm_backward(dout, cache)


class BlockCache(NamedTuple):
    layers: LayerSet  # the pairs the forward ran; the backward runs the same
    activation: str  # which of ACTIVATION_FUNCTIONS the MLP used
    ln_1: LayerNormCache | RMSNormCache
    c_attn: LinearCache  # h -> qkv (B, T, 3C)
    q_norm: RMSNormCache | None  # QK-norm of q and of k; None without it
    k_norm: RMSNormCache | None
    q_rope: RopeCache | None  # RoPE of q and of k; None with learned positions
    k_rope: RopeCache | None
    attention: AttentionCache
    attn_c_proj: LinearCache
    attn_dropout: DropoutCache | None  # on the attention branch, None without dropout
    ln_2: LayerNormCache | RMSNormCache
    c_fc: LinearCache  # h -> (B, T, H), (B, T, 2H) for swiglu
    act: ReluCache | GeluCache | GeluTanhCache | Relu2Cache | SwigluCache
    mlp_c_proj: LinearCache  # its x is None when the layer set rebuilds it from `act`
    mlp_dropout: DropoutCache | None  # on the MLP branch


def block_forward(x: np.ndarray, p: dict, options: BlockOptions, masks: list | None = None,
                  kv: KVSlot | None = None, layers: LayerSet = REFERENCE):
    """x = x + drop(c_proj(attn(ln_1(x)))); x = x + drop(mlp_c_proj(act(c_fc(ln_2(x))))).

    `p` holds this block's parameters under nanoGPT's local names ("ln_1.weight", "attn.c_attn.weight",
    ...; ".bias" entries optional; QK-norm when it has "attn.q_norm.weight"). `masks` is [attention
    probabilities, attention residual, mlp residual] (dropout runs with them, or when
    options.dropout_p > 0). With `kv` (decoding, no dropout) the new keys and values join the slot
    and the queries attend over all of them; the cache then serves no backward.
    Returns (out, BlockCache). See docs/gradients.md#transformer-block.
    """
    L, o, n_head = layers, options, options.n_head
    act_forward, _ = L.activations[o.activation]
    m_att, m_res1, m_res2 = masks if masks is not None else (None, None, None)
    dropout = o.dropout_p > 0.0 or masks is not None
    qk_norm = "attn.q_norm.weight" in p

    # attention branch
    h, c_ln1 = norm_forward(x, p["ln_1.weight"], p.get("ln_1.bias"), o, L)  # (B, T, C)
    qkv, c_attn = L.linear_forward(h, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # (B, T, 3C)
    q, k, v = L.split_qkv(qkv, n_head)  # 3 x (B, nh, T, hs)
    q, c_qnorm = L.rmsnorm_forward(q, p["attn.q_norm.weight"], o.norm_eps) if qk_norm else (q, None)
    k, c_knorm = L.rmsnorm_forward(k, p["attn.k_norm.weight"], o.norm_eps) if qk_norm else (k, None)
    q, c_qrope = L.rope_forward(q, *o.rope) if o.rope is not None else (q, None)
    k, c_krope = L.rope_forward(k, *o.rope) if o.rope is not None else (k, None)
    k, v = L.kv_append(kv, k, v) if kv is not None else (k, v)  # (B, nh, Tk, hs), keys normed and rotated
    y, c_att = L.causal_attention_forward(q, k, v, o.dropout_p, o.rng, m_att)  # (B, nh, T, hs)
    a = L.merge_heads(y)  # (B, T, C)
    a, c_aproj = L.linear_forward(a, p["attn.c_proj.weight"], p.get("attn.c_proj.bias"))
    a, c_drop1 = L.dropout_forward(a, o.dropout_p, o.rng, m_res1) if dropout else (a, None)
    x_mid = L.residual(x, a)

    # MLP branch
    h, c_ln2 = norm_forward(x_mid, p["ln_2.weight"], p.get("ln_2.bias"), o, L)
    h, c_fc = L.linear_forward(h, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"))  # (B, T, H) or (B, T, 2H)
    h, c_act = act_forward(h)  # (B, T, H)
    h, c_mproj = L.linear_forward(h, p["mlp.c_proj.weight"], p.get("mlp.c_proj.bias"))  # (B, T, C)
    if o.activation in L.activation_output_from_cache:  # keep c_act only: saves (B, T, H)
        c_mproj = c_mproj._replace(x=None)
    h, c_drop2 = L.dropout_forward(h, o.dropout_p, o.rng, m_res2) if dropout else (h, None)
    out = L.residual(x_mid, h)

    return out, BlockCache(L, o.activation, c_ln1, c_attn, c_qnorm, c_knorm, c_qrope, c_krope, c_att,
                           c_aproj, c_drop1, c_ln2, c_fc, c_act, c_mproj, c_drop2)


def block_dropout_masks(cache: BlockCache) -> list:
    """The three dropout masks a block_forward used (attention, attn residual, mlp residual)."""
    return [cache.attention.att_mask,
            None if cache.attn_dropout is None else cache.attn_dropout.mask,
            None if cache.mlp_dropout is None else cache.mlp_dropout.mask]


def block_backward(dout: np.ndarray, cache: BlockCache):
    """Returns (dx, grads): grads keyed by the block's local parameter names.

    block_forward's steps in reverse. The residual stream x -> x + f(x) splits the gradient:
    dx = dout + (df/dx)^T dout, so each branch's input gradient is added to the gradient flowing
    straight through. See docs/gradients.md#transformer-block and docs/gradients.md#residual-stream.
    """
    L, c = cache.layers, cache
    _, act_backward = L.activations[c.activation]
    n_head = c.attention.q.shape[1]
    grads = {}

    def put(prefix, dw, db=None):
        if dw is not None:
            grads[prefix + ".weight"] = dw
        if db is not None:
            grads[prefix + ".bias"] = db

    # MLP branch: out = x_mid + h
    (dh,) = L.dropout_backward(dout, c.mlp_dropout) if c.mlp_dropout is not None else (dout,)
    c_mproj = c.mlp_c_proj if c.mlp_c_proj.x is not None else c.mlp_c_proj._replace(
        x=L.activation_output_from_cache[c.activation](c.act))  # the dropped activation, rebuilt
    dh, dw, db = L.linear_backward(dh, c_mproj); put("mlp.c_proj", dw, db)
    (dh,) = act_backward(dh, c.act)
    dh, dw, db = L.linear_backward(dh, c.c_fc); put("mlp.c_fc", dw, db)
    dh, dw, db = norm_backward(dh, c.ln_2, L); put("ln_2", dw, db)
    dx_mid = L.residual(dout, dh)  # residual fan-in: straight path + MLP branch

    # attention branch: x_mid = x + a
    (da,) = L.dropout_backward(dx_mid, c.attn_dropout) if c.attn_dropout is not None else (dx_mid,)
    da, dw, db = L.linear_backward(da, c.attn_c_proj); put("attn.c_proj", dw, db)
    dy = L.split_heads(da, n_head)  # (B, nh, T, hs)
    dq, dk, dv = L.causal_attention_backward(dy, c.attention)
    (dk,) = L.rope_backward(dk, c.k_rope) if c.k_rope is not None else (dk,)
    (dq,) = L.rope_backward(dq, c.q_rope) if c.q_rope is not None else (dq,)
    dk, dw = L.rmsnorm_backward(dk, c.k_norm) if c.k_norm is not None else (dk, None); put("attn.k_norm", dw)
    dq, dw = L.rmsnorm_backward(dq, c.q_norm) if c.q_norm is not None else (dq, None); put("attn.q_norm", dw)
    dqkv = L.merge_qkv(dq, dk, dv)  # (B, T, 3C)
    dh, dw, db = L.linear_backward(dqkv, c.c_attn); put("attn.c_attn", dw, db)
    dh, dw, db = norm_backward(dh, c.ln_1, L); put("ln_1", dw, db)
    dx = L.residual(dx_mid, dh)  # residual fan-in
    return dx, grads
