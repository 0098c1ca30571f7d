"""Helpers of the layer parity tests (parity_tests/test_layers.py, test_properties.py): attention
written with torch ops, and the rounding bounds of softmax's backward and of cross-entropy."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from npgpt import bounds

def softmax_backward_rounding_bound(y: np.ndarray, dout: np.ndarray, dtype) -> np.ndarray:
    """Per-element bound on |dx_ours - dx_torch| for dx = y (dout - s), s = sum_j dout_j y_j.

    Both backends evaluate this formula. Each has error at most
        eps_mach y_i ((V + 4) sum_j |dout_j| y_j + 6 |dout_i - s|)
    (the sum's rounding, y's own few-ulp error, the subtraction and the product), so their
    difference is at most twice that, plus a few of the smallest subnormal numbers (below the
    normal range rounding is absolute, not relative). When y_i ~ 1 and dout_i ~ s the exact dx_i is
    far smaller than these terms: a near one-hot row loses ~log10(1 / (1 - y_max)) digits in any
    backend. With eps_mach = 2 u that is bounds.elementwise(dtype, 2 y_i (...), subnormals=8).
    """
    y, dout = y.astype(np.float64), dout.astype(np.float64)
    V = y.shape[-1]
    s = (dout * y).sum(axis=-1, keepdims=True)
    rounded = 2 * y * ((V + 4) * (np.abs(dout) * y).sum(axis=-1, keepdims=True) + 6 * np.abs(dout - s))
    return bounds.elementwise(dtype, rounded, subnormals=8)


def cross_entropy_rounding_bound(logits: np.ndarray, targets: np.ndarray, dloss: float, dtype):
    """Per-element bound on |dlogits_ours - dlogits_torch|, dlogits = (p - onehot(t)) dloss / N.

    p_i = exp(x_i - max - log Z) has a relative error ~eps_mach (|x_i - max| + log V + 4) from the
    rounding of its exponent; torch then forms p_i / N - 1 / N and npgpt (p_i - 1) / N, each with
    a further eps_mach |p_i - [i == t]| / N. A confidently right row (p_t = 1 - 1e-9, say) has a
    gradient of 1e-9 / N built from terms of size 1 / N, so it keeps only ~7 digits in float64.
    A few of the smallest subnormals are added: below the normal range rounding is absolute.
    Each side within eps_mach = 2 u times those terms: bounds.elementwise(dtype, 2 |dloss| / N per).
    """
    x = logits.astype(np.float64).reshape(-1, logits.shape[-1])  # (N, V)
    N, V = x.shape
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.zeros_like(p)
    onehot[np.arange(N), targets.reshape(-1)] = 1.0
    per = p * (np.abs(x - x.max(-1, keepdims=True)) + np.log(V) + 4) + 4 * np.abs(p - onehot) + 4 * onehot
    return bounds.elementwise(dtype, 2 * abs(dloss) / N * per, subnormals=8).reshape(logits.shape)


def cross_entropy_loss_rounding_bound(logits: np.ndarray, targets: np.ndarray, dtype) -> float:
    """Bound on |loss_ours - loss_torch| for loss = mean over rows of log Z - (x_t - max).

    Per row: x_t - max carries eps_mach |x_t - max|, log Z about eps_mach (V + 2 + log V) from the
    exps, their sum and the log, and the subtraction eps_mach |term|; the mean adds eps_mach N |loss|.
    Twice that bounds the difference (bounds.elementwise, with eps_mach = 2 u). It matters when
    every row is confidently right: the loss is then ~e^-gap, far below these terms.
    """
    x = logits.astype(np.float64).reshape(-1, logits.shape[-1])  # (N, V)
    N, V = x.shape
    shifted = x - x.max(-1, keepdims=True)
    term = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(N), targets.reshape(-1)]  # (N,)
    per_row = np.abs(shifted[np.arange(N), targets.reshape(-1)]) + V + 2 + 2 * np.log(V) + term
    return float(bounds.elementwise(dtype, 2 * (per_row.mean() + N * term.mean())))


def torch_attention(qkv: torch.Tensor, n_head: int, mask: torch.Tensor | None = None,
                    path: str = "explicit") -> torch.Tensor:
    """(B, T, 3C) -> (B, T, C), written with torch ops (explicit) or F.scaled_dot_product_attention."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (z.reshape(B, T, n_head, C // n_head).transpose(1, 2) for z in qkv.split(C, dim=2))
    if path == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // n_head)  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1)
        if mask is not None:
            att = att * mask
        y = att @ v  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C)
