"""Unit tests of npgpt.layers: every forward/backward pair against centred finite differences, the
modern block's (RMSNorm, RoPE, ReLU², SwiGLU, attention with QK-norm and RoPE, the block with its
switches) as rows of the same table.

Gradients are checked in float64 with a random upstream gradient (gradcheck_layer draws it), each
input and parameter to its own bounds.finite_diff bound (npgpt.gradcheck.finite_diff_bound, from
the case's sizes). Every other comparison names its kind in npgpt.bounds. Each case below is built by a
factory `make(rng, dtype) -> (forward, backward, inputs, kwargs)`; the same table drives the
gradient check, the "backward writes nothing" check and the dtype check. Then the forwards against
their formulas written out independently (loops over pairs, scalar sigmoid), each to the bound of
its kind in npgpt.bounds, and RoPE's properties (a rotation: norms kept; q.k after RoPE depends only
on the positions' difference; its backward is the rotation by -angle).

Dimension letters as in npgpt.layers: B batch, T time, C channels, nh heads, hs head size, V vocab.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from scipy.special import log_softmax, ndtr
from scipy.special import softmax as scipy_softmax

from npgpt import layers as L
from npgpt import bounds
from npgpt.gradcheck import gradcheck_layer, rel_error

from layer_helpers import qk_attention_backward, qk_attention_forward

H = 1e-5  # finite-difference step (gradcheck_layer's default)
F64 = np.float64
U64 = bounds.unit_roundoff(F64)
BLOCK_NAMES = (  # one block's parameters under nanoGPT's local names, written out independently
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def normal64(rng, shape, scale=1.0, offset=0.0):
    return offset + scale * rng.standard_normal(shape)


# --------------------------------------------------------------------------------------------
# The case table
# --------------------------------------------------------------------------------------------

def embedding_case(V, C, idx, block_size=None):
    """idx is bound into the forward; test_gradcheck_layer_takes_embedding_inputs_in_forward_order
    checks the positional form, where gradcheck_layer skips the integer idx."""
    def make(rng, dtype):
        ids = np.array(idx)
        wpe = None if block_size is None else normal(rng, (block_size, C), dtype)
        inputs = {"wte": normal(rng, (V, C), dtype), "wpe": wpe}

        def forward(wte, wpe):
            return L.embedding_forward(ids, wte, wpe)

        return forward, L.embedding_backward, inputs, {}
    return make


def linear_case(x_shape, n_out, bias):
    def make(rng, dtype):
        n_in = x_shape[-1]
        inputs = {"x": normal(rng, x_shape, dtype), "w": normal(rng, (n_out, n_in), dtype),
                  "b": normal(rng, (n_out,), dtype) if bias else None}
        return L.linear_forward, L.linear_backward, inputs, {}
    return make


def layernorm_case(x_shape, bias):
    def make(rng, dtype):
        C = x_shape[-1]
        inputs = {"x": normal(rng, x_shape, dtype, 2.0) + dtype(0.5),  # non-zero mean on purpose
                  "w": (1.0 + normal(rng, (C,), np.float64, 0.5)).astype(dtype),
                  "b": normal(rng, (C,), dtype) if bias else None}
        return L.layernorm_forward, L.layernorm_backward, inputs, {}
    return make


def relu_case(shape):
    def make(rng, dtype):
        x = rng.standard_normal(shape)
        x = np.where(np.abs(x) < 0.01, np.copysign(0.01, x), x).astype(dtype)
        # centred differences with step H must not straddle the kink at 0
        assert np.abs(x).min() > 1e-3 and np.abs(x).min() > 100 * H
        return L.relu_forward, L.relu_backward, {"x": x}, {}
    return make


def pointwise_case(forward, backward, shape, scale=2.0):
    def make(rng, dtype):
        return forward, backward, {"x": normal(rng, shape, dtype, scale)}, {}
    return make


def dropout_case(shape, p):
    def make(rng, dtype):
        mask = L.dropout_mask(shape, p, rng, dtype)
        assert (mask == 0).any() and (mask != 0).any()  # both kinds of unit present
        return L.dropout_forward, L.dropout_backward, {"x": normal(rng, shape, dtype)}, {"p": p, "mask": mask}
    return make


def attention_case(B, T, C, n_head, dropout_p=0.0):
    def make(rng, dtype):
        qkv = normal(rng, (B, T, 3 * C), dtype, 1.5)  # scores of order 1: far from uniform attention
        kwargs = {"n_head": n_head}
        if dropout_p:
            kwargs.update(dropout_p=dropout_p, mask=L.dropout_mask((B, n_head, T, T), dropout_p, rng, dtype))
        return L.attention_forward, L.attention_backward, {"qkv": qkv}, kwargs
    return make


def cross_entropy_case(B, T, V, targets=None):
    def make(rng, dtype):
        t = rng.integers(0, V, (B, T)) if targets is None else np.array(targets)
        inputs = {"logits": normal(rng, (B, T, V), dtype, 2.0), "targets": t}
        return L.cross_entropy_forward, L.cross_entropy_backward, inputs, {}
    return make


def block_param_shapes(C):
    return {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C),
            "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,), "ln_2.bias": (C,), "mlp.c_fc.weight": (4 * C, C),
            "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C), "mlp.c_proj.bias": (C,)}


def random_block_params(rng, C, bias, dtype):
    """O(1) activations everywhere: gains near 1, non-zero biases, weights N(0, 1/fan_in)."""
    params = {}
    for name, shape in block_param_shapes(C).items():
        if name.endswith(".bias"):
            if bias:
                params[name] = normal(rng, shape, dtype, 0.2)
        elif name.startswith("ln_"):
            params[name] = (1.0 + normal(rng, shape, np.float64, 0.2)).astype(dtype)
        else:
            params[name] = normal(rng, shape, dtype, 1.0 / math.sqrt(shape[1]))
    return params


def block_case(B, T, C, n_head, activation="gelu", bias=True, dropout_p=0.0):
    """block_forward takes a dict of parameters; gradcheck_layer wants positional arrays, so the
    wrapper rebuilds the dict from the very arrays gradcheck_layer perturbs in place."""
    def make(rng, dtype):
        x = normal(rng, (B, T, C), dtype)
        params = random_block_params(rng, C, bias, dtype)
        names = list(params)
        masks = None
        if dropout_p:
            masks = [L.dropout_mask(shape, dropout_p, rng, dtype)
                     for shape in ((B, n_head, T, T), (B, T, C), (B, T, C))]

        def forward(x, *arrays):
            return L.block_forward(x, dict(zip(names, arrays)), L.BlockOptions(n_head, activation, dropout_p), masks)

        def backward(dout, cache):
            dx, grads = L.block_backward(dout, cache)
            assert sorted(grads) == sorted(names), f"block grads {sorted(grads)} != params {sorted(names)}"
            return (dx, *(grads[n] for n in names))

        return forward, backward, {"x": x, **params}, {}
    return make


def rmsnorm_case(shape, eps=1e-5, offset=0.0):
    def make(rng, dtype):
        C = shape[-1]
        inputs = {"x": normal(rng, shape, dtype, 2.0) + dtype(offset),
                  "w": (1.0 + normal(rng, (C,), np.float64, 0.5)).astype(dtype)}
        return L.rmsnorm_forward, L.rmsnorm_backward, inputs, {"eps": eps}
    return make


def rope_case(B, nh, T, hs, theta=10000.0, offset=0):
    def make(rng, dtype):
        cos, sin = L.rope_angles(T, hs, theta, offset, dtype)
        return L.rope_forward, L.rope_backward, {"x": normal(rng, (B, nh, T, hs), dtype)}, {"cos": cos, "sin": sin}
    return make


def qk_attention_case(B, T, C, n_head, qk_norm=True, rope=True, theta=50.0):
    """The block's attention steps with QK-norm and RoPE (layer_helpers.qk_attention_forward): gradients
    of qkv and of both gains; four stages (QK-norm, RoPE, the core's two) between qkv and y."""
    def make(rng, dtype):
        hs = C // n_head
        inputs = {"qkv": normal(rng, (B, T, 3 * C), dtype)}
        if qk_norm:
            inputs["q_norm"] = (1.0 + normal(rng, (hs,), np.float64, 0.3)).astype(dtype)
            inputs["k_norm"] = (1.0 + normal(rng, (hs,), np.float64, 0.3)).astype(dtype)

        def forward(qkv, q_norm=None, k_norm=None):
            angles = L.rope_angles(T, hs, theta, dtype=qkv.dtype) if rope else None
            return qk_attention_forward(L.REFERENCE, qkv, n_head, q_norm, k_norm, angles)

        return forward, lambda dout, cache: qk_attention_backward(L.REFERENCE, dout, cache), inputs, {}
    make.depth = 4
    return make


def modern_block_case(B, T, C, n_head, activation, bias, norm="rmsnorm", qk_norm=True, rope=True, hidden=None):
    """The block with the modern switches: every parameter's gradient and the input's."""
    def make(rng, dtype):
        hs, H = C // n_head, hidden or 4 * C
        n_fc = 2 * H if activation == "swiglu" else H
        shapes = {"ln_1.weight": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_proj.weight": (C, C),
                  "ln_2.weight": (C,), "mlp.c_fc.weight": (n_fc, C), "mlp.c_proj.weight": (C, H)}
        if qk_norm:
            shapes.update({"attn.q_norm.weight": (hs,), "attn.k_norm.weight": (hs,)})
        if bias:
            shapes.update({"attn.c_attn.bias": (3 * C,), "attn.c_proj.bias": (C,), "mlp.c_fc.bias": (n_fc,),
                           "mlp.c_proj.bias": (C,)})
            if norm == "layernorm":
                shapes.update({"ln_1.bias": (C,), "ln_2.bias": (C,)})
        names = list(shapes)
        params = {n: ((1.0 if n.endswith("norm.weight") or ".ln_" in f".{n}" else 0.0)
                      + normal(rng, shape, np.float64, 0.4)).astype(dtype) for n, shape in shapes.items()}

        def forward(x, *arrays):
            angles = L.rope_angles(T, hs, 100.0, dtype=x.dtype) if rope else None
            return L.block_forward(x, dict(zip(names, arrays)),
                                   L.BlockOptions(n_head, activation, norm=norm, norm_eps=1e-5, rope=angles))

        def backward(dout, cache):
            dx, grads = L.block_backward(dout, cache)
            assert sorted(grads) == sorted(names), f"block grads {sorted(grads)} != params {sorted(names)}"
            return (dx, *(grads[n] for n in names))

        return forward, backward, {"x": normal(rng, (B, T, C), dtype), **params}, {}
    return make


REPEATED_IDS = [[0, 2, 2, 1, 2], [3, 0, 2, 2, 0]]  # id 2 five times, id 0 three times

CASES = [
    pytest.param(embedding_case(4, 3, REPEATED_IDS, block_size=6), id="embedding-repeated-ids"),
    pytest.param(embedding_case(4, 3, REPEATED_IDS), id="embedding-bigram-wpe-none"),
    pytest.param(embedding_case(2, 5, np.full((2, 12), 1), block_size=12), id="embedding-vocab2-one-id-run"),
    pytest.param(embedding_case(5, 4, [[3], [3]], block_size=4), id="embedding-T1"),
    pytest.param(linear_case((6, 5), 3, True), id="linear-2d-bias"),
    pytest.param(linear_case((6, 5), 3, False), id="linear-2d-nobias"),
    pytest.param(linear_case((2, 3, 5), 7, True), id="linear-3d-bias"),
    pytest.param(linear_case((2, 3, 5), 7, False), id="linear-3d-nobias"),
    pytest.param(layernorm_case((2, 3, 4), True), id="layernorm-C4-bias"),
    pytest.param(layernorm_case((2, 3, 4), False), id="layernorm-C4-nobias"),
    pytest.param(layernorm_case((6, 5), True), id="layernorm-2d-C5-bias"),
    pytest.param(layernorm_case((2, 1, 7), False), id="layernorm-T1-C7-nobias"),
    pytest.param(relu_case((2, 3, 7)), id="relu"),
    pytest.param(pointwise_case(L.gelu_forward, L.gelu_backward, (2, 3, 7)), id="gelu"),
    pytest.param(pointwise_case(L.gelu_tanh_forward, L.gelu_tanh_backward, (2, 3, 7)), id="gelu_tanh"),
    pytest.param(dropout_case((2, 3, 5), 0.4), id="dropout-explicit-mask"),
    pytest.param(pointwise_case(L.softmax_forward, L.softmax_backward, (2, 3, 6)), id="softmax"),
    pytest.param(pointwise_case(L.softmax_forward, L.softmax_backward, (4, 2), 1.0), id="softmax-2-classes"),
    pytest.param(attention_case(2, 4, 4, 1), id="attention-nh1"),
    pytest.param(attention_case(2, 4, 4, 2), id="attention-nh2"),
    pytest.param(attention_case(2, 5, 6, 3), id="attention-C6-nh3-hs2"),
    pytest.param(attention_case(1, 3, 5, 5), id="attention-C5-nh5-hs1"),
    pytest.param(attention_case(2, 1, 4, 2), id="attention-T1"),
    pytest.param(attention_case(2, 4, 6, 2, dropout_p=0.3), id="attention-dropout-mask"),
    pytest.param(cross_entropy_case(2, 4, 5), id="cross_entropy"),
    pytest.param(cross_entropy_case(2, 3, 2), id="cross_entropy-vocab2"),
    pytest.param(cross_entropy_case(3, 1, 4, targets=[[1], [1], [1]]), id="cross_entropy-T1-same-target"),
    pytest.param(block_case(2, 4, 4, 2, "gelu", True), id="block-gelu-bias"),
    pytest.param(block_case(2, 4, 4, 2, "gelu", False), id="block-gelu-nobias"),
    pytest.param(block_case(2, 4, 4, 2, "gelu_tanh", True), id="block-gelu_tanh-bias"),
    pytest.param(block_case(2, 4, 4, 2, "gelu_tanh", False), id="block-gelu_tanh-nobias"),
    pytest.param(block_case(2, 4, 4, 2, "relu", True), id="block-relu-bias"),
    pytest.param(block_case(2, 4, 4, 2, "relu", False), id="block-relu-nobias"),
    pytest.param(block_case(2, 3, 4, 2, "gelu", True, dropout_p=0.3), id="block-gelu-dropout-masks"),
    pytest.param(block_case(2, 3, 4, 2, "relu", False, dropout_p=0.3), id="block-relu-nobias-dropout-masks"),
    pytest.param(block_case(1, 3, 6, 3, "gelu_tanh", True), id="block-C6-nh3-hs2"),
    pytest.param(block_case(2, 3, 5, 5, "gelu", False), id="block-C5-nh5-hs1"),
    pytest.param(block_case(2, 1, 4, 1, "gelu", True), id="block-T1-nh1"),
    # the modern block's pairs and switches
    pytest.param(rmsnorm_case((2, 3, 4)), id="rmsnorm-C4"),
    pytest.param(rmsnorm_case((6, 5), offset=1.5), id="rmsnorm-2d-C5-offset"),
    pytest.param(rmsnorm_case((2, 1, 1)), id="rmsnorm-C1"),
    pytest.param(rmsnorm_case((3, 4, 6), eps=0.5), id="rmsnorm-large-eps"),
    pytest.param(rmsnorm_case((2, 2, 3, 4)), id="rmsnorm-qk-per-head"),  # (B, nh, T, hs), as QK-norm
    pytest.param(rope_case(2, 2, 5, 4), id="rope-hs4"),
    pytest.param(rope_case(1, 3, 4, 2, theta=3.0), id="rope-hs2-theta3"),
    pytest.param(rope_case(2, 1, 3, 8, offset=17), id="rope-offset17"),
    pytest.param(pointwise_case(L.relu2_forward, L.relu2_backward, (2, 3, 7), 1.0), id="relu2"),
    pytest.param(pointwise_case(L.swiglu_forward, L.swiglu_backward, (2, 3, 8)), id="swiglu-H4"),
    pytest.param(pointwise_case(L.swiglu_forward, L.swiglu_backward, (5, 2)), id="swiglu-H1"),
    pytest.param(pointwise_case(L.swiglu_forward, L.swiglu_backward, (2, 3, 6), 12.0), id="swiglu-saturated"),
    pytest.param(qk_attention_case(2, 4, 8, 2), id="attention-qknorm-rope"),
    pytest.param(qk_attention_case(2, 4, 8, 2, qk_norm=False), id="attention-rope"),
    pytest.param(qk_attention_case(1, 5, 6, 3, rope=False), id="attention-qknorm-hs2"),
    pytest.param(modern_block_case(2, 4, 8, 2, "swiglu", False, hidden=12), id="block-modern-swiglu"),
    pytest.param(modern_block_case(2, 4, 8, 2, "relu2", True), id="block-modern-relu2-bias"),
    pytest.param(modern_block_case(2, 3, 8, 2, "gelu", True, norm="layernorm", qk_norm=True, rope=False),
                 id="block-layernorm-qknorm"),
    pytest.param(modern_block_case(2, 3, 8, 1, "gelu_tanh", False, qk_norm=False), id="block-rmsnorm-rope-nh1"),
]


# --------------------------------------------------------------------------------------------
# Helpers for the "backward writes nothing" check
# --------------------------------------------------------------------------------------------

def assert_unchanged(before, after, path):
    """Recursive equality of a cache (tuples/lists/dicts of arrays, None, bools, str, shapes)."""
    if isinstance(before, np.ndarray):
        assert isinstance(after, np.ndarray), f"{path}: was an array, is {type(after)}"
        assert after.dtype == before.dtype and after.shape == before.shape, f"{path}: dtype/shape changed"
        assert np.array_equal(after, before), f"{path}: array was modified by backward"
    elif isinstance(before, (tuple, list)):
        assert type(after) is type(before) and len(after) == len(before), f"{path}: structure changed"
        for i, (b, a) in enumerate(zip(before, after)):
            assert_unchanged(b, a, f"{path}[{i}]")
    elif isinstance(before, dict):
        assert list(after) == list(before), f"{path}: keys changed"
        for k in before:
            assert_unchanged(before[k], after[k], f"{path}[{k!r}]")
    else:
        assert after == before, f"{path}: {before!r} became {after!r}"


def arrays_in(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from arrays_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from arrays_in(o)


def float_inputs(inputs):
    return {n: x for n, x in inputs.items() if x is not None and np.issubdtype(np.asarray(x).dtype, np.floating)}


# --------------------------------------------------------------------------------------------
# The three checks every layer pair gets
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", CASES)
def test_backward_matches_finite_differences(make, request, errors_below, recording_relu):
    forward, backward, inputs, kwargs = make(np.random.default_rng(20240611), np.float64)
    with recording_relu() as pre:  # ReLU inputs inside a block, at the point being checked
        out, _ = forward(*inputs.values(), **kwargs)
    assert bool(pre) == request.node.callspec.id.startswith("block-relu")  # the recorder works
    if pre:
        margin = min(float(np.abs(a).min()) for a in pre)
        assert margin > 10 * H, f"a ReLU pre-activation lies {margin:.2e} from the kink; pick another seed"
    errors = gradcheck_layer(forward, backward, inputs, rng=np.random.default_rng(7), h=H, **kwargs)
    # every floating input got a gradient (a backward that returns None or too few would skip one)
    assert sorted(errors) == sorted(float_inputs(inputs))
    # f = sum(out * dout): its longest sum is over the output or over one input (the forward's
    # inner sums run over parts of its inputs); a block is BLOCK_DEPTH stages carried with the
    # parity suite's amplification, a single layer one stage and the final sum (the attention steps
    # with QK-norm and RoPE: make.depth)
    n = max(np.size(out), *(x.size for x in float_inputs(inputs).values()))
    block = request.node.callspec.id.startswith("block-")
    errors_below(errors, request.node.callspec.id, n=n,
                 depth=bounds.BLOCK_DEPTH + 1 if block else getattr(make, "depth", 2),
                 amplification=bounds.PARITY_AMPLIFICATION if block else 1.0, h=H)


def freeze(obj):
    """Every array in a (nested) cache or input: a write raises."""
    for a in arrays_in(obj):
        a.flags.writeable = False


@pytest.mark.parametrize("make", CASES)
def test_backward_leaves_dout_and_cache_untouched(make):
    rng = np.random.default_rng(3)
    forward, backward, inputs, kwargs = make(rng, np.float64)
    inputs_before = copy.deepcopy(inputs)
    out, cache = forward(*inputs.values(), **kwargs)
    dout = rng.standard_normal(np.shape(out))
    dout_before, cache_before = dout.copy(), copy.deepcopy(cache)
    freeze([dout, inputs, cache])  # a backward that writes into any of them raises
    assert isinstance(cache, tuple) and type(cache) is not tuple  # a NamedTuple, read by name
    grads = backward(dout, cache)
    assert np.array_equal(dout, dout_before), "backward wrote into dout"
    assert_unchanged(cache_before, cache, "cache")
    assert_unchanged(inputs_before, inputs, "inputs")
    # fresh arrays: no gradient is a view of dout, of the cache or of an input
    for g in grads:
        if g is None:
            continue
        assert g.flags.writeable
        for other in [dout, *arrays_in(cache), *arrays_in(inputs)]:
            assert not np.shares_memory(g, other), "a gradient shares memory with dout/cache/inputs"
    # a second backward from the same cache gives identical gradients
    for g1, g2 in zip(grads, backward(dout, cache)):
        assert (g1 is None and g2 is None) or np.array_equal(g1, g2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", CASES)
def test_dtype_is_kept(make, dtype):
    """Every gradient has its input's shape and dtype; float32 stays float32 (no silent upcast)."""
    forward, backward, inputs, kwargs = make(np.random.default_rng(4), dtype)
    out, cache = forward(*inputs.values(), **kwargs)
    assert np.asarray(out).dtype == dtype
    dout = np.random.default_rng(5).standard_normal(np.shape(out)).astype(dtype)
    grads = [g for g in backward(dout, cache) if g is not None]
    assert len(grads) == len(float_inputs(inputs))
    for (name, x), g in zip(float_inputs(inputs).items(), grads):
        assert g.shape == x.shape, f"d{name} has shape {g.shape}, expected {x.shape}"
        assert g.dtype == dtype, f"d{name} is {g.dtype}"


# --------------------------------------------------------------------------------------------
# Forward values against independent references
# --------------------------------------------------------------------------------------------

def test_forward_values_match_references(assert_close):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5))
    w, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    # the matmul and einsum add the C = 5 products (and the bias) in their own orders
    assert_close("linear", L.linear_forward(x, w, b)[0], np.einsum("btc,oc->bto", x, w) + b,
                 bounds.reordered(F64, 5 + 1))

    g, beta = rng.standard_normal(5), rng.standard_normal(5)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + beta
    # three stages (mean, variance, normalise) of sums over C = 5, with other formulas on each side
    assert_close("layernorm", L.layernorm_forward(x, g, beta)[0], ref, bounds.chain(F64, 5, depth=3))

    # erf and ndtr are each correct to a few u: a reordered pair of one-term "sums"
    assert_close("gelu", L.gelu_forward(x)[0], x * ndtr(x), bounds.chain(F64, 1, depth=2))
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    assert_close("gelu_tanh", L.gelu_tanh_forward(x)[0], 0.5 * x * (1 + np.tanh(u)), bounds.chain(F64, 2, depth=2))
    # the approximation's error is absolute (GELU_TANH_MAX_ERROR), the roundings relative to |gelu|
    approx = np.abs(L.gelu_tanh_forward(x)[0] - L.gelu_forward(x)[0]).max()
    scale = float(np.abs(L.gelu_forward(x)[0]).max())
    assert approx <= bounds.approximation(F64, bounds.GELU_TANH_MAX_ERROR / scale) * scale
    assert_close("relu", L.relu_forward(x)[0], np.where(x > 0, x, 0.0),
                 bounds.bitwise("no arithmetic: both select x or 0"))
    assert_close("softmax", L.softmax_forward(x)[0], scipy_softmax(x, axis=-1), bounds.chain(F64, 5, depth=2))

    logits, t = rng.standard_normal((2, 3, 6)) * 3, rng.integers(0, 6, (2, 3))
    ref_loss = -np.take_along_axis(log_softmax(logits, axis=-1), t[..., None], -1).mean()
    loss, _ = L.cross_entropy_forward(logits, t)
    # log-sum-exp over V = 6, then a mean of B * T = 6 positive losses
    assert abs(loss - ref_loss) <= bounds.chain(F64, 6, depth=2, cancellation=1.0) * abs(ref_loss)

    idx = np.array(REPEATED_IDS)
    wte, wpe = rng.standard_normal((4, 3)), rng.standard_normal((7, 3))
    out, _ = L.embedding_forward(idx, wte, wpe)
    assert_close("embedding", out, np.stack([[wte[i] + wpe[t] for t, i in enumerate(row)] for row in idx]),
                 bounds.bitwise("one addition wte[idx] + wpe[t], rounded once on either side"))
    wte_before = wte.copy()
    out[...] = 0.0  # the output is a copy: writing it leaves the table alone
    assert np.array_equal(wte, wte_before)


@pytest.mark.parametrize("B,T,C,n_head", [(2, 5, 4, 1), (2, 5, 6, 3), (1, 4, 5, 5), (2, 1, 4, 2)])
def test_attention_forward_matches_per_head_loop(B, T, C, n_head, assert_close):
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((B, T, 3 * C)) * 1.5
    y, _ = L.attention_forward(qkv, n_head)
    hs = C // n_head
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    ref = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            s = slice(h * hs, (h + 1) * hs)
            for t in range(T):
                scores = k[b, :t + 1, s] @ q[b, t, s] / math.sqrt(hs)  # keys 0..t only
                ref[b, t, s] = scipy_softmax(scores) @ v[b, :t + 1, s]
    # scores (sums of hs), softmax (over T), probabilities @ v (over T), in other orders; the
    # softmax Jacobian carries a score's error with the parity suite's amplification
    assert_close(f"attention B{B} T{T} C{C} nh{n_head}", y, ref,
                 bounds.chain(F64, max(T, hs), depth=3, amplification=bounds.PARITY_AMPLIFICATION))


def test_attention_is_causal(assert_close):
    rng = np.random.default_rng(2)
    B, T, C, n_head = 2, 6, 6, 2
    qkv = rng.standard_normal((B, T, 3 * C))
    y, _ = L.attention_forward(qkv, n_head)
    for t in range(1, T):
        changed = qkv.copy()
        changed[:, t:] = rng.standard_normal((B, T - t, 3 * C))  # rewrite q, k, v of positions >= t
        y2, _ = L.attention_forward(changed, n_head)
        # same shapes, so the same BLAS blocking; the masked entries add exact zeros
        assert_close(f"outputs before {t}", y2[:, :t], y[:, :t],
                     bounds.bitwise("same operations on the same unmasked values; masked ones are exact zeros"))
        assert not np.allclose(y2[:, t:], y[:, t:]), "positions >= t should change (test is vacuous)"


def test_causal_mask_with_kv_offset():
    # 2 new queries after 3 cached keys: query i sits at position 3 + i and sees keys 0..3+i
    expected = np.array([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=bool)
    assert np.array_equal(L.causal_mask(2, 5), expected)
    assert np.array_equal(L.causal_mask(4, 4), np.triu(np.ones((4, 4), bool), k=1))


# --------------------------------------------------------------------------------------------
# Embedding: the scatter-add
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("idx,V", [
    (np.array(REPEATED_IDS), 4),
    (np.full((4, 64), 3), 5),  # one id, 256 times: the longest run of additions into one row
    (np.random.default_rng(9).integers(0, 2, (8, 33)), 2),
])
def test_embedding_backward_equals_add_at_scatter(idx, V, assert_close):
    rng = np.random.default_rng(5)
    B, T = idx.shape
    C = 3
    _, cache = L.embedding_forward(idx, rng.standard_normal((V, C)), rng.standard_normal((T + 2, C)))
    dout = rng.standard_normal((B, T, C))
    dwte, dwpe = L.embedding_backward(dout, cache)
    ref = np.zeros((V, C))
    np.add.at(ref, idx.reshape(-1), dout.reshape(-1, C))
    # the one-hot matmul adds the rows of a repeated id in BLAS's order (blocked, SIMD), np.add.at
    # one by one: the same sum of (its number of repeats) terms in another order; the other
    # B * T - repeats products are exact zeros
    repeats = int(np.bincount(idx.reshape(-1)).max())
    assert_close("dwte", dwte, ref, bounds.reordered(F64, repeats))
    ref_pe = np.zeros((T + 2, C))
    np.add.at(ref_pe, np.tile(np.arange(T), B), dout.reshape(-1, C))
    assert_close("dwpe", dwpe, ref_pe, bounds.reordered(F64, B))  # a sum over the batch
    assert not dwpe[T:].any()  # positions never used get exactly zero


def test_gradcheck_layer_takes_embedding_inputs_in_forward_order(errors_below):
    rng = np.random.default_rng(8)
    inputs = {"idx": np.array(REPEATED_IDS), "wte": rng.standard_normal((4, 3)),
              "wpe": rng.standard_normal((6, 3))}
    errors = gradcheck_layer(L.embedding_forward, L.embedding_backward, inputs)
    assert sorted(errors) == ["wpe", "wte"]
    errors_below(errors, "embedding, positional", n=2 * 5 * 3, depth=2)  # f sums B * T * C terms


# --------------------------------------------------------------------------------------------
# Softmax stability, dropout
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale,shift", [(1e3, 0.0), (1.0, 1e3), (1e3, -1e3), (50.0, 700.0)])
def test_softmax_large_logits(scale, shift, assert_close):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 7)) * scale + shift
    y, cache = L.softmax_forward(x)
    assert np.isfinite(y).all()
    C = x.shape[-1]
    # exp, a sum of C positive terms, a division: the row sums 1 but for those roundings
    assert np.abs(y.sum(-1) - 1.0).max() <= bounds.chain(F64, C, depth=2, cancellation=1.0)
    assert_close("softmax vs scipy", y, scipy_softmax(x, axis=-1), bounds.chain(F64, C, depth=2))
    # x - 123 rounds by up to u |x - 123| absolutely, and exp turns an absolute error of its
    # argument into a relative error of the result: amplification max |x - 123|
    shifted = L.softmax_forward(x - 123.0)[0]
    assert_close("shift invariance", shifted, y,
                 bounds.chain(F64, C, depth=3, amplification=float(np.abs(x - 123.0).max())))
    dout = rng.standard_normal(x.shape)
    (dx,) = L.softmax_backward(dout, cache)
    assert np.isfinite(dx).all()
    # the Jacobian's rows sum to zero: sum(y * (dout - s)) = s - s sum(y), s = sum(y * dout), with
    # |s| <= max |dout|; three stages of sums over C, relative to max |dout|
    assert np.abs(dx.sum(-1)).max() <= bounds.chain(F64, C, depth=3) * np.abs(dout).max()


def test_dropout_mask_values_and_rate():
    p, shape = 0.3, (200, 250)
    mask = L.dropout_mask(shape, p, np.random.default_rng(0), np.float64)
    assert set(np.unique(mask)) == {0.0, 1.0 / (1.0 - p)}
    n = mask.size
    dropped = np.count_nonzero(mask == 0) / n
    # binomial standard deviation sqrt(p(1-p)/n) = 0.0013; 6 of them
    assert abs(dropped - p) < 6 * math.sqrt(p * (1 - p) / n)
    assert np.array_equal(mask, L.dropout_mask(shape, p, np.random.default_rng(0), np.float64))
    assert L.dropout_mask((3,), p, np.random.default_rng(0), np.float32).dtype == np.float32


def test_dropout_forward_uses_given_mask_and_needs_rng_or_mask():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5))
    mask = L.dropout_mask(x.shape, 0.5, rng, np.float64)
    out, cache = L.dropout_forward(x, 0.5, mask=mask)
    assert np.array_equal(out, x * mask) and cache.mask is mask
    with pytest.raises(ValueError, match="rng or mask"):
        L.dropout_forward(x, 0.5)


def test_block_dropout_masks_reproduce_a_drawn_forward(assert_close):
    rng = np.random.default_rng(2)
    B, T, C, n_head = 2, 4, 4, 2
    x = rng.standard_normal((B, T, C))
    p = random_block_params(rng, C, True, np.float64)
    out, cache = L.block_forward(x, p, L.BlockOptions(n_head, "gelu", 0.4, np.random.default_rng(11)))
    masks = L.block_dropout_masks(cache)
    assert [m.shape for m in masks] == [(B, n_head, T, T), (B, T, C), (B, T, C)]
    assert all((m == 0).any() for m in masks)
    out2, _ = L.block_forward(x, p, L.BlockOptions(n_head, "gelu", 0.4), masks)
    assert_close("block with its own masks", out2, out,
                 bounds.bitwise("the same forward on the same inputs and the same masks"))
    out_nodrop, _ = L.block_forward(x, p, L.BlockOptions(n_head, "gelu"))
    assert not np.allclose(out, out_nodrop)


# --------------------------------------------------------------------------------------------
# The modern block's forwards against their formulas written out another way
# --------------------------------------------------------------------------------------------

def test_rmsnorm_forward_formula():
    rng = np.random.default_rng(3)
    x, w = normal64(rng, (4, 6)), normal64(rng, (6,))
    out, _ = L.rmsnorm_forward(x, w, eps=1e-3)
    expected = np.array([[x[i, j] / math.sqrt(sum(v * v for v in x[i]) / 6 + 1e-3) * w[j]
                          for j in range(6)] for i in range(4)])
    assert rel_error(out, expected) <= bounds.chain(F64, 6, depth=2)  # mean square, then divide
    # rms of the normalised row is 1 (up to eps): the whole point of the layer. Exactly,
    # sqrt(ms / (ms + eps)) = 1 - eps / (2 ms) to first order; and two more stages of sums over 6
    out1, _ = L.rmsnorm_forward(100.0 * x, np.ones(6))
    ms = np.mean((100.0 * x) ** 2, axis=-1)
    rms = np.sqrt(np.mean(out1 ** 2, axis=-1))
    assert np.abs(rms - 1.0).max() <= 1e-5 / (2 * ms.min()) + bounds.chain(F64, 6, depth=4, cancellation=1.0)


def test_rmsnorm_gradient_is_orthogonal_to_xhat_at_zero_eps():
    """Scaling x leaves the output unchanged (eps = 0), so the gradient has no component along x."""
    rng = np.random.default_rng(4)
    x, w = normal64(rng, (5, 7)), normal64(rng, (7,))
    _, cache = L.rmsnorm_forward(x, w, eps=0.0)
    dx, _ = L.rmsnorm_backward(normal64(rng, (5, 7)), cache)
    cosines = np.sum(dx * x, axis=-1) / (np.linalg.norm(dx, axis=-1) * np.linalg.norm(x, axis=-1))
    # dx = r (g - xhat mean(g xhat)): the sums over C = 7 of the backward and of the dot product
    # round relative to |dx| |x|, which the cosine divides by
    assert np.abs(cosines).max() <= bounds.chain(F64, 7, depth=3)
    assert np.abs(np.sum(dx, axis=-1)).min() > 1e-3  # unlike layernorm's, not orthogonal to 1


def test_rope_angles_follow_the_contract():
    T, hs, theta, offset = 5, 6, 50.0, 3
    cos, sin = L.rope_angles(T, hs, theta, offset)
    assert cos.shape == sin.shape == (T, hs)
    for t in range(T):
        for i in range(hs // 2):
            angle = (offset + t) * theta ** (-2 * i / hs)
            # theta ** e, e = -2i / hs rounded, is off by |e ln theta| u relatively, the product
            # (offset + t) * inv_freq by u: an absolute angle error of a few u |angle|, which cos and
            # sin (each correct to u) pass on; a reordered pair of one-term sums per unit of angle
            tol = bounds.reordered(F64, 1) * (1.0 + angle * max(1.0, math.log(theta)))
            for j in (i, i + hs // 2):  # cat(angle, angle)
                assert abs(cos[t, j] - math.cos(angle)) <= tol and abs(sin[t, j] - math.sin(angle)) <= tol
    assert np.array_equal(L.rope_angles(T, hs, theta, 0).cos[offset:], L.rope_angles(T - offset, hs, theta, offset).cos)
    assert L.rope_angles(2, 4, dtype=np.float32).sin.dtype == np.float32


def test_rope_rotates_each_pair():
    """Pair (x_i, x_{i+hs/2}) at position t turns by angle[t, i]: rotate-half's layout, written out."""
    rng = np.random.default_rng(5)
    B, nh, T, hs = 1, 2, 4, 6
    x = normal64(rng, (B, nh, T, hs))
    cos, sin = L.rope_angles(T, hs, 100.0, 2)
    out, _ = L.rope_forward(x, cos, sin)
    half = hs // 2
    for t in range(T):
        for i in range(half):
            a = (2 + t) * 100.0 ** (-2 * i / hs)
            x1, x2 = x[..., t, i], x[..., t, i + half]
            # two products and a sum on each side, and cos, sin of angles that differ by a few
            # u |a| (see test_rope_angles_follow_the_contract): relative to |x1| + |x2|
            tol = bounds.reordered(F64, 2) * (1.0 + a * math.log(100.0)) * (np.abs(x1) + np.abs(x2))
            assert (np.abs(out[..., t, i] - (x1 * math.cos(a) - x2 * math.sin(a))) <= tol).all()
            assert (np.abs(out[..., t, i + half] - (x2 * math.cos(a) + x1 * math.sin(a))) <= tol).all()
    assert np.array_equal(L.rotate_half(L.rotate_half(x)), -x)


def test_rope_preserves_norms():
    rng = np.random.default_rng(6)
    x = normal64(rng, (2, 3, 9, 8), 3.0)
    out, _ = L.rope_forward(x, *L.rope_angles(9, 8, offset=1000))
    # an angle off by rounding is still a rotation: only cos^2 + sin^2 = 1 (each correct to u), the
    # two products and sum of each pair, and the norms' sums of 8 squares round
    ratio = np.linalg.norm(out, axis=-1) / np.linalg.norm(x, axis=-1)
    assert np.abs(ratio - 1.0).max() <= bounds.chain(F64, 8, depth=3, cancellation=1.0)
    # and it does change the vectors (position 0 alone is the identity)
    assert rel_error(out, x) > 0.1


def test_rope_scores_depend_only_on_the_position_difference():
    """q rotated at position m, k at position n: q_m . k_n is a function of m - n alone."""
    rng = np.random.default_rng(7)
    hs = 8
    q, k = normal64(rng, (hs,)), normal64(rng, (hs,))

    def rotated(v, position):
        out, _ = L.rope_forward(v[None, None, None, :], *L.rope_angles(1, hs, 10000.0, position))
        return out[0, 0, 0]

    # the angle of position m rounds to m inv_freq (1 + d), |d| <= u: an absolute error up to m u,
    # for q's angle and k's, which turns the score by at most 2 m u |q| |k|; and a dot product of hs
    positions = (3, 10, 250, 4096)
    tol = (bounds.reordered(F64, hs) + 2 * max(positions) * U64) * np.linalg.norm(q) * np.linalg.norm(k)
    for delta in (0, 1, 5, -3):
        scores = [rotated(q, m) @ rotated(k, m - delta) for m in positions]
        assert np.ptp(scores) <= tol, (delta, scores)
    # and the score does depend on the difference (else the test proves nothing)
    assert abs(rotated(q, 5) @ rotated(k, 5) - rotated(q, 5) @ rotated(k, 4)) > 1e-3


def test_rope_backward_is_rotation_by_minus_angle():
    rng = np.random.default_rng(8)
    T, hs = 6, 4
    dout = normal64(rng, (2, 2, T, hs))
    cos, sin = L.rope_angles(T, hs, 10.0, 5)
    _, cache = L.rope_forward(normal64(rng, dout.shape), cos, sin)
    (dx,) = L.rope_backward(dout, cache)
    back, _ = L.rope_forward(dout, cos, -sin)  # cos(-a) = cos a, sin(-a) = -sin a
    assert np.array_equal(dx, back)
    # the rotation by -angle undoes the forward: the backward of a rotation is its inverse
    x = normal64(rng, dout.shape)
    out, cache = L.rope_forward(x, cos, sin)
    # two rotations, each two products and a sum per entry
    assert rel_error(L.rope_backward(out, cache)[0], x) <= bounds.chain(F64, 2, depth=2)


def test_relu2_forward_and_kink():
    x = np.array([-2.0, -1e-9, 0.0, 1e-9, 3.0])
    out, cache = L.relu2_forward(x)
    assert np.array_equal(out, [0.0, 0.0, 0.0, 1e-18, 9.0])
    (dx,) = L.relu2_backward(np.ones(5), cache)
    assert np.array_equal(dx, [0.0, 0.0, 0.0, 2e-9, 6.0])  # 2 relu(x): continuous through 0


def test_swiglu_forward_formula_and_split():
    rng = np.random.default_rng(9)
    x = normal64(rng, (3, 10), 3.0)
    out, _ = L.swiglu_forward(x)
    assert out.shape == (3, 5)
    sigmoid = lambda g: 1.0 / (1.0 + math.exp(-g))  # noqa: E731
    expected = np.array([[x[i, j] * sigmoid(x[i, j]) * x[i, 5 + j] for j in range(5)] for i in range(3)])
    # exp, 1 + e, a division and two products: math's exp against NumPy's, each correct to u
    assert rel_error(out, expected) <= bounds.chain(F64, 1, depth=3)
    # no overflow warning and the right limits far out: silu(-800) = 0, silu(800) = 800
    with np.errstate(all="raise"):
        far, _ = L.swiglu_forward(np.array([-800.0, 800.0, 2.0, 2.0]))
    assert np.array_equal(far, [-0.0, 1600.0])
