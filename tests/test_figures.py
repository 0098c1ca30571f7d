"""docs/figures.py: the script runs headless and writes three PNGs; its numbers mean what they say."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "docs"))

import figures  # noqa: E402  (docs/figures.py)
from npgpt import GPT, GPTConfig, bounds  # noqa: E402
from gptapp.data import DATA_ENV_VAR, resolve_data_path  # noqa: E402
from npgpt.data import CharTokenizer, DataError, train_val_split  # noqa: E402
from npgpt.layers import BlockOptions, block_forward, embedding_forward  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def data_path() -> Path:
    """$NPGPT_DATA, else the shared checkout's copy, else the cache; skip rather than download."""
    if not os.environ.get(DATA_ENV_VAR) and SHARED_DATA.is_file():
        return SHARED_DATA
    try:
        return resolve_data_path(download=False)
    except DataError as exc:
        pytest.skip(f"no Tiny Shakespeare without a download: {exc}")


@pytest.fixture(scope="module")
def train_tokens() -> np.ndarray:
    text = data_path().read_text(encoding="utf-8")
    train, _ = train_val_split(CharTokenizer.from_text(text).encode(text))
    return train


def test_quick_run_writes_three_pngs(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("DISPLAY", None)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "figures.py"), "--quick", "--out", str(tmp_path),
         "--data", str(data_path())],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"figures.py failed:\n{proc.stdout}\n{proc.stderr}"
    for name in figures.FIGURES:
        png = tmp_path / name
        assert png.is_file(), f"{name} was not written; output:\n{proc.stdout}"
        head = png.read_bytes()[:8]
        size = png.stat().st_size
        print(f"{name}: {size} bytes")
        assert head == PNG_SIGNATURE, f"{name} is not a PNG (starts with {head!r})"
        assert 5_000 < size < 1_000_000, f"{name} has an unlikely size: {size} bytes"


def test_missing_data_is_a_clean_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "figures.py"), "--quick", "--out", str(tmp_path),
         "--data", str(tmp_path / "nope.txt")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def one_torch_thread():
    """Tiny tensors, and the suite runs in parallel on few cores: extra threads only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_loss_curves_coincide(train_tokens, one_torch_thread, dtype):
    """npgpt + npgpt AdamW and torchgpt + torch AdamW, same init and batches: the same losses, to the
    parity of npgpt and torchgpt over the 15 steps' forward and backward passes (each at most the
    PARITY_DEPTH stages of a 2-layer model; sums of at most 4 n_embd = 64 terms)."""
    steps, config = 15, GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=16)
    np_losses, torch_losses = figures.train_both(train_tokens, config, steps=steps, batch_size=4, dtype=dtype)
    diff = np.max(np.abs(np_losses - torch_losses))
    bound = bounds.parity(dtype, n=4 * config.n_embd, depth=steps * bounds.PARITY_DEPTH) * np.max(torch_losses)
    print(f"{np.dtype(dtype).name}: losses {np_losses[0]:.4f} -> {np_losses[-1]:.4f}, max |diff| {diff:.2e}")
    assert np_losses.shape == torch_losses.shape == (steps,)
    assert np_losses[-1] < np_losses[0], "the run should learn something"
    assert diff <= bound, f"loss curves differ by {diff:.2e} (bound {bound:.2e})"


def test_attention_maps_are_the_models_attention():
    """The maps are causal probability rows and equal the `att` kept in attention_forward's cache."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config, seed=3, dtype=np.float64)
    idx = np.random.default_rng(0).integers(11, size=(1, 7))
    maps = figures.attention_maps(model, idx)
    assert maps.shape == (2, 2, 7, 7)
    # each row: T = 7 positive probabilities, each a rounded quotient, summed in another order than exp's sum
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, rtol=bounds.reordered(np.float64, n=7, cancellation=1.0),
                               atol=0)
    assert np.all(np.triu(maps, k=1) == 0.0), "attention must never look at a later position"

    x, _ = embedding_forward(idx, model.params["transformer.wte.weight"], model.params["transformer.wpe.weight"])
    for i in range(config.n_layer):
        x, cache = block_forward(x, model.block_params(i), BlockOptions.of(config))
        att = cache.attention.att[0]  # (nh, T, T), batch row 0
        np.testing.assert_array_equal(maps[i], att)  # bitwise: attention_probs, on the same q and k


def test_parity_rows_fallback_is_at_rounding_level():
    config = GPTConfig(vocab_size=13, block_size=6, n_layer=1, n_head=2, n_embd=8)
    for dtype, bound in (("float64", figures.BOUNDS["float64"]), ("float32", figures.BOUNDS["float32"])):
        rows = figures.gradient_parity(np.dtype(dtype), config, batch_size=2)
        assert [r[0] for r in rows] == list(GPT(config).params)
        worst = max(r[3] for r in rows)
        print(f"{dtype}: worst relative gradient error {worst:.2e}")
        assert worst < bound


def test_attention_maps_from_a_checkpoint(tmp_path):
    """--ckpt: a train_np.py checkpoint gives back the same model and its own vocabulary."""
    ckpt_mod = pytest.importorskip("gptapp.checkpoint")
    config = GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, seed=5)
    path = tmp_path / "ckpt_last.npz"
    ckpt_mod.save_npz(path, ckpt_mod.Checkpoint(backend="numpy", model="gpt", gpt_config=config,
                                                vocab="abc\n", params=model.params))
    loaded, tok = figures.load_checkpoint_model(str(path), CharTokenizer("xyz"))
    assert tok.vocab_string() == "abc\n"
    for name, value in model.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    idx = tok.encode("abc\nab")[None, :]
    np.testing.assert_array_equal(figures.attention_maps(loaded, idx), figures.attention_maps(model, idx))

    bigram = tmp_path / "bigram.npz"
    ckpt_mod.save_npz(bigram, ckpt_mod.Checkpoint(backend="numpy", model="bigram", gpt_config=None, vocab="ab",
                                                  params={"token_embedding_table.weight": np.zeros((2, 2),
                                                                                                   np.float32)}))
    with pytest.raises(figures.FigureError, match="no attention"):
        figures.load_checkpoint_model(str(bigram), tok)
    with pytest.raises(figures.FigureError, match="not found"):
        figures.load_checkpoint_model(str(tmp_path / "missing.npz"), tok)
