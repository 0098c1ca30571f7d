"""npgpt.fast's layer set: npgpt.layers' pairs, with those that run faster another way replaced.

The block and the model are npgpt.layers.block_forward and npgpt.GPT, written once; they take
their pairs from a LayerSet. FAST is npgpt.layers.REFERENCE with these replacements:

- NumPy rewrites, here, in the reference's order and under its names: the embedding (position
  rows added in the gather's fresh array), the linear layer (one 2-D matmul), merge_qkv (no copy
  when dq, dk, dv already lie in one buffer), the causal attention core (batched products writing
  into head views: no merge_heads copy; also the KV-cache decoding path), the residual sum (in
  place), and ACTIVATION_OUTPUT_FROM_CACHE (the block drops the MLP's hidden activation after the
  forward and rebuilds it in the backward).
- With numba (npgpt.fast.numba_kernels.ENABLED): the fused, threaded kernels of
  npgpt.fast.numba_kernels for the embedding's backward (a scatter-add), layernorm, GELU, the
  attention core (per head, where it pays), cross-entropy, RMSNorm, RoPE and SwiGLU. Without
  numba those pairs are the reference's.

tests/test_fastpath.py compares each replaced pair with its reference twin (numpy only), and
tests/test_numba_kernels.py with the kernels on.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import layers as _reference
from ..layers import REFERENCE, AttentionCache, EmbeddingCache, LayerSet, LinearCache, SoftmaxCache, split_heads
from . import numba_kernels as _kernels

__all__ = ["FAST", "layer_set", "embedding_forward", "linear_forward", "linear_backward", "merge_qkv",
           "causal_attention_forward", "causal_attention_backward", "residual",
           "ACTIVATION_OUTPUT_FROM_CACHE", "FUSED_ATTENTION_MAX_T2HS"]


# --------------------------------------------------------------------------------------------
# Embedding: the position rows added in place
# --------------------------------------------------------------------------------------------

def embedding_forward(idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray | None = None):
    """npgpt.layers.embedding_forward: wte[idx] + wpe[:T], the sum taken in the gather's fresh array."""
    B, T = idx.shape
    out = wte[idx]  # (B, T, C)
    if wpe is not None:
        out += wpe[:T]
    return out, EmbeddingCache(idx, wte.shape, None if wpe is None else wpe.shape)


# --------------------------------------------------------------------------------------------
# Linear: one 2-D matmul
# --------------------------------------------------------------------------------------------

def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None):
    """npgpt.layers.linear_forward as one (N, in) @ (in, out) product (on a 3-D x, matmul would
    loop over the batch with B smaller products). The reshapes are views."""
    out = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
    if b is not None:
        out += b
    return out, LinearCache(x, w, b is not None)


def linear_backward(dout: np.ndarray, cache: LinearCache):
    """npgpt.layers.linear_backward: (dx, dw, db), dx as one 2-D product."""
    x, w = cache.x, cache.w
    dout2d = dout.reshape(-1, dout.shape[-1])  # (N, out)
    dx = (dout2d @ w).reshape(x.shape)  # (N, out) @ (out, in) -> (N, in) -> (..., in)
    dw = dout2d.T @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in) -> (out, in)
    db = dout2d.sum(axis=0) if cache.has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# ACTIVATION_OUTPUT_FROM_CACHE: the MLP's hidden activation rebuilt, not kept
# --------------------------------------------------------------------------------------------
# An activation whose cache determines its output, rebuilt with the forward's own last operation
# (so bit for bit the same array, the reference's pair or the kernel's). block_forward then drops
# the MLP's hidden activation (B, T, H) after the forward; block_backward rebuilds it for
# mlp.c_proj's weight gradient. relu's cache (a boolean mask) does not determine x: relu keeps it.
ACTIVATION_OUTPUT_FROM_CACHE = {
    "gelu": lambda cache: cache.x * cache.phi,
    "gelu_tanh": lambda cache: 0.5 * cache.x * (1.0 + cache.th),
    "relu2": lambda cache: cache.relu_x * cache.relu_x,
    "swiglu": lambda cache: cache.gate * cache.sig * cache.up,
}


# --------------------------------------------------------------------------------------------
# Attention: dq, dk, dv merged without a copy; the core writing into head views
# --------------------------------------------------------------------------------------------

def _head_view_of(a: np.ndarray, base: np.ndarray, part: int, n_parts: int) -> bool:
    """Whether a (B, nh, T, hs) is exactly split_heads of channels part of n_parts in base (B, T, n_parts * C)."""
    C = base.shape[-1] // n_parts
    view = split_heads(base[..., part * C:(part + 1) * C], a.shape[1])
    return (a.shape == view.shape and a.strides == view.strides
            and a.__array_interface__["data"][0] == view.__array_interface__["data"][0])


def merge_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """npgpt.layers.merge_qkv: (B, T, 3C). When v is a head view of a (B, T, 3C) buffer, as the
    causal_attention_backward here hands dv, q and k are written into their channels of it (no
    copy for those already there) and the buffer is the result."""
    base = v.base
    while isinstance(base, np.ndarray) and base.base is not None and base.ndim != 3:
        base = base.base
    if not (isinstance(base, np.ndarray) and base.ndim == 3 and base.flags.c_contiguous
            and base.shape[-1] == 3 * v.shape[1] * v.shape[3] and _head_view_of(v, base, 2, 3)):
        return _reference.merge_qkv(q, k, v)
    for part, a in enumerate((q, k)):
        if not _head_view_of(a, base, part, 3):
            split_heads(base[..., part * base.shape[-1] // 3:(part + 1) * base.shape[-1] // 3], a.shape[1])[...] = a
    return base


# The fused per-head attention kernel calls BLAS from inside numba's parallel loop. With small heads
# each of those products runs on one thread and the kernel wins. With larger heads OpenBLAS threads
# each product itself, nested inside numba's threads, and the two pools fight over the cores
# (bench/RESULTS.md). Above this size the batched products run instead (with the softmax kernel).
FUSED_ATTENTION_MAX_T2HS = 1 << 18  # T * T * hs of one head


def _fused_attention_pays(T: int, hs: int) -> bool:
    return T * T * hs <= FUSED_ATTENTION_MAX_T2HS


def _kernels_on() -> bool:
    return _kernels.ENABLED


def causal_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, dropout_p: float = 0.0,
                             rng: np.random.Generator | None = None, mask: np.ndarray | None = None):
    """npgpt.layers.causal_attention_forward with y (B, nh, Tq, hs) a head view of a fresh
    (B, Tq, C) array, so merge_heads(y) is a view. With numba: the fused per-head kernel where it
    pays (queries and keys the same positions), else batched products and the softmax kernel;
    the KV-cache decoding path (Tq < Tk) is always the batched one."""
    B, nh, Tq, hs = q.shape
    kernels = _kernels_on()
    if kernels and Tq == k.shape[2] and _fused_attention_pays(Tq, hs):
        return _kernels.causal_attention_forward(q, k, v, dropout_p, rng, mask)
    softmax_forward = _kernels.softmax_forward if kernels else _reference.softmax_forward
    scale = 1.0 / math.sqrt(hs)
    scores = q @ k.transpose(0, 1, 3, 2)  # (B, nh, Tq, Tk)
    scores *= scale
    # copyto broadcasts the (Tq, Tk) mask over (B, nh), in the scores' own memory
    np.copyto(scores, -np.inf, where=_reference.causal_mask(Tq, k.shape[2]))
    att, _ = softmax_forward(scores)
    att_used, att_mask = att, None
    if dropout_p > 0.0 or mask is not None:
        att_used, c_drop = _reference.dropout_forward(att, dropout_p, rng, mask)
        att_mask = c_drop.mask
    (y,) = _kernels.new_heads_buffer(B, nh, Tq, hs, 1, q.dtype)
    np.matmul(att_used, v, out=y)  # each head written into its channels of (B, Tq, C)
    return y, AttentionCache(q, k, v, att, att_mask, scale)


def causal_attention_backward(dout: np.ndarray, cache: AttentionCache):
    """npgpt.layers.causal_attention_backward: (dq, dk, dv), head views of one fresh (B, T, 3C)
    array, so merge_qkv needs no copy. With numba: the fused kernel where it pays, else batched
    products and the softmax kernel."""
    q, k, v, att, att_mask, scale = cache
    kernels = _kernels_on()
    if kernels and _fused_attention_pays(q.shape[2], q.shape[3]):
        return _kernels.causal_attention_backward(dout, cache)
    softmax_backward = _kernels.softmax_backward if kernels else _reference.softmax_backward
    dq, dk, dv = _kernels.new_heads_buffer(*q.shape, 3, dout.dtype)
    att_used = att if att_mask is None else att * att_mask
    np.matmul(att_used.transpose(0, 1, 3, 2), dout, out=dv)
    datt = dout @ v.transpose(0, 1, 3, 2)  # (B, nh, T, T)
    if att_mask is not None:
        datt *= att_mask
    (dscores,) = softmax_backward(datt, SoftmaxCache(att))
    np.matmul(dscores, k, out=dq)
    dq *= scale
    np.matmul(dscores.transpose(0, 1, 3, 2), q, out=dk)
    dk *= scale
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# The residual sum, in place
# --------------------------------------------------------------------------------------------

def residual(x: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """npgpt.layers.residual: x + branch, summed into `branch`, a fresh array the block owns."""
    branch += x
    return branch


# --------------------------------------------------------------------------------------------
# The layer set
# --------------------------------------------------------------------------------------------

def layer_set(kernels: bool) -> LayerSet:
    """npgpt.layers.REFERENCE with the NumPy rewrites above, and the numba kernels if `kernels`."""
    numpy_rewrites = dict(
        embedding_forward=embedding_forward, linear_forward=linear_forward, linear_backward=linear_backward,
        merge_qkv=merge_qkv, causal_attention_forward=causal_attention_forward,
        causal_attention_backward=causal_attention_backward, residual=residual,
        activation_output_from_cache=ACTIVATION_OUTPUT_FROM_CACHE)
    if not kernels:
        return dataclasses.replace(REFERENCE, **numpy_rewrites)
    K = _kernels
    activations = {**REFERENCE.activations, "gelu": (K.gelu_forward, K.gelu_backward),
                   "swiglu": (K.swiglu_forward, K.swiglu_backward)}
    return dataclasses.replace(
        REFERENCE, **numpy_rewrites, embedding_backward=K.embedding_backward, layernorm_forward=K.layernorm_forward,
        layernorm_backward=K.layernorm_backward, activations=activations,
        cross_entropy_forward=K.cross_entropy_forward, cross_entropy_backward=K.cross_entropy_backward,
        rmsnorm_forward=K.rmsnorm_forward, rmsnorm_backward=K.rmsnorm_backward,
        rope_forward=K.rope_forward, rope_backward=K.rope_backward)


FAST = layer_set(_kernels.ENABLED)
