"""The modern block in the training application (issue 11): its flags in both scripts, the presets
modern-cpu and modern-gpu, --optimizer muon (Muon for the block matrices, AdamW for the rest),
resume with the Muon state, and one-line errors for bad values."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from train_helpers import DATA, assert_one_error_line, needs_data, run_main, tiny_args

import torchgpt
from gptapp.checkpoint import load_npz
from gptapp.optimizers import MuonAdamW, uses_muon
from gptapp.settings import CPU, PRESETS, TrainConfig
from gptapp.torch_checkpoint import load_torch_checkpoint
from npgpt import GPT, GPTConfig, bounds
from npgpt.muon import NS_COEFFICIENTS
from npgpt.optim import AdamW
from torchgpt.model import uses_muon as torch_uses_muon

MODERN_FLAGS = ["--norm", "rmsnorm", "--pos_emb", "rope", "--rope_theta", "500", "--qk_norm", "true",
                "--activation", "swiglu", "--mlp_hidden", "40", "--optimizer", "muon", "--muon_lr", "0.03"]
BACKENDS = [("np", ".npz"), ("torch", ".pt")]


def test_modern_presets_change_only_the_block_and_the_optimizer():
    """modern-cpu: the cpu preset's size, batch and step budget, with the switches and Muon."""
    modern, gpu = PRESETS["modern-cpu"], PRESETS["modern-gpu"]
    changed = {k for k, v in modern.to_dict().items() if v != getattr(CPU, k)}
    assert changed == {"norm", "pos_emb", "qk_norm", "activation", "mlp_hidden", "optimizer", "muon_lr"}
    assert (modern.norm, modern.pos_emb, modern.qk_norm, modern.activation, modern.optimizer) == (
        "rmsnorm", "rope", True, "swiglu", "muon")
    size = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "batch_size", "max_iters")
    assert {k: getattr(gpu, k) for k in size} == {k: getattr(PRESETS["shakespeare-char"], k) for k in size}
    for preset in (modern, gpu):
        preset.validate()
        config = preset.gpt_config(65)
        assert config.mlp_hidden_size in (344, 1024) and config.pos_emb == "rope"


def test_default_settings_build_the_lecture_model():
    """mlp_hidden 0 means 4 * n_embd; a saved train_config from before issue 11 still loads."""
    assert CPU.gpt_config(65) == GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128,
                                           bias=False, tie_weights=False)
    old = {k: v for k, v in CPU.to_dict().items()
           if k not in ("norm", "pos_emb", "rope_theta", "qk_norm", "mlp_hidden", "optimizer", "muon_lr")}
    assert TrainConfig.from_dict(old) == CPU


def test_one_split_rule_for_both_backends():
    """Muon gets exactly the 2-D matrices inside the blocks, on both sides."""
    config = PRESETS["modern-cpu"].gpt_config(65)
    ours = {n for n, p in GPT(config).params.items() if uses_muon(n, p.shape)}
    theirs = {n for n, p in torchgpt.GPT(config).named_parameters() if torch_uses_muon(n, p)}
    assert ours == theirs
    assert len(ours) == 4 * config.n_layer and all(n.startswith("transformer.h.") for n in ours)


def test_muon_adamw_steps_both_parts_on_one_schedule():
    config = replace(PRESETS["modern-cpu"], n_layer=1, n_embd=16, n_head=2, mlp_hidden=24).gpt_config(11)
    model = GPT(config, dtype=np.float64)
    opt = MuonAdamW(model.params, AdamW, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, muon_lr=0.02)
    grads = {n: np.ones_like(p) for n, p in model.params.items()}
    before = {n: p.copy() for n, p in model.params.items()}
    opt.step(grads, lr=5e-4)  # half the base rate: Muon's is halved too
    assert opt.muon.step_count == 1 and opt.adamw.step_count == 1
    w = "transformer.h.0.attn.c_proj.weight"  # (16, 16): no shape adjustment
    # Muon's step at half its rate: decay by that rate, then lr * O. O of an all-ones matrix is rank 1:
    # its one singular value starts at 1 (after the Frobenius normalisation) and goes through the
    # quintic s -> a s + b s^3 + c s^5 five times, which carries an error by its slope at each s
    muon_lr = 0.02 * 0.5
    update = before[w] * (1 - muon_lr * 0.1) - model.params[w]
    a, b, c = NS_COEFFICIENTS
    sv, slope = 1.0, 1.0
    for _ in range(5):
        slope *= abs(a + 3 * b * sv**2 + 5 * c * sv**4)
        sv = a * sv + b * sv**3 + c * sv**5
    # the update is read back as a difference of weights |before| / |update| ~ 30 times its size
    cancellation = np.linalg.norm(before[w]) / np.linalg.norm(update)
    bound = bounds.chain(np.float64, n=16, depth=3 * 5 + 2, amplification=cancellation * max(slope, 1.0))
    assert abs(np.linalg.norm(update, 2) - muon_lr * sv) <= bound * muon_lr * sv
    state = opt.state_dict()
    assert {k.split(".")[0] for k in state} == {"adamw", "muon"}
    fresh = MuonAdamW(GPT(config, dtype=np.float64).params, AdamW, 1e-3, (0.9, 0.99), 0.1, 0.02)
    fresh.load_state_dict(state)
    assert all(np.array_equal(fresh.muon.momentum_buffer[n], b) for n, b in opt.muon.momentum_buffer.items())
    with pytest.raises(ValueError, match="not saved with --optimizer muon"):
        fresh.load_state_dict({"exp_avg.decay": np.zeros(3)})


@needs_data
@pytest.mark.parametrize("backend,ext", BACKENDS)
def test_modern_flags_train_and_resume(backend, ext, tmp_path, capsys):
    out = tmp_path / "run"
    res = run_main(backend, tiny_args(out, "--max_iters", 20, "--eval_interval", 10, *MODERN_FLAGS), capsys)
    assert res.rc == 0, res.err
    load = load_npz if ext == ".npz" else load_torch_checkpoint
    ckpt = load(out / f"ckpt_last{ext}")
    cfg = ckpt.gpt_config
    assert (cfg.norm, cfg.pos_emb, cfg.rope_theta, cfg.qk_norm, cfg.activation, cfg.mlp_hidden) == (
        "rmsnorm", "rope", 500.0, True, "swiglu", 40)
    assert "transformer.wpe.weight" not in ckpt.params and "transformer.h.0.attn.q_norm.weight" in ckpt.params
    assert ckpt.params["transformer.h.0.mlp.c_fc.weight"].shape == (80, 32)
    assert ckpt.train_config["optimizer"] == "muon" and ckpt.train_config["muon_lr"] == 0.03
    if ext == ".npz":
        assert any(k.startswith("muon.momentum_buffer.") for k in ckpt.optimizer)
    else:
        assert set(ckpt.optimizer) == {"adamw", "muon"}
    res = run_main(backend, ["--resume", "--out_dir", out, "--data", DATA, "--max_iters", 30,
                             "--max_new_tokens", 0], capsys)
    assert res.rc == 0, res.err
    assert load(out / f"ckpt_last{ext}").iter_num == 30
    # the run keeps its optimizer: switching it on resume is refused in one line
    res = run_main(backend, ["--resume", "--out_dir", out, "--data", DATA, "--optimizer", "adamw"],
                   capsys)
    assert_one_error_line(res, "--optimizer='adamw'", "optimizer='muon'", rc=2)


@pytest.mark.parametrize("backend", ["np", "torch"])
@pytest.mark.parametrize("flags,words", [
    (["--norm", "batchnorm"], ["--norm='batchnorm'", "layernorm, rmsnorm"]),
    (["--pos_emb", "alibi"], ["--pos_emb='alibi'", "learned, rope"]),
    (["--pos_emb", "rope", "--n_embd", "30", "--n_head", "2"], ["rope needs an even head size", "15"]),
    (["--activation", "geglu"], ["--activation='geglu'", "relu2, swiglu"]),
    (["--optimizer", "sgd"], ["--optimizer='sgd'", "adamw, muon"]),
    (["--optimizer", "muon", "--model", "bigram"], ["bigram", "use adamw"]),
    (["--optimizer", "muon", "--learning_rate", "0"], ["--learning_rate=0.0", "must be > 0"]),
    (["--mlp_hidden", "-5"], ["--mlp_hidden=-5", ">= 0"]),
    (["--rope_theta", "0"], ["--rope_theta=0.0", "> 0"]),
    (["--muon_lr", "-1"], ["--muon_lr=-1.0", ">= 0"]),
])
def test_bad_modern_flags_are_one_line_errors(backend, flags, words, tmp_path, capsys):
    res = run_main(backend, tiny_args(tmp_path / "run", *flags), capsys)
    assert_one_error_line(res, *words, rc=2)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # before any work
