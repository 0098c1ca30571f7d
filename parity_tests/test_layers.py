"""Every forward/backward pair in npgpt.layers against the same computation in torch autograd.

For each layer: run npgpt's forward, draw a RANDOM upstream gradient dout, run npgpt's backward;
run torch.nn.functional's version of the layer on the same inputs and get its gradients from
torch.autograd.grad(out, inputs, dout). The output and every gradient are compared by
npgpt.compare, in float64 and float32, against npgpt.compare.bounds for the layer's own sizes
(npgpt.bounds.parity: n the longest sum, depth the layer's stages).

Two regimes are ill-conditioned for ANY implementation, so they get their own bound, explained
where they are tested: layernorm over fewer than 4 channels, and softmax / cross-entropy rows that
are nearly one-hot (where the gradient is a difference of nearly equal numbers). Their per-element
bounds are npgpt.bounds.elementwise of each formula's worst-case rounding analysis.

The modern block's pairs (rmsnorm, rope, relu2, swiglu) at the end, against F.rms_norm, torchgpt's
RoPE, F.relu and F.silu, at npgpt.compare.bounds for each pair's sizes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npgpt import bounds
from npgpt import layers as L
from npgpt.compare import bounds as parity_bounds
from npgpt.compare import compare_all, compare_outputs_and_grads, rel_error
from parity_tests.layer_twins import (cross_entropy_loss_rounding_bound, cross_entropy_rounding_bound,
                                      softmax_backward_rounding_bound, torch_attention)
from parity_tests.twins import TORCH_DTYPE, block_parity_sizes, small_config
from torchgpt import model as tm
from torchgpt.convert import load_params
from torchgpt.model import NO_DROPOUT, Block, DropoutPlan

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]


def randn(rng, shape, dtype, scale=1.0, offset=0.0) -> np.ndarray:
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def frozen(*objs):
    """Make every array in objs (and in tuples, lists and dicts inside them) read-only, and return
    objs. npgpt's layers promise never to write into their inputs, dout or their cache; a write
    into a frozen array raises, so the promise is checked on every call below. (A layer that wrote
    into dout would also hand torch a different dout than it used itself.)"""
    def freeze(o):
        if isinstance(o, np.ndarray):
            o.flags.writeable = False
        elif isinstance(o, (tuple, list)):
            for item in o:
                freeze(item)
        elif isinstance(o, dict):
            for item in o.values():
                freeze(item)
    for o in objs:
        freeze(o)
    return objs


def torch_vjp(fn, inputs: dict, dout):
    """out = fn(*inputs) in torch, and the gradient of sum(out * dout) w.r.t. each input."""
    leaves = {name: torch.tensor(value, requires_grad=True) for name, value in inputs.items()}
    out = fn(*leaves.values())
    grads = torch.autograd.grad(out, list(leaves.values()), torch.tensor(dout, dtype=out.dtype))
    return out, {"d" + name: g for name, g in zip(leaves, grads)}


def check_layer_vs_torch(header, dtype, fn, inputs: dict, out, grads: tuple, dout, n: int, depth: int = 1,
                         atol=None):
    """Compare npgpt's (out, grads in the order of `inputs`) with torch's on the same inputs.

    Every tensor gets the relative bound npgpt.compare.bounds(dtype, n, depth) (n the layer's
    longest sum, depth its stages), except those named in `atol` ({name: bound}), which get that
    absolute bound instead (ill-conditioned cases only, each explained where used).
    """
    t_out, t_grads = torch_vjp(fn, inputs, dout)
    ours = dict(zip(("d" + k for k in inputs), grads))
    if not atol:
        return compare_outputs_and_grads({"out": out}, {"out": t_out}, ours, t_grads, dtype, header,
                                         n=n, depth=depth)
    b = parity_bounds(dtype, n, depth)
    rtol = {"out": b["forward"], **{k: b["grad"] for k in t_grads}}
    for name in atol:
        del rtol[name]
    return compare_all({"out": out, **ours}, {"out": t_out, **t_grads}, rtol=rtol, atol=atol,
                       header=f"{header} [{np.dtype(dtype).name}]")


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_repeated_ids(dtype):
    rng = np.random.default_rng(0)
    V, C, block_size, B, T = 7, 5, 8, 3, 6
    idx = rng.integers(0, V, (B, T))
    idx[0] = 3  # one id many times: its row of dwte is a sum of 6 + rows
    idx[1, :4] = 0
    wte, wpe = randn(rng, (V, C), dtype), randn(rng, (block_size, C), dtype)
    out, cache = L.embedding_forward(*frozen(idx, wte, wpe))
    dout = randn(rng, out.shape, dtype)
    grads = L.embedding_backward(*frozen(dout, cache))
    idx_t = torch.tensor(idx)
    rows = check_layer_vs_torch("embedding", dtype, lambda w, p: F.embedding(idx_t, w) + p[:T],
                       {"wte": wte, "wpe": wpe}, out, grads, dout, n=B * T)  # dwte sums positions
    assert rows[0].shape == (B, T, C)
    assert np.all(grads[1][T:] == 0)  # positions past T were not used


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_bigram_form(dtype):
    """wpe None: the bigram model's (V, V) lookup table."""
    rng = np.random.default_rng(1)
    V, B, T = 6, 4, 9
    idx = rng.integers(0, V, (B, T))
    idx[2] = 5
    table = randn(rng, (V, V), dtype)
    out, cache = L.embedding_forward(*frozen(idx, table))
    dout = randn(rng, out.shape, dtype)
    dtable, dwpe = L.embedding_backward(*frozen(dout, cache))
    assert dwpe is None
    idx_t = torch.tensor(idx)
    check_layer_vs_torch("embedding (bigram)", dtype, lambda w: F.embedding(idx_t, w), {"table": table}, out,
                (dtable,), dout, n=B * T)


# --------------------------------------------------------------------------------------------
# Linear, layernorm
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype, bias):
    rng = np.random.default_rng(2)
    x, w = randn(rng, (3, 5, 8), dtype), randn(rng, (12, 8), dtype)
    b = randn(rng, (12,), dtype) if bias else None
    out, cache = L.linear_forward(*frozen(x, w, b))
    dout = randn(rng, out.shape, dtype)
    dx, dw, db = L.linear_backward(*frozen(dout, cache))
    n = max(8, 12, 3 * 5)  # out sums 8 inputs, dx 12 outputs, dw and db 15 positions
    if bias:
        check_layer_vs_torch("linear", dtype, F.linear, {"x": x, "w": w, "b": b}, out, (dx, dw, db), dout, n)
    else:
        assert db is None
        check_layer_vs_torch("linear (no bias)", dtype, F.linear, {"x": x, "w": w}, out, (dx, dw), dout, n)


def layernorm_case(dtype, C, bias, seed):
    rng = np.random.default_rng([seed, C])
    x = randn(rng, (4, 5, C), dtype, scale=2.0, offset=0.5)  # off-centre rows: the mean term matters
    w, b = randn(rng, (C,), dtype, 0.3, 1.0), randn(rng, (C,), dtype) if bias else None
    out, cache = L.layernorm_forward(*frozen(x, w, b))
    dout = randn(rng, out.shape, dtype)
    grads = L.layernorm_backward(*frozen(dout, cache))
    inputs = {"x": x, "w": w, "b": b} if bias else {"x": x, "w": w}
    if not bias:
        assert grads[2] is None
    fn = lambda x, w, b=None: F.layer_norm(x, (C,), w, b, eps=1e-5)  # noqa: E731
    return inputs, out, grads[:len(inputs)], dout, fn


@pytest.mark.parametrize("C", [4, 16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(dtype, bias, C):
    inputs, out, grads, dout, fn = layernorm_case(dtype, C, bias, seed=3)
    check_layer_vs_torch(f"layernorm C={C}", dtype, fn, inputs, out, grads, dout, n=max(C, 4 * 5))


@pytest.mark.parametrize("C", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_narrow(dtype, C):
    """Layernorm over fewer than 4 channels, where dx is ill-conditioned for any implementation.

    dx = rstd (g - mean g - xhat mean(g xhat)), g = dout * w, removes from g its components along
    (1, .., 1) and along xhat. With C = 3 one direction is left, and on random rows dx is as accurate
    as for C >= 4 (tight bound here); only a row whose g lies almost in the removed plane cancels
    (to a fraction t of rstd |g| with chance ~t; test_properties has a case hypothesis found).
    With C = 2 none is left: xhat = (s, -s) with s^2 = var / (var + eps), and the exact dx is
    rstd (g1 - g2) / 2 * eps / (var + eps) * (1, -1), a difference of terms of size rstd |g| that
    cancel down to a fraction eps / (var + eps) (~1e-5 of them for unit variance). Any
    implementation keeps the rounding error of those terms, so dx is bounded per element, not
    relatively (for unit variance that is 5 of float64's 16 digits, and all of float32's 7, lost):
    each side's error is at most 8 u rstd (|g1| + |g2|) (1 + max|x| rstd) per row (u the unit
    roundoff, eps_mach = 2 u), so the two differ by at most
        bounds.elementwise(dtype, 8 rstd (|g1| + |g2|) (1 + max|x| rstd))   per row.
    The first factor is the terms' own rounding; (1 + max|x| rstd) is that of x - mean, which has
    an absolute error eps_mach |x| and matters when the two values nearly coincide (x = (3.374,
    3.389) loses 3 more digits in both backends). Over 300 random rows the worst error was 0.13 of
    this bound in both dtypes; a wrong formula misses it by a factor of ~1 / eps_mach.
    With C = 1, x - mean = 0 exactly, so xhat = 0 and the true dx and dw are exactly 0 (ours are);
    torch's are rounding noise of size eps_mach * rstd * |g| with rstd = 1 / sqrt(eps) ~ 316, so
    they are compared by absolute error against bounds.elementwise(dtype, 16 |g|max / sqrt(eps))
    (each side within 8 roundings of the terms, 16 u |g|max / sqrt(eps) = 8 eps_mach of them).
    The output, db, and dw for C >= 2 involve no such cancellation and keep the tight bounds.
    """
    inputs, out, grads, dout, fn = layernorm_case(dtype, C, True, seed=4)
    x, w = inputs["x"].astype(np.float64), inputs["w"].astype(np.float64)
    g = dout.astype(np.float64) * w  # (4, 5, C)
    ln_eps, n = L.LAYERNORM_EPS, 4 * 5  # dw and db sum the 20 positions
    if C == 3:
        check_layer_vs_torch("layernorm C=3", dtype, fn, inputs, out, grads, dout, n)
        return
    if C == 2:
        rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + ln_eps)  # (4, 5, 1)
        rounded = (8 * rstd * np.abs(g).sum(axis=-1, keepdims=True)
                   * (1 + np.abs(x).max(axis=-1, keepdims=True) * rstd))  # (4, 5, 1)
        check_layer_vs_torch("layernorm C=2", dtype, fn, inputs, out, grads, dout, n,
                    atol={"dx": np.broadcast_to(bounds.elementwise(dtype, rounded), x.shape)})
        return
    noise = float(bounds.elementwise(dtype, 16 * float(np.abs(g).max()) / math.sqrt(ln_eps)))
    assert np.all(grads[0] == 0) and np.all(grads[1] == 0)  # ours: exactly the true value 0
    check_layer_vs_torch("layernorm C=1", dtype, fn, inputs, out, grads, dout, n, atol={"dx": noise, "dw": noise})


# --------------------------------------------------------------------------------------------
# Activations and dropout
# --------------------------------------------------------------------------------------------

TORCH_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x),  # exact erf form, nn.GELU()
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),  # the modern block's; test_relu2 below has more cases
    "swiglu": lambda x: F.silu(x[..., :x.shape[-1] // 2]) * x[..., x.shape[-1] // 2:],
}


@pytest.mark.parametrize("name", list(L.ACTIVATION_FUNCTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation(dtype, name):
    rng = np.random.default_rng(5)
    x = randn(rng, (3, 4, 10), dtype, scale=3.0)  # both tails, where GELU's derivative bends
    x[0, 0, :3] = 0.0  # ReLU's kink: torch's convention is gradient 0 at exactly 0
    x[0, 1, :2] = (-12.0, 12.0)  # far tails: GELU's derivative is 0 and 1 there
    forward, backward = L.ACTIVATION_FUNCTIONS[name]
    out, cache = forward(*frozen(x))
    dout = randn(rng, out.shape, dtype)
    grads = backward(*frozen(dout, cache))
    check_layer_vs_torch(name, dtype, TORCH_ACTIVATIONS[name], {"x": x}, out, grads, dout, n=1)  # elementwise
    assert np.shares_memory(grads[0], dout) is False  # a fresh array, dout untouched


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_shared_mask(dtype, p):
    """npgpt draws the mask; torch applies the same mask as x * mask (as torchgpt does)."""
    rng = np.random.default_rng(6)
    x = randn(rng, (4, 6, 8), dtype)
    out, cache = L.dropout_forward(*frozen(x), p, rng=np.random.default_rng(7))
    mask = cache.mask
    assert mask.dtype == dtype and set(np.unique(mask)) == {0.0, dtype(1.0) / dtype(1.0 - p)}
    assert 0.0 < (mask == 0).mean() < 1.0
    out2, cache2 = L.dropout_forward(x, p, mask=frozen(mask)[0])  # the same mask given back: the same output
    assert np.array_equal(out2, out) and cache2.mask is mask
    dout = randn(rng, out.shape, dtype)
    grads = L.dropout_backward(*frozen(dout, cache))
    mask_t = torch.tensor(mask)
    check_layer_vs_torch(f"dropout p={p}", dtype, lambda x: x * mask_t, {"x": x}, out, grads, dout, n=1)


# --------------------------------------------------------------------------------------------
# Softmax and cross-entropy
# --------------------------------------------------------------------------------------------

# Logits for the well-conditioned regimes: rows far from 0 (exp would overflow without the
# max subtraction: exp(1000) = inf even in float64) and rows so spread out that the softmax is
# exactly one-hot in floating point (exp underflows to 0, and so does every gradient but the row's
# few O(1) entries).
SOFTMAX_REGIMES = {
    "unit": dict(scale=1.0, offset=0.0),
    "offset +1e3": dict(scale=1.0, offset=1e3),
    "offset -1e3": dict(scale=1.0, offset=-1e3),
    "saturated (spread 1e3)": dict(scale=1e3, offset=0.0),
}


@pytest.mark.parametrize("regime", list(SOFTMAX_REGIMES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(dtype, regime):
    rng = np.random.default_rng(8)
    x = randn(rng, (3, 5, 9), dtype, **SOFTMAX_REGIMES[regime])
    out, cache = L.softmax_forward(*frozen(x))
    dout = randn(rng, out.shape, dtype)
    grads = L.softmax_backward(*frozen(dout, cache))
    V = x.shape[-1]  # the longest sum: a row's exps, and dout . y in the backward
    # each row sums to 1 up to the rounding of V positive terms and the division
    assert np.isfinite(out).all()
    assert np.abs(out.astype(np.float64).sum(-1) - 1.0).max() <= bounds.reordered(dtype, V + 1, cancellation=1.0)
    check_layer_vs_torch(f"softmax {regime}", dtype, lambda x: F.softmax(x, dim=-1), {"x": x}, out, grads, dout, V)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_peaked_rows(dtype):
    """Rows with a gap of ~10-100 between the top logits: y_max = 1 - 1e-5 .. 1 - 1e-40.

    The gradient of the top entry, y_max (dout_max - sum_j dout_j y_j), is then a difference of two
    nearly equal numbers in ANY implementation: over 300 random cases the normwise relative error
    between the two backends reached 1e-3 in float64 and 0.3 in float32 with no bug anywhere. So
    dx is checked per element against the rounding-error bound of the formula
    (softmax_backward_rounding_bound; the worst case seen used 0.36 of it); the output keeps the
    tight relative bound.
    """
    rng = np.random.default_rng(9)
    x = randn(rng, (4, 6, 7), dtype, scale=30.0)
    out, cache = L.softmax_forward(*frozen(x))
    dout = randn(rng, out.shape, dtype)
    grads = L.softmax_backward(*frozen(dout, cache))
    assert (out.max(-1) > 1 - 1e-4).mean() > 0.5  # mostly peaked rows: the regime under test
    y_t = F.softmax(torch.tensor(x), dim=-1).numpy()
    check_layer_vs_torch("softmax peaked rows", dtype, lambda x: F.softmax(x, dim=-1), {"x": x}, out, grads, dout,
                n=x.shape[-1], atol={"dx": softmax_backward_rounding_bound(y_t, dout, dtype)})


CE_REGIMES = {
    "unit": dict(scale=1.0, offset=0.0),
    "offset +1e3": dict(scale=2.0, offset=1e3),
    "spread 1e3 (one-hot softmax)": dict(scale=1e3, offset=0.0),
}


@pytest.mark.parametrize("regime", list(CE_REGIMES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype, regime):
    rng = np.random.default_rng(10)
    B, T, V = 3, 5, 9
    logits = randn(rng, (B, T, V), dtype, **CE_REGIMES[regime])
    targets = rng.integers(0, V, (B, T))
    loss, cache = L.cross_entropy_forward(*frozen(logits, targets))
    dloss = float(rng.uniform(0.5, 2.0))  # a random upstream gradient, not 1
    (dlogits,) = L.cross_entropy_backward(*frozen(dloss, cache))
    assert np.isfinite(loss) and np.isfinite(dlogits).all()
    t = torch.tensor(targets.reshape(-1))
    fn = lambda x: F.cross_entropy(x.reshape(-1, V), t)  # noqa: E731
    # a row's exps (V), then the mean over the B*T rows: two stages
    check_layer_vs_torch(f"cross-entropy {regime}", dtype, fn, {"logits": logits}, loss, (dlogits,), dloss,
                         n=max(V, B * T), depth=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_confident_rows(dtype):
    """Every row confidently right (target = argmax, gaps ~10-50): the loss and the gradient are
    ~e^-gap, computed from O(1) terms, so both backends keep only a few digits of them (see
    cross_entropy_rounding_bound). Bounded per element instead of relatively."""
    rng = np.random.default_rng(11)
    B, T, V = 2, 4, 5
    logits = randn(rng, (B, T, V), dtype, scale=10.0)
    targets = logits.argmax(-1)
    loss, cache = L.cross_entropy_forward(*frozen(logits, targets))
    dloss = 1.3
    (dlogits,) = L.cross_entropy_backward(*frozen(dloss, cache))
    t = torch.tensor(targets.reshape(-1))
    fn = lambda x: F.cross_entropy(x.reshape(-1, V), t)  # noqa: E731
    check_layer_vs_torch("cross-entropy confident rows", dtype, fn, {"logits": logits}, loss, (dlogits,), dloss,
                n=max(V, B * T), depth=2, atol={"out": cross_entropy_loss_rounding_bound(logits, targets, dtype),
                      "dlogits": cross_entropy_rounding_bound(logits, targets, dloss, dtype)})


# --------------------------------------------------------------------------------------------
# Causal self-attention (fused qkv)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head,T,dropout,path", [
    (1, 6, False, "explicit"),
    (2, 6, False, "explicit"),
    (4, 6, False, "explicit"),
    (2, 1, False, "explicit"),  # T = 1: the query sees only itself
    (2, 6, False, "sdpa"),
    (1, 1, False, "sdpa"),
    (2, 6, True, "explicit"),  # dropout on the attention probabilities, mask shared
    (1, 5, True, "explicit"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention(dtype, n_head, T, dropout, path):
    rng = np.random.default_rng([12, n_head, T])
    B, C = 2, 8
    qkv = randn(rng, (B, T, 3 * C), dtype)
    mask = L.dropout_mask((B, n_head, T, T), 0.3, rng, dtype) if dropout else None
    out, cache = L.attention_forward(*frozen(qkv), n_head, 0.3 if dropout else 0.0, mask=frozen(mask)[0])
    dout = randn(rng, out.shape, dtype)
    grads = L.attention_backward(*frozen(dout, cache))
    mask_t = None if mask is None else torch.tensor(mask)
    # q k^T sums the head size, att v and the backward's dq, dk sum the T keys or queries;
    # three stages: the scores, the softmax, the weighted values
    check_layer_vs_torch(f"attention nh={n_head} T={T} {path}{' dropout' if dropout else ''}", dtype,
                lambda z: torch_attention(z, n_head, mask_t, path), {"qkv": qkv}, out, grads, dout,
                n=max(C // n_head, T), depth=3)


def test_attention_causal():
    """A later token never changes an earlier output, in npgpt's attention."""
    rng = np.random.default_rng(13)
    qkv = rng.standard_normal((1, 5, 24))
    y, _ = L.attention_forward(*frozen(qkv, 2))
    qkv2 = qkv.copy()
    qkv2[:, 3:] += 1.0
    y2, _ = L.attention_forward(*frozen(qkv2, 2))
    assert np.array_equal(y[:, :3], y2[:, :3])
    assert rel_error(y2[:, 3:], y[:, 3:]) > parity_bounds(np.float64, 24, 3)["forward"]  # far beyond rounding


# --------------------------------------------------------------------------------------------
# The transformer block: npgpt's block_forward/backward against torchgpt's Block
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropmasks"])
@pytest.mark.parametrize("activation", list(L.ACTIVATION_FUNCTIONS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block(dtype, bias, activation, dropout):
    cfg = small_config(bias=bias, activation=activation, dropout=0.2 if dropout else 0.0)
    rng = np.random.default_rng(14)
    B, T, C = 2, 6, cfg.n_embd
    block = Block(cfg, attention="explicit").to(torch.float64 if dtype == np.float64 else torch.float32)
    params = {name: randn(rng, tuple(p.shape), dtype, scale=0.3, offset=1.0 if ".ln_" in f".{name}" else 0.0)
              for name, p in block.named_parameters()}
    load_params(block, params)
    x = randn(rng, (B, T, C), dtype)
    masks = None
    if dropout:
        shapes = [(B, cfg.n_head, T, T), (B, T, C), (B, T, C)]
        masks = [L.dropout_mask(s, cfg.dropout, rng, dtype) for s in shapes]
    out, cache = L.block_forward(*frozen(x, params), L.BlockOptions(cfg.n_head, activation, cfg.dropout),
                                   masks=frozen(masks)[0])
    assert dropout == (L.block_dropout_masks(cache)[0] is not None)
    dout = randn(rng, out.shape, dtype)
    dx, grads = L.block_backward(*frozen(dout, cache))

    x_t = torch.tensor(x, requires_grad=True)
    plan = DropoutPlan(cfg.dropout, masks=[torch.tensor(m) for m in masks]) if dropout else NO_DROPOUT
    out_t = block(x_t, plan)
    leaves = [x_t] + list(block.parameters())
    t_grads = torch.autograd.grad(out_t, leaves, torch.tensor(dout))
    theirs = {"dx": t_grads[0], **{n: g for n, g in zip(dict(block.named_parameters()), t_grads[1:])}}
    compare_outputs_and_grads({"out": out}, {"out": out_t}, {"dx": dx, **grads}, theirs, dtype,
                              f"block bias={bias} {activation} dropout={dropout}",
                              *block_parity_sizes(cfg, B, T))


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
# The modern block's pairs against autograd: RMSNorm, RoPE, ReLU², SwiGLU
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
