"""Where the training text comes from, and the text of a run: Tiny Shakespeare found or downloaded,
encoded and split, with a checkpoint's tokenizer (its characters, or GPT-2's BPE) or the text's characters.

Where the text comes from (`resolve_data_path`), first match wins:
    1. an explicit path (the `--data` flag),
    2. the environment variable NPGPT_DATA,
    3. the cache, `$XDG_CACHE_HOME/npgpt/tinyshakespeare/input.txt` (default `~/.cache/npgpt/...`),
    4. a download of Tiny Shakespeare into that cache, checked against its SHA-256.
An explicit path or NPGPT_DATA that names a missing file is an error, never a silent fall-through.
Every failure a user can cause raises `DataError` (npgpt.data's) with a one-line message that names the fix.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Callable

import numpy as np

from npgpt.bpe import BPETokenizer
from npgpt.data import CharTokenizer, DataError, train_val_split

from .errors import UsageError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV_VAR = "NPGPT_DATA"
CACHE_SUBPATH = Path("tinyshakespeare") / "input.txt"   # inside the cache dir
DOWNLOAD_TIMEOUT_S = 30.0
FIX_HINT = f"pass --data PATH or set {DATA_ENV_VAR}"
UTF8_BOM = b"\xef\xbb\xbf"


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
    """The file's text, decoded as strict UTF-8 with no newline translation. A UTF-8 byte order mark
    at its start (editors on Windows write one) is no character of the text: it is dropped, with a
    note on stderr, rather than becoming a token of the vocabulary."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({_describe(exc)}); check its permissions or {FIX_HINT}") from exc
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
        print(f"note: {path} begins with a UTF-8 byte order mark (EF BB BF); it is not part of the text and "
              "was dropped", file=sys.stderr)
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


# --------------------------------------------------------------------------- the text of a run

Tokenizer = CharTokenizer | BPETokenizer  # what a run encodes its text with: encode, decode, vocab_size


def training_splits(text: str, tokenizer: Tokenizer, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode `text` and split it 90/10 (int64 ids); DataError unless both splits hold a (block_size + 1)
    window. The text's length is told in characters for a character tokenizer, in tokens for BPE."""
    try:
        data = np.asarray(tokenizer.encode(text), dtype=np.int64)  # (N,)
    except ValueError as err:
        raise DataError(f"the training text does not fit the checkpoint's vocabulary: {err}") from None
    train_data, val_data = train_val_split(data)
    length = f"{len(text)} characters" if isinstance(tokenizer, CharTokenizer) else f"{len(data)} tokens"
    for name, split in (("train", train_data), ("val", val_data)):
        if len(split) < block_size + 1:
            raise DataError(f"the text has {length}, so the {name} split has {len(split)} tokens, "
                            f"fewer than block_size + 1 = {block_size + 1}; use a longer text or a smaller "
                            "--block_size")
    return train_data, val_data


def checkpoint_tokenizer(ckpt, vocab_path: str | None, default_text) -> Tokenizer:
    """The tokenizer of a checkpoint: its GPT-2 tokenizer or its own vocabulary, or (nanoGPT files carry
    none) the sorted characters of the text at `vocab_path`, else of `default_text()`. DataError/UsageError
    if they do not match the model's vocab_size, or for a Hugging Face folder without tokenizer files."""
    if ckpt.tokenizer is not None:
        return ckpt.tokenizer
    if ckpt.vocab is not None:
        return CharTokenizer(ckpt.vocab)
    if ckpt.backend == "hf":
        raise DataError(f"{ckpt.path} has no tokenizer files (vocab.json and merges.txt); copy them from the "
                        "model's hub folder (GPT-2's: openai-community/gpt2) into it")
    if vocab_path is not None:
        path = Path(vocab_path).expanduser()
        if not path.is_file():
            raise DataError(f"--vocab file not found: {path}; pass the text the model was trained on")
        text, source = read_text_file(path), f"--vocab {path}"
    else:
        text, source = default_text(), "Tiny Shakespeare (the default vocabulary)"
    if not text:
        raise DataError(f"{source} is empty; pass the text the model was trained on with --vocab")
    tokenizer = CharTokenizer.from_text(text)
    if tokenizer.vocab_size != ckpt.vocab_size:
        raise UsageError(f"{ckpt.path} has vocab_size={ckpt.vocab_size} but {source} has "
                         f"{tokenizer.vocab_size} distinct characters; pass the model's training text with --vocab")
    return tokenizer
