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
from typing import NamedTuple

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
# Causal multi-head self-attention (all heads in one batched computation)
# --------------------------------------------------------------------------------------------

def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, C) -> (B, nh, T, hs): head j owns channels [j*hs, (j+1)*hs)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, nh, T, hs) -> (B, T, C): the inverse of split_heads."""
    B, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


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


class KVSlot(NamedTuple):
    """One layer's keys and values for decoding: the first `length` positions of k, v are filled.

    attention_forward writes the new positions' keys and values after them and attends over all.
    """
    k: np.ndarray  # (B, nh, block_size, hs)
    v: np.ndarray  # (B, nh, block_size, hs)
    length: int


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, nh, T, hs) as the scores see it (after QK-norm and RoPE, if any)
    k: np.ndarray  # (B, nh, T, hs)
    v: np.ndarray  # (B, nh, T, hs)
    att: np.ndarray  # (B, nh, T, T) the attention probabilities
    att_mask: np.ndarray | None  # their dropout mask, None without dropout
    scale: float  # 1 / sqrt(hs)
    q_norm: RMSNormCache | None = None  # QK-norm of q and of k; None without qk_norm
    k_norm: RMSNormCache | None = None
    q_rope: RopeCache | None = None  # RoPE of q and of k; None with learned positions
    k_rope: RopeCache | None = None


def attention_forward(qkv: np.ndarray, n_head: int, dropout_p: float = 0.0,
                      rng: np.random.Generator | None = None, mask: np.ndarray | None = None,
                      kv: KVSlot | None = None, q_norm: np.ndarray | None = None,
                      k_norm: np.ndarray | None = None, norm_eps: float = 1e-5, rope=None):
    """Causal self-attention on the fused qkv (B, T, 3C) -> y (B, T, C).

    att = softmax(q k^T / sqrt(hs) with the future masked to -inf); y = dropout(att) v, per head.
    Dropout (applied to att when dropout_p > 0) takes `mask` if given, else draws from `rng`.
    With `kv` (decoding) the T new keys and values are stored after the kv.length cached ones and
    the queries attend over all of them; the cache then serves no backward.
    The modern block (issue 11), between the head split and the scores: q_norm, k_norm (hs,)
    gains: QK-norm, rmsnorm_forward over hs with norm_eps; then rope (RopeAngles of the T new
    positions, from rope_angles): q and k rotated. Keys enter the KV cache normed and rotated.
    """
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))  # (B, nh, T, hs)
    c_qnorm = c_knorm = c_qrope = c_krope = None
    if q_norm is not None:  # QK-norm, before RoPE (Qwen3's order)
        q, c_qnorm = rmsnorm_forward(q, q_norm, norm_eps)
        k, c_knorm = rmsnorm_forward(k, k_norm, norm_eps)
    if rope is not None:
        q, c_qrope = rope_forward(q, rope.cos, rope.sin)
        k, c_krope = rope_forward(k, rope.cos, rope.sin)
    if kv is not None:
        end = kv.length + q.shape[2]
        kv.k[:, :, kv.length:end] = k
        kv.v[:, :, kv.length:end] = v
        k, v = kv.k[:, :, :end], kv.v[:, :, :end]  # (B, nh, Tk, hs), every position so far
    scale = 1.0 / math.sqrt(C // n_head)
    att = attention_probs(q, k, scale)  # (B, nh, T, Tk)
    att_mask = None
    att_used = att
    if dropout_p > 0.0 or mask is not None:
        att_used, drop_cache = dropout_forward(att, dropout_p, rng, mask)
        att_mask = drop_cache.mask
    y = merge_heads(att_used @ v)  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs) -> (B, T, C)
    return y, AttentionCache(q, k, v, att, att_mask, scale, c_qnorm, c_knorm, c_qrope, c_krope)


def attention_backward(dout: np.ndarray, cache: AttentionCache):
    """Gradient of the fused qkv, (B, T, 3C) = concat(dq, dk, dv) along channels.

    dV = A^T dY;  dA = dY V^T (through dropout);  dS = softmax_backward(dA);
    dQ = dS K * scale;  dK = dS^T Q * scale. Masked entries have A = 0, so they pass nothing back.
    With RoPE, dQ and dK are rotated back (rope_backward); with QK-norm they then go through
    rmsnorm_backward, and the result is (dqkv, dq_norm, dk_norm), the gains' gradients included.
    See docs/gradients.md#attention and docs/gradients.md#qk-norm.
    """
    q, k, v, att, att_mask, scale = cache.q, cache.k, cache.v, cache.att, cache.att_mask, cache.scale
    n_head = q.shape[1]
    dy = split_heads(dout, n_head)  # (B, nh, T, hs)
    att_used = att if att_mask is None else att * att_mask
    dv = att_used.transpose(0, 1, 3, 2) @ dy  # (B, nh, T, hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, nh, T, T)
    if att_mask is not None:
        datt = datt * att_mask
    (dscores,) = softmax_backward(datt, SoftmaxCache(att))  # (B, nh, T, T)
    dq = (dscores @ k) * scale  # (B, nh, T, hs)
    dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale  # (B, nh, T, hs)
    if cache.q_rope is not None:  # RoPE: the rotation by -angle
        (dq,) = rope_backward(dq, cache.q_rope)
        (dk,) = rope_backward(dk, cache.k_rope)
    if cache.q_norm is not None:  # QK-norm: rmsnorm_backward, and the gains' gradients
        dq, dq_norm = rmsnorm_backward(dq, cache.q_norm)
        dk, dk_norm = rmsnorm_backward(dk, cache.k_norm)
        dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # (B, T, 3C)
        return dqkv, dq_norm, dk_norm
    return (np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1),)


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
# The transformer block (a composite "sandwich" layer: its cache names the caches of its parts)
# --------------------------------------------------------------------------------------------

class BlockCache(NamedTuple):
    activation: str  # which of ACTIVATION_FUNCTIONS the MLP used
    ln_1: LayerNormCache | RMSNormCache
    c_attn: LinearCache  # h -> qkv (B, T, 3C)
    attention: AttentionCache
    attn_c_proj: LinearCache
    attn_dropout: DropoutCache | None  # on the attention branch, None without dropout
    ln_2: LayerNormCache | RMSNormCache
    c_fc: LinearCache  # h -> (B, T, H), (B, T, 2H) for swiglu
    act: ReluCache | GeluCache | GeluTanhCache | Relu2Cache | SwigluCache
    mlp_c_proj: LinearCache
    mlp_dropout: DropoutCache | None  # on the MLP branch


def block_forward(x: np.ndarray, p: dict, n_head: int, activation: str = "gelu",
                  dropout_p: float = 0.0, rng: np.random.Generator | None = None,
                  masks: list | None = None, kv: KVSlot | None = None, norm: str = "layernorm",
                  norm_eps: float = LAYERNORM_EPS, rope=None):
    """x = x + drop(c_proj(attn(ln_1(x)))); x = x + drop(mlp_c_proj(act(c_fc(ln_2(x))))).

    `p` holds this block's parameters under nanoGPT's local names ("ln_1.weight", "attn.c_attn.weight",
    ...; ".bias" entries optional). Dropout runs when dropout_p > 0 or masks are given; `masks` is
    [attention probabilities, attention residual, mlp residual]. `kv` (decoding, no dropout) is
    passed to attention_forward. Returns (out, BlockCache).
    The modern block: norm "layernorm" or "rmsnorm" (ln_1, ln_2, eps norm_eps); QK-norm when p has
    "attn.q_norm.weight"; rope (RopeAngles) for RoPE; activation "relu2" or "swiglu".
    """
    act_forward, _ = ACTIVATION_FUNCTIONS[activation]
    m_att, m_res1, m_res2 = masks if masks is not None else (None, None, None)
    use_dropout = dropout_p > 0.0 or masks is not None

    # attention branch
    h, c_ln1 = _norm_forward(x, p, "ln_1", norm, norm_eps)
    qkv, c_attn = linear_forward(h, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # (B, T, 3C)
    a, c_att = attention_forward(qkv, n_head, dropout_p, rng, m_att, kv, p.get("attn.q_norm.weight"),
                                 p.get("attn.k_norm.weight"), norm_eps, rope)  # (B, T, C)
    a, c_aproj = linear_forward(a, p["attn.c_proj.weight"], p.get("attn.c_proj.bias"))
    c_drop1 = None
    if use_dropout:
        a, c_drop1 = dropout_forward(a, dropout_p, rng, m_res1)
    x_mid = x + a  # residual

    # MLP branch
    h, c_ln2 = _norm_forward(x_mid, p, "ln_2", norm, norm_eps)
    h, c_fc = linear_forward(h, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"))  # (B, T, H) or (B, T, 2H)
    h, c_act = act_forward(h)  # (B, T, H)
    h, c_mproj = linear_forward(h, p["mlp.c_proj.weight"], p.get("mlp.c_proj.bias"))  # (B, T, C)
    c_drop2 = None
    if use_dropout:
        h, c_drop2 = dropout_forward(h, dropout_p, rng, m_res2)
    out = x_mid + h  # residual

    return out, BlockCache(activation, c_ln1, c_attn, c_att, c_aproj, c_drop1,
                           c_ln2, c_fc, c_act, c_mproj, c_drop2)


def block_dropout_masks(cache: BlockCache) -> list:
    """The three dropout masks a block_forward used (attention, attn residual, mlp residual)."""
    return [cache.attention.att_mask,
            None if cache.attn_dropout is None else cache.attn_dropout.mask,
            None if cache.mlp_dropout is None else cache.mlp_dropout.mask]


def block_backward(dout: np.ndarray, cache: BlockCache):
    """Returns (dx, grads): grads keyed by the block's local parameter names.

    The residual stream x -> x + f(x) splits the gradient: dx = dout + (df/dx)^T dout, so each
    branch's input gradient is added to the gradient flowing straight through.
    See docs/gradients.md#transformer-block and docs/gradients.md#residual-stream.
    """
    _, act_backward = ACTIVATION_FUNCTIONS[cache.activation]
    grads = {}

    def put(prefix, dw, db):
        grads[prefix + ".weight"] = dw
        if db is not None:
            grads[prefix + ".bias"] = db

    # MLP branch: out = x_mid + h
    dh = dout
    if cache.mlp_dropout is not None:
        (dh,) = dropout_backward(dh, cache.mlp_dropout)
    dh, dw, db = linear_backward(dh, cache.mlp_c_proj); put("mlp.c_proj", dw, db)
    (dh,) = act_backward(dh, cache.act)
    dh, dw, db = linear_backward(dh, cache.c_fc); put("mlp.c_fc", dw, db)
    dh, dw, db = _norm_backward(dh, cache.ln_2); put("ln_2", dw, db)
    dx_mid = dout + dh  # residual fan-in: straight path + MLP branch

    # attention branch: x_mid = x + a
    da = dx_mid
    if cache.attn_dropout is not None:
        (da,) = dropout_backward(da, cache.attn_dropout)
    da, dw, db = linear_backward(da, cache.attn_c_proj); put("attn.c_proj", dw, db)
    dqkv, *dqk_norm = attention_backward(da, cache.attention)
    if dqk_norm:  # QK-norm's gains
        grads["attn.q_norm.weight"], grads["attn.k_norm.weight"] = dqk_norm
    dh, dw, db = linear_backward(dqkv, cache.c_attn); put("attn.c_attn", dw, db)
    dh, dw, db = _norm_backward(dh, cache.ln_1); put("ln_1", dw, db)
    dx = dx_mid + dh  # residual fan-in
    return dx, grads


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
