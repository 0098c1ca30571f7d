"""Generation in both backends: the same tokens, and KV-cache logits equal to uncached ones.

Both backends hand the last position's logits to the shared npgpt.sampling.sample_next, so with the
same weights and the same np.random.Generator seed they must produce the same tokens: greedily,
and when sampling. The KV cache must not change any logit, also once the context is longer than
block_size (the window then slides and the cache is rebuilt from the last block_size tokens).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from npgpt.compare import bounds, compare_all
from parity_tests.twins import make_npgpt, parity_sizes, small_config, torch_twin

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
BS = 6  # block_size: small, so 20 new tokens run well past it


def pair(dtype, seed=0, attention="sdpa", **overrides):
    """A random GPT in eval mode and its twin. Weights at scale 0.5 give logits spread over a few
    units, so the greedy choice is never a near-tie that float32 rounding could flip."""
    cfg = small_config(block_size=BS, dropout=0.1, **overrides)
    model = make_npgpt(cfg, dtype, seed, scale=0.5).eval()
    return model, torch_twin(model, attention).eval()


def uncached_greedy(model, idx, n):
    """The reference: argmax of a full uncached forward over the last block_size tokens, n times.
    Also returns the smallest gap between the two largest logits met on the way, and the largest
    norm of the last position's logits (B, V)."""
    gap, norm = np.inf, 0.0
    for _ in range(n):
        logits, _ = model.forward(idx[:, -model.config.block_size:])
        top2 = np.sort(logits[:, -1], axis=-1)[:, -2:]  # (B, 2)
        gap = min(gap, float((top2[:, 1] - top2[:, 0]).min()))
        norm = max(norm, float(np.linalg.norm(logits[:, -1].astype(np.float64))))
        idx = np.concatenate([idx, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return idx, gap, norm


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_same_tokens(dtype, attention):
    model, twin = pair(dtype, seed=3, attention=attention)  # seed 3: no row settles on one token
    idx = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 2))
    ours = model.generate(idx, 20, temperature=0.0)
    theirs = twin.generate(torch.from_numpy(idx), 20, temperature=0.0).numpy()
    reference, gap, norm = uncached_greedy(model, idx, 20)
    print("npgpt ", ours.tolist(), "\ntorch ", theirs.tolist(), f"\nsmallest top-2 logit gap {gap:.3g}")
    # a near-tie could be flipped by rounding alone: each logit errs by at most the forward's
    # normwise bound (float32's, the larger) times the logits' norm, so a gap of twice that is safe
    error = bounds(np.float32, *parity_sizes(model.config, *idx.shape))["forward"] * norm
    assert gap > 2 * error, (gap, error)
    assert ours.shape == (3, 22) and np.array_equal(ours, reference)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, model.generate(idx, 20, temperature=0.0, use_cache=False))
    assert all(len(set(row[BS + 2:])) > 2 for row in ours.tolist())  # past block_size, still varied


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.8, 3), (1.5, None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_same_seed_same_tokens(dtype, temperature, top_k):
    model, twin = pair(dtype, seed=2)
    idx = np.random.default_rng(3).integers(0, model.config.vocab_size, (4, 3))
    ours = model.generate(idx, 20, temperature, top_k, rng=np.random.default_rng(42))
    theirs = twin.generate(torch.from_numpy(idx), 20, temperature, top_k, rng=np.random.default_rng(42))
    print("npgpt ", ours.tolist(), "\ntorch ", theirs.tolist())
    assert np.array_equal(ours, theirs.numpy())
    other = model.generate(idx, 20, temperature, top_k, rng=np.random.default_rng(43))
    assert not np.array_equal(ours, other)  # the seed matters: the tokens are really sampled


def cached_last_logits(step_fn, reset_fn, tokens: np.ndarray, bs: int, prompt: int):
    """Walk `tokens` (B, N) the way generate() does: prefill the prompt, then one token at a time
    through the cache; once it holds bs positions, reset it and prefill the last bs tokens.
    Returns the last position's logits after each step: [(B, V)] for contexts prompt..N."""
    out = [step_fn(tokens[:, :prompt], 0)[:, -1]]
    filled = prompt
    for t in range(prompt, tokens.shape[1]):
        if filled == bs:  # the window slides: every position shifts, so rebuild the cache
            reset_fn()
            out.append(step_fn(tokens[:, t + 1 - bs:t + 1], 0)[:, -1])
        else:
            out.append(step_fn(tokens[:, t:t + 1], filled)[:, -1])
            filled += 1
    return out


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_logits_equal_uncached(dtype, attention):
    model, twin = pair(dtype, seed=4, attention=attention)
    B, N, prompt = 2, 3 * BS, 2
    tokens = np.random.default_rng(5).integers(0, model.config.vocab_size, (B, N))

    # uncached: a full forward over the (cropped) context for every length
    uncached = [model.forward(tokens[:, max(0, t - BS):t])[0][:, -1] for t in range(prompt, N + 1)]
    with torch.no_grad():
        uncached_t = [twin(torch.from_numpy(tokens[:, max(0, t - BS):t]))[0][:, -1]
                      for t in range(prompt, N + 1)]

    kv = model.new_kv_cache(B)

    def np_reset():
        kv.length = 0

    def np_step(new, start):
        assert kv.length == start
        return model.forward_cached(new, kv)

    state = {"cache": None}

    def t_step(new, start):
        new = torch.from_numpy(new)
        with torch.no_grad():
            if start == 0:
                logits, state["cache"] = twin.prefill(new)
                return logits
            return twin.forward_cached(new, state["cache"], start)

    cached = cached_last_logits(np_step, np_reset, tokens, BS, prompt)
    cached_t = cached_last_logits(t_step, lambda: None, tokens, BS, prompt)
    assert len(cached) == N + 1 - prompt > 2 * BS  # well past block_size

    def table(xs):
        return {f"context {t} last logits": x for t, x in zip(range(prompt, N + 1), xs)}

    tol = bounds(dtype, *parity_sizes(model.config, B, BS))["forward"]
    compare_all(table(cached), table(uncached), rtol=tol, header="npgpt: KV cache vs uncached")
    compare_all(table(cached_t), table(uncached_t), rtol=tol, header="torch: KV cache vs uncached")
    compare_all(table(cached), table(cached_t), rtol=tol, header="KV cache: npgpt vs torch")


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_logits_all_positions(dtype):
    """The cached forward of a whole block equals the uncached forward at every position."""
    model, twin = pair(dtype, seed=6)
    idx = np.random.default_rng(7).integers(0, model.config.vocab_size, (2, BS))
    ours = model.forward_cached(idx[:, :4], kv := model.new_kv_cache(2))
    ours = np.concatenate([ours, model.forward_cached(idx[:, 4:], kv)], axis=1)
    with torch.no_grad():
        theirs, _ = twin.prefill(torch.from_numpy(idx))
    tol = bounds(dtype, *parity_sizes(model.config, *idx.shape))["forward"]
    compare_all({"logits": ours}, {"logits": model.forward(idx)[0]}, rtol=tol,
                header="npgpt: prefill 4 + 2 cached vs forward")
    compare_all({"logits": ours}, {"logits": theirs}, rtol=tol,
                header="cached logits: npgpt vs torch")
    with pytest.raises(ValueError, match="block_size"):
        model.forward_cached(idx[:, :1], kv)  # the cache is full
    with pytest.raises(ValueError, match="block_size"):
        twin.forward_cached(torch.from_numpy(idx[:, :1]), twin.prefill(torch.from_numpy(idx))[1], BS)
