"""Nucleus (top-p) sampling in npgpt.sampling: the exact sets of tokens kept, the order of the filters
(temperature, top-k, then top-p), ties, and agreement with Hugging Face's TopPLogitsWarper."""
from __future__ import annotations

import numpy as np
import pytest

from npgpt.sampling import sample_next, top_p_filter

# Probabilities 0.15, 0.5, 0.05, 0.3 in a shuffled order: by probability, tokens 1, 3, 0, 2.
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = np.log(PROBS)[None, :]  # (1, 4)


def kept(logits, top_p) -> set[int]:
    out = top_p_filter(np.atleast_2d(logits), top_p)  # (1, V)
    return set(np.flatnonzero(np.isfinite(out[0])).tolist())


def drawn(logits, n=400, **sampling) -> set[int]:
    """Every token sample_next draws in n rows of the same logits (each kept token has probability >= 0.1
    in the cases below, so missing one has odds below 0.9 ** 400)."""
    tokens = sample_next(np.tile(logits, (n, 1)), rng=np.random.default_rng(0), **sampling)
    return set(np.unique(tokens).tolist())


@pytest.mark.parametrize("top_p,expected", [
    (1e-12, {1}),         # a tiny top_p keeps the most likely token alone
    (0.4, {1}),           # 0.5 reaches 0.4
    (0.7, {1, 3}),        # 0.5 < 0.7 <= 0.8
    (0.9, {1, 3, 0}),     # 0.8 < 0.9 <= 0.95
    (0.96, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),  # top_p = 1 keeps every token
])
def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_that_reaches_top_p(top_p, expected):
    assert kept(LOGITS, top_p) == expected
    assert drawn(LOGITS, top_p=top_p) == expected
    out = top_p_filter(LOGITS, top_p)
    np.testing.assert_array_equal(out[np.isfinite(out)], LOGITS[np.isfinite(out)])  # kept logits unchanged


def test_ties_are_kept_together_whatever_their_order():
    """Tokens tied with the least likely one kept all stay: the set does not depend on the order in V."""
    probs = np.array([0.4, 0.2, 0.2, 0.1, 0.1])  # 0.4 + one 0.2 reaches 0.5: both 0.2s stay
    assert kept(np.log(probs), 0.5) == {0, 1, 2}
    assert kept(np.log(probs), 0.85) == {0, 1, 2, 3, 4}  # 0.8 + one 0.1 reaches 0.85: both 0.1s stay
    rng = np.random.default_rng(1)
    for _ in range(5):
        perm = rng.permutation(5)
        assert kept(np.log(probs[perm]), 0.5) == {int(np.flatnonzero(perm == i)[0]) for i in (0, 1, 2)}
    tied_max = np.array([1.0, 2.0, 2.0, 0.0, 2.0])
    assert kept(tied_max, 1e-12) == {1, 2, 4}


def test_filters_apply_in_order_temperature_then_top_k_then_top_p():
    # temperature 2 flattens the probabilities to about 0.38, 0.29, 0.21, 0.12 (tokens 1, 3, 0, 2):
    # top_p 0.45 then needs two tokens, where at temperature 1 the most likely one reaches it
    assert drawn(LOGITS, temperature=1.0, top_p=0.45) == {1}
    assert drawn(LOGITS, temperature=2.0, top_p=0.45) == {1, 3}
    # top_k 2 first leaves 0.5 / 0.8 = 0.625 and 0.375: top_p 0.6 keeps token 1 alone (top_p first
    # would keep {1, 3}, and top_k 2 after it would leave both)
    assert drawn(LOGITS, top_k=2, top_p=0.6) == {1}
    # top_k 3 leaves 0.53, 0.32, 0.16: 0.8 needs two of them, 0.9 all three
    assert drawn(LOGITS, top_k=3, top_p=0.8) == {1, 3}
    assert drawn(LOGITS, top_k=3, top_p=0.9) == {1, 3, 0}


def test_top_p_one_or_none_draws_the_same_tokens():
    logits = np.random.default_rng(2).standard_normal((64, 11)) * 3
    for kw in ({}, {"top_k": 5}):
        a = sample_next(logits, 0.8, rng=np.random.default_rng(3), **kw)
        b = sample_next(logits, 0.8, rng=np.random.default_rng(3), top_p=1.0, **kw)
        np.testing.assert_array_equal(a, b)
    assert (sample_next(logits, 0.0, top_p=1e-9) == np.argmax(logits, axis=-1)).all()  # greedy ignores top_p


@pytest.mark.parametrize("top_p", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_top_p_outside_0_1_is_refused(top_p):
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        sample_next(LOGITS, 1.0, top_p=top_p)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        top_p_filter(LOGITS, top_p)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("top_k", [None, 7])
def test_top_p_keeps_the_same_tokens_as_transformers(top_p, top_k):
    """Hugging Face's TopKLogitsWarper then TopPLogitsWarper on random float64 logits (no ties): the same
    tokens survive as with our filter on the same input."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = np.random.default_rng(4).standard_normal((16, 50)) * 2.5  # (B, V)
    scores = torch.from_numpy(logits)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    hf = TopPLogitsWarper(top_p)(None, scores).numpy()
    ours = top_p_filter(scores.numpy(), top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])
    sizes = np.isfinite(ours).sum(axis=-1)
    assert sizes.min() >= 1
    if top_p <= 0.9:  # the filter did something in every row
        assert sizes.max() < (top_k or 50)
