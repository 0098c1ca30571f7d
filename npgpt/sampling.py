"""Picking the next token from logits: shared by npgpt and torchgpt so both sample the same text.

Both backends hand the last position's logits (as float64 NumPy) to `sample_next`, and draw from
the same `np.random.Generator`; the same seed therefore gives the same tokens in either backend.
The filters follow Hugging Face's logits warpers, in their order: temperature, top-k, then top-p.
"""
from __future__ import annotations

import numpy as np


def check_top_p(top_p) -> None:
    """ValueError unless top_p is None or a number in (0, 1]."""
    if top_p is None:
        return
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating)) \
            or not 0.0 < top_p <= 1.0:  # also rejects NaN
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filtering: logits (B, V) with every token outside the nucleus set to -inf.

    As Hugging Face's TopPLogitsWarper: sorted by probability, the tokens whose cumulative probability
    counted from the least likely is <= 1 - top_p go, and the most likely token always stays. What is
    left is the smallest set of most likely tokens whose probability reaches top_p. Tokens tied with
    the least likely one kept are kept too, so the set does not depend on the tokens' order in V.
    """
    logits = np.asarray(logits, dtype=np.float64)  # (B, V)
    check_top_p(top_p)
    order = np.argsort(logits, axis=-1, kind="stable")  # (B, V) ascending
    ascending = np.take_along_axis(logits, order, axis=-1)  # (B, V)
    probs = np.exp(ascending - ascending[:, -1:])
    probs /= probs.sum(axis=-1, keepdims=True)
    remove = np.cumsum(probs, axis=-1) <= 1.0 - top_p  # (B, V), in ascending order
    remove[:, -1] = False  # the most likely token always stays
    # the least likely logit kept: the first one not removed (cumulative sums only grow)
    cut = np.take_along_axis(ascending, np.argmin(remove, axis=-1)[:, None], axis=-1)  # (B, 1)
    return np.where(logits < cut, -np.inf, logits)


def sample_next(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                rng: np.random.Generator | None = None, top_p: float | None = None) -> np.ndarray:
    """Draw one token id per row of `logits` (B, V); returns (B,) int64.

    temperature == 0 means greedy decoding (argmax). top_k keeps only the k largest logits; then
    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (see
    top_p_filter). Sampling is by inverse CDF on one uniform number per row, so it is fully
    determined by `rng`.
    """
    logits = np.asarray(logits, dtype=np.float64)  # (B, V)
    if not temperature >= 0 or temperature == float("inf"):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    check_top_p(top_p)
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    if rng is None:
        rng = np.random.default_rng()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]  # (B, 1) k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, V)
    cdf = np.cumsum(probs, axis=-1)
    # Index = how many CDF entries lie at or below u: a zero-probability token is never picked.
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]  # (B, 1), scaled so rounding never overshoots
    return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1).astype(np.int64)
