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

    Returns (dwte, dwpe), dwpe None without wpe; idx is integer and has no gradient. A token id
    that appears many times collects the sum of all its rows (a scatter-add), written here as one
    matmul with the one-hot matrix, which is exact and avoids the slow np.add.at.
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
    q: np.ndarray  # (B, nh, T, hs)
    k: np.ndarray  # (B, nh, T, hs)
    v: np.ndarray  # (B, nh, T, hs)
    att: np.ndarray  # (B, nh, T, T) the attention probabilities
    att_mask: np.ndarray | None  # their dropout mask, None without dropout
    scale: float  # 1 / sqrt(hs)


def attention_forward(qkv: np.ndarray, n_head: int, dropout_p: float = 0.0,
                      rng: np.random.Generator | None = None, mask: np.ndarray | None = None,
                      kv: KVSlot | None = None):
    """Causal self-attention on the fused qkv (B, T, 3C) -> y (B, T, C).

    att = softmax(q k^T / sqrt(hs) with the future masked to -inf); y = dropout(att) v, per head.
    Dropout (applied to att when dropout_p > 0) takes `mask` if given, else draws from `rng`.
    With `kv` (decoding) the T new keys and values are stored after the kv.length cached ones and
    the queries attend over all of them; the cache then serves no backward.
    """
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))  # (B, nh, T, hs)
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
    return y, AttentionCache(q, k, v, att, att_mask, scale)


def attention_backward(dout: np.ndarray, cache: AttentionCache):
    """Gradient of the fused qkv, (B, T, 3C) = concat(dq, dk, dv) along channels.

    dV = A^T dY;  dA = dY V^T (through dropout);  dS = softmax_backward(dA);
    dQ = dS K * scale;  dK = dS^T Q * scale. Masked entries have A = 0, so they pass nothing back.
    See docs/gradients.md#attention.
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
    ln_1: LayerNormCache
    c_attn: LinearCache  # h -> qkv (B, T, 3C)
    attention: AttentionCache
    attn_c_proj: LinearCache
    attn_dropout: DropoutCache | None  # on the attention branch, None without dropout
    ln_2: LayerNormCache
    c_fc: LinearCache  # h -> (B, T, 4C)
    act: ReluCache | GeluCache | GeluTanhCache
    mlp_c_proj: LinearCache
    mlp_dropout: DropoutCache | None  # on the MLP branch


def block_forward(x: np.ndarray, p: dict, n_head: int, activation: str = "gelu",
                  dropout_p: float = 0.0, rng: np.random.Generator | None = None,
                  masks: list | None = None, kv: KVSlot | None = None):
    """x = x + drop(c_proj(attn(ln_1(x)))); x = x + drop(mlp_c_proj(act(c_fc(ln_2(x))))).

    `p` holds this block's parameters under nanoGPT's local names ("ln_1.weight", "attn.c_attn.weight",
    ...; ".bias" entries optional). Dropout runs when dropout_p > 0 or masks are given; `masks` is
    [attention probabilities, attention residual, mlp residual]. `kv` (decoding, no dropout) is
    passed to attention_forward. Returns (out, BlockCache).
    """
    act_forward, _ = ACTIVATION_FUNCTIONS[activation]
    m_att, m_res1, m_res2 = masks if masks is not None else (None, None, None)
    use_dropout = dropout_p > 0.0 or masks is not None

    # attention branch
    h, c_ln1 = layernorm_forward(x, p["ln_1.weight"], p.get("ln_1.bias"))
    qkv, c_attn = linear_forward(h, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # (B, T, 3C)
    a, c_att = attention_forward(qkv, n_head, dropout_p, rng, m_att, kv)  # (B, T, C)
    a, c_aproj = linear_forward(a, p["attn.c_proj.weight"], p.get("attn.c_proj.bias"))
    c_drop1 = None
    if use_dropout:
        a, c_drop1 = dropout_forward(a, dropout_p, rng, m_res1)
    x_mid = x + a  # residual

    # MLP branch
    h, c_ln2 = layernorm_forward(x_mid, p["ln_2.weight"], p.get("ln_2.bias"))
    h, c_fc = linear_forward(h, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"))  # (B, T, 4C)
    h, c_act = act_forward(h)
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
    dh, dw, db = layernorm_backward(dh, cache.ln_2); put("ln_2", dw, db)
    dx_mid = dout + dh  # residual fan-in: straight path + MLP branch

    # attention branch: x_mid = x + a
    da = dx_mid
    if cache.attn_dropout is not None:
        (da,) = dropout_backward(da, cache.attn_dropout)
    da, dw, db = linear_backward(da, cache.attn_c_proj); put("attn.c_proj", dw, db)
    (dqkv,) = attention_backward(da, cache.attention)
    dh, dw, db = linear_backward(dqkv, cache.c_attn); put("attn.c_attn", dw, db)
    dh, dw, db = layernorm_backward(dh, cache.ln_1); put("ln_1", dw, db)
    dx = dx_mid + dh  # residual fan-in
    return dx, grads
