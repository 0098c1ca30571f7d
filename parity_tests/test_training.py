"""A training run in both backends: 20 steps from the same init on the same batches.

npgpt: GPT + npgpt.optim.AdamW + clip_grad_norm + cosine_lr, and the same with npgpt.fast's
GPT, AdamW and clip_grad_norm. torchgpt: GPT + torch.optim.AdamW
from configure_optimizers (nanoGPT's two groups) + torch.nn.utils.clip_grad_norm_, each group's
lr set from the same schedule. The batches come from npgpt.data.get_batch on a synthetic text and
on Tiny Shakespeare (when it is on disk). The loss at every step and the final parameters agree in
float64 to twins.training_bound (20 chained parity steps); in the dropout variant npgpt draws each
step's masks and torch replays them. A 20-step run of the modern model with Muon (block matrices) +
AdamW (the rest), both backends, float64, at twins.training_bound with each step's Muon update added.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import npgpt
import npgpt.fast
from gptapp.data import read_text_file, resolve_data_path
from npgpt.data import CharTokenizer, DataError, get_batch
from npgpt import GPT, optim
from npgpt.muon import Muon
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr
from npgpt.compare import bounds as parity_bounds
from npgpt.compare import compare_all, to_numpy64
from parity_tests.twins import (SWITCHES, modern_config, newton_schulz_bound, parity_sizes, torch_muon_step_float64,
                                torch_twin, training_bound)

STEPS, B, T = 20, 4, 16
LR, MIN_LR, WARMUP, WD, BETAS, GRAD_CLIP = 1e-2, 1e-3, 4, 0.1, (0.9, 0.99), 1.0
# The key part of each c_attn.bias has an exactly zero gradient: adding a constant vector to every
# key adds the same q.b_k to every score in a row, which the softmax ignores. Both backends compute
# that zero as rounding noise (~1e-18), and AdamW turns noise g into steps lr/(1-b1^t) * g/eps
# (eps = 1e-8 >> |g|), ~1e-12 per step: after 20 steps the true value 0 is held as +-1e-13 of
# unrelated noise on each side. It is compared by absolute error, the q and v parts relatively:
# the noise is the rounding of terms no larger than the clipped gradient (norm <= GRAD_CLIP), at
# most parity * GRAD_CLIP, and each step moves the bias by at most lr * |m_hat| / eps with
# |m_hat| <= the largest noise: key_bias_atol.
ADAM_EPS = 1e-8  # both backends' AdamW default


def key_bias_atol(config) -> float:
    """STEPS * LR * noise / ADAM_EPS, noise = the gradient's parity bound times GRAD_CLIP."""
    noise = parity_bounds(np.float64, *parity_sizes(config, B, T))["grad"] * GRAD_CLIP
    return STEPS * LR * noise / ADAM_EPS
# npgpt's side of the run: (model class, optimizer class, clip_grad_norm) of each implementation
IMPLEMENTATIONS = {
    "reference": (npgpt.GPT, optim.AdamW, optim.clip_grad_norm),
    "fast": (npgpt.fast.GPT, npgpt.fast.AdamW, npgpt.fast.clip_grad_norm),
}
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def synthetic_text(n: int = 5000, seed: int = 0) -> str:
    """Words from a small vocabulary with a repeating structure, so a model can learn something."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    out = []
    while sum(map(len, out)) < n:
        out.append(" ".join(rng.choice(words, size=rng.integers(3, 8))) + ".\n")
    return "".join(out)


def training_text(source: str) -> str:
    if source == "synthetic":
        return synthetic_text()
    try:  # --data / NPGPT_DATA / the cache; never a download in a test
        path = resolve_data_path(download=False)
    except DataError:
        path = SHARED_DATA
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found (set NPGPT_DATA or place it at {SHARED_DATA})")
    return read_text_file(path)[:50_000]


def train_both(text: str, dropout: float, seed: int = 0, implementation: str = "reference"):
    """Run both backends side by side; returns (losses ours, losses torch, params ours, torch model)."""
    model_class, AdamW, clip_grad_norm = IMPLEMENTATIONS[implementation]
    tok = CharTokenizer.from_text(text)
    data = tok.encode(text)
    cfg = npgpt.GPTConfig(vocab_size=tok.vocab_size, block_size=T, n_layer=2, n_head=2, n_embd=16,
                          dropout=dropout, bias=True, activation="gelu", tie_weights=True)
    model = model_class(cfg, seed=seed, dtype=np.float64).train()  # nanoGPT's init, as train_np.py
    twin = torch_twin(model).train()
    opt = AdamW(model.params, lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WD)
    opt_t = twin.configure_optimizers(WD, LR, BETAS, "cpu")
    batch_rng = np.random.default_rng([seed, 11])
    losses, losses_t, clipped = [], [], []
    for it in range(STEPS):
        lr = cosine_lr(it, LR, WARMUP, STEPS, MIN_LR)
        x, y = get_batch(data, B, T, batch_rng)

        _, loss = model.forward(x, y)
        grads = model.backward()
        norm = clip_grad_norm(grads, GRAD_CLIP)
        opt.step(grads, lr=lr)
        losses.append(loss)
        clipped.append(norm > GRAD_CLIP)

        masks = [torch.from_numpy(m) for m in model.last_dropout_masks] if dropout else None
        for group in opt_t.param_groups:
            group["lr"] = lr
        opt_t.zero_grad(set_to_none=True)
        _, loss_t = twin(torch.from_numpy(x), torch.from_numpy(y), dropout_masks=masks)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), GRAD_CLIP)
        opt_t.step()
        losses_t.append(loss_t.item())
    return np.array(losses), np.array(losses_t), model.params, twin, clipped


def split_key_bias(params: dict, n_embd: int) -> dict:
    """c_attn.bias (3C,) -> "...c_attn.bias[q,v]" (2C,) and "...c_attn.bias[k]" (C,), as float64."""
    out = {}
    for name, value in params.items():
        value = to_numpy64(value)
        if name.endswith("attn.c_attn.bias"):
            out[name + "[q,v]"] = np.concatenate([value[:n_embd], value[2 * n_embd:]])
            out[name + "[k]"] = value[n_embd:2 * n_embd]
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("source", ["synthetic", "tinyshakespeare"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_training_trajectory(implementation, source, dropout):
    losses, losses_t, params, twin, clipped = train_both(training_text(source), dropout,
                                                         implementation=implementation)
    ours = {f"loss step {i}": v for i, v in enumerate(losses)}
    theirs = {f"loss step {i}": v for i, v in enumerate(losses_t)}
    n_params = sum(p.size for p in params.values())
    rtol, atol = training_bound(twin.config, B, T, STEPS, n_params), key_bias_atol(twin.config)
    compare_all(ours, theirs, rtol=rtol, header=f"{implementation} {source} dropout={dropout}: loss at every step")
    C = twin.config.n_embd
    ours, theirs = split_key_bias(params, C), split_key_bias(dict(twin.named_parameters()), C)
    key_bias = [n for n in theirs if n.endswith("[k]")]
    assert len(key_bias) == twin.config.n_layer
    compare_all(ours, theirs, rtol={n: rtol for n in theirs if n not in key_bias},
                atol={n: atol for n in key_bias},
                header=f"{implementation} {source} dropout={dropout}: parameters after {STEPS} steps")
    assert all(np.abs(ours[n]).max() <= atol for n in key_bias)  # ours stays ~0 too
    # the run must be a real one: the loss falls and the weights moved far from their init
    assert losses[-5:].mean() < losses[:5].mean() - 0.3, losses
    init = npgpt.GPT(twin.config, seed=0, dtype=np.float64).params["transformer.wte.weight"]
    assert np.linalg.norm(params["transformer.wte.weight"] - init) > 0.1 * np.linalg.norm(init)
    print(f"clipped at steps {[i for i, c in enumerate(clipped) if c]}")


# --------------------------------------------------------------------------------------------
# Training with Muon + AdamW, 20 steps, npgpt against torchgpt in float64
# --------------------------------------------------------------------------------------------

def uses_muon(name: str, shape) -> bool:
    """The speedrun split: Muon for the 2-D matrices inside the blocks; AdamW for the rest."""
    return name.startswith("transformer.h.") and len(shape) == 2


TRAINERS = {"reference": (GPT, AdamW, clip_grad_norm),
            "fast": (npgpt.fast.GPT, npgpt.fast.AdamW, npgpt.fast.clip_grad_norm)}


@pytest.mark.parametrize("impl", list(TRAINERS))
def test_training_trajectory_with_muon_and_adamw(impl):
    """20 steps from the same init on the same batches with the modern block: npgpt (Muon on the
    block matrices, AdamW on embeddings, head and gains, clip_grad_norm, cosine_lr; the reference's
    or npgpt.fast's model, AdamW and clip) against torchgpt (the float64 restatement of
    torch.optim.Muon's step above, since torch's own rounds to bfloat16, and torch.optim.AdamW with
    nanoGPT's two groups). Every step's loss and the final parameters normwise, at
    twins.training_bound with each step's Muon update (newton_schulz_bound) added."""
    model_class, adamw_class, clip_grad_norm = TRAINERS[impl]
    steps, B, T, clip = 20, 4, 8, 1.0
    config = modern_config(**SWITCHES["modern"])  # untied head: AdamW for wte and lm_head
    model = model_class(config, seed=0, dtype=np.float64).train()
    twin = torch_twin(model).train()
    muon_names = [n for n, p in model.params.items() if uses_muon(n, p.shape)]
    adam_names = [n for n in model.params if n not in muon_names]
    assert "transformer.wte.weight" in adam_names and "lm_head.weight" in adam_names
    assert "transformer.h.0.attn.q_norm.weight" in adam_names and len(muon_names) == 4 * config.n_layer
    muon = Muon({n: model.params[n] for n in muon_names}, lr=0.02, weight_decay=0.01)
    adamw = adamw_class({n: model.params[n] for n in adam_names}, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    named = dict(twin.named_parameters())
    t_adamw = torch.optim.AdamW(
        [{"params": [named[n] for n in adam_names if named[n].dim() >= 2], "weight_decay": 0.1},
         {"params": [named[n] for n in adam_names if named[n].dim() < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95))
    t_bufs = {n: torch.zeros_like(named[n]) for n in muon_names}
    rng = np.random.default_rng(12)
    data = (3 * np.arange(500) + np.arange(500) // 7) % config.vocab_size  # a learnable sequence
    losses, t_losses = [], []
    for it in range(steps):
        scale = cosine_lr(it, 1.0, 2, steps, 0.1)  # one schedule for both optimizers' rates
        starts = rng.integers(0, data.size - T - 1, B)
        idx = np.stack([data[s:s + T] for s in starts])  # (B, T)
        targets = np.stack([data[s + 1:s + T + 1] for s in starts])  # the next tokens
        _, loss = model.forward(idx, targets)
        grads = model.backward()
        clip_grad_norm(grads, clip)
        muon.step({n: grads[n] for n in muon_names}, lr=0.02 * scale)
        adamw.step({n: grads[n] for n in adam_names}, lr=3e-3 * scale)
        losses.append(loss)

        twin.zero_grad(set_to_none=True)
        _, t_loss = twin(torch.from_numpy(idx), torch.from_numpy(targets))
        t_loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
        for group in t_adamw.param_groups:
            group["lr"] = 3e-3 * scale
        t_adamw.step()
        with torch.no_grad():
            torch_muon_step_float64({n: named[n] for n in muon_names}, {n: named[n].grad for n in muon_names},
                                    t_bufs, lr=0.02 * scale, weight_decay=0.01, momentum=0.95,
                                    nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7,
                                    ns_steps=5, adjust_lr_fn=None)
        t_losses.append(t_loss.item())
    print("losses", " ".join(f"{v:.4f}" for v in losses))
    n_params = sum(p.size for p in model.params.values())
    muon_step = newton_schulz_bound(np.float64, [model.params[n].shape for n in muon_names], 5,
                                    (3.4445, -4.775, 2.0315))
    rtol = math.hypot(training_bound(config, B, T, steps, n_params), math.sqrt(steps) * muon_step)
    compare_all({"losses": np.array(losses), **model.params},
                {"losses": np.array(t_losses), **{n: named[n] for n in model.params}}, rtol=rtol,
                header=f"20 steps, Muon + AdamW, modern block, {impl} [float64]")
    assert losses[-1] < losses[0] - 0.5  # it learned: Muon + AdamW really trained the model
