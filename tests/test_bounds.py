"""npgpt.bounds: its kinds' values, and proof that the bounds built from them stay tight.

The first part checks the module itself (unit roundoffs, growth with the sizes, refusals). The second
plants the bugs a hand-written backward typically has (a missing term, a missing scale, a missing
sum, a lost gradient) and shows that each wrong backward FAILS the very bound its right twin
passes: the finite_diff bound of tests/test_layers.py's gradchecks in float64, and the chain bound
of a comparison against the reference layer in float32 and float64. A bound loose enough to let a
planted bug through would fail here.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import pytest
from scipy.special import ndtr

from npgpt import GPT, GPTConfig, bounds
from npgpt import layers as L
from npgpt.compare import rel_error
from npgpt.gradcheck import Check, finite_diff_bound, numerical_gradient

F32, F64 = np.float32, np.float64
H = 1e-5


# --------------------------------------------------------------------------------------------
# The module's values
# --------------------------------------------------------------------------------------------

def test_unit_roundoff_values():
    assert bounds.unit_roundoff(F64) == 2.0 ** -53
    assert bounds.unit_roundoff(F32) == 2.0 ** -24
    assert bounds.unit_roundoff("float64") == bounds.unit_roundoff(np.dtype(F64))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bounds_grow_with_the_sizes(dtype):
    sizes = [1, 2, 7, 64, 1000, 10 ** 6]
    for kind in (lambda n: bounds.sum_error(dtype, n), lambda n: bounds.reordered(dtype, n),
                 lambda n: bounds.chain(dtype, n, 3), lambda n: bounds.parity(dtype, n)):
        values = [kind(n) for n in sizes]
        assert all(a < b for a, b in zip(values, values[1:])), values
    depths = [bounds.chain(dtype, 16, d) for d in (1, 2, 10, 48)]
    assert all(a < b for a, b in zip(depths, depths[1:]))
    assert bounds.chain(dtype, 16, 4, amplification=3.0) == 3.0 * bounds.chain(dtype, 16, 4)
    assert bounds.reordered(dtype, 16, cancellation=1.0) < bounds.reordered(dtype, 16)
    assert bounds.chain(dtype, 16, 1) == bounds.reordered(dtype, 16)
    assert bounds.reordered(F32, 16) > bounds.reordered(F64, 16) * 1e8  # u32 / u64 = 2^29


def test_bitwise_needs_a_reason():
    for why in ("", "   ", None):
        with pytest.raises(ValueError, match="say why"):
            bounds.bitwise(why)
    assert bounds.bitwise("the same function run twice") == 0.0


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="n must be >= 1"):
        bounds.sum_error(F64, 0)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        bounds.chain(F64, 4, 0)


def test_parity_bounds():
    assert bounds.parity(F64) <= 1e-12  # the README's "to 1e-12"
    assert bounds.parity(F32) < 1e-3
    assert bounds.parity(F64, 8, 4) < bounds.parity(F64)


def test_finite_diff_terms():
    u = bounds.unit_roundoff(F64)
    assert bounds.finite_diff(1e-5, 6.0, 0.0, 1.0) == pytest.approx(1e-10)  # truncation h^2/6 f'''
    assert bounds.finite_diff(1e-5, 0.0, 1.0, 1.0) == pytest.approx(u / 1e-5)  # rounding u |f| / h
    assert bounds.finite_diff(gradient=1.0) == pytest.approx(bounds.finite_diff() / 100)
    check = Check(1e-9, gradient=0.5, terms=3.0)
    assert float(check) == 1e-9 and f"{check:.1e}" == "1.0e-09"
    assert finite_diff_bound(check, H, 16, 2) < finite_diff_bound(check, H, 16, 8)
    assert finite_diff_bound(check, H, 16, 2) < finite_diff_bound(Check(1e-9, 0.05, 3.0), H, 16, 2)


def test_reference_layer_sizes():
    assert bounds.forward_depth(2) > bounds.forward_depth(1) > bounds.BLOCK_DEPTH
    x = np.linspace(-8.0, 8.0, 1_600_001)  # step 1e-5
    tanh_form = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    worst = np.abs(tanh_form - x * ndtr(x)).max()
    assert 0.95 * bounds.GELU_TANH_MAX_ERROR < worst <= bounds.GELU_TANH_MAX_ERROR  # stated and tight


# --------------------------------------------------------------------------------------------
# Planted bugs: each wrong backward fails the bound its right twin passes
# --------------------------------------------------------------------------------------------

class Planted(NamedTuple):
    """One layer's input x (float64 values that float32 holds exactly), its forward out(x), the
    reference backward (npgpt.layers, float64), the right and the wrong backward written here
    (each in x's dtype), and the sizes of its chain bound."""
    x: np.ndarray
    forward: Callable  # x -> out
    reference: Callable  # (x, dout) -> dx, float64
    right: Callable  # (x, dout) -> dx
    wrong: Callable
    n: int  # the longest sum of forward and backward
    depth: int  # their stages
    amplification: float = 1.0


def f32_exact(a):
    return np.asarray(a, dtype=F32).astype(F64)


def layernorm_planted(bug):
    rng = np.random.default_rng(1)
    w, b = f32_exact(1.0 + 0.3 * rng.standard_normal(8)), f32_exact(rng.standard_normal(8))

    def backward(x, dout, keep_mean, keep_var):  # docs/gradients.md#layernorm, written out
        mu = x.mean(-1, keepdims=True)
        r = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
        xhat, g = (x - mu) * r, dout * w.astype(x.dtype)
        return r * (g - keep_mean * g.mean(-1, keepdims=True)
                    - keep_var * xhat * (g * xhat).mean(-1, keepdims=True))

    return Planted(
        f32_exact(2.0 * rng.standard_normal((2, 3, 8)) + 0.5),
        lambda x: L.layernorm_forward(x, w.astype(x.dtype), b.astype(x.dtype))[0],
        lambda x, d: L.layernorm_backward(d, L.layernorm_forward(x, w, b)[1])[0],
        lambda x, d: backward(x, d, 1, 1),
        lambda x, d: backward(x, d, bug != "mean", bug != "variance"),
        n=8, depth=6, amplification=bounds.PARITY_AMPLIFICATION)


def softmax_planted():
    def backward(x, dout, subtract):
        y = L.softmax_forward(x)[0]
        return y * (dout - subtract * (y * dout).sum(-1, keepdims=True))

    return Planted(f32_exact(2.0 * np.random.default_rng(2).standard_normal((2, 3, 6))),
                   lambda x: L.softmax_forward(x)[0],
                   lambda x, d: L.softmax_backward(d, L.softmax_forward(x)[1])[0],
                   lambda x, d: backward(x, d, 1), lambda x, d: backward(x, d, 0), n=6, depth=4)


def attention_planted():
    B, T, C, nh = 2, 4, 8, 2
    hs = C // nh

    def backward(qkv, dout, scale_ok):
        (dqkv,) = L.attention_backward(dout, L.attention_forward(qkv, nh)[1])
        if not scale_ok:  # dscores without its 1 / sqrt(hs): dq and dk sqrt(hs) times too large
            dqkv = np.concatenate([dqkv[..., :2 * C] * np.sqrt(hs).astype(qkv.dtype), dqkv[..., 2 * C:]], -1)
        return dqkv

    return Planted(f32_exact(1.5 * np.random.default_rng(3).standard_normal((B, T, 3 * C))),
                   lambda qkv: L.attention_forward(qkv, nh)[0],
                   lambda qkv, d: backward(qkv, d, True),
                   lambda qkv, d: backward(qkv, d, True), lambda qkv, d: backward(qkv, d, False),
                   n=max(T, hs), depth=8, amplification=bounds.PARITY_AMPLIFICATION)


def cross_entropy_planted():
    B, T, V = 2, 4, 5
    targets = np.random.default_rng(4).integers(0, V, (B, T))

    def backward(logits, dout, divide):
        p = L.softmax_forward(logits)[0]
        p[np.arange(B)[:, None], np.arange(T)[None, :], targets] -= 1.0
        return p * (dout / (B * T) if divide else dout)

    return Planted(f32_exact(2.0 * np.random.default_rng(5).standard_normal((B, T, V))),
                   lambda z: np.asarray(L.cross_entropy_forward(z, targets)[0], dtype=z.dtype),
                   lambda z, d: L.cross_entropy_backward(d, L.cross_entropy_forward(z, targets)[1])[0],
                   lambda z, d: backward(z, d, True), lambda z, d: backward(z, d, False),
                   n=max(V, B * T), depth=3)


def embedding_planted():
    idx = np.array([[0, 2, 2, 1, 2], [3, 0, 2, 2, 0]])  # id 2 five times, id 0 three times

    def backward(wte, dout, accumulate):
        dwte = np.zeros_like(wte)
        if accumulate:
            np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, wte.shape[1]))
        else:  # buffered assignment: the last row of a repeated id wins
            dwte[idx.reshape(-1)] = dout.reshape(-1, wte.shape[1])
        return dwte

    return Planted(f32_exact(np.random.default_rng(6).standard_normal((4, 3))),
                   lambda wte: L.embedding_forward(idx, wte, None)[0],
                   lambda wte, d: L.embedding_backward(d, L.embedding_forward(idx, wte, None)[1])[0],
                   lambda wte, d: backward(wte, d, True), lambda wte, d: backward(wte, d, False),
                   n=5, depth=1)


def linear_weight_planted():
    rng = np.random.default_rng(7)
    x = f32_exact(rng.standard_normal((3, 4, 5)))

    def backward(w, dout, sum_batch):
        xs = x.astype(w.dtype)
        if sum_batch:
            return np.einsum("bto,btc->oc", dout, xs)
        return dout[0].T @ xs[0]  # only the first batch row

    return Planted(f32_exact(rng.standard_normal((6, 5))),
                   lambda w: L.linear_forward(x.astype(w.dtype), w)[0],
                   lambda w, d: L.linear_backward(d, L.linear_forward(x, w)[1])[1],
                   lambda w, d: backward(w, d, True), lambda w, d: backward(w, d, False),
                   n=3 * 4, depth=1)


PLANTED = {
    "layernorm-without-mean-path": lambda: layernorm_planted("mean"),
    "layernorm-without-variance-path": lambda: layernorm_planted("variance"),
    "softmax-without-dot-product": softmax_planted,
    "attention-without-scale": attention_planted,
    "cross_entropy-not-divided-by-N": cross_entropy_planted,
    "embedding-assigns-repeated-ids": embedding_planted,
    "linear-dw-not-summed-over-batch": linear_weight_planted,
}


def fd_check(case: Planted, candidate: Callable, seed: int = 8) -> tuple[Check, float]:
    """(the candidate's Check against finite differences, its finite_diff bound), as
    npgpt.gradcheck.gradcheck_layer and tests/conftest.py's errors_below make them."""
    x = case.x.copy()
    out = case.forward(x)
    dout = np.random.default_rng(seed).standard_normal(np.shape(out))
    numeric = numerical_gradient(lambda: float(np.sum(case.forward(x) * dout)), x, H)
    check = Check(rel_error(candidate(x, dout), numeric), np.linalg.norm(numeric) / math.sqrt(numeric.size),
                  float(np.linalg.norm(out * dout)))
    n = max(np.size(out), x.size)
    return check, finite_diff_bound(check, H, n, depth=2)


@pytest.mark.parametrize("name", PLANTED)
def test_planted_bug_fails_the_finite_diff_bound(name):
    case = PLANTED[name]()
    right, bound = fd_check(case, case.right)
    wrong, wrong_bound = fd_check(case, case.wrong)
    print(f"{name}: right {float(right):.2e}, wrong {float(wrong):.2e}, bound {bound:.2e}")
    assert right <= bound
    assert not wrong <= wrong_bound, f"{name}: the planted bug passes ({float(wrong):.2e} <= {wrong_bound:.2e})"


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", PLANTED)
def test_planted_bug_fails_the_chain_bound(name, dtype):
    """Against the reference backward in float64 on the same numbers: the right backward in `dtype`
    differs by its rounding only (chain(dtype, n, depth, amplification)), the wrong one by its bug."""
    case = PLANTED[name]()
    out = case.forward(case.x)
    dout = f32_exact(np.random.default_rng(9).standard_normal(np.shape(out)))
    expected = case.reference(case.x, dout)
    bound = bounds.chain(dtype, case.n, case.depth, case.amplification)
    x, d = case.x.astype(dtype), dout.astype(dtype)
    right, wrong = rel_error(case.right(x, d), expected), rel_error(case.wrong(x, d), expected)
    print(f"{name} [{np.dtype(dtype).name}]: right {right:.2e}, wrong {wrong:.2e}, bound {bound:.2e}")
    assert right <= bound
    assert not wrong <= bound, f"{name}: the planted bug passes ({wrong:.2e} <= {bound:.2e})"


# The tied embedding: a model's backward that drops the head's part of the tied gradient.

def tied_models(dtype):
    """A tied GPT at O(1) scale (as tests/test_model.py draws them), and an untied copy whose
    lm_head holds the same matrix: its wte gradient is the embedding part alone."""
    config = GPTConfig(vocab_size=7, block_size=6, n_layer=1, n_head=2, n_embd=8, tie_weights=True)
    tied = GPT(config, seed=1, dtype=F64)
    rng = np.random.default_rng(10)
    for name, p in tied.params.items():
        if name.endswith(".bias"):
            value = 0.2 * rng.standard_normal(p.shape)
        elif p.ndim == 1:  # layernorm gains
            value = 1.0 + 0.2 * rng.standard_normal(p.shape)
        elif "wte" in name or "wpe" in name:
            value = 0.5 * rng.standard_normal(p.shape)
        else:
            value = rng.standard_normal(p.shape) / math.sqrt(p.shape[1])
        p[...] = f32_exact(value)
    tied_d = GPT(config, seed=1, dtype=dtype)
    untied = GPT(GPTConfig(**{**config.to_dict(), "tie_weights": False}), seed=1, dtype=dtype)
    for name, p in tied.params.items():
        tied_d.params[name][...] = p
        untied.params[name][...] = p
    untied.params["lm_head.weight"][...] = tied.params["transformer.wte.weight"]
    idx = np.random.default_rng(11).integers(0, 7, (2, 5))
    targets = np.random.default_rng(12).integers(0, 7, (2, 5))
    return config, tied, tied_d, untied, idx, targets


def tied_gradients(dtype):
    """(right, wrong) wte gradients in dtype: the tied model's, and the embedding part alone."""
    _, _, tied, untied, idx, targets = tied_models(dtype)
    tied.forward(idx, targets)
    untied.forward(idx, targets)
    return tied.backward()["transformer.wte.weight"], untied.backward()["transformer.wte.weight"]


def test_dropped_tied_gradient_fails_the_finite_diff_bound():
    config, tied, _, _, idx, targets = tied_models(F64)
    _, loss = tied.forward(idx, targets)
    wte = tied.params["transformer.wte.weight"]
    numeric = numerical_gradient(lambda: tied.forward(idx, targets)[1], wte, H)
    rms = np.linalg.norm(numeric) / math.sqrt(numeric.size)
    n = max(4 * config.n_embd, config.vocab_size, idx.size)
    right, wrong = tied_gradients(F64)
    checks = {name: Check(rel_error(g, numeric), rms, abs(loss)) for name, g in (("right", right), ("wrong", wrong))}
    limit = finite_diff_bound(checks["right"], H, n, bounds.forward_depth(1), bounds.PARITY_AMPLIFICATION)
    print(f"tied wte: right {float(checks['right']):.2e}, wrong {float(checks['wrong']):.2e}, bound {limit:.2e}")
    assert checks["right"] <= limit
    assert not checks["wrong"] <= limit


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dropped_tied_gradient_fails_the_chain_bound(dtype):
    config, *_ , idx, _ = tied_models(F64)
    expected, _ = tied_gradients(F64)
    right, wrong = tied_gradients(dtype)
    n = max(4 * config.n_embd, config.vocab_size, idx.size)
    # a model's forward and backward: twice the forward's stages
    bound = bounds.chain(dtype, n, 2 * bounds.forward_depth(1), bounds.PARITY_AMPLIFICATION)
    print(f"tied wte [{np.dtype(dtype).name}]: right {rel_error(right, expected):.2e}, "
          f"wrong {rel_error(wrong, expected):.2e}, bound {bound:.2e}")
    assert rel_error(right, expected) <= bound
    assert not rel_error(wrong, expected) <= bound
