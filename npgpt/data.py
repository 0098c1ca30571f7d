"""Text data for the character-level GPT: tokenizer, train/val split, random batches, Tiny Shakespeare.

NumPy only (npgpt never imports torch). Token ids are int64 throughout, as in the lecture.
Dimension letters: B batch, T time (block_size), V vocabulary.

Where the text comes from (`resolve_data_path`), first match wins:
    1. an explicit path (the `--data` flag),
    2. the environment variable NPGPT_DATA,
    3. the cache, `$XDG_CACHE_HOME/npgpt/tinyshakespeare/input.txt` (default `~/.cache/npgpt/...`),
    4. a download of Tiny Shakespeare into that cache, checked against its SHA-256.
An explicit path or NPGPT_DATA that names a missing file is an error, never a silent fall-through.
Every failure a user can cause raises `DataError` with a one-line message that names the fix.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Callable

import numpy as np

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV_VAR = "NPGPT_DATA"
CACHE_SUBPATH = Path("tinyshakespeare") / "input.txt"   # inside the cache dir
DOWNLOAD_TIMEOUT_S = 30.0
FIX_HINT = f"pass --data PATH or set {DATA_ENV_VAR}"


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
            dupes = sorted({c for c in chars if chars.count(c) > 1})
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


# --------------------------------------------------------------------------- Tiny Shakespeare loader

def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/npgpt`, or `~/.cache/npgpt` when XDG_CACHE_HOME is unset or relative."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "npgpt"


def resolve_data_path(path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                      download: bool = True, opener: Callable[[str], bytes] | None = None,
                      url: str = TINYSHAKESPEARE_URL, sha256: str = TINYSHAKESPEARE_SHA256) -> Path:
    """Find the training text: explicit path > $NPGPT_DATA > cache > download into the cache.

    `opener(url) -> bytes` fetches the download (default: urllib with a timeout); `url` and `sha256`
    override the source and its expected checksum. An empty NPGPT_DATA counts as unset.
    """
    if path is not None:
        return _existing_file(Path(path).expanduser(), "--data")
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        return _existing_file(Path(env).expanduser(), DATA_ENV_VAR)
    cached = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cached / CACHE_SUBPATH
    if cached.is_file():
        return cached
    if not download:
        raise DataError(f"Tiny Shakespeare is not in the cache ({cached}) and downloading is off; {FIX_HINT}")
    _download(url, cached, sha256, opener or _urlopen_bytes)
    return cached


def load_text(path: str | os.PathLike | None = None, **kw) -> str:
    """Resolve the data path (see `resolve_data_path`, which takes `**kw`) and read it as UTF-8."""
    return read_text_file(resolve_data_path(path, **kw))


def read_text_file(path: Path) -> str:
    """The file's text, decoded as strict UTF-8 with no newline translation."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({_describe(exc)}); check its permissions or {FIX_HINT}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at byte offset "
                        f"{exc.start}); convert it to UTF-8 (e.g. iconv -t UTF-8) or {FIX_HINT}") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _existing_file(path: Path, source: str) -> Path:
    """`path` if it is an existing file; otherwise a DataError that names where it came from."""
    if not path.exists():
        raise DataError(f"{source} file not found: {path}; {FIX_HINT} to an existing text file")
    if not path.is_file():
        raise DataError(f"{source} path is not a file: {path}; {FIX_HINT} to a text file")
    return path


def _urlopen_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def _download(url: str, target: Path, sha256: str, opener: Callable[[str], bytes]) -> None:
    """Fetch `url`, write it to a temp file beside `target`, check its SHA-256, then move it into place."""
    try:
        payload = opener(url)
    except (OSError, HTTPException, ValueError) as exc:   # URLError/HTTPError/timeouts are OSErrors
        raise DataError(f"could not download Tiny Shakespeare ({_describe(exc)}); download input.txt from "
                        f"{url} and {FIX_HINT}") from exc
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"cannot write the download cache {target.parent} ({_describe(exc)}); "
                        f"set XDG_CACHE_HOME to a writable directory or {FIX_HINT}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        got = sha256_hex(tmp.read_bytes())
        if got != sha256:
            raise DataError(f"checksum mismatch for the download from {url}: sha256 {got}, expected {sha256}; "
                            f"download input.txt yourself and {FIX_HINT}")
        os.replace(tmp, target)
    except OSError as exc:
        raise DataError(f"cannot write {target} ({_describe(exc)}); "
                        f"set XDG_CACHE_HOME to a writable directory or {FIX_HINT}") from exc
    finally:
        tmp.unlink(missing_ok=True)   # gone already after a successful os.replace


def _describe(exc: BaseException) -> str:
    """A short one-line reason for an exception (urllib wraps the useful part in `.reason`)."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else Exception(str(exc.reason))
    text = str(exc) or type(exc).__name__
    return re.sub(r"\s+", " ", text).strip()
