"""npgpt.fast against the reference it speeds up (npgpt.layers, npgpt.GPT, npgpt.optim's AdamW and Muon),
the modern block's switches (RMSNorm, RoPE, QK-norm, ReLU², SwiGLU) as rows of the block and model tables.

Most rewrites in npgpt.fast do the same floating-point operations in the same order as the plain
formula (in place, with out= and views), so they must give the reference's result bit for bit,
in float64 and float32 alike: bounds.bitwise(why), the why beside each comparison. Two rewrites
legitimately differ, and every result that passes through them gets a bound from npgpt.bounds:
- linear layers as one 2-D (N, in) @ (in, out) matmul instead of a batched one: the same sums,
  but BLAS adds them in an order that depends on the call's shape (its kernel, blocking and SIMD
  width), so bounds.reordered(dtype, n) for the longest sum n, and bounds.fast_model (a chain of
  such stages) for a block or a model.

These tests run npgpt.fast on NumPy alone (the numba kernels switched off, as without numba);
tests/test_numba_kernels.py runs the same comparisons with the kernels on.
"""
from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np
import pytest

import npgpt
from npgpt import GPTConfig, fast, optim
from npgpt import layers as ref
from npgpt import muon as ref_muon
from npgpt.bounds import (bitwise, fast_model,
                          reordered)
from npgpt.compare import compare_all
from npgpt.fast import layers as fl
from npgpt.model import init_params
from npgpt.muon import Muon
from functools import partial

from fast_helpers import (IN_PLACE, MODEL_CONFIGS, MODERN_CONFIGS, batch, block_params, check_equal, compare_pair,
                          noisy_pair, randn, small_config)
from layer_helpers import qk_attention_backward, qk_attention_forward

NP = fl.layer_set(kernels=False)  # npgpt.fast without numba: the reference's pairs plus the NumPy rewrites

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]


@pytest.fixture(autouse=True)
def numpy_only(monkeypatch):
    """npgpt.fast's NumPy code, which these bit-for-bit claims are about (see the docstring)."""
    monkeypatch.setattr(fast.numba_kernels, "ENABLED", False)


# --------------------------------------------------------------------------------------------
# Every layer pair
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_equals_reference(dtype):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 7, (3, 5))
    wte, wpe = randn(rng, (7, 8), dtype), randn(rng, (6, 8), dtype)
    compare_pair("embedding", (fl.embedding_forward, ref.embedding_backward),
                 (ref.embedding_forward, ref.embedding_backward), (idx, wte, wpe), dtype,
                 bitwise("the same gather, the position rows added in the gather's fresh array"))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_equals_reference_to_rounding(dtype, bias):
    """One 2-D matmul instead of a batched one: the same sums, added in another order (the forward's
    over in = 24, dx's over out = 10; dw is the same 2-D product on both sides)."""
    rng = np.random.default_rng(1)
    x, w, b = randn(rng, (4, 7, 24), dtype), randn(rng, (10, 24), dtype), randn(rng, 10, dtype)
    compare_pair("linear", (fl.linear_forward, fl.linear_backward),
                 (ref.linear_forward, ref.linear_backward), (x, w, b if bias else None), dtype,
                 reordered(dtype, max(w.shape)))


def test_without_kernels_the_set_keeps_the_reference_pairs():
    """Where a numba kernel would replace a pair (layernorm, GELU, cross-entropy, RMSNorm, RoPE,
    SwiGLU) or nothing replaces it (dropout, relu, gelu_tanh, relu2), npgpt.fast on NumPy runs the
    reference's own pair; the NumPy rewrites are the embedding, the linear layer, merge_qkv, the
    attention core and the residual sum."""
    for name in ("layernorm_forward", "layernorm_backward", "dropout_forward", "dropout_backward",
                 "cross_entropy_forward", "cross_entropy_backward", "rmsnorm_forward", "rmsnorm_backward",
                 "rope_forward", "rope_backward", "split_qkv", "split_heads", "merge_heads", "kv_append",
                 "embedding_backward"):
        assert getattr(NP, name) is getattr(ref.REFERENCE, name), name
    assert NP.activations == ref.ACTIVATION_FUNCTIONS
    for name in ("embedding_forward", "linear_forward", "linear_backward", "merge_qkv",
                 "causal_attention_forward", "causal_attention_backward", "residual"):
        assert getattr(NP, name) is getattr(fl, name) is not getattr(ref.REFERENCE, name), name
    assert NP.activation_output_from_cache is fl.ACTIVATION_OUTPUT_FROM_CACHE


ATTENTION_VIEWS = bitwise("the reference's batched matmuls, the same shapes and operand layouts (only the "
                          "output's row stride differs: y and dq, dk, dv written through head views), and "
                          "its softmax")


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_written_into_its_outputs_equals_reference(dtype, dropout):
    """y written head by head into (B, T, C), dq/dk/dv straight into (B, T, 3C): no merge, no concat."""
    rng = np.random.default_rng(6)
    B, T, C, nh = 2, 9, 12, 3
    qkv = randn(rng, (B, T, 3 * C), dtype)
    mask = ref.dropout_mask((B, nh, T, T), 0.25, rng, dtype) if dropout else None
    compare_pair("attention", (partial(ref.attention_forward, layers=NP), partial(ref.attention_backward, layers=NP)),
                 (ref.attention_forward, ref.attention_backward), (qkv, nh), dtype, ATTENTION_VIEWS, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_with_a_kv_slot_equals_reference(dtype):
    """Decoding: 3 new queries after 4 cached positions, keys and values appended to the slot."""
    rng = np.random.default_rng(7)
    B, C, nh, bs = 2, 12, 3, 8
    past = randn(rng, (B, nh, bs, C // nh), dtype), randn(rng, (B, nh, bs, C // nh), dtype)
    qkv = randn(rng, (B, 3, 3 * C), dtype)
    results = {}
    for name, layers in (("fast", NP), ("reference", ref.REFERENCE)):
        slot = ref.KVSlot(past[0].copy(), past[1].copy(), 4)
        q, k, v = layers.split_qkv(qkv, nh)
        y, _ = layers.causal_attention_forward(q, *layers.kv_append(slot, k, v))
        results[name] = {"y": layers.merge_heads(y), "slot.k": slot.k, "slot.v": slot.v}
    check_equal(f"attention with kv [{np.dtype(dtype).name}]", results["fast"], results["reference"],
                ATTENTION_VIEWS)


BLOCK_CONFIGS = {"relu": small_config(activation="relu"), "gelu": small_config(),
                 "gelu_tanh": small_config(activation="gelu_tanh"), **MODERN_CONFIGS}


def block_case(config, dtype, dropout, seed=10):
    C, nh, B, T = config.n_embd, config.n_head, 2, config.block_size
    p = block_params(config, dtype)
    rng = np.random.default_rng(seed)
    x, dout = randn(rng, (B, T, C), dtype), randn(rng, (B, T, C), dtype)
    masks = ([ref.dropout_mask(s, 0.2, rng, dtype) for s in [(B, nh, T, T), (B, T, C), (B, T, C)]]
             if dropout else None)
    rope = ref.rope_angles(T, C // nh, config.rope_theta, 0, dtype) if config.pos_emb == "rope" else None
    options = ref.BlockOptions.of(config, 0.2 if dropout else 0.0, None, rope)
    return (x, p, options, masks), {}, dout


def run_block(layers, args, kwargs, dout):
    out, cache = ref.block_forward(*args, **kwargs, layers=layers)
    dx, grads = ref.block_backward(dout, cache)
    return {"out": out, "dx": dx, **grads}, cache


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("name", BLOCK_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_equals_reference(dtype, name, dropout):
    """The whole block, every switch of the modern block included; it holds linears, so a chain of
    their reordered sums (and the float32 erf); every gradient, QK-norm's gains included. The fast
    cache drops the MLP's hidden activation (mlp_c_proj.x None) where the activation's cache
    rebuilds it: every activation but relu."""
    config = BLOCK_CONFIGS[name]
    args, kwargs, dout = block_case(config, dtype, dropout)
    ours, f_cache = run_block(NP, args, kwargs, dout)
    theirs, r_cache = run_block(ref.REFERENCE, args, kwargs, dout)
    assert list(ours) == list(theirs)
    check_equal(f"block {name} dropout={dropout} [{np.dtype(dtype).name}]", ours, theirs,
                fast_model(dtype, dataclasses.replace(config, n_layer=1), numpy_only=True, blocks_only=True))
    assert (f_cache.mlp_c_proj.x is None) == (config.activation != "relu")
    assert ref.block_dropout_masks(f_cache) == [] or all(
        (a is None and b is None) or np.array_equal(a, b)
        for a, b in zip(ref.block_dropout_masks(f_cache), ref.block_dropout_masks(r_cache)))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_block_rebuilds_the_dropped_mlp_activation_exactly(activation):
    """The backward's rebuilt activation is the forward's output bit for bit, so the gradients
    equal those computed from a cache that kept it."""
    C, nh = 8, 2
    p = block_params(GPTConfig(vocab_size=5, block_size=6, n_layer=1, n_head=nh, n_embd=C), np.float64)
    rng = np.random.default_rng(11)
    x, dout = rng.standard_normal((2, 6, C)), rng.standard_normal((2, 6, C))
    _, cache = ref.block_forward(x, p, ref.BlockOptions(nh, activation), layers=NP)
    act_out, _ = NP.activations[activation][0](cache.act.x)
    rebuilt = fl.ACTIVATION_OUTPUT_FROM_CACHE[activation](cache.act)
    assert np.array_equal(rebuilt, act_out)
    kept = cache._replace(mlp_c_proj=cache.mlp_c_proj._replace(x=act_out))
    dx, grads = ref.block_backward(dout, cache)
    dx_kept, grads_kept = ref.block_backward(dout, kept)
    check_equal(f"rebuilt {activation}", {"dx": dx, **grads}, {"dx": dx_kept, **grads_kept},
                bitwise("one backward on two caches holding the same arrays"))


# --------------------------------------------------------------------------------------------
# The modern block's pairs (RMSNorm, RoPE, QK-norm, ReLU², SwiGLU)
# --------------------------------------------------------------------------------------------

def test_the_fast_layers_cover_every_switch():
    """fast.GPT runs npgpt.fast's layer set for the modern block too (here on NumPy;
    tests/test_numba_kernels.py: with the kernels)."""
    for name, config in MODERN_CONFIGS.items():
        assert fast.GPT(config).layers == NP, name


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_modern_activations_equal_reference_bit_for_bit(dtype, activation):
    x = randn(np.random.default_rng(3), (4, 6, 32), dtype, 3.0)
    compare_pair(activation, NP.activations[activation], ref.ACTIVATION_FUNCTIONS[activation],
                 (x,), dtype, IN_PLACE)
    out, cache = NP.activations[activation][0](x)  # the block rebuilds the output from the cache
    assert np.array_equal(fl.ACTIVATION_OUTPUT_FROM_CACHE[activation](cache), out)


def qk_kwargs(rng, dtype, hs, T, qk_norm=True, rope=True, offset=0):
    return dict(q_norm=randn(rng, hs, dtype, 0.5) + dtype(1.0) if qk_norm else None,
                k_norm=randn(rng, hs, dtype, 0.5) + dtype(1.0) if qk_norm else None,
                eps=0.01, rope=ref.rope_angles(T, hs, 50.0, offset, dtype) if rope else None)


def qk_attention_pair(layers):
    """The block's attention steps (layer_helpers.qk_attention_forward) on a layer set."""
    return (lambda qkv, nh, **kw: qk_attention_forward(layers, qkv, nh, **kw),
            lambda dout, cache: qk_attention_backward(layers, dout, cache))


QK_PREPARED = bitwise("QK-norm and RoPE run the reference's operations in its order, in place; then the "
                      "reference's batched attention matmuls (the same shapes and operand layouts, outputs "
                      "through head views)")


@pytest.mark.parametrize("switches", [(True, True), (True, False), (False, True)], ids=["qk+rope", "qk", "rope"])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_with_qk_norm_and_rope_equals_reference_bit_for_bit(dtype, dropout, switches):
    """q, k prepared (QK-norm, then RoPE) into a fresh qkv; the backward takes dq, dk back through
    both in their place in dqkv and returns the gains' gradients as the reference does."""
    rng = np.random.default_rng(4)
    B, T, C, nh = 2, 9, 12, 3
    qkv = randn(rng, (B, T, 3 * C), dtype)
    kwargs = qk_kwargs(rng, dtype, C // nh, T, *switches)
    if dropout:
        kwargs["mask"] = ref.dropout_mask((B, nh, T, T), 0.25, rng, dtype)
    before = qkv.copy()
    compare_pair("attention qk", qk_attention_pair(NP), qk_attention_pair(ref.REFERENCE), (qkv, nh), dtype,
                 QK_PREPARED, **kwargs)
    assert np.array_equal(qkv, before)  # the input is not written


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_with_qk_norm_rope_and_a_kv_slot_equals_reference(dtype):
    """Decoding at positions 4..6: keys enter the slot normed and rotated, as in the reference."""
    rng = np.random.default_rng(5)
    B, C, nh, bs = 2, 12, 3, 8
    past = randn(rng, (B, nh, bs, C // nh), dtype), randn(rng, (B, nh, bs, C // nh), dtype)
    qkv = randn(rng, (B, 3, 3 * C), dtype)
    kwargs = qk_kwargs(rng, dtype, C // nh, 3, offset=4)
    results = {}
    for name, layers in (("fast", NP), ("reference", ref.REFERENCE)):
        slot = ref.KVSlot(past[0].copy(), past[1].copy(), 4)
        y, _ = qk_attention_forward(layers, qkv, nh, kv=slot, **kwargs)
        results[name] = {"y": y, "slot.k": slot.k, "slot.v": slot.v}
    compare_all(results["fast"], results["reference"], rtol=QK_PREPARED,
                header=f"attention qk kv [{np.dtype(dtype).name}]")


# --------------------------------------------------------------------------------------------
# The whole model and the optimizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_forward_backward_equals_reference(dtype, name):
    config = MODEL_CONFIGS[name]
    reference, quick = noisy_pair(config, dtype)
    idx, targets = batch(config)
    r_logits, r_loss = reference.forward(idx, targets)
    masks = reference.last_dropout_masks or None  # the fast model replays the reference's masks
    f_logits, f_loss = quick.forward(idx, targets, dropout_masks=masks)
    assert len(quick.last_dropout_masks) == len(reference.last_dropout_masks)
    r_grads, f_grads = reference.backward(), quick.backward()
    assert list(f_grads) == list(r_grads) == list(reference.params)
    check_equal(f"model {name} [{np.dtype(dtype).name}]", {"logits": f_logits, "loss": f_loss, **f_grads},
                {"logits": r_logits, "loss": r_loss, **r_grads}, fast_model(dtype, config, numpy_only=True))


@pytest.mark.parametrize("bug", ["scaled", "dropped"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_bound_catches_a_planted_bug(dtype, bug):
    """The model's bound is tight enough to fail a wrong backward: one gradient scaled by 1 + 1e-3
    (a factor slightly off) or dropped (a missing term) is over it."""
    config = small_config(dropout=0.2, activation="gelu_tanh")
    reference, quick = noisy_pair(config, dtype)
    idx, targets = batch(config)
    reference.forward(idx, targets)
    quick.forward(idx, targets, dropout_masks=reference.last_dropout_masks)
    r_grads, f_grads = reference.backward(), quick.backward()
    name = "transformer.h.0.mlp.c_fc.weight"
    f_grads[name] = f_grads[name] * (1.0 + 1e-3) if bug == "scaled" else np.zeros_like(f_grads[name])
    with pytest.raises(AssertionError, match=name):
        check_equal(f"planted bug [{np.dtype(dtype).name}]", f_grads, r_grads,
                    fast_model(dtype, config, numpy_only=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_steps_equal_reference(dtype):
    """Five steps of forward, backward, clip and AdamW on each side: a chain of five passes (clipping
    and AdamW run the reference's arithmetic, bit for bit). No biases: the key part of
    c_attn.bias has a gradient of pure rounding noise, which AdamW turns into steps of lr * noise / eps,
    so there the two sides agree only absolutely (parity_tests/test_training.py explains it)."""
    config = small_config(bias=False)
    reference, quick = noisy_pair(config, dtype)
    r_opt = optim.AdamW(reference.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    f_opt = fast.AdamW(quick.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(5):
        idx, targets = batch(config, seed=step)
        _, r_loss = reference.forward(idx, targets)
        _, f_loss = quick.forward(idx, targets)
        r_grads, f_grads = reference.backward(), quick.backward()
        r_norm = optim.clip_grad_norm(r_grads, 0.5)
        f_norm = fast.clip_grad_norm(f_grads, 0.5)
        lr = optim.cosine_lr(step, 1e-2, 2, 5, 1e-3)
        r_opt.step(r_grads, lr=lr)
        f_opt.step(f_grads, lr=lr)
        check_equal(f"step {step} [{np.dtype(dtype).name}]",
                    {"loss": f_loss, "grad norm": f_norm, **quick.params},
                    {"loss": r_loss, "grad norm": r_norm, **reference.params},
                    fast_model(dtype, config, numpy_only=True, steps=step + 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_updates_equal_reference_bit_for_bit(dtype):
    """Given the same gradients, the flat-buffer AdamW does the reference's arithmetic exactly."""
    config = small_config()
    reference, quick = noisy_pair(config, dtype)
    r_opt = optim.AdamW(reference.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    f_opt = fast.AdamW(quick.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(16)
    for lr in (1e-2, 3e-3, 1e-2):
        grads = {n: randn(rng, p.shape, dtype) for n, p in reference.params.items()}
        r_opt.step(grads, lr=lr)
        f_opt.step(grads, lr=lr)
    check_equal(f"AdamW [{np.dtype(dtype).name}]",
                {**quick.params, **{f"m {n}": m for n, m in f_opt.moments("exp_avg").items()}},
                {**reference.params, **{f"m {n}": m for n, m in r_opt.moments("exp_avg").items()}},
                bitwise("the reference's AdamW formula, element by element in the same order, on flat views"))


def test_adamw_state_dicts_load_into_each_other():
    """Checkpoints move between the two optimizers both ways, and both take the older
    per-group layout ("exp_avg.decay", ...) that npgpt wrote before the fast path moved out."""
    config = small_config()
    reference, quick = noisy_pair(config, np.float64)
    r_opt, f_opt = optim.AdamW(reference.params, lr=1e-2), fast.AdamW(quick.params, lr=1e-2)
    rng = np.random.default_rng(17)
    for _ in range(2):
        grads = {n: rng.standard_normal(p.shape) for n, p in reference.params.items()}
        r_opt.step(grads)
        f_opt.step(grads)
    per_group = {"step": np.array(2, dtype=np.int64)}
    for kind in ("exp_avg", "exp_avg_sq"):
        for group, names in f_opt.groups.items():
            per_group[f"{kind}.{group}"] = np.concatenate([f_opt.moments(kind)[n].ravel() for n in names])
    for source_name, state in (("reference", r_opt.state_dict()), ("fast", f_opt.state_dict()),
                               ("per-group", per_group)):
        assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
        for target in (optim.AdamW(reference.params, lr=1e-2), fast.AdamW(quick.params, lr=1e-2)):
            target.load_state_dict(state)
            assert target.step_count == 2
            for kind in ("exp_avg", "exp_avg_sq"):
                check_equal(f"{source_name} -> {type(target).__module__} {kind}", target.moments(kind),
                            r_opt.moments(kind), bitwise("the same moments, copied between layouts"))
    assert set(r_opt.state_dict()) == set(f_opt.state_dict())


def test_adamw_state_of_another_model_is_refused_whole():
    opt = fast.AdamW(fast.GPT(small_config()).params)
    other = optim.AdamW(npgpt.GPT(small_config(n_embd=12)).params)
    before = {k: v.copy() for k, v in opt.state_dict().items()}
    with pytest.raises(ValueError, match="belongs to another model"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_muon_is_bit_for_bit_the_reference(dtype, nesterov):
    """npgpt.fast.Muon's in-place Newton-Schulz: the same operations, so five steps on a tall, a wide
    and a square matrix give npgpt.optim.Muon's parameters and buffers exactly; the state dicts load
    into each other."""
    rng = np.random.default_rng(10)
    shapes = {"tall": (12, 5), "wide": (4, 9), "square": (6, 6)}
    start = {n: randn(rng, s, dtype) for n, s in shapes.items()}
    params = {"ours": {n: p.copy() for n, p in start.items()}, "reference": {n: p.copy() for n, p in start.items()}}
    opts = {"ours": fast.Muon(params["ours"], lr=0.05, weight_decay=0.1, nesterov=nesterov),
            "reference": Muon(params["reference"], lr=0.05, weight_decay=0.1, nesterov=nesterov)}
    for step in range(5):
        grads = {n: randn(rng, s, dtype) for n, s in shapes.items()}
        for opt in opts.values():
            opt.step(grads, lr=0.05 / (step + 1))
    compare_all({**params["ours"], **{f"buf {n}": b for n, b in opts["ours"].momentum_buffer.items()}},
                {**params["reference"], **{f"buf {n}": b for n, b in opts["reference"].momentum_buffer.items()}},
                rtol=bitwise("fast.Muon's in-place Newton-Schulz: the reference's products and sums, in its order"),
                header=f"fast.Muon [{np.dtype(dtype).name}]")
    u = randn(rng, (7, 3), dtype)
    assert np.array_equal(fast.optim.zeropower_via_newton_schulz(u), ref_muon.zeropower_via_newton_schulz(u))
    swapped = Muon({n: p.copy() for n, p in start.items()})
    swapped.load_state_dict(opts["ours"].state_dict())
    assert swapped.step_count == 5 and all(np.array_equal(swapped.momentum_buffer[n], opts["ours"].momentum_buffer[n])
                                           for n in shapes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_cached_and_generate_equal_reference(dtype):
    config = small_config(block_size=8)
    reference, quick = noisy_pair(config, dtype)
    idx, _ = batch(config, B=2)
    ours, theirs = {}, {}
    for model, results in ((quick, ours), (reference, theirs)):
        kv = model.new_kv_cache(2)
        results["prefill"] = model.forward_cached(idx[:, :5], kv)
        results["next"] = model.forward_cached(idx[:, 5:6], kv)
        results["kv.k"], results["kv.v"] = kv.k, kv.v
    check_equal(f"forward_cached [{np.dtype(dtype).name}]", ours, theirs,
                fast_model(dtype, config, numpy_only=True, backward=False))
    prompt = idx[:, :3]
    for temperature, top_k in ((0.0, None), (0.9, 3)):
        got = quick.generate(prompt, 12, temperature, top_k, np.random.default_rng(18))
        want = reference.generate(prompt, 12, temperature, top_k, np.random.default_rng(18))
        if np.dtype(dtype) == np.float64:  # sampling on equal-to-rounding logits: the same tokens
            assert np.array_equal(got, want), (temperature, top_k)
        assert got.shape == want.shape == (2, 15) and np.array_equal(got[:, :3], prompt)


def test_fast_model_is_a_drop_in():
    """Same params dict (names, shapes, order, values at init), methods and bigram model."""
    config = small_config(dropout=0.1)
    reference, quick = npgpt.GPT(config, seed=3), fast.GPT(config, seed=3)
    assert list(quick.params) == list(reference.params)
    assert all(np.array_equal(quick.params[n], p) and quick.params[n].dtype == p.dtype
               for n, p in reference.params.items())
    assert quick.num_params() == reference.num_params()
    assert quick.eval() is quick and not quick.training and quick.train().training
    assert fast.BigramLanguageModel is npgpt.BigramLanguageModel
    for name in ("forward", "backward", "forward_cached", "generate", "new_kv_cache"):
        assert inspect.signature(getattr(fast.GPT, name)) == inspect.signature(getattr(npgpt.GPT, name))
    assert inspect.signature(fast.GPT) == inspect.signature(npgpt.GPT)
    assert inspect.signature(fast.AdamW) == inspect.signature(optim.AdamW)


# --------------------------------------------------------------------------------------------
# Parameters as views of one buffer; AdamW without gather/scatter; the allocator
# --------------------------------------------------------------------------------------------

def test_pack_params_are_views_of_one_buffer_with_the_same_values():
    params = init_params(small_config(), seed=3)
    packed = fast.pack_params(params)
    assert list(packed) == list(params), "keys keep nanoGPT's order"
    base = next(iter(packed.values())).base
    for n, p in packed.items():
        assert np.array_equal(p, params[n]), n
        assert p.base is base and p.shape == params[n].shape and p.dtype == params[n].dtype
        assert p.flags.c_contiguous and p.flags.writeable
    model = fast.GPT(small_config(), seed=3)
    assert all(np.array_equal(model.params[n], params[n]) for n in params)
    assert next(iter(model.params.values())).base is not None  # fast.GPT packs its own


def test_writing_into_a_packed_parameter_reaches_the_buffer():
    model = fast.GPT(small_config())
    w = model.params["transformer.h.1.mlp.c_fc.weight"]
    w[...] = 0.25
    assert np.count_nonzero(w.base == np.float32(0.25)) >= w.size


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_view_path_equals_gather_path(dtype):
    """fast.AdamW on packed params (flat views, no gather/scatter) against the same params as
    separate arrays (gathered and scattered every step): identical, bit for bit."""
    model = fast.GPT(small_config(), seed=1, dtype=dtype)
    loose = {n: p.copy() for n, p in model.params.items()}
    opt_view = fast.AdamW(model.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_gather = fast.AdamW(loose, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert all(v is not None for v in opt_view._param_views.values())
    assert opt_gather._param_views["decay"] is None
    rng = np.random.default_rng(19)
    for lr in (1e-2, 3e-3, 1e-2):
        grads = {n: randn(rng, p.shape, dtype) for n, p in loose.items()}
        opt_view.step(grads, lr=lr)
        opt_gather.step(grads, lr=lr)
    check_equal("view path vs gather path", model.params, loose,
                bitwise("one AdamW, the same arithmetic on flat views or on gathered copies"))


def test_adamw_falls_back_when_a_parameter_is_replaced():
    model = fast.GPT(small_config(), seed=2, dtype=np.float64)
    opt = fast.AdamW(model.params, lr=1e-2, weight_decay=0.1)
    name = "transformer.h.0.attn.c_attn.weight"
    model.params[name] = model.params[name].copy()  # no longer a view of the buffer
    before = model.params[name].copy()
    grads = {n: np.ones_like(p) for n, p in model.params.items()}
    opt.step(grads)
    assert not np.array_equal(model.params[name], before), "the replaced array must be updated too"
    reference = npgpt.GPT(small_config(), seed=2, dtype=np.float64)
    optim.AdamW(reference.params, lr=1e-2, weight_decay=0.1).step(grads)
    check_equal("after fallback", model.params, reference.params,
                bitwise("fast.AdamW's fallback runs the reference's formula element by element"))


def test_forward_frees_the_previous_cache_but_backward_still_repeats():
    model = fast.GPT(small_config(), seed=4)
    idx, targets = batch(small_config(), B=2)
    model.forward(idx, targets)
    g1, g2 = model.backward(), model.backward()
    assert all(np.array_equal(g1[n], g2[n]) for n in g1)


def test_fast_gpt_tunes_the_allocator_itself_once():
    """No setup call for the caller: building a fast.GPT sets glibc's malloc (where it has mallopt)."""
    fast.GPT(small_config())
    first = fast.model._kept_freed_memory
    assert isinstance(first, bool)
    fast.GPT(small_config())
    assert fast.keep_freed_memory() == first and fast.model._kept_freed_memory == first


def test_the_reference_holds_no_speed_tricks():
    """npgpt.layers, model and optim are the plain formulas: no out= aliasing, no allocator calls,
    no buffer addresses, no erf approximation, and they never import the fast path."""
    for module in (ref, npgpt.model, optim):
        source = inspect.getsource(module)
        assert not re.search(r"\bout=", source), f"{module.__name__} writes with out="
        for trick in ("ctypes", "mallopt", "__array_interface__", "pack_params", "_horner",
                      "from .fast", "npgpt.fast import", "import fast"):
            assert trick not in source, f"{module.__name__} contains {trick!r}"
