"""Autocomplete a prompt with either backend's model: the same text for the same weights and seed."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from npgpt.bpe import BPETokenizer
from npgpt.data import CharTokenizer, DataError

from .data import Tokenizer, read_text_file
from .errors import UsageError


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int | None) -> np.ndarray:
    """The prompt as (1, T) ids; an empty prompt starts from token 0, or for GPT-2's tokenizer from
    <|endoftext|> (as GPT-2's unconditional samples do). UsageError for unknown characters.

    A character-level model's prompt longer than block_size is kept whole (it is printed back), but
    the model only sees its last block_size tokens; that is said once on stderr. (check_prompt
    refuses such a prompt for any other tokenizer.)
    """
    try:
        ids = np.asarray(tokenizer.encode(prompt), dtype=np.int64)  # (T,)
    except ValueError as err:
        raise UsageError(f"--prompt has {err}; change the prompt") from None
    if len(ids) == 0:
        start = tokenizer.encoder.get(tokenizer.eot_token, 0) if isinstance(tokenizer, BPETokenizer) else 0
        ids = np.full(1, start, dtype=np.int64)
    if block_size is not None and len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} characters but block_size is {block_size}; the model sees "
              f"only its last {block_size}", file=sys.stderr)
    return ids[None, :]


def check_prompt(tokenizer: Tokenizer, prompt: str, block_size: int | None = None) -> None:
    """UsageError, before any work, unless every character of the prompt is in the vocabulary and, for a
    tokenizer other than characters (GPT-2's BPE), the prompt fits in the model's block_size tokens.

    A character-level model's context is short (tens to hundreds of characters) and continuing the
    end of a longer text is what autocomplete is for: encode_prompt crops such a prompt, with a note.
    """
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as err:
        raise UsageError(f"--prompt {_shown(prompt)} has {err}; change the prompt") from None
    if block_size is not None and not isinstance(tokenizer, CharTokenizer) and len(ids) > block_size:
        raise UsageError(f"--prompt {_shown(prompt)} encodes to {len(ids)} tokens but the model's context "
                         f"(block_size) is {block_size}; shorten the prompt to at most {block_size} tokens")


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The sample command's prompt: --prompt, the text of --prompt_file, or a newline."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("--prompt and --prompt_file exclude each other; pick one")
    if prompt_file is None:
        return "\n" if prompt is None else prompt
    path = Path(prompt_file).expanduser()
    if not path.is_file():
        raise UsageError(f"--prompt_file {path} is not a file; pass the path of a UTF-8 text file")
    try:
        return read_text_file(path)
    except DataError as err:
        raise UsageError(f"--prompt_file: {err}") from None


def _shown(prompt: str, limit: int = 40) -> str:
    return repr(prompt) if len(prompt) <= limit else repr(prompt[:limit]) + f"... ({len(prompt)} characters)"


def autocomplete(generate, tokenizer: Tokenizer, prompt: str, block_size: int | None,
                 max_new_tokens: int, temperature: float, top_k: int, seed: int, top_p: float = 1.0) -> str:
    """prompt + its continuation. `generate(idx, n, temperature=, top_k=, top_p=, rng=)` is either model's
    generate (returning ids as anything np.asarray takes); the sampler draws from default_rng(seed),
    so both backends give the same text for the same weights and seed. top_k 0 and top_p 1 filter nothing.
    A model whose vocabulary is padded past its BPE tokenizer's (nanoGPT's 50304 for GPT-2's 50257) may
    draw a padding id, which has no text: it is left out, as Hugging Face's tokenizers leaves out unknown ids."""
    ids = encode_prompt(tokenizer, prompt, block_size)
    out = np.asarray(generate(ids, max_new_tokens, temperature=temperature, top_k=top_k or None,
                              top_p=top_p if top_p < 1.0 else None, rng=np.random.default_rng(seed)))
    new = out[0, ids.shape[1]:]  # (max_new_tokens,)
    if isinstance(tokenizer, BPETokenizer):
        new = new[new < tokenizer.vocab_size]
    return prompt + tokenizer.decode(new.tolist())
