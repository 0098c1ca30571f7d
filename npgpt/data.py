"""Text data for the character-level GPT: tokenizer, train/val split, random batches.

NumPy only, and shared by both backends (torchgpt and the app use it too). Token ids are int64
throughout, as in the lecture. Dimension letters: B batch, T time (block_size), V vocabulary.
Where the text comes from (path, cache, download) is the app's business: gptapp.data.
Every failure a user can cause raises `DataError` with a one-line message that names the fix.
"""
from __future__ import annotations

import numpy as np


class DataError(Exception):
    """A problem with the training text that the user can fix; the message is one line."""


# --------------------------------------------------------------------------- tokenizer

class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in `chars`.

    `CharTokenizer.from_text(text)` builds the lecture's vocabulary, the sorted distinct characters
    of the training text. `CharTokenizer(chars)` rebuilds one from a list or string of characters
    (e.g. `vocab_string()` stored in a checkpoint), keeping their order.
    """

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character in its vocabulary")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer vocabulary entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            seen: set = set()
            dupes = sorted({c for c in chars if c in seen or seen.add(c)})  # linear in V
            raise ValueError(f"CharTokenizer vocabulary has duplicate characters: {', '.join(map(repr, dupes))}")
        self.chars: list[str] = chars
        # Encoding looks code points up in a sorted table: order[k] is the id of sorted_codes[k].
        codes = _code_points("".join(chars))                     # (V,)
        self._order = np.argsort(codes, kind="stable")           # (V,)
        self._sorted_codes = codes[self._order]                  # (V,)
        self._char_table = np.array(chars, dtype=object)         # (V,) for decode

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Vocabulary = the sorted distinct characters of `text`."""
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def vocab_string(self) -> str:
        """The vocabulary as one plain string, for checkpoints; `CharTokenizer(s)` rebuilds it."""
        return "".join(self.chars)

    def encode(self, s: str) -> np.ndarray:
        """String -> (len(s),) int64 ids. ValueError lists every character not in the vocabulary."""
        codes = _code_points(s)                                                  # (N,)
        pos = np.searchsorted(self._sorted_codes, codes)                         # (N,)
        pos_clipped = np.minimum(pos, self.vocab_size - 1)
        known = self._sorted_codes[pos_clipped] == codes                         # (N,)
        if not known.all():
            raise ValueError(_unknown_chars_message(s, np.flatnonzero(~known)))
        return self._order[pos_clipped].astype(np.int64)

    def decode(self, ids) -> str:
        """Ids (any integer array or list, 0-d or 1-d) -> string. ValueError for ids out of range."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"decode expects integer token ids, got dtype {ids.dtype}")
        if ids.ndim > 1:
            raise ValueError(f"decode takes one sequence, got shape {ids.shape}; decode each row, e.g. decode(ids[0])")
        ids = ids.reshape(-1)
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            shown = ", ".join(str(i) for i in np.unique(ids[bad])[:10])
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {shown}")
        return "".join(self._char_table[ids].tolist())

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, chars={self.vocab_string()!r})"


def _code_points(s: str) -> np.ndarray:
    """The Unicode code points of `s` as a (len(s),) uint32 array (lone surrogates included)."""
    return np.frombuffer(s.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _unknown_chars_message(s: str, positions: np.ndarray) -> str:
    """One line naming each unknown character once, in order of first appearance."""
    seen: dict[str, None] = {}
    for p in positions.tolist():
        seen.setdefault(s[p], None)
    listed = ", ".join(repr(c) for c in seen)
    return (f"{len(seen)} character(s) not in the vocabulary: {listed}; "
            "the vocabulary comes from the training text, so only its characters can be encoded")


# --------------------------------------------------------------------------- split and batches

def train_val_split(data: np.ndarray, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """First `train_fraction` of `data` for training, the rest for validation (the lecture's 90/10)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def get_batch(data: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of `data`: x (B, T) and targets y (B, T) = x shifted left by one, int64."""
    data = np.asarray(data)
    if data.ndim != 1:
        raise ValueError(f"get_batch expects 1-d token data, got shape {data.shape}")
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens but block_size={block_size} needs at least "
                         f"{block_size + 1}; use more data or a smaller block_size")
    ix = rng.integers(len(data) - block_size, size=batch_size)   # (B,) window starts
    idx = ix[:, None] + np.arange(block_size)                    # (B, T)
    x = data[idx].astype(np.int64, copy=False)                   # (B, T)
    y = data[idx + 1].astype(np.int64, copy=False)               # (B, T)
    return x, y


def check_text_length(text: str, block_size: int) -> None:
    """DataError unless `text` is long enough for one (x, y) window of `block_size`."""
    if len(text) < block_size + 1:
        raise DataError(f"the text has {len(text)} characters but block_size={block_size} needs at least "
                        f"{block_size + 1}; use a longer text or a smaller --block_size")
