"""The modern block against PyTorch: each new pair, Muon, and torchgpt's switches.

1. Each pair of npgpt.layers (rmsnorm, rope, relu2, swiglu) against torch autograd on the same
   inputs with a random upstream gradient, normwise, at npgpt.compare.bounds for each pair's sizes
   (npgpt.bounds.parity). torch's side is F.rms_norm, torchgpt's RoPE, F.relu, F.silu.
2. npgpt.optim.Muon against a float64 restatement of torch.optim.Muon's step (10 steps, a chain of
   Newton-Schulz matmuls), and against torch.optim.Muon itself in float32, whose Newton-Schulz runs
   in bfloat16 (npgpt.bounds.roundings of bfloat16's unit roundoff).
3. torchgpt's switches: parameter names and shapes, values against a forward composed of
   npgpt.layers' pairs, both attention paths, the KV cache with RoPE, F.rms_norm's fallback.
4. Whole models, npgpt.GPT against torchgpt.GPT, over the switch combinations: logits, loss and
   every gradient, at npgpt.compare.bounds for each model's sizes; generation with RoPE.
5. A 20-step training run with Muon (block matrices) + AdamW (the rest), both backends, float64,
   at twins.training_bound (20 chained steps).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import npgpt.fast
from npgpt import GPT, bounds
from npgpt import layers as L
from npgpt.compare import bounds as parity_bounds
from npgpt.compare import compare_all, compare_outputs_and_grads, rel_error
from npgpt.config import GPTConfig
from npgpt.muon import Muon, adjusted_lr
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr
from parity_tests.twins import (MODEL_CLASSES, block_parity_sizes, describe, make_npgpt, model_pair_results,
                                parity_sizes, torch_twin, training_bound)
from torchgpt import model as tm
from torchgpt.convert import load_params, state_dict_to_params

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


def randn(rng, shape, dtype, scale=1.0, offset=0.0) -> np.ndarray:
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def torch_vjp(fn, inputs: dict, dout):
    """out = fn(*inputs) in torch, and the gradient of sum(out * dout) w.r.t. each input."""
    leaves = {name: torch.tensor(value, requires_grad=True) for name, value in inputs.items()}
    out = fn(*leaves.values())
    grads = torch.autograd.grad(out, list(leaves.values()), torch.tensor(dout, dtype=out.dtype))
    return out, {"d" + name: g for name, g in zip(leaves, grads)}


def check_pair(header, dtype, forward, backward, torch_fn, inputs: dict, rng, n: int, **kwargs):
    """npgpt's forward and backward against torch_fn's autograd, one table, at
    npgpt.compare.bounds(dtype, n, 1): one stage whose longest sum has n terms."""
    out, cache = forward(*inputs.values(), **kwargs)
    dout = randn(rng, out.shape, dtype)
    grads = backward(dout, cache)
    t_out, t_grads = torch_vjp(torch_fn, inputs, dout)
    ours = dict(zip(("d" + n for n in inputs), grads))
    return compare_outputs_and_grads({"out": out}, {"out": t_out}, ours, t_grads, dtype, header, n=n, depth=1)


# --------------------------------------------------------------------------------------------
# 1. The pairs against autograd
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,eps,offset", [((2, 5, 16), 1e-5, 0.0), ((3, 4), 1e-6, 2.0),
                                               ((2, 2, 5, 8), 1e-5, 0.0), ((4, 2), 1e-5, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype, shape, eps, offset):
    rng = np.random.default_rng(0)
    C = shape[-1]
    inputs = {"x": randn(rng, shape, dtype, 2.0, offset), "w": randn(rng, (C,), dtype, 0.5, 1.0)}
    n = max(C, math.prod(shape[:-1]))  # a row's squares; dw sums the positions
    check_pair(f"rmsnorm {shape}", dtype, L.rmsnorm_forward, L.rmsnorm_backward,
               lambda x, w: F.rms_norm(x, (C,), w, eps), inputs, rng, n, eps=eps)


@pytest.mark.parametrize("T,hs,theta,offset", [(7, 8, 10000.0, 0), (5, 4, 100.0, 3), (3, 2, 10000.0, 500)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(dtype, T, hs, theta, offset):
    rng = np.random.default_rng(1)
    cos, sin = L.rope_angles(T, hs, theta, offset, dtype)
    t_cos, t_sin = tm.rope_cos_sin(T, hs, theta, offset, TORCH_DTYPE[np.dtype(dtype)], "cpu")
    # the angles themselves: the same float64 formula on both sides, then one rounding to dtype
    compare_all({"cos": cos, "sin": sin}, {"cos": t_cos, "sin": t_sin},
                atol=rope_angles_bound(T, hs, theta, offset, dtype), header=f"rope angles [{np.dtype(dtype).name}]")
    inputs = {"x": randn(rng, (2, 3, T, hs), dtype)}
    check_pair(f"rope T={T} hs={hs} offset={offset}", dtype, L.rope_forward, L.rope_backward,
               lambda x: tm.apply_rope(x, t_cos, t_sin), inputs, rng, 2, cos=cos, sin=sin)  # x cos + rot(x) sin


def rope_angles_bound(T: int, hs: int, theta: float, offset: int, dtype) -> np.ndarray:
    """Per-element bound on |cos_ours - cos_torch| (and sin's) for angle = t * theta^(-2i / hs).

    Each side computes the angle in float64 from a power (a libm's, within 1 ulp) and a product: 2
    roundings, an absolute error 2 u |angle| that cos and sin carry unchanged (their derivatives are
    at most 1); then cos and sin themselves (within 2 ulp, 4 u, in any libm); then one rounding to
    dtype: bounds.elementwise(float64, 2 |angle| + 4) + bounds.elementwise(dtype, 1).
    """
    inv_freq = theta ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)  # (hs/2,)
    angle = np.outer(np.arange(offset, offset + T, dtype=np.float64), inv_freq)  # (T, hs/2)
    angle = np.concatenate([angle, angle], axis=-1)  # (T, hs)
    return bounds.elementwise(np.float64, 2 * np.abs(angle) + 4) + bounds.elementwise(dtype, np.ones_like(angle))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_against_the_rotate_half_formula(dtype):
    """torchgpt's apply_rope is checked above; here torch's side is the contract's formula typed
    out again, so the npgpt pair cannot share a mistake with torchgpt's."""
    rng = np.random.default_rng(2)
    T, hs = 6, 8
    inv_freq = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], dim=-1).to(TORCH_DTYPE[np.dtype(dtype)])

    def rot(x):
        return x * angle.cos() + torch.cat([-x[..., hs // 2:], x[..., :hs // 2]], dim=-1) * angle.sin()

    cos, sin = L.rope_angles(T, hs, dtype=dtype)
    check_pair("rope (formula)", dtype, L.rope_forward, L.rope_backward, rot,
               {"x": randn(rng, (2, 2, T, hs), dtype)}, rng, 2, cos=cos, sin=sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2(dtype):
    rng = np.random.default_rng(3)
    check_pair("relu2", dtype, L.relu2_forward, L.relu2_backward, lambda x: F.relu(x).square(),
               {"x": randn(rng, (2, 5, 12), dtype)}, rng, 1)  # elementwise


@pytest.mark.parametrize("shape,scale", [((2, 5, 16), 2.0), ((3, 2), 1.0), ((4, 6), 15.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype, shape, scale):
    rng = np.random.default_rng(4)
    H = shape[-1] // 2

    def swiglu(x):
        return F.silu(x[..., :H]) * x[..., H:]

    check_pair(f"swiglu {shape}", dtype, L.swiglu_forward, L.swiglu_backward, swiglu,
               {"x": randn(rng, shape, dtype, scale)}, rng, 1)  # elementwise


# --------------------------------------------------------------------------------------------
# 2. Muon
# --------------------------------------------------------------------------------------------

MUON_SHAPES = {"tall": (24, 8), "wide": (8, 24), "square": (12, 12)}


def newton_schulz_bound(dtype, shapes, ns_steps: int, ns_coefficients, steps: int = 1) -> float:
    """The normwise bound of `steps` Muon updates, each a Newton-Schulz iteration: per iteration 3
    matmul stages (the Gram matrix, the polynomial, the new iterate), plus the normalisation and the
    momentum's lerp; the longest sum is a matrix's larger side. Each iterate a x + b (x x^T) x +
    c (x x^T)^2 x adds terms up to sum |coefficient| times the result (singular values <= 1): the
    amplification. bounds.chain over all the stages of all the steps."""
    n = max(max(s) for s in shapes)
    amplification = sum(abs(c) for c in ns_coefficients)
    return bounds.chain(dtype, n, steps * (3 * ns_steps + 2), amplification)



def torch_muon_step_float64(params, grads, bufs, lr, weight_decay, momentum, nesterov,
                            ns_coefficients, eps, ns_steps, adjust_lr_fn):
    """torch.optim.Muon's step (torch/optim/_muon.py, _single_tensor_muon), restated with every
    operation in float64: the same lerps, the same addmm forms, but no cast to bfloat16."""
    a, b, c = ns_coefficients
    for name, p in params.items():
        g, buf = grads[name], bufs[name]
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        x = update.T if update.size(0) > update.size(1) else update
        x = x / x.norm().clamp(min=eps)
        for _ in range(ns_steps):
            gram = x @ x.T
            gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, gram_update, x, beta=a)
        if update.size(0) > update.size(1):
            x = x.T
        rows, cols = p.shape
        if adjust_lr_fn in (None, "original"):
            adj = lr * math.sqrt(max(1, rows / cols))
        else:
            adj = lr * 0.2 * math.sqrt(max(rows, cols))
        p.mul_(1 - lr * weight_decay)
        p.add_(x, alpha=-adj)


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


# --------------------------------------------------------------------------------------------
# 3. torchgpt's switches
# --------------------------------------------------------------------------------------------

def modern_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    kw.update(overrides)
    return GPTConfig(**kw)


SWITCHES = {
    "default": dict(),
    "rmsnorm": dict(norm="rmsnorm"),
    "rope": dict(pos_emb="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "swiglu-H24": dict(activation="swiglu", mlp_hidden=24),
    "mlp_hidden-40": dict(mlp_hidden=40, activation="gelu_tanh"),
    "modern": dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="swiglu", bias=False,
                   tie_weights=False, norm_eps=1e-6, rope_theta=500.0),
    "modern-relu2-bias": dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="relu2"),
}


def expected_shapes(config: GPTConfig) -> dict:
    """Every parameter's shape, written from the modern block's contract."""
    V, C, bs, hs, H = config.vocab_size, config.n_embd, config.block_size, config.head_size, config.mlp_hidden_size
    shapes = {"transformer.wte.weight": (V, C)}
    if config.pos_emb == "learned":
        shapes["transformer.wpe.weight"] = (bs, C)
    norm_bias = config.bias and config.norm == "layernorm"
    fc = 2 * H if config.activation == "swiglu" else H
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        if norm_bias:
            shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (3 * C, C)
        if config.bias:
            shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        if config.bias:
            shapes[p + "attn.c_proj.bias"] = (C,)
        if config.qk_norm:
            shapes[p + "attn.q_norm.weight"] = (hs,)
            shapes[p + "attn.k_norm.weight"] = (hs,)
        shapes[p + "ln_2.weight"] = (C,)
        if norm_bias:
            shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (fc, C)
        if config.bias:
            shapes[p + "mlp.c_fc.bias"] = (fc,)
        shapes[p + "mlp.c_proj.weight"] = (C, H)
        if config.bias:
            shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["transformer.ln_f.weight"] = (C,)
    if norm_bias:
        shapes["transformer.ln_f.bias"] = (C,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


@pytest.mark.parametrize("switch", SWITCHES)
def test_torchgpt_parameter_names_and_shapes(switch):
    config = modern_config(**SWITCHES[switch])
    model = tm.GPT(config)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = expected_shapes(config)
    assert sorted(got) == sorted(expected)  # no wpe with rope, no norm biases with rmsnorm
    assert got == expected
    for n, p in model.named_parameters():
        if n.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.equal(p, torch.ones_like(p)), n  # gains start at one
    n_wpe = config.block_size * config.n_embd if config.pos_emb == "learned" else 0
    n_head_params = 0 if config.tie_weights else config.vocab_size * config.n_embd
    assert model.get_num_params() == sum(p.numel() for p in model.parameters()) - n_wpe - n_head_params


def test_torchgpt_default_config_is_the_lecture_model():
    """The switches' defaults build the lecture's modules, names and numbers."""
    config = modern_config()
    model = tm.GPT(config)
    assert isinstance(model.transformer.ln_f, tm.LayerNorm) and model.transformer.ln_f.eps == 1e-5
    assert model.transformer.h[0].attn.q_norm is None
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (64, 16)


NP_ACTIVATIONS = {"relu": L.relu_forward, "gelu": L.gelu_forward, "gelu_tanh": L.gelu_tanh_forward,
                  "relu2": L.relu2_forward, "swiglu": L.swiglu_forward}


def npgpt_layers_logits(config: GPTConfig, p: dict, idx: np.ndarray) -> np.ndarray:
    """The GPT's forward composed from npgpt.layers' pairs, by the contract, independent of torchgpt."""
    B, T = idx.shape
    hs, eps = config.head_size, config.norm_eps

    def norm(x, prefix):
        if config.norm == "rmsnorm":
            return L.rmsnorm_forward(x, p[prefix + ".weight"], eps)[0]
        return L.layernorm_forward(x, p[prefix + ".weight"], p.get(prefix + ".bias"), eps)[0]

    def linear(x, prefix):
        return L.linear_forward(x, p[prefix + ".weight"], p.get(prefix + ".bias"))[0]

    x = p["transformer.wte.weight"][idx]  # (B, T, C)
    if config.pos_emb == "learned":
        x = x + p["transformer.wpe.weight"][:T]
    else:
        cos, sin = L.rope_angles(T, hs, config.rope_theta, 0, x.dtype)
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}."
        qkv = linear(norm(x, pre + "ln_1"), pre + "attn.c_attn")  # (B, T, 3C)
        q, k, v = (L.split_heads(part, config.n_head) for part in np.split(qkv, 3, axis=-1))
        if config.qk_norm:
            q = L.rmsnorm_forward(q, p[pre + "attn.q_norm.weight"], eps)[0]
            k = L.rmsnorm_forward(k, p[pre + "attn.k_norm.weight"], eps)[0]
        if config.pos_emb == "rope":
            q, k = L.rope_forward(q, cos, sin)[0], L.rope_forward(k, cos, sin)[0]
        att = L.attention_probs(q, k, 1.0 / math.sqrt(hs))  # (B, nh, T, T)
        x = x + linear(L.merge_heads(att @ v), pre + "attn.c_proj")
        h = linear(norm(x, pre + "ln_2"), pre + "mlp.c_fc")
        h = NP_ACTIVATIONS[config.activation](h)[0]
        x = x + linear(h, pre + "mlp.c_proj")
    x = norm(x, "transformer.ln_f")
    head = p["transformer.wte.weight"] if config.tie_weights else p["lm_head.weight"]
    return x @ head.T  # (B, T, V)


def random_torch_model(config: GPTConfig, dtype, seed: int = 0, scale: float = 0.3) -> tm.GPT:
    """A torchgpt GPT whose every parameter (gains and biases too) is moved off its init."""
    torch.manual_seed(seed)
    model = tm.GPT(config).to(TORCH_DTYPE[np.dtype(dtype)]).eval()
    rng = np.random.default_rng([seed, 11])
    params = {n: v + rng.normal(0.0, scale, v.shape).astype(v.dtype)
              for n, v in state_dict_to_params(model).items()}
    load_params(model, params)
    return model


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torchgpt_forward_matches_npgpt_layers(dtype, switch, attention):
    config = modern_config(**SWITCHES[switch])
    model = random_torch_model(config, dtype)
    model.attention = attention
    idx = np.random.default_rng(7).integers(0, config.vocab_size, (3, config.block_size))
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(idx))
    ours = npgpt_layers_logits(config, state_dict_to_params(model), idx)
    rtol = parity_bounds(dtype, *parity_sizes(config, *idx.shape))["forward"]
    compare_all({"logits": ours}, {"logits": logits}, rtol=rtol,
                header=f"torchgpt {switch} {attention} vs npgpt layers [{np.dtype(dtype).name}]")


@pytest.mark.parametrize("switch", ["rope", "modern", "modern-relu2-bias"])
def test_torchgpt_kv_cache_with_rope_equals_uncached_forward(switch):
    """Prefill, then one token at a time and in a chunk: RoPE's positions offset by the cache."""
    config = modern_config(**SWITCHES[switch])
    model = random_torch_model(config, np.float64, seed=1)
    idx = torch.from_numpy(np.random.default_rng(8).integers(0, config.vocab_size, (2, config.block_size)))
    with torch.no_grad():
        full, _ = model(idx)  # (B, bs, V)
        first, cache = model.prefill(idx[:, :3])
        pieces = [first, model.forward_cached(idx[:, 3:4], cache, 3),
                  model.forward_cached(idx[:, 4:7], cache, 4), model.forward_cached(idx[:, 7:], cache, 7)]
    cached = torch.cat(pieces, dim=1)
    # torch against itself on other shapes: the same formulas, sums split another way
    rtol = parity_bounds(np.float64, *parity_sizes(config, *idx.shape))["forward"]
    compare_all({"logits": cached}, {"logits": full}, rtol=rtol, header=f"KV cache with {switch}")
    # the test has teeth: without the offset (positions restarting at 0) the logits differ
    with torch.no_grad():
        _, cache = model.prefill(idx[:, :4])
        shifted = model._embed(idx[:, 4:5], 0)
        x, rope = shifted
        for block, kv in zip(model.transformer.h, cache.layers):
            x = block(x, tm.NO_DROPOUT, kv, rope)
        wrong = model._logits(x)
    assert rel_error(wrong, full[:, 4:5]) > rtol  # the comparison above would fail


def test_torchgpt_generate_with_rope_matches_uncached_greedy():
    """generate() with the KV cache, past block_size (the window slides, the cache is rebuilt),
    equals greedy decoding by full uncached forwards over the last block_size tokens."""
    config = modern_config(**SWITCHES["modern"])
    model = random_torch_model(config, np.float64, seed=2, scale=0.5)
    idx = torch.from_numpy(np.random.default_rng(9).integers(0, config.vocab_size, (2, 2)))
    out = model.generate(idx, 15, temperature=0.0)
    ref = idx
    with torch.no_grad():
        for _ in range(15):
            logits, _ = model(ref[:, -config.block_size:])
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    assert len(set(out[0, 4:].tolist())) > 2  # not stuck on one token


def test_torchgpt_rms_norm_fallback_without_f_rms_norm(monkeypatch):
    """On a torch without F.rms_norm (before 2.4) the formula gives the same numbers."""
    rng = np.random.default_rng(10)
    x, w = torch.tensor(rng.standard_normal((3, 5, 16))), torch.tensor(rng.standard_normal(16))
    with_f = tm.rms_norm(x, w, 1e-5)
    monkeypatch.delattr(F, "rms_norm")
    assert not hasattr(F, "rms_norm")
    without = tm.rms_norm(x, w, 1e-5)
    # the same formula: a row's 16 squares (one sign) summed in another order, then elementwise
    compare_all({"rmsnorm": without}, {"rmsnorm": with_f}, rtol=bounds.reordered(np.float64, 16, cancellation=1.0),
                header="F.rms_norm fallback")


def test_torchgpt_training_forward_and_backward_with_every_switch():
    """Dropout masks and gradients reach every new parameter (q_norm, k_norm, swiglu's 2H rows)."""
    config = modern_config(**SWITCHES["modern"], dropout=0.2)
    model = random_torch_model(config, np.float64).train()
    idx = torch.from_numpy(np.random.default_rng(11).integers(0, config.vocab_size, (2, config.block_size)))
    _, loss = model(idx, idx)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n


@pytest.mark.parametrize("switch", [k for k in SWITCHES if k != "default"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_against_torchgpt_block(dtype, switch):
    """npgpt's block_forward/backward with the switches against torchgpt's Block (autograd):
    output, input gradient and every parameter's gradient, q_norm and k_norm included."""
    config = modern_config(**SWITCHES[switch])
    rng = np.random.default_rng(13)
    B, T, C = 2, 6, config.n_embd
    block = tm.Block(config, attention="explicit").to(TORCH_DTYPE[np.dtype(dtype)])
    params = {n: randn(rng, tuple(p.shape), dtype, 0.3, 1.0 if n.endswith("weight") and p.dim() == 1 else 0.0)
              for n, p in block.named_parameters()}
    load_params(block, params)
    x, dout = randn(rng, (B, T, C), dtype), randn(rng, (B, T, C), dtype)
    angles = (L.rope_angles(T, config.head_size, config.rope_theta, 0, dtype)
              if config.pos_emb == "rope" else None)
    out, cache = L.block_forward(x, params, L.BlockOptions.of(config, rope=angles))
    dx, grads = L.block_backward(dout, cache)
    x_t = torch.tensor(x, requires_grad=True)
    rope_t = None if angles is None else (torch.tensor(angles.cos), torch.tensor(angles.sin))
    out_t = block(x_t, tm.NO_DROPOUT, rope=rope_t)
    leaves = [x_t] + list(block.parameters())
    t_grads = torch.autograd.grad(out_t, leaves, torch.tensor(dout))
    theirs = {"dx": t_grads[0], **dict(zip(dict(block.named_parameters()), t_grads[1:]))}
    compare_outputs_and_grads({"out": out}, {"out": out_t}, {"dx": dx, **grads}, theirs, dtype,
                              f"block {switch}", *block_parity_sizes(config, B, T))


# --------------------------------------------------------------------------------------------
# 4. Whole models, npgpt against torchgpt, over the switch combinations
# --------------------------------------------------------------------------------------------

COMBOS = [
    pytest.param(dict(norm=norm, pos_emb=pos, qk_norm=qk, activation=act, bias=(i % 2 == 0),
                      tie_weights=(i % 3 != 0), mlp_hidden=(None if i % 4 else 24)),
                 id=f"{norm}-{pos}-{'qk' if qk else 'noqk'}-{act}")
    for i, (norm, pos, qk, act) in enumerate(itertools.product(
        ("layernorm", "rmsnorm"), ("learned", "rope"), (False, True), ("gelu", "relu2", "swiglu")))
]


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("impl", list(MODEL_CLASSES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_model_parity_over_switches(dtype, impl, combo):
    """Logits, loss and every parameter's gradient (names in named_parameters() order), normwise at
    npgpt.compare.bounds for the model's sizes. Both torch attention paths take turns; npgpt's
    side is the reference (npgpt.GPT) or the fast path (npgpt.fast.GPT, kernels as installed)."""
    config = modern_config(**combo)
    attention = "sdpa" if config.qk_norm else "explicit"
    ours_fwd, theirs_fwd, ours_grads, theirs_grads = model_pair_results(config, dtype, attention, seed=4,
                                                                        model_class=MODEL_CLASSES[impl])
    assert list(ours_grads) == list(theirs_grads)
    compare_outputs_and_grads(ours_fwd, theirs_fwd, ours_grads, theirs_grads, dtype,
                              f"{impl} {describe(config)} {combo} {attention}", *parity_sizes(config, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_model_parity_with_dropout_masks(dtype):
    """Every switch at once, in training with dropout: torch replays npgpt's masks."""
    config = modern_config(**SWITCHES["modern"], dropout=0.3)
    ours_fwd, theirs_fwd, ours_grads, theirs_grads = model_pair_results(config, dtype, "explicit", seed=5)
    compare_outputs_and_grads(ours_fwd, theirs_fwd, ours_grads, theirs_grads, dtype,
                              f"{describe(config)} modern, dropout masks", *parity_sizes(config, 3))


def test_npgpt_and_torchgpt_generate_the_same_tokens_with_rope():
    """KV-cache generation past block_size, both backends, the same greedy tokens as npgpt's
    uncached forward (tests/test_modern_model.py checks npgpt's cache alone)."""
    config = modern_config(**SWITCHES["modern"])
    model = make_npgpt(config, np.float64, seed=24, scale=0.5).eval()
    twin = torch_twin(model).eval()
    idx = np.array([[1, 2], [3, 4]])
    ours = model.generate(idx, 14, temperature=0.0)
    theirs = twin.generate(torch.from_numpy(idx), 14, temperature=0.0).numpy()
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, model.generate(idx, 14, temperature=0.0, use_cache=False))


# --------------------------------------------------------------------------------------------
# 5. Training with Muon + AdamW, 20 steps, npgpt against torchgpt in float64
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
