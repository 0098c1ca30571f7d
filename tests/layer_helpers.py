"""The block's attention steps as one pair, for the tests of npgpt.layers and npgpt.fast: split the
heads, QK-norm, RoPE, the KV slot, the causal core, merge (each step optional as in the block)."""
from __future__ import annotations

from typing import NamedTuple

class QKAttentionCache(NamedTuple):
    q_norm: object
    k_norm: object
    q_rope: object
    k_rope: object
    attention: object


def qk_attention_forward(layers, qkv, n_head, q_norm, k_norm, rope, mask=None, kv=None, eps=1e-5):
    """The block's attention steps from qkv (B, T, 3C) to y (B, T, C): split, QK-norm (gains given),
    RoPE (angles given), the KV slot (given), the causal core, merge. Returns (y, caches)."""
    q, k, v = layers.split_qkv(qkv, n_head)
    q, c_qn = layers.rmsnorm_forward(q, q_norm, eps) if q_norm is not None else (q, None)
    k, c_kn = layers.rmsnorm_forward(k, k_norm, eps) if k_norm is not None else (k, None)
    q, c_qr = layers.rope_forward(q, *rope) if rope is not None else (q, None)
    k, c_kr = layers.rope_forward(k, *rope) if rope is not None else (k, None)
    k, v = layers.kv_append(kv, k, v) if kv is not None else (k, v)
    y, c_att = layers.causal_attention_forward(q, k, v, 0.0, None, mask)
    return layers.merge_heads(y), QKAttentionCache(c_qn, c_kn, c_qr, c_kr, c_att)


def qk_attention_backward(layers, dout, caches):
    """qk_attention_forward's steps reversed: (dqkv,), then the gains' gradients if QK-norm ran."""
    c_qn, c_kn, c_qr, c_kr, c_att = caches
    dq, dk, dv = layers.causal_attention_backward(layers.split_heads(dout, c_att.q.shape[1]), c_att)
    (dq,) = layers.rope_backward(dq, c_qr) if c_qr is not None else (dq,)
    (dk,) = layers.rope_backward(dk, c_kr) if c_kr is not None else (dk,)
    gains = []
    if c_qn is not None:
        dq, dgq = layers.rmsnorm_backward(dq, c_qn)
        dk, dgk = layers.rmsnorm_backward(dk, c_kn)
        gains = [dgq, dgk]
    return (layers.merge_qkv(dq, dk, dv), *gains)
