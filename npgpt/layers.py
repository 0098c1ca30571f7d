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
    Every backward's docstring states its result; docs/gradients.md derives it.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erf as _scipy_erf  # the error function itself; every derivative below is ours

LAYERNORM_EPS = 1e-5

# Speed notes (bench/RESULTS.md has the measurements). The layers below keep the plain formulas
# but evaluate them with few fresh arrays: a new large array costs page faults on memory the
# allocator has just taken from the OS (an elementwise op on fresh memory can take ~4x as long as
# on warm memory), so chains like `a * b + c` are written `out = a * b; out += c` wherever the
# operands need not survive. Each such rewrite does the same floating-point operations in the same
# order, so float64 results are bit-for-bit those of the one-line formula.


def _sum_to_last_axis(a: np.ndarray) -> np.ndarray:
    """Sum over every axis but the last: (..., K) -> (K,). Used for bias and norm gains."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


# The error function for float32: the rational approximation of Eigen and XLA (their float32 erf),
# erf(x) ~= x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) rounds to 1 in float32).
# scipy's erf is a scalar C loop, ~15 ns an element, and was most of a float32 training step's
# non-matmul time; this is ~20 whole-array operations, ~7x faster. Its error is below 5e-7
# everywhere (a few float32 ulps; tests/test_fastpath.py checks it against scipy). float64 keeps
# scipy's erf, so the float64 gradient checks and the parity suite see the exact function.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
            -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
            -1.60960333262415e-02)  # coefficients of x^12, x^10, ..., x^0 in P
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
            -7.37332916720468e-03, -1.42647390514189e-02)  # of x^8, ..., x^0 in Q
_ERF32_CHUNK = 65536  # elements per pass: a chunk and its three scratch arrays fit a 1 MB L2 cache


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
    n = min(_ERF32_CHUNK, flat.size)
    x2, p, q = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    for start in range(0, flat.size, _ERF32_CHUNK):
        v = flat[start:start + _ERF32_CHUNK]
        m = v.size
        np.multiply(v, v, out=x2[:m])
        v *= _horner(_ERF32_P, x2[:m], p[:m])  # x P(x^2)
        v /= _horner(_ERF32_Q, x2[:m], q[:m])  # x P(x^2) / Q(x^2)
    return out


# --------------------------------------------------------------------------------------------
# Token + position embedding
# --------------------------------------------------------------------------------------------

def embedding_forward(idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray | None = None):
    """x[b, t] = wte[idx[b, t]] + wpe[t].   idx (B, T) int, wte (V, C), wpe (block_size, C) or None.

    With wpe None this is a plain lookup table (the bigram model).
    """
    B, T = idx.shape
    out = wte[idx]  # (B, T, C) gather
    if wpe is not None:
        out += wpe[:T]  # broadcast over the batch
    return out, (idx, wte.shape, None if wpe is None else wpe.shape)


def embedding_backward(dout: np.ndarray, cache):
    """dwte[v] = sum of dout[b, t] over every (b, t) with idx[b, t] == v;  dwpe[t] = sum_b dout[b, t].

    Returns (dwte, dwpe), dwpe None without wpe; idx is integer and has no gradient. A token id
    that appears many times collects the sum of all its rows (a scatter-add), written here as one
    matmul with the one-hot matrix, which is exact and avoids the slow np.add.at.
    See docs/gradients.md#embedding.
    """
    idx, wte_shape, wpe_shape = cache
    B, T, C = dout.shape
    V = wte_shape[0]
    one_hot = np.zeros((B * T, V), dtype=dout.dtype)  # (B*T, V)
    one_hot[np.arange(B * T), idx.reshape(-1)] = 1.0
    dwte = one_hot.T @ dout.reshape(B * T, C)  # (V, B*T) @ (B*T, C) -> (V, C)
    if wpe_shape is None:
        return dwte, None
    dwpe = np.zeros(wpe_shape, dtype=dout.dtype)  # positions >= T got no gradient
    dwpe[:T] = dout.sum(axis=0)  # (T, C)
    return dwte, dwpe


# --------------------------------------------------------------------------------------------
# Linear (nn.Linear layout: w is (out, in))
# --------------------------------------------------------------------------------------------

def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None):
    """out = x @ w.T + b.   x (..., in), w (out, in), b (out,) or None -> out (..., out)."""
    # One (N, in) @ (in, out) product: on a 3-D x, matmul would loop over the batch with B
    # smaller products instead (~20% slower here). The reshapes are views.
    out = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
    if b is not None:
        out += b
    return out, (x, w, b is not None)


def linear_backward(dout: np.ndarray, cache):
    """dx = dout @ w;  dw = dout^T x (summed over positions);  db = dout summed over positions.

    Returns (dx, dw, db); db is None when the forward had no bias. See docs/gradients.md#linear.
    """
    x, w, has_bias = cache
    dout2d = dout.reshape(-1, dout.shape[-1])  # (N, out)
    dx = (dout2d @ w).reshape(x.shape)  # (N, out) @ (out, in) -> (N, in) -> (..., in)
    dw = dout2d.T @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in) -> (out, in)
    db = dout2d.sum(axis=0) if has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Layer normalisation over the last axis
# --------------------------------------------------------------------------------------------

def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                      eps: float = LAYERNORM_EPS):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis (biased var)."""
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
    return out, (xhat, rstd, w, b is not None)


def layernorm_backward(dout: np.ndarray, cache):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w;  dw = sum dout*xhat.

    The two mean terms are the paths through the mean and the variance, which both depend on
    every x in the row. Returns (dx, dw, db). See docs/gradients.md#layernorm.
    """
    xhat, rstd, w, has_bias = cache
    g = dout * w  # (..., C) gradient w.r.t. xhat
    scratch = g * xhat  # (..., C)
    mean_gx = scratch.mean(axis=-1, keepdims=True)  # (..., 1)
    dx = g  # rstd * (g - mean(g) - xhat * mean_gx), built in place in g's memory
    dx -= g.mean(axis=-1, keepdims=True)
    dx -= np.multiply(xhat, mean_gx, out=scratch)
    dx *= rstd
    dw = _sum_to_last_axis(np.multiply(dout, xhat, out=scratch))
    db = _sum_to_last_axis(dout) if has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

def relu_forward(x: np.ndarray):
    """out = max(x, 0)."""
    out = np.maximum(x, 0)
    return out, out > 0


def relu_backward(dout: np.ndarray, cache):
    """dx = dout where x > 0, else 0 (torch's convention: the kink at 0 gets gradient 0).

    See docs/gradients.md#relu.
    """
    positive = cache
    return (np.where(positive, dout, 0),)


def gelu_forward(x: np.ndarray):
    """Exact GELU: out = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 (nn.GELU())."""
    phi = x * (1.0 / math.sqrt(2.0))
    erf(phi, out=phi)  # in place: one fresh array for the whole of Phi
    phi += 1.0
    phi *= 0.5  # standard normal CDF
    return x * phi, (x, phi)


def gelu_backward(dout: np.ndarray, cache):
    """dx = dout * (Phi(x) + x * pdf(x)), pdf(x) = exp(-x^2 / 2) / sqrt(2 pi).

    In the code `phi` is the CDF Phi and `pdf` its derivative. See docs/gradients.md#gelu.
    """
    x, phi = cache
    dx = -0.5 * x  # the chain below is dout * (phi + x * pdf), built in one fresh array
    dx *= x
    np.exp(dx, out=dx)
    dx *= 1.0 / math.sqrt(2.0 * math.pi)  # pdf
    dx *= x
    dx += phi
    dx *= dout
    return (dx,)


_GELU_TANH_K = math.sqrt(2.0 / math.pi)


def gelu_tanh_forward(x: np.ndarray):
    """GPT-2's GELU: out = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3)."""
    th = np.tanh(_GELU_TANH_K * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1.0 + th), (x, th)


def gelu_tanh_backward(dout: np.ndarray, cache):
    """dx = dout * (1/2 (1 + tanh u) + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3*0.044715 x^2)).

    See docs/gradients.md#tanh-gelu.
    """
    x, th = cache
    du_dx = _GELU_TANH_K * (1.0 + 3 * 0.044715 * x * x)
    return (dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du_dx),)


ACTIVATION_FUNCTIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
}

# An activation whose cache determines its output: the output rebuilt from the cache with the
# forward's own last operation (so bit for bit the same array). block_forward uses this to drop the
# MLP's hidden activation (B, T, 4C), the largest array of a block, after the forward, and
# block_backward rebuilds it for mlp.c_proj's weight gradient: one multiply instead of keeping it.
ACTIVATION_OUTPUT_FROM_CACHE = {
    "gelu": lambda cache: cache[0] * cache[1],  # x * phi
    "gelu_tanh": lambda cache: 0.5 * cache[0] * (1.0 + cache[1]),  # x / 2 * (1 + tanh u)
}


# --------------------------------------------------------------------------------------------
# Dropout (inverted: kept activations are scaled by 1 / (1 - p) during training)
# --------------------------------------------------------------------------------------------

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
    return x * mask, mask


def dropout_backward(dout: np.ndarray, cache):
    """dx = dout * mask: dropped units pass no gradient, kept ones are scaled by 1 / (1 - p).

    See docs/gradients.md#dropout.
    """
    mask = cache
    return (dout * mask,)


# --------------------------------------------------------------------------------------------
# Softmax over the last axis
# --------------------------------------------------------------------------------------------

def softmax_forward(x: np.ndarray):
    """out = exp(x - max x) / sum exp(x - max x): subtracting the row max avoids overflow."""
    out = x - x.max(axis=-1, keepdims=True)  # the one fresh array; the rest is done in place
    np.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out, out


def softmax_backward(dout: np.ndarray, cache):
    """dx = y * (dout - sum(dout * y)): the Jacobian diag(y) - y y^T applied without forming it.

    See docs/gradients.md#softmax.
    """
    y = cache
    dx = dout * y
    row_sum = dx.sum(axis=-1, keepdims=True)  # (..., 1)
    np.subtract(dout, row_sum, out=dx)  # reuse dx's memory for dout - sum(dout * y)
    dx *= y
    return (dx,)


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
    scores = q @ k.transpose(0, 1, 3, 2)  # (B, nh, Tq, Tk)
    scores *= scale
    # exp(-inf) = 0: no weight on the future. copyto broadcasts the (Tq, Tk) mask over (B, nh),
    # ~4x faster than the equivalent boolean indexing scores[..., mask] = -inf.
    np.copyto(scores, -np.inf, where=causal_mask(q.shape[2], k.shape[2]))
    att, _ = softmax_forward(scores)
    return att


def attention_forward(qkv: np.ndarray, n_head: int, dropout_p: float = 0.0,
                      rng: np.random.Generator | None = None, mask: np.ndarray | None = None):
    """Causal self-attention on the fused qkv (B, T, 3C) -> y (B, T, C).

    att = softmax(q k^T / sqrt(hs) with the future masked to -inf); y = dropout(att) v, per head.
    Dropout (applied to att when dropout_p > 0) takes `mask` if given, else draws from `rng`.
    """
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))  # (B, nh, T, hs)
    scale = 1.0 / math.sqrt(C // n_head)
    att = attention_probs(q, k, scale)  # (B, nh, T, T)
    att_mask = None
    att_used = att
    if dropout_p > 0.0 or mask is not None:
        att_used, att_mask = dropout_forward(att, dropout_p, rng, mask)
    # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs), each head written straight into its
    # channels of y (B, T, C): split_heads(y) is a view, so no merge_heads copy is needed.
    y = np.empty(qkv.shape[:-1] + (C,), dtype=qkv.dtype)
    np.matmul(att_used, v, out=split_heads(y, n_head))
    return y, (q, k, v, att, att_mask, scale)


def attention_backward(dout: np.ndarray, cache):
    """Gradient of the fused qkv, (B, T, 3C) = concat(dq, dk, dv) along channels.

    dV = A^T dY;  dA = dY V^T (through dropout);  dS = softmax_backward(dA);
    dQ = dS K * scale;  dK = dS^T Q * scale. Masked entries have A = 0, so they pass nothing back.
    See docs/gradients.md#attention.
    """
    q, k, v, att, att_mask, scale = cache
    n_head = q.shape[1]
    dy = split_heads(dout, n_head)  # (B, nh, T, hs)
    # dq, dk, dv are views into one (B, T, 3C) result, as q, k, v are views into qkv: the
    # matmuls write straight into it (out=), so there is no merge_heads copy and no concatenate.
    dqkv = np.empty(dout.shape[:-1] + (3 * dout.shape[-1],), dtype=dout.dtype)  # (B, T, 3C)
    dq, dk, dv = (split_heads(part, n_head) for part in np.split(dqkv, 3, axis=-1))  # (B, nh, T, hs)
    att_used = att if att_mask is None else att * att_mask
    np.matmul(att_used.transpose(0, 1, 3, 2), dy, out=dv)  # (B, nh, T, T) @ (B, nh, T, hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, nh, T, T)
    if att_mask is not None:
        datt *= att_mask
    (dscores,) = softmax_backward(datt, att)  # (B, nh, T, T)
    np.matmul(dscores, k, out=dq)
    dq *= scale
    np.matmul(dscores.transpose(0, 1, 3, 2), q, out=dk)
    dk *= scale
    return (dqkv,)


# --------------------------------------------------------------------------------------------
# Cross-entropy fused with softmax, mean over all positions
# --------------------------------------------------------------------------------------------

def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray):
    """loss = mean over the N = B*T positions of -log softmax(logits)[target]."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)  # (N, V)
    t = targets.reshape(-1)  # (N,)
    shifted = flat - flat.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))  # (N,) log of the partition function
    rows = np.arange(flat.shape[0])
    loss = (log_z - shifted[rows, t]).mean()
    probs = shifted  # (N, V) softmax, kept for the backward: exp(shifted - log_z), in place
    probs -= log_z[:, None]
    np.exp(probs, out=probs)
    return loss, (probs, t, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = (softmax(logits) - onehot(target)) / N * dloss.  Returns (dlogits,).

    See docs/gradients.md#cross-entropy.
    """
    probs, t, shape = cache
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[np.arange(n), t] -= 1.0
    dlogits *= dlogits.dtype.type(dloss / n)
    return (dlogits.reshape(shape),)


# --------------------------------------------------------------------------------------------
# The transformer block (a composite "sandwich" layer: its cache is the tuple of its parts)
# --------------------------------------------------------------------------------------------

def block_forward(x: np.ndarray, p: dict, n_head: int, activation: str = "gelu",
                  dropout_p: float = 0.0, rng: np.random.Generator | None = None,
                  masks: list | None = None):
    """x = x + drop(c_proj(attn(ln_1(x)))); x = x + drop(mlp_c_proj(act(c_fc(ln_2(x))))).

    `p` holds this block's parameters under nanoGPT's local names ("ln_1.weight", "attn.c_attn.weight",
    ...; ".bias" entries optional). Dropout runs when dropout_p > 0 or masks are given; `masks` is
    [attention probabilities, attention residual, mlp residual]. Returns (out, cache).
    """
    act_forward, _ = ACTIVATION_FUNCTIONS[activation]
    m_att, m_res1, m_res2 = masks if masks is not None else (None, None, None)
    use_dropout = dropout_p > 0.0 or masks is not None

    # attention branch
    h, c_ln1 = layernorm_forward(x, p["ln_1.weight"], p.get("ln_1.bias"))
    qkv, c_qkv = linear_forward(h, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # (B, T, 3C)
    a, c_att = attention_forward(qkv, n_head, dropout_p, rng, m_att)  # (B, T, C)
    a, c_aproj = linear_forward(a, p["attn.c_proj.weight"], p.get("attn.c_proj.bias"))
    c_drop1 = None
    if use_dropout:
        a, c_drop1 = dropout_forward(a, dropout_p, rng, m_res1)
    a += x  # residual x + a, summed into the branch's fresh output rather than a new array
    x = a

    # MLP branch
    h, c_ln2 = layernorm_forward(x, p["ln_2.weight"], p.get("ln_2.bias"))
    h, c_fc = linear_forward(h, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"))  # (B, T, 4C)
    h, c_act = act_forward(h)
    h, c_mproj = linear_forward(h, p["mlp.c_proj.weight"], p.get("mlp.c_proj.bias"))  # (B, T, C)
    if activation in ACTIVATION_OUTPUT_FROM_CACHE:  # keep c_act only: saves (B, T, 4C) per block
        c_mproj = (None,) + c_mproj[1:]
    c_drop2 = None
    if use_dropout:
        h, c_drop2 = dropout_forward(h, dropout_p, rng, m_res2)
    h += x  # residual x + h, in place as above
    out = h

    cache = (activation, c_ln1, c_qkv, c_att, c_aproj, c_drop1, c_ln2, c_fc, c_act, c_mproj, c_drop2)
    return out, cache


def block_dropout_masks(cache) -> list:
    """The three dropout masks a block_forward used (attention, attn residual, mlp residual)."""
    _, _, _, c_att, _, c_drop1, _, _, _, _, c_drop2 = cache
    return [c_att[4], c_drop1, c_drop2]


def block_backward(dout: np.ndarray, cache):
    """Returns (dx, grads): grads keyed by the block's local parameter names.

    The residual stream x -> x + f(x) splits the gradient: dx = dout + (df/dx)^T dout, so each
    branch's input gradient is added to the gradient flowing straight through.
    See docs/gradients.md#transformer-block and docs/gradients.md#residual-stream.
    """
    activation, c_ln1, c_qkv, c_att, c_aproj, c_drop1, c_ln2, c_fc, c_act, c_mproj, c_drop2 = cache
    _, act_backward = ACTIVATION_FUNCTIONS[activation]
    grads = {}

    def put(prefix, dw, db):
        grads[prefix + ".weight"] = dw
        if db is not None:
            grads[prefix + ".bias"] = db

    # MLP branch: out = x_mid + h
    dh = dout
    if c_drop2 is not None:
        (dh,) = dropout_backward(dh, c_drop2)
    if c_mproj[0] is None:  # the forward dropped the activation's output: rebuild it from c_act
        c_mproj = (ACTIVATION_OUTPUT_FROM_CACHE[activation](c_act),) + c_mproj[1:]
    dh, dw, db = linear_backward(dh, c_mproj); put("mlp.c_proj", dw, db)
    (dh,) = act_backward(dh, c_act)
    dh, dw, db = linear_backward(dh, c_fc); put("mlp.c_fc", dw, db)
    dh, dw, db = layernorm_backward(dh, c_ln2); put("ln_2", dw, db)
    dh += dout  # residual fan-in: straight path + MLP branch (dh is fresh, dout is not ours)
    dx_mid = dh

    # attention branch: x_mid = x + a
    da = dx_mid
    if c_drop1 is not None:
        (da,) = dropout_backward(da, c_drop1)
    da, dw, db = linear_backward(da, c_aproj); put("attn.c_proj", dw, db)
    (dqkv,) = attention_backward(da, c_att)
    dh, dw, db = linear_backward(dqkv, c_qkv); put("attn.c_attn", dw, db)
    dh, dw, db = layernorm_backward(dh, c_ln1); put("ln_1", dw, db)
    dh += dx_mid  # residual fan-in
    return dh, grads


# --------------------------------------------------------------------------------------------
# The modern block: RMSNorm, rotary position embeddings (RoPE), ReLU², SwiGLU
# --------------------------------------------------------------------------------------------
# Plain formulas, one expression per line, each cache a NamedTuple. QK-norm is rmsnorm_forward
# applied over hs to q and to k of every head, so it has no pair of its own.

from typing import NamedTuple  # noqa: E402  (this section is appended; it moves up with the others)

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
