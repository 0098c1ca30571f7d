"""npgpt.fast's modern block (RMSNorm, RoPE, QK-norm, ReLU², SwiGLU) against npgpt.layers.

On NumPy alone (the numba kernels off) the fast pairs do the reference's floating-point operations
in the same order, so they must match it bit for bit (bounds.bitwise), in float64 and float32;
anything holding a linear layer matches within a chain of reordered sums (bounds.fast_model). With
the kernels on (RMSNorm's kernel, the fused attention) every stage rounds in its own order: float64
within bounds.fast_model of the reference, float32 within it of the exact result
(tests/test_numba_kernels.py's compare_to_reference).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from npgpt import fast, optim
from npgpt import layers as ref
from npgpt.bounds import (EXP32_MAX_ERROR, LIBM64_MAX_ERROR, NEWTON_SCHULZ_MATMULS, approximation, bitwise, chain,
                          fast_model)
from npgpt.compare import compare_all
from npgpt.fast import layers as fl
from npgpt.fast import numba_kernels as K
from npgpt import muon as ref_muon
from npgpt.muon import Muon
from fast_helpers import (IN_PLACE, batch, block_params, check, compare_pair, compare_to_reference, exact_twin, noisy_pair,
                          randn, small_config)
from layer_helpers import qk_attention_backward, qk_attention_forward

NP = fl.layer_set(kernels=False)

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
MODERN = dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="swiglu", bias=False, rope_theta=100.0)
CONFIGS = {
    "modern": small_config(**MODERN),
    "modern-relu2-bias-eps": small_config(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="relu2",
                                          norm_eps=0.01),
    "rope-only": small_config(pos_emb="rope"),
    "qk_norm-layernorm": small_config(qk_norm=True, norm_eps=1e-3),
    "swiglu-H12-tied": small_config(activation="swiglu", mlp_hidden=12, tie_weights=True),
}


@pytest.fixture
def numpy_only(monkeypatch):
    monkeypatch.setattr(K, "ENABLED", False)


@pytest.fixture
def kernels_on(monkeypatch):
    pytest.importorskip("numba")  # the base install (`make test-base`) has none; with numba, no excuse
    assert K.AVAILABLE, K.UNAVAILABLE_REASON
    monkeypatch.setattr(K, "ENABLED", True)


def test_the_fast_layers_cover_every_switch():
    """fast.GPT runs npgpt.fast's layer set for the modern block too."""
    for name, config in CONFIGS.items():
        assert fast.GPT(config).layers == fl.FAST, name


# --------------------------------------------------------------------------------------------
# The pairs, NumPy only: bit for bit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_modern_activations_equal_reference_bit_for_bit(dtype, activation, numpy_only):
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
    """The block's attention steps (test_modern_layers.qk_attention_forward) on a layer set."""
    return (lambda qkv, nh, **kw: qk_attention_forward(layers, qkv, nh, **kw),
            lambda dout, cache: qk_attention_backward(layers, dout, cache))


QK_PREPARED = bitwise("QK-norm and RoPE run the reference's operations in its order, in place; then the "
                      "reference's batched attention matmuls (the same shapes and operand layouts, outputs "
                      "through head views)")


@pytest.mark.parametrize("switches", [(True, True), (True, False), (False, True)], ids=["qk+rope", "qk", "rope"])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_with_qk_norm_and_rope_equals_reference_bit_for_bit(dtype, dropout, switches, numpy_only):
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
def test_attention_with_qk_norm_rope_and_a_kv_slot_equals_reference(dtype, numpy_only):
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


def modern_block_case(config, dtype, dropout, seed=10):
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
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_modern_block_equals_reference(dtype, name, dropout, numpy_only):
    """The block holds linears, so within a chain of their reordered sums; every gradient, QK-norm's
    gains included. The MLP's hidden activation is dropped after the forward for relu2 and swiglu as
    for gelu."""
    args, kwargs, dout = modern_block_case(CONFIGS[name], dtype, dropout)
    ours, f_cache = run_block(NP, args, kwargs, dout)
    theirs, _ = run_block(ref.REFERENCE, args, kwargs, dout)
    assert list(ours) == list(theirs)
    bound = fast_model(dtype, dataclasses.replace(CONFIGS[name], n_layer=1), numpy_only=True, blocks_only=True)
    compare_all(ours, theirs, rtol=bound, header=f"block {name} [{np.dtype(dtype).name}]")
    assert (f_cache.mlp_c_proj.x is None) == (CONFIGS[name].activation in ("gelu", "relu2", "swiglu"))


# --------------------------------------------------------------------------------------------
# The model, NumPy only and with the kernels
# --------------------------------------------------------------------------------------------

def forward_backward(model, config, dropout_masks=None):
    idx, targets = batch(config)
    logits, loss = model.forward(idx, targets, dropout_masks=dropout_masks)
    return {"logits": logits, "loss": loss, **model.backward()}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_modern_model_on_numpy_equals_reference(dtype, name, numpy_only):
    config = CONFIGS[name]
    reference, quick = noisy_pair(config, dtype)
    theirs = forward_backward(reference, config)
    ours = forward_backward(quick, config)
    assert list(ours) == list(theirs)
    rows = compare_all(ours, theirs, rtol=fast_model(dtype, config, numpy_only=True),
                       header=f"model {name} [{np.dtype(dtype).name}]")
    print(f"model {name} [{np.dtype(dtype).name}]: worst error / bound {max(r.rel / r.rtol for r in rows):.3g}")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_modern_model_with_kernels_equals_reference(dtype, name, kernels_on):
    config = CONFIGS[name]
    reference, quick = noisy_pair(config, dtype)
    theirs = forward_backward(reference, config)
    ours = forward_backward(quick, config)
    exact = forward_backward(exact_twin(reference, config), config) if np.dtype(dtype) == np.float32 else None
    compare_to_reference(f"model {name} with kernels [{np.dtype(dtype).name}]", ours, theirs, exact, dtype,
                         fast_model(dtype, config, numpy_only=False))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(3, 7, 24), (12, 64, 128), (2, 4, 9, 32)])
def test_rmsnorm_kernel(dtype, shape, kernels_on):
    """The row kernel against the float64 formula (a strided view of heads included, as QK-norm
    passes it): the forward a chain of 2 stages (the mean square over C, the scaling), dx 4 (and
    the backward's mean over C), dw 3 (and its sum over the N rows)."""
    rng = np.random.default_rng(6)
    C = shape[-1]
    x, dout = randn(rng, shape, dtype, 3.0) + dtype(1.5), randn(rng, shape, dtype)
    if len(shape) == 4:  # (B, nh, T, hs) heads split out of a (B, T, 3C) array: not contiguous
        x = ref.split_heads(randn(rng, (shape[0], shape[2], 3 * shape[1] * C), dtype)[..., :shape[1] * C], shape[1])
    w = randn(rng, C, dtype, 0.5) + dtype(1.0)
    out, cache = K.rmsnorm_forward(x, w, 1e-5)
    dx, dw = K.rmsnorm_backward(dout, cache)
    ref_out, ref_cache = ref.rmsnorm_forward(*(np.asarray(a, np.float64) for a in (x, w)))
    ref_dx, ref_dw = ref.rmsnorm_backward(np.asarray(dout, np.float64), ref_cache)
    assert type(cache) is ref.RMSNormCache
    N = int(np.prod(shape[:-1]))
    check("out", out, ref_out, dtype, chain(dtype, C, 2))
    check("xhat", cache.xhat, ref_cache.xhat, dtype, chain(dtype, C, 2))
    check("dx", dx, ref_dx, dtype, chain(dtype, C, 4))
    check("dw", dw, ref_dw, dtype, chain(dtype, max(C, N), 3))


def test_rmsnorm_kernel_uses_eps(kernels_on):
    rng = np.random.default_rng(7)
    x = randn(rng, (4, 16), np.float64, 1e-3)  # mean square ~1e-6: eps matters
    out, _ = K.rmsnorm_forward(x, np.ones(16), eps=1e-2)
    bound = chain(np.float64, 16, 2)
    compare_all({"out": out}, {"out": ref.rmsnorm_forward(x, np.ones(16), 1e-2)[0]}, rtol=bound)
    assert np.abs(K.rmsnorm_forward(x, np.ones(16))[0] - out).max() > bound  # the default eps: another result


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_swiglu_kernel(dtype, kernels_on):
    """One pass per row (sigmoid as 1 / (1 + exp(-g)), float32's polynomial exp) against the float64
    formula (sigmoid as (1 + tanh(g / 2)) / 2), wide gates included (no NaN, no overflow): the
    exp's error (float32: EXP32_MAX_ERROR; float64: two libm functions, LIBM64_MAX_ERROR) and
    the formulas' roundings, 3 for sig, 5 for out, 9 for dx (dsilu's 4, two products), with
    CANCELLATION (1 - sig, random-sign dout). The output the block rebuilds from the cache is the
    kernel's own, bit for bit."""
    rng = np.random.default_rng(8)
    x = randn(rng, (3, 5, 2 * 24), dtype, 3.0)
    x[0, 0, :6] = np.array([-100.0, -30.0, 0.0, 30.0, 100.0, -0.0], dtype)  # gates at the extremes
    dout = randn(rng, (3, 5, 24), dtype)
    out, cache = K.swiglu_forward(x)
    (dx,) = K.swiglu_backward(dout, cache)
    ref_out, ref_cache = ref.swiglu_forward(x.astype(np.float64))
    (ref_dx,) = ref.swiglu_backward(dout.astype(np.float64), ref_cache)
    assert type(cache) is ref.SwigluCache and np.isfinite(out).all() and np.isfinite(dx).all()
    approx = EXP32_MAX_ERROR if np.dtype(dtype) == np.float32 else LIBM64_MAX_ERROR
    check("out", out, ref_out, dtype, approximation(dtype, approx, 5))
    check("sig", cache.sig, ref_cache.sig, dtype, approximation(dtype, approx, 3))
    check("dx", dx, ref_dx, dtype, approximation(dtype, approx, 9))
    assert np.array_equal(fl.ACTIVATION_OUTPUT_FROM_CACHE["swiglu"](cache), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kernel_is_bit_for_bit_the_reference(dtype, kernels_on, monkeypatch):
    """The one-pass kernel (no FMA contraction) on a strided head view of qkv: the reference's
    result exactly, forward and backward, into `out` when given."""
    calls = []
    for name in ("rope_forward", "rope_backward"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name: (calls.append(_n), _f(*a))[1])
    rng = np.random.default_rng(9)
    B, nh, T, hs = 2, 3, 7, 8
    qkv = randn(rng, (B, T, 3 * nh * hs), dtype)
    x = ref.split_heads(qkv[..., nh * hs:2 * nh * hs], nh)  # k's heads: not contiguous
    angles = ref.rope_angles(T, hs, 100.0, offset=5, dtype=dtype)
    compare_pair("rope kernel", (K.rope_forward, K.rope_backward), (ref.rope_forward, ref.rope_backward),
                 (x, angles.cos, angles.sin), dtype,
                 bitwise("the kernel's loop runs ROPE_HALVES' products and sums, FMA contraction off"))
    assert set(calls) == {"rope_forward", "rope_backward"}, calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_modern_training_with_muon_equals_reference(dtype, kernels_on):
    """Steps of the fast modern model (kernels on) with Muon + AdamW, against the reference: five in
    float64, two in float32, within a chain over the steps (each a forward, backward, clip, AdamW
    and Newton-Schulz's 5 x 3 products). Newton-Schulz raises every singular value of the momentum
    towards 1, however small: a direction in which the gradient is little more than rounding noise
    gets as large an update as the main ones. So the two float32 runs' different summation orders
    (each ~5e-7 from the exact run) turn into parameter differences of order lr * 1e-6 / sigma, and
    from the third step the gradient norms differ at a few 1e-6: that would test the amplification,
    not the layers."""
    from gptapp.optimizers import MuonAdamW

    config = CONFIGS["modern"]
    reference, quick = noisy_pair(config, dtype)
    runs = {"ours": (quick, fast.AdamW, fast.clip_grad_norm), "reference": (reference, optim.AdamW, optim.clip_grad_norm)}
    if np.dtype(dtype) == np.float32:
        runs["exact"] = (exact_twin(reference, config), optim.AdamW, optim.clip_grad_norm)
    opts = {k: MuonAdamW(m.params, adamw, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, muon_lr=0.05,
                         muon_class=fast.Muon if k == "ours" else Muon)
            for k, (m, adamw, _) in runs.items()}
    assert opts["ours"].muon.params and isinstance(opts["ours"].muon, fast.Muon)
    for step in range(5 if np.dtype(dtype) == np.float64 else 2):
        idx, targets = batch(config, seed=step)
        state = {}
        for k, (model, _, clip) in runs.items():
            _, loss = model.forward(idx, targets)
            norm = clip(g := model.backward(), 0.5)
            opts[k].step(g, lr=optim.cosine_lr(step, 1e-2, 2, 5, 1e-3))
            state[k] = {"loss": loss, "grad norm": norm, **{n: p.copy() for n, p in model.params.items()}}
        bound = fast_model(dtype, config, numpy_only=False, steps=step + 1,
                           extra_stages=2 + 5 * NEWTON_SCHULZ_MATMULS)
        compare_to_reference(f"muon step {step} [{np.dtype(dtype).name}]", state["ours"], state["reference"],
                             state.get("exact"), dtype, bound)


@pytest.mark.parametrize("name", ["modern", "modern-relu2-bias-eps"])
def test_modern_generate_with_kernels_equals_reference(name, kernels_on):
    """KV-cache decoding with RoPE offsets on the fast layers: the reference's tokens and logits."""
    config = CONFIGS[name]
    reference, quick = noisy_pair(config, np.float64)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    assert np.array_equal(quick.generate(idx, 9, temperature=0.0), reference.generate(idx, 9, temperature=0.0))
    kv_r, kv_f = reference.new_kv_cache(2), quick.new_kv_cache(2)
    first = {"logits": quick.forward_cached(idx, kv_f)}, {"logits": reference.forward_cached(idx, kv_r)}
    nxt = np.array([[0], [2]])
    second = {"logits": quick.forward_cached(nxt, kv_f)}, {"logits": reference.forward_cached(nxt, kv_r)}
    bound = fast_model(np.float64, config, numpy_only=False, backward=False)
    compare_all(first[0], first[1], rtol=bound, header="forward_cached, prompt")
    compare_all(second[0], second[1], rtol=bound, header="forward_cached, next token")


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
