"""Picking the next token from logits: shared by npgpt and torchgpt so both sample the same text.

Both backends hand the last position's logits (as float64 NumPy) to `sample_next`, and draw from
the same `np.random.Generator`; the same seed therefore gives the same tokens in either backend.
"""
from __future__ import annotations

import numpy as np


def sample_next(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw one token id per row of `logits` (B, V); returns (B,) int64.

    temperature == 0 means greedy decoding (argmax). top_k keeps only the k largest logits.
    Sampling is by inverse CDF on one uniform number per row, so it is fully determined by `rng`.
    """
    logits = np.asarray(logits, dtype=np.float64)  # (B, V)
    if not temperature >= 0 or temperature == float("inf"):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    if rng is None:
        rng = np.random.default_rng()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]  # (B, 1) k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, V)
    cdf = np.cumsum(probs, axis=-1)
    # Index = how many CDF entries lie at or below u: a zero-probability token is never picked.
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]  # (B, 1), scaled so rounding never overshoots
    return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1).astype(np.int64)
