"""Known wrong backwards, one list per exercise: the mistakes people make when they derive a backward.

Each entry is a real backward with the reference's signature and returns (npgpt/layers.py, and for
"model" `gpt_backward` below), with one thing broken. `name_mistake` (exercises/diagnose.py) runs
each on the reference caches of a check's cases and names the one the student's gradients match.
Every entry's paragraph in docs/gradients.md (the `doc` link) says why it is wrong.

Imports npgpt and the standard library only (and NumPy, as npgpt does).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from npgpt import layers as L
from npgpt.model import BLOCK_PARAM_NAMES
from npgpt.layers import (CrossEntropyCache, EmbeddingCache, LinearCache, LayerNormCache, SoftmaxCache,
                          norm_backward, rotate_half, softmax_backward)


class Mistake(NamedTuple):
    key: str           # a short id, e.g. "layernorm-no-mean-path"
    title: str         # names the mistake in a sentence
    doc: str           # where docs/gradients.md explains it: "docs/gradients.md#anchor"
    backward: Callable  # the wrong backward: same signature and returns as the reference's


def _doc(key: str) -> str:
    return f"docs/gradients.md#mistake-{key}"


# --------------------------------------------------------------------------------------------
# The model's backward as one function of (dout, cache)
# --------------------------------------------------------------------------------------------

def gpt_backward(dout, cache, *, tied: bool = True, head_into_wte: bool = True,
                   embedding_into_wte: bool = True, blocks_reversed: bool = True,
                   ln_f_dx: bool = True) -> dict:
    """GPT.backward's steps as a pair's backward: dout is the loss's gradient (GPT.backward passes
    1.0), cache the npgpt.model.GPTCache that GPT.forward keeps (GPT._cache). Returns the gradients
    keyed like GPT.params, in their order. `tied` (GPTConfig.tie_weights, the default): the head is
    wte. The other switches break one step each, for the catalogue's mistakes; all True is the
    reference."""
    blocks = cache.blocks
    layers = blocks[0].layers if blocks else L.REFERENCE
    grads = {}
    (dlogits,) = layers.cross_entropy_backward(dout, cache.loss)  # (B, T, V)
    dx, dhead, _ = layers.linear_backward(dlogits, cache.lm_head)  # dhead (V, C)
    dx_lnf, dw_lnf, db_lnf = norm_backward(dx, cache.ln_f, layers)
    dx = dx_lnf if ln_f_dx else dx
    block_grads = {}
    order = reversed(range(len(blocks))) if blocks_reversed else range(len(blocks))
    for i in order:
        dx, block_grads[i] = L.block_backward(dx, blocks[i])
    if cache.embedding_dropout is not None:
        (dx,) = layers.dropout_backward(dx, cache.embedding_dropout)
    dwte, dwpe = layers.embedding_backward(dx, cache.embedding)
    if tied:
        wte = np.zeros_like(dwte)
        if embedding_into_wte:
            wte = wte + dwte
        if head_into_wte:
            wte = wte + dhead  # one matrix used twice: the two gradients add
        grads["transformer.wte.weight"] = wte
    else:
        grads["transformer.wte.weight"] = dwte
    if dwpe is not None:
        grads["transformer.wpe.weight"] = dwpe
    for i in range(len(blocks)):  # in the parameters' order, as GPT.backward returns them
        for name in BLOCK_PARAM_NAMES:
            if name in block_grads[i]:
                grads[f"transformer.h.{i}.{name}"] = block_grads[i][name]
    grads["transformer.ln_f.weight"] = dw_lnf
    if db_lnf is not None:
        grads["transformer.ln_f.bias"] = db_lnf
    if not tied:
        grads["lm_head.weight"] = dhead
    return grads


def _block_backward(dout, cache, *, mlp_identity: bool = True, attn_identity: bool = True,
                    attn_from_dout: bool = False):
    """block_backward's steps (npgpt/layers.py) with one switch per catalogue mistake."""
    lay, c = cache.layers, cache
    _, act_backward = lay.activations[c.activation]
    n_head = c.attention.q.shape[1]
    grads = {}

    def put(prefix, dw, db=None):
        if dw is not None:
            grads[prefix + ".weight"] = dw
        if db is not None:
            grads[prefix + ".bias"] = db

    (dh,) = lay.dropout_backward(dout, c.mlp_dropout) if c.mlp_dropout is not None else (dout,)
    dh, dw, db = lay.linear_backward(dh, c.mlp_c_proj); put("mlp.c_proj", dw, db)
    (dh,) = act_backward(dh, c.act)
    dh, dw, db = lay.linear_backward(dh, c.c_fc); put("mlp.c_fc", dw, db)
    dh, dw, db = norm_backward(dh, c.ln_2, lay); put("ln_2", dw, db)
    dx_mid = dout + dh if mlp_identity else dh
    upstream = dout if attn_from_dout else dx_mid
    (da,) = lay.dropout_backward(upstream, c.attn_dropout) if c.attn_dropout is not None else (upstream,)
    da, dw, db = lay.linear_backward(da, c.attn_c_proj); put("attn.c_proj", dw, db)
    dy = lay.split_heads(da, n_head)
    dq, dk, dv = lay.causal_attention_backward(dy, c.attention)
    (dk,) = lay.rope_backward(dk, c.k_rope) if c.k_rope is not None else (dk,)
    (dq,) = lay.rope_backward(dq, c.q_rope) if c.q_rope is not None else (dq,)
    dk, dw = lay.rmsnorm_backward(dk, c.k_norm) if c.k_norm is not None else (dk, None); put("attn.k_norm", dw)
    dq, dw = lay.rmsnorm_backward(dq, c.q_norm) if c.q_norm is not None else (dq, None); put("attn.q_norm", dw)
    dqkv = lay.merge_qkv(dq, dk, dv)
    dh, dw, db = lay.linear_backward(dqkv, c.c_attn); put("attn.c_attn", dw, db)
    dh, dw, db = norm_backward(dh, c.ln_1, lay); put("ln_1", dw, db)
    dx = dx_mid + dh if attn_identity else dh
    return dx, grads


def _block(**switches):
    """A block backward with the given switch of _block_backward turned."""
    def backward(dout, cache):
        return _block_backward(dout, cache, **switches)
    return backward


def _gpt(**switches):
    """The model's backward with the given switch of gpt_backward turned."""
    def backward(dout, cache):
        return gpt_backward(dout, cache, **switches)
    return backward


# --------------------------------------------------------------------------------------------
# The wrong backwards
# --------------------------------------------------------------------------------------------

# embedding: (dwte, dwpe)

def _embedding_assign(dout, cache: EmbeddingCache):
    B, T, C = dout.shape
    dwte = np.zeros(cache.wte_shape, dtype=dout.dtype)
    dwte[cache.idx.reshape(-1)] = dout.reshape(B * T, C)  # buffered: a repeated id keeps its last row
    dwpe = None
    if cache.wpe_shape is not None:
        dwpe = np.zeros(cache.wpe_shape, dtype=dout.dtype)
        dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


def _embedding_dwpe(how):
    def backward(dout, cache: EmbeddingCache):
        dwte, dwpe = L.embedding_backward(dout, cache)
        if dwpe is not None:
            T = dout.shape[1]
            dwpe = np.zeros(cache.wpe_shape, dtype=dout.dtype)
            dwpe[:T] = dout[0] if how == "first" else dout.mean(axis=0)
        return dwte, dwpe
    return backward


def _embedding_dwpe_everywhere(dout, cache: EmbeddingCache):
    dwte, dwpe = L.embedding_backward(dout, cache)
    if dwpe is not None:
        T = dout.shape[1]
        # the rows t >= T also take a gradient: dout's last position copied on
        dwpe = np.broadcast_to(dout.sum(axis=0)[np.minimum(np.arange(cache.wpe_shape[0]), T - 1)],
                               cache.wpe_shape).copy()
    return dwte, dwpe


# linear: (dx, dw, db)

def _linear_dw_reshaped(dout, cache: LinearCache):
    dx, dw, db = L.linear_backward(dout, cache)
    x2d = cache.x.reshape(-1, cache.x.shape[-1])
    dw = (x2d.T @ dout.reshape(-1, dout.shape[-1])).reshape(cache.w.shape)  # (in, out) read as (out, in)
    return dx, dw, db


def _linear_dw_mean(dout, cache: LinearCache):
    dx, dw, db = L.linear_backward(dout, cache)
    n = dout.reshape(-1, dout.shape[-1]).shape[0]
    return dx, dw / n, db


def _linear_db(how):
    def backward(dout, cache: LinearCache):
        dx, dw, db = L.linear_backward(dout, cache)
        if db is not None:
            dout2d = dout.reshape(-1, dout.shape[-1])
            db = dout2d[-1].copy() if how == "last" else dout2d.mean(axis=0)
        return dx, dw, db
    return backward


# layernorm: (dx, dw, db)

def _layernorm(mean_path=True, var_path=True, var_divisor="C", rstd=True):
    def backward(dout, cache: LayerNormCache):
        xhat, r = cache.xhat, cache.rstd
        C = xhat.shape[-1]
        g = dout * cache.w
        dxhat = g.copy()
        if mean_path:
            dxhat = dxhat - g.mean(axis=-1, keepdims=True)
        if var_path:
            divisor = C if var_divisor == "C" else C - 1
            dxhat = dxhat - xhat * (g * xhat).sum(axis=-1, keepdims=True) / divisor
        dx = r * dxhat if rstd else dxhat
        dw = L._sum_to_last_axis(dout * xhat)
        db = L._sum_to_last_axis(dout) if cache.has_bias else None
        return dx, dw, db
    return backward


# activations: (dx,)

def _relu_identity(dout, cache):
    return (dout.copy(),)


def _relu_inverted(dout, cache):
    return (np.where(cache.positive, 0, dout),)


def _relu_local(dout, cache):
    return (cache.positive.astype(dout.dtype),)


def _gelu_pdf(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_tanh_derivative(dout, cache):
    x = cache.x
    k = math.sqrt(2.0 / math.pi)
    th = np.tanh(k * (x + 0.044715 * x ** 3))
    return (dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3 * 0.044715 * x * x)),)


def _gelu_no_pdf(dout, cache):
    return (dout * cache.phi,)


def _gelu_local(dout, cache):
    return (cache.phi + cache.x * _gelu_pdf(cache.x),)


def _gelu_unnormalised_pdf(dout, cache):
    x = cache.x
    return (dout * (cache.phi + x * np.exp(-0.5 * x * x)),)


def _tanh_gelu(inner=True, cubic=True, product=True):
    def backward(dout, cache):
        x, th = cache.x, cache.th
        k = math.sqrt(2.0 / math.pi)
        du_dx = k * (1.0 + 3 * 0.044715 * x * x) if cubic else k * np.ones_like(x)
        if not inner:
            du_dx = np.ones_like(x)
        local = 0.5 * (1.0 + th)
        if product:
            local = local + 0.5 * x * (1.0 - th * th) * du_dx
        return (dout * local,)
    return backward


def _tanh_gelu_exact(dout, cache):
    x = cache.x
    _, exact = L.gelu_forward(x)  # Phi(x), the exact GELU's CDF
    return (dout * (exact.phi + x * _gelu_pdf(x)),)


def _dropout_keep_scale(mask):
    """(keep, 1 / (1 - p)) from an inverted-dropout mask of values 0 and 1 / (1 - p)."""
    keep = mask != 0
    scale = mask.max() if keep.any() else mask.dtype.type(1.0)
    return keep, scale


def _dropout_not_rescaled(dout, cache):
    keep, _ = _dropout_keep_scale(cache.mask)
    return (dout * keep,)


def _dropout_identity(dout, cache):
    return (dout.copy(),)


def _dropout_times_keep_prob(dout, cache):
    keep, scale = _dropout_keep_scale(cache.mask)
    return (dout * keep / scale,)  # multiplies by 1 - p where the forward divided by it


# softmax: (dx,)

def _softmax_no_dot(dout, cache: SoftmaxCache):
    return (cache.y * dout,)


def _softmax_diagonal(dout, cache: SoftmaxCache):
    y = cache.y
    return (dout * y * (1.0 - y),)


def _softmax_first_axis(dout, cache: SoftmaxCache):
    y = cache.y
    return (y * (dout - (dout * y).sum(axis=0, keepdims=True)),)


# attention: (dq, dk, dv)

def _attention(scale_backward=True, dv_transposed=True, dk_transposed=True, dot_term=True,
               masked_recompute=True):
    def backward(dout, cache):
        q, k, v, att, att_mask, scale = cache
        if not masked_recompute:  # the probabilities recomputed from q and k, without the causal mask
            att, _ = L.softmax_forward((q @ k.transpose(0, 1, 3, 2)) * scale)
        att_used = att if att_mask is None else att * att_mask
        dv = (att_used.transpose(0, 1, 3, 2) if dv_transposed else att_used) @ dout
        datt = dout @ v.transpose(0, 1, 3, 2)
        if att_mask is not None:
            datt = datt * att_mask
        if dot_term:
            (dscores,) = softmax_backward(datt, SoftmaxCache(att))
        else:
            dscores = att * datt
        s = scale if scale_backward else 1.0
        dq = (dscores @ k) * s
        dk = ((dscores.transpose(0, 1, 3, 2) if dk_transposed else dscores) @ q) * s
        return dq, dk, dv
    return backward


# cross-entropy: (dlogits,)

def _cross_entropy(divide="N", one_hot=True, probs_grad=False):
    def backward(dloss, cache: CrossEntropyCache):
        probs, t = cache.probs, cache.targets
        n = probs.shape[0]
        rows = np.arange(n)
        hot = np.zeros_like(probs)
        hot[rows, t] = 1.0
        divisor = {"N": n, "1": 1, "B": cache.logits_shape[0]}[divide]
        if probs_grad:  # d loss / d probs: -1 / p at the target, and stopped there
            d = np.zeros_like(probs)
            d[rows, t] = -1.0 / probs[rows, t]
        else:
            d = probs - hot if one_hot else probs.copy()
        return ((d * probs.dtype.type(dloss / divisor)).reshape(cache.logits_shape),)
    return backward


# rmsnorm: (dx, dw)

def _rmsnorm(projection=True, mean_path=False, gain=True):
    def backward(dout, cache):
        g = dout * cache.w if gain else dout
        dxhat = g.copy()
        if mean_path:
            dxhat = dxhat - g.mean(axis=-1, keepdims=True)
        if projection:
            dxhat = dxhat - cache.xhat * np.mean(g * cache.xhat, axis=-1, keepdims=True)
        dx = cache.rstd * dxhat
        dw = L._sum_to_last_axis(dout * cache.xhat)
        return dx, dw
    return backward


# rope: (dx,)

def _rope_forward_direction(dout, cache):
    return (dout * cache.cos + rotate_half(dout) * cache.sin,)


def _rope_no_sin(dout, cache):
    return (dout * cache.cos,)


def _rotate_adjacent(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved pairs of the RoPE paper."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def _rope_interleaved(dout, cache):
    return (dout * cache.cos - _rotate_adjacent(dout) * cache.sin,)


# swiglu: (dx,)

def _swiglu(dsilu="silu", swapped=False, up_sigmoid=True):
    def backward(dout, cache):
        gate, up, sig = cache
        if dsilu == "silu":
            d = sig * (1.0 + gate * (1.0 - sig))
        elif dsilu == "sig":  # silu' taken as sigmoid: the product rule's second term left out
            d = sig
        else:  # the derivative of the sigmoid, not of silu
            d = sig * (1.0 - sig)
        dgate = dout * up * d
        dup = dout * gate * sig if up_sigmoid else dout * gate
        halves = [dup, dgate] if swapped else [dgate, dup]
        return (np.concatenate(halves, axis=-1),)
    return backward


# relu2: (dx,)

def _relu2_no_two(dout, cache):
    return (dout * cache.relu_x,)


def _relu2_relu(dout, cache):
    return (dout * (cache.relu_x > 0),)


def _relu2_local(dout, cache):
    return (2.0 * cache.relu_x,)


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------

def _m(key, title, backward):
    return Mistake(key, title, _doc(key), backward)


MISTAKES: dict[str, tuple[Mistake, ...]] = {
    "embedding": (
        _m("embedding-assign-repeated-ids",
           "dwte assigns each position's row (dwte[idx] = dout) instead of adding: a token id that "
           "occurs more than once keeps only its last row.", _embedding_assign),
        _m("embedding-dwpe-first-batch-row",
           "dwpe takes the first batch row of dout instead of summing over the batch.",
           _embedding_dwpe("first")),
        _m("embedding-dwpe-mean-over-batch",
           "dwpe averages dout over the batch instead of summing it.", _embedding_dwpe("mean")),
        _m("embedding-dwpe-unused-rows",
           "dwpe gives the position rows t >= T a gradient; rows the forward did not use get zero.",
           _embedding_dwpe_everywhere),
    ),
    "linear": (
        _m("linear-dw-reshaped",
           "dw is x^T dout, which is (in, out), reshaped to w's (out, in) instead of transposed.",
           _linear_dw_reshaped),
        _m("linear-dw-mean",
           "dw is divided by the number of positions N: the sum over positions became a mean.",
           _linear_dw_mean),
        _m("linear-db-last-position",
           "db is the last position's dout (assigned in a loop, not accumulated) instead of the sum "
           "over positions.", _linear_db("last")),
        _m("linear-db-mean",
           "db averages dout over the positions instead of summing it.", _linear_db("mean")),
    ),
    "layernorm": (
        _m("layernorm-no-mean-path",
           "dx leaves out the path through the mean: the term -rstd * mean(g) is missing.",
           _layernorm(mean_path=False)),
        _m("layernorm-no-variance-path",
           "dx leaves out the path through the variance: the term -rstd * xhat * mean(g * xhat) is "
           "missing.", _layernorm(var_path=False)),
        _m("layernorm-unbiased-variance",
           "dx's variance path divides by C - 1 (the unbiased variance) where the forward divides by C.",
           _layernorm(var_divisor="C-1")),
        _m("layernorm-no-rstd",
           "dx forgets the outer factor rstd = 1 / sqrt(var + eps).", _layernorm(rstd=False)),
    ),
    "relu": (
        _m("relu-identity", "dx passes dout through everywhere: the ReLU's mask is not applied.",
           _relu_identity),
        _m("relu-inverted-mask", "dx passes dout where x <= 0 and blocks it where x > 0: the mask "
           "is inverted.", _relu_inverted),
        _m("relu-local-derivative-only", "dx is the ReLU's local derivative (x > 0) alone, not "
           "multiplied by dout: the chain rule's product is missing.", _relu_local),
    ),
    "gelu": (
        _m("gelu-tanh-derivative", "dx uses the derivative of the tanh approximation of GELU, "
           "while the forward is the exact (erf) GELU.", _gelu_tanh_derivative),
        _m("gelu-no-pdf-term", "dx is dout * Phi(x): the product rule's second term x * pdf(x) "
           "is missing.", _gelu_no_pdf),
        _m("gelu-local-derivative-only", "dx is GELU's local derivative Phi(x) + x pdf(x) alone, "
           "not multiplied by dout.", _gelu_local),
        _m("gelu-pdf-unnormalised", "dx's normal density exp(-x^2 / 2) lacks its factor "
           "1 / sqrt(2 pi).", _gelu_unnormalised_pdf),
    ),
    "gelu_tanh": (
        _m("tanh-gelu-no-inner-derivative", "dx forgets the chain rule through u = sqrt(2/pi) "
           "(x + 0.044715 x^3): du/dx is missing.", _tanh_gelu(inner=False)),
        _m("tanh-gelu-no-cubic-term", "dx's du/dx leaves out the cubic's derivative: "
           "sqrt(2/pi) instead of sqrt(2/pi) (1 + 3 * 0.044715 x^2).", _tanh_gelu(cubic=False)),
        _m("tanh-gelu-no-product-rule", "dx is dout * (1 + tanh u) / 2: the product rule's term "
           "x/2 * (1 - tanh^2 u) du/dx is missing.", _tanh_gelu(product=False)),
        _m("tanh-gelu-exact-derivative", "dx uses the exact (erf) GELU's derivative while the "
           "forward is the tanh approximation.", _tanh_gelu_exact),
    ),
    "dropout": (
        _m("dropout-not-rescaled", "dx zeroes the dropped units but forgets the kept ones' "
           "scale 1 / (1 - p).", _dropout_not_rescaled),
        _m("dropout-identity", "dx passes dout through unchanged: the mask is not applied.",
           _dropout_identity),
        _m("dropout-times-keep-probability", "dx multiplies the kept units by 1 - p where the "
           "forward divided by it.", _dropout_times_keep_prob),
    ),
    "softmax": (
        _m("softmax-no-dot-term", "dx is y * dout: the subtracted dot product sum(dout * y) is "
           "missing.", _softmax_no_dot),
        _m("softmax-diagonal-only", "dx applies only the Jacobian's diagonal y (1 - y) and leaves "
           "out its off-diagonal part -y_i y_j.", _softmax_diagonal),
        _m("softmax-wrong-axis", "dx sums dout * y over the first axis instead of the last "
           "(the softmax's) axis.", _softmax_first_axis),
    ),
    "attention": (
        _m("attention-no-scale", "dq and dk leave out the scale 1 / sqrt(hs) that the forward "
           "applied to the scores.", _attention(scale_backward=False)),
        _m("attention-dv-not-transposed", "dv is att @ dout instead of att^T @ dout.",
           _attention(dv_transposed=False)),
        _m("attention-dk-not-transposed", "dk is dscores @ q * scale instead of "
           "dscores^T @ q * scale.", _attention(dk_transposed=False)),
        _m("attention-softmax-no-dot-term", "dscores is att * datt: the softmax backward's "
           "subtracted dot product is missing.", _attention(dot_term=False)),
        _m("attention-unmasked-recompute", "the backward recomputes the attention probabilities "
           "from q and k without the causal mask.", _attention(masked_recompute=False)),
    ),
    "cross_entropy": (
        _m("cross-entropy-not-divided-by-n", "dlogits is not divided by N = B*T, the number of "
           "positions the loss averages over.", _cross_entropy(divide="1")),
        _m("cross-entropy-no-one-hot", "dlogits is softmax / N: the one-hot of the targets is not "
           "subtracted.", _cross_entropy(one_hot=False)),
        _m("cross-entropy-divided-by-batch", "dlogits is divided by the batch size B instead of "
           "by N = B*T.", _cross_entropy(divide="B")),
        _m("cross-entropy-stops-at-probs", "dlogits is d loss / d probs (-1 / p at the target), "
           "not carried through the softmax.", _cross_entropy(probs_grad=True)),
    ),
    "rmsnorm": (
        _m("rmsnorm-no-projection", "dx is rstd * g: the path through the rms, the term "
           "-rstd * xhat * mean(g * xhat), is missing.", _rmsnorm(projection=False)),
        _m("rmsnorm-layernorm-mean-term", "dx subtracts mean(g) as layernorm does, though RMSNorm "
           "subtracts no mean.", _rmsnorm(mean_path=True)),
        _m("rmsnorm-no-gain", "dx forgets the gain: g = dout instead of dout * w.", _rmsnorm(gain=False)),
    ),
    "rope": (
        _m("rope-forward-rotation", "dx rotates dout by +angle, as the forward did, instead of by "
           "-angle (the rotation's transpose).", _rope_forward_direction),
        _m("rope-no-sin-term", "dx is dout * cos: the rotate_half(dout) * sin term is missing.",
           _rope_no_sin),
        _m("rope-interleaved-pairs", "dx rotates adjacent pairs (x0, x1), (x2, x3) while the "
           "forward rotates the halves (x_i, x_{i + hs/2}).", _rope_interleaved),
    ),
    "swiglu": (
        _m("swiglu-silu-no-second-term", "dgate takes silu'(g) as sigmoid(g): the term "
           "g * sigmoid(g) (1 - sigmoid(g)) of the product rule is missing.", _swiglu(dsilu="sig")),
        _m("swiglu-sigmoid-derivative", "dgate uses the sigmoid's derivative sigmoid (1 - sigmoid) "
           "instead of silu's.", _swiglu(dsilu="dsig")),
        _m("swiglu-halves-swapped", "dx puts dup in the gate half and dgate in the up half.",
           _swiglu(swapped=True)),
        _m("swiglu-dup-no-sigmoid", "dup is dout * gate instead of dout * silu(gate).",
           _swiglu(up_sigmoid=False)),
    ),
    "relu2": (
        _m("relu2-no-factor-two", "dx is dout * relu(x): the factor 2 of d(r^2)/dr = 2r is missing.",
           _relu2_no_two),
        _m("relu2-relu-derivative", "dx uses ReLU's derivative (x > 0) instead of 2 relu(x).",
           _relu2_relu),
        _m("relu2-local-derivative-only", "dx is the local derivative 2 relu(x) alone, not "
           "multiplied by dout.", _relu2_local),
    ),
    "block": (
        _m("block-no-mlp-residual-path", "the MLP's residual drops its identity path: dx_mid is the "
           "MLP branch's gradient alone, without dout.",
           _block(mlp_identity=False)),
        _m("block-no-attention-residual-path", "the attention's residual drops its identity path: dx "
           "is the attention branch's gradient alone, without dx_mid.",
           _block(attn_identity=False)),
        _m("block-attention-from-dout", "the attention branch's backward starts from dout instead "
           "of dx_mid, the gradient at its output that includes the MLP branch's.",
           _block(attn_from_dout=True)),
    ),
    "model": (
        _m("model-tied-head-gradient-dropped", "the tied wte collects only the embedding's "
           "gradient: the head's gradient dhead is dropped.",
           _gpt(head_into_wte=False)),
        _m("model-tied-embedding-gradient-overwritten", "the tied wte's gradient is the head's "
           "alone: the embedding's gradient was overwritten instead of added to.",
           _gpt(embedding_into_wte=False)),
        _m("model-blocks-forward-order", "the backward walks the blocks first to last, the "
           "forward's order, instead of last to first.",
           _gpt(blocks_reversed=False)),
        _m("model-ln-f-dx-dropped", "the blocks get the head's dx, not ln_f's: ln_f's input "
           "gradient is computed and dropped.",
           _gpt(ln_f_dx=False)),
    ),
}
"""exercise name -> its known mistakes, each a wrong backward with the reference's signature."""
