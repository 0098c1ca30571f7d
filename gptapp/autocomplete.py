"""Autocomplete a prompt with either backend's model: the same text for the same weights and seed."""
from __future__ import annotations

import sys

import numpy as np

from npgpt.data import CharTokenizer

from .errors import UsageError


def encode_prompt(tokenizer: CharTokenizer, prompt: str, block_size: int | None) -> np.ndarray:
    """The prompt as (1, T) ids; an empty prompt starts from token 0. UsageError for unknown characters.

    A prompt longer than block_size is kept whole (it is printed back), but the model only sees its
    last block_size tokens; that is said once on stderr.
    """
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as err:
        raise UsageError(f"--prompt has {err}; change the prompt") from None
    if len(ids) == 0:
        ids = np.zeros(1, dtype=np.int64)
    if block_size is not None and len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} characters but block_size is {block_size}; the model sees "
              f"only its last {block_size}", file=sys.stderr)
    return ids[None, :]


def autocomplete(generate, tokenizer: CharTokenizer, prompt: str, block_size: int | None,
                 max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    """prompt + its continuation. `generate(idx, n, temperature=, top_k=, rng=)` is either model's
    generate (returning ids as anything np.asarray takes); the sampler draws from default_rng(seed),
    so both backends give the same text for the same weights and seed."""
    ids = encode_prompt(tokenizer, prompt, block_size)
    out = np.asarray(generate(ids, max_new_tokens, temperature=temperature, top_k=top_k or None,
                              rng=np.random.default_rng(seed)))
    return prompt + tokenizer.decode(out[0, ids.shape[1]:])
