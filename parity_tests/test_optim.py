"""npgpt.optim against torch.optim: AdamW, gradient clipping and the cosine schedule.

Ten AdamW steps on the parameters of a real (small) GPT, with weight decay on the matrices only
(nanoGPT's rule; torch gets the two parameter groups torchgpt's configure_optimizers builds),
bias correction, global-norm clipping and a per-step learning rate from the cosine schedule.
After every step each parameter and both moment buffers are compared in float64 at
npgpt.bounds.chain over the steps, whose longest sum is the global gradient norm's (every parameter).

npgpt.optim.Muon against a float64 restatement of torch.optim.Muon's step (10 steps, a chain of
Newton-Schulz matmuls), and against torch.optim.Muon itself in float32, whose Newton-Schulz runs in
bfloat16 (npgpt.bounds.roundings of bfloat16's unit roundoff).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npgpt import bounds
from npgpt.muon import Muon, adjusted_lr
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr
from npgpt.compare import assert_close, compare_all
from parity_tests.twins import make_npgpt, newton_schulz_bound, randn, small_config, torch_muon_step_float64, torch_twin

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


# --------------------------------------------------------------------------------------------
# Muon: npgpt.optim.Muon against torch.optim.Muon's step
# --------------------------------------------------------------------------------------------

MUON_SHAPES = {"tall": (24, 8), "wide": (8, 24), "square": (12, 12)}


@pytest.mark.parametrize("settings", [
    dict(),
    dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False),
    dict(lr=0.02, adjust_lr_fn="match_rms_adamw", ns_steps=3, eps=1e-3),
    dict(lr=0.02, ns_coefficients=(15 / 8, -10 / 8, 3 / 8)),  # the classic quintic: converges to 1
], ids=["defaults", "no-nesterov", "match_rms_adamw", "other-coefficients"])
def test_muon_matches_torch_step_in_float64(settings):
    rng = np.random.default_rng(5)
    params = {n: randn(rng, s, np.float64, 0.5) for n, s in MUON_SHAPES.items()}
    t_params = {n: torch.tensor(v) for n, v in params.items()}
    opt = Muon(params, **settings)
    full = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None)
    full.update(settings)
    t_bufs = {n: torch.zeros_like(v) for n, v in t_params.items()}
    start = {n: v.copy() for n, v in params.items()}
    for step in range(10):
        grads = {n: randn(rng, s, np.float64) for n, s in MUON_SHAPES.items()}
        lr = full["lr"] * (0.5 if step >= 5 else 1.0)  # a schedule: step(grads, lr=...)
        opt.step(grads, lr=lr)
        torch_muon_step_float64(t_params, {n: torch.tensor(g) for n, g in grads.items()}, t_bufs,
                                **{**full, "lr": lr})
    # the parameters carry every step's update; the buffers are elementwise lerps of the gradients
    rtol = {**{n: newton_schulz_bound(np.float64, MUON_SHAPES.values(), full["ns_steps"],
                                      full["ns_coefficients"], steps=10) for n in params},
            **{f"buf.{n}": bounds.chain(np.float64, 1, 10) for n in params}}
    compare_all({**params, **{f"buf.{n}": b for n, b in opt.momentum_buffer.items()}},
                {**t_params, **{f"buf.{n}": b for n, b in t_bufs.items()}}, rtol=rtol,
                header=f"Muon vs torch's step in float64, 10 steps {settings}")
    assert all(np.linalg.norm(params[n] - start[n]) > 1e-3 for n in params)  # it moved


def test_muon_matches_torch_optim_muon_in_float32():
    """torch.optim.Muon itself, whose Newton-Schulz iteration runs in bfloat16.

    Why the bound: bfloat16 keeps 8 significant bits, unit roundoff u = 2^-8 = 3.9e-3
    (bounds.BFLOAT16_UNIT_ROUNDOFF). torch rounds to bfloat16 the input, its normalised copy and, in
    each of the 5 iterations, the Gram matrix, the polynomial and the new iterate: 2 + 3 * 5 = 17
    roundings of ~u each. Their errors add at most linearly (bounds.roundings), so the
    orthogonalised update O differs from ours (float32, u = 6e-8: nothing by comparison) by at most
    ~17 u = 6.6e-2 normwise; measured 1.7e-2 .. 3.2e-2. The momentum buffers do not see O, so they
    agree at float32 rounding (elementwise lerps, bounds.chain over the steps), and every step's O
    starts from the same input:
    the errors do not compound. The parameters then differ by at most the sum over steps of
    adjusted_lr * ||O_ours - O_torch||, which is checked against 17 u * sum adjusted_lr * ||O||.
    """
    bound = bounds.roundings(bounds.BFLOAT16_UNIT_ROUNDOFF, 2 + 3 * 5)
    float32_alone = newton_schulz_bound(np.float32, MUON_SHAPES.values(), 5, (3.4445, -4.775, 2.0315))
    lr, wd = 0.02, 0.1
    rng = np.random.default_rng(6)
    params = {n: randn(rng, s, np.float32, 0.5) for n, s in MUON_SHAPES.items()}
    t_params = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    opt = Muon(params, lr=lr, weight_decay=wd)
    t_opt = torch.optim.Muon(list(t_params.values()), lr=lr, weight_decay=wd)
    step_error_sum = {n: 0.0 for n in params}
    worst = {n: 0.0 for n in params}
    for _ in range(10):
        grads = {n: randn(rng, s, np.float32) for n, s in MUON_SHAPES.items()}
        before = {n: v.copy() for n, v in params.items()}
        t_before = {n: v.detach().clone() for n, v in t_params.items()}
        opt.step(grads)
        for n, t in t_params.items():
            t.grad = torch.tensor(grads[n])
        t_opt.step()
        for n, s in MUON_SHAPES.items():
            adj = adjusted_lr(lr, None, s)
            ours_o = (before[n].astype(np.float64) * (1 - lr * wd) - params[n]) / adj
            theirs_o = (t_before[n].double() * (1 - lr * wd) - t_params[n].detach().double()).numpy() / adj
            rel = np.linalg.norm(ours_o - theirs_o) / np.linalg.norm(theirs_o)
            worst[n] = max(worst[n], rel)
            step_error_sum[n] += bound * adj * np.linalg.norm(theirs_o)
    print("worst normwise error of one step's orthogonalised update:",
          {n: f"{e:.3e}" for n, e in worst.items()}, f"bound {bound:.3e}")
    assert all(e <= bound for e in worst.values()), worst
    assert all(e > float32_alone for e in worst.values())  # torch really did round to bfloat16
    compare_all({f"buf.{n}": b for n, b in opt.momentum_buffer.items()},
                {f"buf.{n}": t_opt.state[t_params[n]]["momentum_buffer"] for n in params},
                rtol=bounds.chain(np.float32, 1, 10), header="Muon momentum buffers vs torch.optim.Muon [float32]")
    for n in params:
        drift = np.linalg.norm(params[n].astype(np.float64) - t_params[n].detach().double().numpy())
        print(f"{n}: ||p_ours - p_torch|| {drift:.3e} <= {step_error_sum[n]:.3e}")
        assert drift <= step_error_sum[n]
