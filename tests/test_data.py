"""Tests of npgpt.data (tokenizer, split, batches) and gptapp.data (the Tiny Shakespeare loader). No network, no torch.

The one download over a socket goes to an http.server on 127.0.0.1 started by the test itself.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptapp.data import DATA_ENV_VAR, TINYSHAKESPEARE_SHA256, TINYSHAKESPEARE_URL, load_text, resolve_data_path
from npgpt.data import CharTokenizer, DataError, check_text_length, get_batch, train_val_split

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
CACHE_FILE = Path("tinyshakespeare") / "input.txt"


def real_data_path() -> Path:
    env = os.environ.get(DATA_ENV_VAR, "")
    return Path(env) if env else SHARED_DATA


REAL_DATA = real_data_path()  # read before any test's no_env fixture takes NPGPT_DATA away


@pytest.fixture(scope="module")
def shakespeare_bytes() -> bytes:
    path = REAL_DATA
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {path}; set {DATA_ENV_VAR} to run the real-data tests")
    return path.read_bytes()


@pytest.fixture
def no_env(monkeypatch):
    """Loader tests must not see the developer's own NPGPT_DATA."""
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)


def no_network(url: str) -> bytes:
    raise AssertionError(f"the loader tried to download {url} when it should not have")


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg, f"message is not one line: {msg!r}"
    return msg


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_on_tiny_shakespeare(shakespeare_bytes):
    assert hashlib.sha256(shakespeare_bytes).hexdigest() == TINYSHAKESPEARE_SHA256
    text = shakespeare_bytes.decode("utf-8")
    assert len(text) == 1_115_394
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert tok.chars == sorted(set(text))
    assert tok.vocab_string() == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ids.min() == 0 and ids.max() == 64
    assert tok.decode(ids) == text
    # The lecture's example: "hii there" under this vocabulary.
    assert tok.encode("hii there").tolist() == [46, 47, 47, 1, 58, 46, 43, 56, 43]


def test_load_text_reads_the_real_file_verbatim(shakespeare_bytes, no_env):
    text = load_text(REAL_DATA, download=False, opener=no_network)
    assert text.encode("utf-8") == shakespeare_bytes   # no newline translation


def test_tokenizer_ids_follow_sorted_vocabulary():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello").tolist() == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"


def test_tokenizer_from_chars_keeps_order_and_matches_vocab_string():
    tok = CharTokenizer.from_text("the quick brown fox")
    rebuilt = CharTokenizer(tok.vocab_string())
    assert rebuilt.chars == tok.chars
    assert CharTokenizer(["z", "a"]).encode("az").tolist() == [1, 0]   # given order, not re-sorted


def test_tokenizer_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["a", "bc"])
    with pytest.raises(ValueError):
        CharTokenizer.from_text("")


def test_encode_error_lists_every_unknown_char_once_in_order():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as exc:
        tok.encode("axbé\nxzé")
    msg = assert_one_line(exc)
    listed = ["'x'", "'é'", "'\\n'", "'z'"]
    positions = [msg.index(r) for r in listed]
    assert positions == sorted(positions), msg
    assert all(msg.count(r) == 1 for r in listed), msg
    assert "'a'" not in msg and "'b'" not in msg
    assert "training text" in msg


def test_encode_empty_string():
    ids = CharTokenizer("ab").encode("")
    assert ids.dtype == np.int64 and ids.shape == (0,)


def test_decode_rejects_out_of_range_ids():
    tok = CharTokenizer("abc")
    for bad in ([0, 3], [-1], np.array([1, 99], dtype=np.int32)):
        with pytest.raises(ValueError, match=r"out of range \[0, 3\)"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="integer"):
        tok.decode([0.0, 1.0])


def test_decode_accepts_any_integer_array():
    tok = CharTokenizer("abc")
    assert tok.decode(np.array([2, 0, 1], dtype=np.uint8)) == "cab"
    assert tok.decode(np.int64(1)) == "b"
    assert tok.decode([]) == ""


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1))
def test_round_trip_any_text(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


# --------------------------------------------------------------------------- split and batches

def test_train_val_split_sizes():
    data = np.arange(1000, dtype=np.int64)
    train, val = train_val_split(data)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), data)
    train, val = train_val_split(np.arange(1_115_394))
    assert (len(train), len(val)) == (1_003_854, 111_540)
    with pytest.raises(ValueError):
        train_val_split(data, train_fraction=1.5)


def test_get_batch_windows_and_shift():
    data = np.random.default_rng(0).integers(0, 65, size=500)
    x, y = get_batch(data, batch_size=16, block_size=8, rng=np.random.default_rng(1))
    assert x.shape == y.shape == (16, 8)
    assert x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    # Each row is a window of the data starting at the lecture's ix.
    ix = np.random.default_rng(1).integers(len(data) - 8, size=16)
    for b, i in enumerate(ix):
        assert np.array_equal(x[b], data[i:i + 8])
        assert np.array_equal(y[b], data[i + 1:i + 9])


def test_get_batch_same_seed_same_batch():
    data = np.arange(10_000) % 65
    x1, y1 = get_batch(data, 4, 32, np.random.default_rng(42))
    x2, y2 = get_batch(data, 4, 32, np.random.default_rng(42))
    x3, _ = get_batch(data, 4, 32, np.random.default_rng(43))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_get_batch_smallest_data_and_int32_input():
    data = np.arange(9, dtype=np.int32)   # exactly block_size + 1 tokens: one possible window
    x, y = get_batch(data, 3, 8, np.random.default_rng(0))
    assert x.dtype == np.int64
    assert np.array_equal(x, np.tile(np.arange(8), (3, 1)))
    assert np.array_equal(y, np.tile(np.arange(1, 9), (3, 1)))


def test_get_batch_too_little_data():
    with pytest.raises(ValueError, match="8 tokens but block_size=8 needs at least 9"):
        get_batch(np.arange(8), 2, 8, np.random.default_rng(0))


def test_check_text_length():
    check_text_length("x" * 9, 8)
    with pytest.raises(DataError) as exc:
        check_text_length("x" * 5, 8)
    msg = assert_one_line(exc)
    assert "5 characters" in msg and "at least 9" in msg


# --------------------------------------------------------------------------- loader order

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_explicit_path_beats_env_and_cache(tmp_path, monkeypatch):
    explicit = write(tmp_path / "explicit.txt", "explicit")
    monkeypatch.setenv(DATA_ENV_VAR, str(write(tmp_path / "env.txt", "env")))
    write(tmp_path / "cache" / CACHE_FILE, "cache")
    got = resolve_data_path(explicit, cache_dir=tmp_path / "cache", opener=no_network)
    assert got == explicit
    assert load_text(str(explicit), cache_dir=tmp_path / "cache", opener=no_network) == "explicit"


def test_env_beats_cache(tmp_path, monkeypatch):
    env_file = write(tmp_path / "env.txt", "env")
    monkeypatch.setenv(DATA_ENV_VAR, str(env_file))
    write(tmp_path / "cache" / CACHE_FILE, "cache")
    assert resolve_data_path(cache_dir=tmp_path / "cache", opener=no_network) == env_file
    assert load_text(cache_dir=tmp_path / "cache", opener=no_network) == "env"


def test_cache_beats_download(tmp_path, no_env):
    cached = write(tmp_path / "cache" / CACHE_FILE, "cache")
    assert resolve_data_path(cache_dir=tmp_path / "cache", opener=no_network) == cached


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch, no_env):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cached = write(tmp_path / "xdg" / "npgpt" / CACHE_FILE, "xdg cache")
    assert resolve_data_path(opener=no_network) == cached
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cached = write(tmp_path / "home" / ".cache" / "npgpt" / CACHE_FILE, "home cache")
    assert resolve_data_path(opener=no_network) == cached


def test_missing_explicit_path_is_an_error_not_a_fallthrough(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(write(tmp_path / "env.txt", "env")))
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as exc:
        resolve_data_path(missing, cache_dir=tmp_path / "cache", opener=no_network)
    msg = assert_one_line(exc)
    assert "not found" in msg and str(missing) in msg and "--data" in msg and DATA_ENV_VAR in msg


def test_missing_env_path_is_an_error_not_a_fallthrough(tmp_path, monkeypatch):
    write(tmp_path / "cache" / CACHE_FILE, "cache")
    missing = tmp_path / "gone.txt"
    monkeypatch.setenv(DATA_ENV_VAR, str(missing))
    with pytest.raises(DataError) as exc:
        resolve_data_path(cache_dir=tmp_path / "cache", opener=no_network)
    msg = assert_one_line(exc)
    assert DATA_ENV_VAR in msg and "not found" in msg and str(missing) in msg


def test_directory_as_data_path(tmp_path, no_env):
    with pytest.raises(DataError, match="not a file"):
        resolve_data_path(tmp_path, opener=no_network)


def test_no_cache_and_download_off(tmp_path, no_env):
    with pytest.raises(DataError) as exc:
        resolve_data_path(cache_dir=tmp_path, download=False, opener=no_network)
    assert "--data" in assert_one_line(exc)


# --------------------------------------------------------------------------- download

def test_download_writes_cache_when_checksum_matches(tmp_path, no_env):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    calls = []

    def opener(url):
        calls.append(url)
        return payload

    got = resolve_data_path(cache_dir=tmp_path, opener=opener, sha256=hashlib.sha256(payload).hexdigest())
    assert calls == [TINYSHAKESPEARE_URL]
    assert got == tmp_path / CACHE_FILE and got.read_bytes() == payload
    assert [p.name for p in (tmp_path / "tinyshakespeare").iterdir()] == ["input.txt"]   # no temp left
    # A second call finds the cache and does not download again.
    assert resolve_data_path(cache_dir=tmp_path, opener=no_network) == got


def test_download_real_bytes_default_checksum(tmp_path, no_env, shakespeare_bytes):
    text = load_text(cache_dir=tmp_path, opener=lambda url: shakespeare_bytes)
    assert len(text) == 1_115_394
    assert (tmp_path / CACHE_FILE).read_bytes() == shakespeare_bytes


def test_download_checksum_mismatch_leaves_nothing(tmp_path, no_env):
    with pytest.raises(DataError) as exc:
        resolve_data_path(cache_dir=tmp_path, opener=lambda url: b"<html>rate limited</html>")
    msg = assert_one_line(exc)
    assert "checksum" in msg and TINYSHAKESPEARE_SHA256 in msg
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_download_offline_is_one_line_error(tmp_path, no_env):
    def offline(url):
        raise OSError("[Errno -3] Temporary failure in name resolution\n(more detail)")

    with pytest.raises(DataError) as exc:
        resolve_data_path(cache_dir=tmp_path, opener=offline)
    msg = assert_one_line(exc)
    assert msg.startswith("could not download Tiny Shakespeare (")
    assert "name resolution" in msg and TINYSHAKESPEARE_URL in msg
    assert "--data PATH" in msg and DATA_ENV_VAR in msg
    assert not (tmp_path / CACHE_FILE).exists()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    """An http.server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_through_default_opener_from_local_server(tmp_path, no_env, local_server):
    base, root = local_server
    payload = "To be, or not to be: that is the question.\n".encode("utf-8")
    (root / "input.txt").write_bytes(payload)
    cache = tmp_path / "cache"
    text = load_text(cache_dir=cache, url=f"{base}/input.txt", sha256=hashlib.sha256(payload).hexdigest())
    assert text == payload.decode("utf-8")
    assert (cache / CACHE_FILE).read_bytes() == payload


def test_download_http_404_is_data_error(tmp_path, no_env, local_server):
    base, _ = local_server
    with pytest.raises(DataError) as exc:
        resolve_data_path(cache_dir=tmp_path / "cache", url=f"{base}/missing.txt")
    msg = assert_one_line(exc)
    assert "404" in msg and "--data" in msg
    assert not (tmp_path / "cache" / CACHE_FILE).exists()


# --------------------------------------------------------------------------- reading

def test_non_utf8_file_gives_byte_offset(tmp_path, no_env):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf".encode() + "é au lait".encode("latin-1"))
    with pytest.raises(DataError) as exc:
        load_text(bad)
    msg = assert_one_line(exc)
    assert "not UTF-8" in msg and "byte offset 3" in msg and "0xe9" in msg and str(bad) in msg


def test_unreadable_file(tmp_path, no_env, monkeypatch):
    target = write(tmp_path / "secret.txt", "hidden")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError) as exc:
        load_text(target)
    msg = assert_one_line(exc)
    assert "cannot read" in msg and "Permission denied" in msg and "--data" in msg
