"""npgpt.optim against torch.optim: AdamW, gradient clipping and the cosine schedule.

Ten AdamW steps on the parameters of a real (small) GPT, with weight decay on the matrices only
(nanoGPT's rule; torch gets the two parameter groups torchgpt's configure_optimizers builds),
bias correction, global-norm clipping and a per-step learning rate from the cosine schedule.
After every step each parameter and both moment buffers are compared in float64 at
npgpt.bounds.chain over the steps, whose longest sum is the global gradient norm's (every parameter).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npgpt import bounds
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr
from npgpt.compare import assert_close, compare_all
from parity_tests.twins import make_npgpt, small_config, torch_twin

# The cosine schedule: a handful of elementwise operations (the ratio, the cosine, a product and
# sums of two terms), one stage each.
SCHEDULE_RTOL = bounds.chain(np.float64, 1, 6)
LR, BETAS, EPS, WD = 3e-2, (0.9, 0.95), 1e-8, 0.1
MAX_NORM = 1.0
# Gradient scale per step: steps with scale 1 have a global norm of ~20 (> MAX_NORM: clipped), steps
# with scale 0.01 have ~0.2 (not clipped), so both branches of the clip run.
GRAD_SCALES = [1.0, 0.01, 1.0, 1.0, 0.01, 0.003, 1.0, 0.01, 1.0, 0.01]


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr, written out independently of npgpt.optim.cosine_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_cosine_schedule_matches_nanogpt():
    ours = [cosine_lr(it, 6e-4, 10, 50, 6e-5) for it in range(70)]
    theirs = [nanogpt_get_lr(it, 6e-4, 10, 50, 6e-5) for it in range(70)]
    assert_close("lr schedule (70 iterations)", np.array(ours), np.array(theirs), rtol=SCHEDULE_RTOL)
    assert ours[0] < ours[9] < ours[10] == 6e-4 and ours[60] == 6e-5  # warmup, peak, floor


def test_decay_groups_match_configure_optimizers():
    """npgpt's decay rule (ndim >= 2) picks exactly the parameters torchgpt's first group holds."""
    model = make_npgpt(small_config(bias=True, tie_weights=False))
    twin = torch_twin(model)
    names = {id(p): n for n, p in twin.named_parameters()}
    decay_group, no_decay_group = twin.configure_optimizers(WD, LR, BETAS, "cpu").param_groups
    opt = AdamW(model.params, LR, BETAS, EPS, WD)
    assert [names[id(p)] for p in decay_group["params"]] == opt.groups["decay"]
    assert [names[id(p)] for p in no_decay_group["params"]] == opt.groups["no_decay"]
    assert decay_group["weight_decay"] == WD and no_decay_group["weight_decay"] == 0.0
    assert "transformer.wte.weight" in opt.groups["decay"]
    assert "transformer.ln_f.bias" in opt.groups["no_decay"]


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_adamw_ten_steps(clip):
    cfg = small_config(bias=True, tie_weights=False)
    model = make_npgpt(cfg, np.float64)
    params = model.params
    twin = torch_twin(model)  # the same starting weights
    named = dict(twin.named_parameters())
    groups = twin.configure_optimizers(WD, LR, BETAS, "cpu").param_groups  # nanoGPT's two groups
    opt_t = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=False)
    opt = AdamW(params, LR, BETAS, EPS, WD)
    rng = np.random.default_rng(0)
    clipped = []
    # The longest sum is the global gradient norm's, over every parameter (terms of one sign); its
    # error scales every clipped gradient, and the AdamW update is a few elementwise roundings.
    # Each step adds its errors to the moments and the parameters: bounds.chain over the steps.
    n_params = sum(p.size for p in params.values())
    norm_rtol = bounds.reordered(np.float64, n_params, cancellation=1.0)
    for step, scale in enumerate(GRAD_SCALES):
        rtol = bounds.chain(np.float64, n_params, step + 1)
        lr = cosine_lr(step, LR, warmup_iters=2, lr_decay_iters=8, min_lr=LR / 10)  # warmup, decay, floor
        grads = {n: scale * rng.standard_normal(p.shape) for n, p in params.items()}
        for n, p in named.items():
            p.grad = torch.from_numpy(grads[n].copy())
        if clip:
            norm = clip_grad_norm(grads, MAX_NORM)
            norm_t = torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)
            assert_close(f"step {step} grad norm before clipping", norm, norm_t, rtol=norm_rtol)
            clipped.append(norm > MAX_NORM)
            compare_all(grads, {n: p.grad for n, p in named.items()}, rtol=norm_rtol,
                        header=f"step {step} clipped gradients (norm {norm:.3g})")
        for group in opt_t.param_groups:
            group["lr"] = lr
        opt.step(grads, lr=lr)
        opt_t.step()
        state = opt_t.state
        compare_all(params, named, rtol=rtol, header=f"step {step} parameters (lr {lr:.3g})")
        compare_all(opt.moments("exp_avg"), {n: state[p]["exp_avg"] for n, p in named.items()},
                    rtol=rtol, header=f"step {step} exp_avg")
        compare_all(opt.moments("exp_avg_sq"), {n: state[p]["exp_avg_sq"] for n, p in named.items()},
                    rtol=rtol, header=f"step {step} exp_avg_sq")
        assert float(state[named["transformer.wte.weight"]]["step"]) == step + 1 == opt.step_count
    if clip:
        assert any(clipped) and not all(clipped), f"clipping must trigger at some steps only: {clipped}"


def test_clip_grad_norm_not_triggered_leaves_gradients_alone():
    rng = np.random.default_rng(1)
    grads = {"a": 0.01 * rng.standard_normal((3, 4)), "b": 0.01 * rng.standard_normal(5)}
    before = {n: g.copy() for n, g in grads.items()}
    norm = clip_grad_norm(grads, 1.0)
    tensors = [torch.from_numpy(g.copy()).requires_grad_() for g in before.values()]
    for t, g in zip(tensors, before.values()):
        t.grad = torch.from_numpy(g.copy())
    norm_t = torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    n_terms = sum(g.size for g in grads.values())  # the norm's squares, of one sign
    assert_close("unclipped norm", norm, norm_t, rtol=bounds.reordered(np.float64, n_terms, cancellation=1.0))
    assert norm < 1.0 and all(np.array_equal(grads[n], before[n]) for n in grads)
    compare_all(grads, dict(zip(before, (t.grad for t in tensors))),
                rtol=bounds.bitwise("below max_norm neither side touches the gradients"), header="unclipped grads")
