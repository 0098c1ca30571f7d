"""gptapp.checkpoint and the .pt side in gptapp.torch_checkpoint: round trips, atomic writes (a writer
that fails halfway, a process killed halfway: the previous file stays whole), and files that must be
refused (pickles that would run code, truncated or mismatched checkpoints)."""
from __future__ import annotations

import errno
import math
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from checkpoint_helpers import CFG, VOCAB, Evil, make_checkpoint, torch_payload
from train_helpers import ROOT, SUBPROCESS_ENV

from gptapp.checkpoint import (
    CheckpointError,
    atomic_write,
    checkpoint_kind,
    ensure_writable_dir,
    load_checkpoint,
    load_npz,
    save_npz,
)
from npgpt.config import GPTConfig
from npgpt.model import init_params
from gptapp.torch_checkpoint import load_torch_checkpoint, save_torch_checkpoint


def temp_files(directory) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- round trips

def test_npz_round_trip(tmp_path):
    ckpt = make_checkpoint()
    save_npz(tmp_path / "c.npz", ckpt)
    back = load_npz(tmp_path / "c.npz")
    assert back.vocab == VOCAB and back.gpt_config == CFG and back.iter_num == 3
    assert back.best_val_loss == math.inf and back.rng == ckpt.rng
    assert all(np.array_equal(back.params[k], v) and back.params[k].dtype == v.dtype for k, v in ckpt.params.items())
    assert np.array_equal(back.optimizer["exp_avg.decay"], np.arange(4.0)) and int(back.optimizer["step"]) == 3
    # the restored generator continues the saved stream
    g = np.random.default_rng()
    g.bit_generator.state = back.rng["data"]
    h = np.random.default_rng(1)
    h.random(7)
    assert g.random() == h.random()
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:  # plain arrays only
        assert all(f[k].dtype != object for k in f.files)
    assert oct((tmp_path / "c.npz").stat().st_mode & 0o777) != oct(0o600), "the mkstemp mode leaked through"


def test_torch_round_trip_and_kind_by_content(tmp_path):
    params = init_params(CFG, seed=0)
    save_torch_checkpoint(tmp_path / "c.pt", torch_payload(params))
    ckpt = load_torch_checkpoint(tmp_path / "c.pt")
    assert ckpt.backend == "torch" and ckpt.vocab == VOCAB and ckpt.best_val_loss == 2.5
    assert all(np.array_equal(ckpt.params[k], v) for k, v in params.items())
    # both formats are zip archives: the content decides, whatever the suffix says
    (tmp_path / "c.pt").rename(tmp_path / "renamed.npz")
    assert checkpoint_kind(tmp_path / "renamed.npz") == "torch"
    save_npz(tmp_path / "real.pt", make_checkpoint())
    assert checkpoint_kind(tmp_path / "real.pt") == "npz"
    assert load_checkpoint(tmp_path / "real.pt").vocab == VOCAB
    with pytest.raises(CheckpointError, match="is a PyTorch checkpoint.*not an .npz"):
        load_checkpoint(tmp_path / "renamed.npz")  # no torch loader given: npgpt never imports torch


# --------------------------------------------------------------------------- atomic writes

def test_writer_failing_halfway_leaves_the_previous_npz(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_last.npz"
    save_npz(path, make_checkpoint(1))
    before = path.read_bytes()

    def half_then_disk_full(f, **arrays):
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        save_npz(path, make_checkpoint(2))
    assert path.read_bytes() == before and load_npz(path).iter_num == 1
    assert temp_files(tmp_path) == [], "the temporary file was not removed"


def test_writer_failing_halfway_leaves_the_previous_pt(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_last.pt"
    save_torch_checkpoint(path, torch_payload(init_params(CFG, seed=0)))
    before = path.read_bytes()

    def half_then_interrupted(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_torch_checkpoint(path, torch_payload(init_params(CFG, seed=1)))
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []


def test_process_killed_during_a_write_leaves_the_previous_file(tmp_path):
    """SIGKILL (no handler, no cleanup) halfway through the write of the replacement."""
    path = tmp_path / "ckpt_last.npz"
    save_npz(path, make_checkpoint(1))
    before = path.read_bytes()
    child = textwrap.dedent(f"""
        import sys, time
        from gptapp.checkpoint import atomic_write
        def slow(f):
            f.write(b"x" * 100_000)
            f.flush()
            print("halfway", flush=True)
            time.sleep(60)
        atomic_write({str(path)!r}, slow)
    """)
    p = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "halfway"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert path.read_bytes() == before and load_npz(path).iter_num == 1
    assert len(temp_files(tmp_path)) == 1  # the torn temporary is left beside it, never in its place


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"one"))
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two" and temp_files(tmp_path) == []


# --------------------------------------------------------------------------- refused and damaged files

def test_pickle_in_npz_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", meta=np.array([Evil(marker)], dtype=object))
    with pytest.raises(CheckpointError, match="refused.*pickled"):
        load_npz(tmp_path / "evil.npz")
    assert not marker.exists()


def test_pickle_in_pt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"x": Evil(marker)}, "model_args": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused.*could run code"):
        load_torch_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("ext", [".npz", ".pt"])
def test_truncated_checkpoint(tmp_path, ext):
    path = tmp_path / f"c{ext}"
    if ext == ".npz":
        save_npz(path, make_checkpoint())
    else:
        save_torch_checkpoint(path, torch_payload(init_params(CFG, seed=0)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path, torch_loader=load_torch_checkpoint)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_names_the_parameter(tmp_path):
    params = init_params(CFG, seed=0)
    params["transformer.wpe.weight"] = np.zeros((4, 8), np.float32)  # block_size 4, not 8
    save_torch_checkpoint(tmp_path / "c.pt", torch_payload(params))
    wanted = r"transformer.wpe.weight has shape \(4, 8\) but the model needs \(8, 8\)"
    with pytest.raises(CheckpointError, match=wanted):
        load_torch_checkpoint(tmp_path / "c.pt")
    ckpt = make_checkpoint()
    ckpt.params.pop("transformer.ln_f.weight")
    save_npz(tmp_path / "c.npz", ckpt)
    with pytest.raises(CheckpointError, match="missing transformer.ln_f.weight"):
        load_npz(tmp_path / "c.npz")


def test_npz_without_meta_and_other_files(tmp_path):
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an npgpt checkpoint"):
        load_npz(tmp_path / "plain.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError):
        load_npz(tmp_path / "text.npz")
    torch.save({"just": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither an npgpt nor a nanoGPT checkpoint"):
        load_torch_checkpoint(tmp_path / "other.pt")


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        ensure_writable_dir(tmp_path / "file")
    with pytest.raises(CheckpointError, match="not writable"):
        ensure_writable_dir(tmp_path / "file" / "sub")
    assert ensure_writable_dir(tmp_path / "new" / "dir").is_dir()


# The keys of a run's saved settings (train_config): checkpoints are read by other versions of the app.
SAVED_SETTINGS = {
    "model", "n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "activation", "tie_weights", "norm",
    "pos_emb", "rope_theta", "qk_norm", "mlp_hidden", "batch_size", "gradient_accumulation_steps", "max_iters",
    "learning_rate", "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr", "beta1", "beta2", "weight_decay",
    "grad_clip", "optimizer", "muon_lr", "muon_ns_dtype", "eval_interval", "eval_iters", "log_interval", "seed",
    "max_new_tokens", "temperature", "top_k", "top_p", "prompt"}


def test_the_saved_settings_keep_their_keys_and_settings_saved_before_the_modern_block_load():
    from gptapp.settings import PRESETS, TrainConfig
    assert set(TrainConfig().to_dict()) == SAVED_SETTINGS
    modern = ("norm", "pos_emb", "rope_theta", "qk_norm", "mlp_hidden", "optimizer", "muon_lr", "muon_ns_dtype")
    older = {k: v for k, v in PRESETS["cpu"].to_dict().items() if k not in modern}
    assert TrainConfig.from_dict(older) == PRESETS["cpu"]
    assert PRESETS["cpu"].gpt_config(65) == GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128,
                                                      bias=False, tie_weights=False)
    assert PRESETS["modern-cpu"].gpt_config(65).mlp_hidden == 344 and TrainConfig().gpt_config(65).mlp_hidden is None
