"""Unit tests of npgpt.optim: AdamW against a per-parameter reference, clipping, the LR schedule, and
Muon (Newton-Schulz, its step by hand, its state)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, bounds
from npgpt.bounds import ADAMW_ROUNDINGS, CANCELLATION, bitwise, gamma, reassociated
from npgpt.bounds import global_norm as bounds_global_norm
from npgpt.compare import rel_error
from npgpt.muon import NS_COEFFICIENTS, Muon, adjusted_lr, zeropower_via_newton_schulz
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr
from npgpt.optim import Muon as OptimMuon

F64 = np.float64
# A Newton-Schulz step x <- a x + (b A + c A^2) x, A = x x^T, is three matmuls whose roundings the
# rest of the iteration carries with at most |a| + |b| + |c| (the step's coefficients on s <= 1)
NS_STAGES = 3 * 5
NS_AMPLIFICATION = sum(abs(c) for c in NS_COEFFICIENTS)


def normal64(rng, shape, scale=1.0, offset=0.0):
    return offset + scale * rng.standard_normal(shape)


def model_params(seed=0, dtype=np.float64, **overrides):
    """A real parameter dict: matrices and vectors interleaved, as the flat groups must undo."""
    config = dict(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, tie_weights=False)
    return GPT(GPTConfig(**{**config, **overrides}), seed=seed, dtype=dtype).params


def random_grads(params, rng):
    return {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()}


def reference_adamw(params, grad_steps, lrs, betas, eps, weight_decay):
    """torch.optim.AdamW's algorithm written from the formula, one parameter at a time, t from 1:
        p *= 1 - lr wd  (matrices only),  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    b1, b2 = betas
    p = {n: x.copy() for n, x in params.items()}
    m = {n: np.zeros_like(x) for n, x in params.items()}
    v = {n: np.zeros_like(x) for n, x in params.items()}
    for t, (grads, lr) in enumerate(zip(grad_steps, lrs), start=1):
        for n in p:
            g = grads[n]
            if p[n].ndim >= 2:
                p[n] = p[n] * (1 - lr * weight_decay)
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g ** 2
            p[n] = p[n] - lr / (1 - b1 ** t) * m[n] / (np.sqrt(v[n]) / math.sqrt(1 - b2 ** t) + eps)
    return p, m, v


# --------------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lr_overrides", [
    [None],                                  # one step
    [None, None, None, None, None, None],    # several steps at the base rate
    [None, 3e-3, None, 1e-4, 0.0, None],     # step(grads, lr=...) as a schedule does
])
def test_adamw_matches_reference(lr_overrides, assert_close):
    base_lr, betas, eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    params = model_params(seed=1)
    start = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, lr=base_lr, betas=betas, eps=eps, weight_decay=wd)
    rng = np.random.default_rng(0)
    grad_steps = [random_grads(params, rng) for _ in lr_overrides]
    for grads, lr in zip(grad_steps, lr_overrides):
        opt.step(grads, lr=lr)
    assert opt.lr == base_lr, "an lr override must not change the base rate"
    lrs = [base_lr if lr is None else lr for lr in lr_overrides]
    ref_p, ref_m, ref_v = reference_adamw(start, grad_steps, lrs, betas, eps, wd)
    assert opt.step_count == len(lr_overrides)
    m, v = opt.moments("exp_avg"), opt.moments("exp_avg_sq")
    # kind reordered, elementwise: the same formula in another association (the decay, the bias
    # corrections and the step size folded differently), ADAMW_ROUNDINGS an element a step for p, 3
    # for m (random-sign g: CANCELLATION), 4 for v (terms of one sign), over the steps
    steps = len(lr_overrides)
    for n in params:
        assert_close(f"{n}", params[n], ref_p[n], reassociated(np.float64, ADAMW_ROUNDINGS * steps, CANCELLATION))
        assert_close(f"{n} exp_avg", m[n], ref_m[n], reassociated(np.float64, 3 * steps, CANCELLATION))
        assert_close(f"{n} exp_avg_sq", v[n], ref_v[n], reassociated(np.float64, 4 * steps))
        assert not np.array_equal(params[n], start[n]), f"{n} did not move"


def test_weight_decay_only_for_matrices():
    params = model_params()
    before = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    assert opt.groups["decay"] == [n for n, p in params.items() if p.ndim >= 2]
    assert opt.groups["no_decay"] == [n for n, p in params.items() if p.ndim < 2]
    assert "transformer.wte.weight" in opt.groups["decay"]  # embeddings decay, as in nanoGPT
    assert all(n.endswith(".bias") or ".ln_" in n for n in opt.groups["no_decay"])
    # zero gradients: Adam's step is 0 / (0 + eps) = 0, so only the decay moves anything
    opt.step({n: np.zeros_like(p) for n, p in params.items()})
    for n, p in params.items():
        if p.ndim >= 2:
            assert np.allclose(p, before[n] * 0.95, atol=0,
                               rtol=bitwise("p *= 1 - lr wd: one product with the double 1 - 0.1 * 0.5, "
                                            "which is the double 0.95")), f"{n} not decayed by 1 - lr wd"
        else:
            assert np.array_equal(p, before[n]), f"{n} (ndim {p.ndim}) must not decay"


def test_adamw_keeps_float32_and_updates_in_place():
    params = model_params(dtype=np.float32)
    arrays = {n: p for n, p in params.items()}
    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    opt.step(random_grads(params, np.random.default_rng(1)))
    for n, p in params.items():
        assert p is arrays[n], "the model's arrays must be updated in place, not replaced"
        assert p.dtype == np.float32
    assert all(m.dtype == np.float32 for m in opt.moments().values())


def test_state_dict_round_trip_gives_identical_steps():
    rng = np.random.default_rng(2)
    params_a = model_params(seed=3)
    opt_a = AdamW(params_a, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)
    for _ in range(3):
        opt_a.step(random_grads(params_a, rng))
    state = opt_a.state_dict()
    buffer = io.BytesIO()
    np.savez(buffer, **state)  # flat arrays: saves and loads without pickle
    buffer.seek(0)
    loaded = dict(np.load(buffer, allow_pickle=False))

    params_b = {n: p.copy() for n, p in params_a.items()}
    opt_b = AdamW(params_b, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)
    opt_b.load_state_dict(loaded)
    assert opt_b.step_count == 3
    for _ in range(2):
        grads = random_grads(params_a, rng)
        opt_a.step(grads)
        opt_b.step(grads)
    for n in params_a:
        assert np.array_equal(params_a[n], params_b[n]), f"{n} diverged after load_state_dict"
    # the saved state is a copy: the two later steps did not reach into it
    assert int(state["step"]) == 3
    assert all(not np.shares_memory(a, b) for a in state.values() for b in opt_a.exp_avg.values())


def test_load_state_of_another_model_raises():
    opt = AdamW(model_params())
    other = AdamW(model_params(n_embd=4))
    with pytest.raises(ValueError, match="belongs to another model"):
        opt.load_state_dict(other.state_dict())


def test_invalid_adamw_settings_raise():
    for kwargs in (dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError, match="invalid AdamW settings"):
            AdamW(model_params(), **kwargs)


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------

def global_norm(grads):
    return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_grad_norm_scales_to_max_norm(dtype):
    grads = random_grads(model_params(dtype=dtype), np.random.default_rng(4))
    before = {n: g.copy() for n, g in grads.items()}
    norm_before = global_norm(grads)  # about 60 here
    assert norm_before > 10
    returned = clip_grad_norm(grads, 1.0)
    # clip_grad_norm sums each gradient's squares in `dtype` (np.vdot), global_norm in float64
    norm_bound = bounds_global_norm(dtype, max(g.size for g in grads.values()))
    assert abs(returned - norm_before) <= norm_bound * norm_before, "must return the norm before clipping"
    scale = 1.0 / (norm_before + 1e-6)  # torch's coefficient max_norm / (norm + 1e-6)
    # the clipped gradients: the norm's error, the coefficient's rounding to `dtype` and the
    # product's, each gradient scaled by exactly that one coefficient
    clipped_bound = norm_bound + gamma(dtype, 2)  # those two roundings' worst case
    assert abs(global_norm(grads) - norm_before * scale) <= clipped_bound * norm_before * scale, \
        f"clipped norm {global_norm(grads)}"
    for n, g in grads.items():
        assert g.dtype == dtype
        assert rel_error(g, before[n] * scale) <= clipped_bound, n


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = random_grads(model_params(), np.random.default_rng(5))
    norm = global_norm(grads)
    before = {n: g.copy() for n, g in grads.items()}
    norm_bound = bounds_global_norm(np.float64, max(g.size for g in grads.values()))
    assert abs(clip_grad_norm(grads, 2 * norm) - norm) <= norm_bound * norm
    assert all(np.array_equal(grads[n], before[n]) for n in grads)
    zeros = {n: np.zeros_like(g) for n, g in grads.items()}
    assert clip_grad_norm(zeros, 1.0) == 0.0
    assert all(not g.any() and np.isfinite(g).all() for g in zeros.values())


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------

def test_cosine_lr_schedule():
    lr, warmup, decay_iters, min_lr = 1e-3, 10, 100, 1e-4
    sched = [cosine_lr(it, lr, warmup, decay_iters, min_lr) for it in range(decay_iters + 50)]
    # linear warmup, nanoGPT's (it + 1) / (warmup_iters + 1): never zero, reaches lr at it = warmup
    for it in range(warmup):
        assert sched[it] == pytest.approx(lr * (it + 1) / (warmup + 1),
                                          rel=bitwise("cosine_lr's own expression lr * (it + 1) / (warmup + 1)"))
    assert all(a < b for a, b in zip(sched[:warmup], sched[1:warmup + 1]))
    # the formula against its exact value, kind reordered, elementwise: min_lr + coeff * (lr - min_lr)
    # with coeff = 0.5 (1 + cos(pi ratio)) rounds at most 5 times (cos, 1 +, 0.5 *, the difference,
    # the product and sum fold into those bounds for these one-signed terms)
    formula = reassociated(np.float64, 5)
    assert sched[warmup] == pytest.approx(lr, rel=formula)
    # cosine decay, strictly decreasing, through the midpoint, down to min_lr exactly
    assert all(a > b for a, b in zip(sched[warmup:decay_iters], sched[warmup + 1:decay_iters + 1]))
    mid = (warmup + decay_iters) // 2
    assert sched[mid] == pytest.approx((lr + min_lr) / 2, rel=formula)
    assert sched[decay_iters] == pytest.approx(min_lr, rel=formula)
    assert all(min_lr <= s <= lr for s in sched[warmup:])
    assert all(s == min_lr for s in sched[decay_iters + 1:])
    assert cosine_lr(10 ** 6, lr, warmup, decay_iters, min_lr) == min_lr


# --------------------------------------------------------------------------------------------
# Muon (npgpt.optim.Muon); the parity with torch.optim.Muon is in parity_tests/test_optim.py
# --------------------------------------------------------------------------------------------

def test_muon_is_exported_by_optim():
    assert OptimMuon is Muon


def test_newton_schulz_pushes_singular_values_towards_one():
    """The quintic maps every singular value into a band around 1 and keeps the singular vectors."""
    rng = np.random.default_rng(10)
    u = normal64(rng, (12, 7)) @ np.diag(np.logspace(-1, 1, 7))  # condition number ~100
    o = zeropower_via_newton_schulz(u)
    s = np.linalg.svd(o, compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.25, s  # (5 steps lift s >= ~1/500 of the largest)
    # same singular vectors: o = U S' V^T, so U^T o V is diagonal
    U, _, Vt = np.linalg.svd(u, full_matrices=False)
    inner = U.T @ o @ Vt.T
    # NS_STAGES matmuls with sums over 12, carried with NS_AMPLIFICATION, then two more matmuls
    # (and the SVD, backward stable): off-diagonal rounding relative to ||o|| <= sqrt(7) * 1.25
    off = np.abs(inner - np.diag(np.diag(inner))).max()
    assert off <= bounds.chain(F64, 12, NS_STAGES + 3, NS_AMPLIFICATION) * np.linalg.norm(o)
    # the wide orientation gives the transpose (the iteration runs on rows <= cols): the same
    # matmuls on a transposed view, which BLAS may block and add in another order
    assert rel_error(zeropower_via_newton_schulz(u.T), o.T) <= bounds.chain(F64, 12, NS_STAGES, NS_AMPLIFICATION)
    assert zeropower_via_newton_schulz(u.astype(np.float32)).dtype == np.float32


def test_newton_schulz_of_zero_is_zero():
    """The norm clamp at eps keeps a zero update from dividing by zero."""
    with np.errstate(all="raise"):
        assert not zeropower_via_newton_schulz(np.zeros((3, 4))).any()


def test_adjusted_lr():
    assert adjusted_lr(0.02, None, (8, 2)) == 0.02 * 2.0
    assert adjusted_lr(0.02, "original", (2, 8)) == 0.02
    assert adjusted_lr(0.02, "match_rms_adamw", (4, 16)) == 0.02 * 0.2 * 4.0


def test_muon_step_by_hand():
    """One plain step, every line of the update restated: momentum, Nesterov, NS, decay, lr."""
    rng = np.random.default_rng(11)
    p0 = normal64(rng, (6, 3))
    g1, g2 = normal64(rng, (6, 3)), normal64(rng, (6, 3))
    params = {"w": p0.copy()}
    opt = Muon(params, lr=0.05, weight_decay=0.2, momentum=0.9)
    w = params["w"]
    opt.step({"w": g1})
    opt.step({"w": g2}, lr=0.01)
    assert params["w"] is w  # updated in place: the model holds this very array
    buf1 = 0.1 * g1
    p1 = p0 * (1 - 0.05 * 0.2) - 0.05 * math.sqrt(2) * zeropower_via_newton_schulz(0.1 * g1 + 0.9 * buf1)
    buf2 = 0.9 * buf1 + 0.1 * g2
    p2 = p1 * (1 - 0.01 * 0.2) - 0.01 * math.sqrt(2) * zeropower_via_newton_schulz(0.1 * g2 + 0.9 * buf2)
    # the buffer: two lerps, formulas rearranged; the parameter: the Nesterov input rounds
    # differently on each side and Newton-Schulz carries it (NS_STAGES stages) into two steps
    assert rel_error(opt.momentum_buffer["w"], buf2) <= bounds.chain(F64, 2, depth=2)
    assert rel_error(w, p2) <= bounds.chain(F64, 6, 2 * (NS_STAGES + 2), NS_AMPLIFICATION)
    assert opt.step_count == 2


def test_muon_without_nesterov_uses_the_buffer():
    rng = np.random.default_rng(12)
    p0, g = normal64(rng, (3, 5)), normal64(rng, (3, 5))
    params = {"w": p0.copy()}
    Muon(params, lr=0.1, weight_decay=0.0, nesterov=False).step({"w": g})
    expected = p0 - 0.1 * zeropower_via_newton_schulz(0.05 * g)
    # the buffer 0.05 g is rounded once either way; Newton-Schulz and one update carry it
    assert rel_error(params["w"], expected) <= bounds.chain(F64, 5, NS_STAGES + 2, NS_AMPLIFICATION)


def test_muon_state_dict_round_trip_and_npz(tmp_path):
    rng = np.random.default_rng(13)
    make = lambda: {"a": normal64(rng, (4, 3)), "b": normal64(rng, (2, 5))}  # noqa: E731
    params = make()
    start = {n: v.copy() for n, v in params.items()}
    grads = [make() for _ in range(3)]
    opt = Muon(params, lr=0.02)
    opt.step(grads[0])
    path = tmp_path / "muon.npz"
    np.savez(path, **opt.state_dict())
    with np.load(path, allow_pickle=False) as f:
        state = dict(f)
    assert set(state) == {"step", "momentum_buffer.a", "momentum_buffer.b"}
    resumed_params = {n: v.copy() for n, v in params.items()}
    resumed = Muon(resumed_params, lr=0.02)
    resumed.load_state_dict(state)
    for g in grads[1:]:
        opt.step(g)
        resumed.step(g)
    for n in params:
        assert np.array_equal(params[n], resumed_params[n])
        assert not np.array_equal(params[n], start[n])
    assert resumed.step_count == 3


def test_muon_load_state_dict_is_all_or_nothing():
    params = {"a": np.zeros((4, 3)), "b": np.zeros((2, 5))}
    opt = Muon(params)
    opt.step({"a": np.ones((4, 3)), "b": np.ones((2, 5))})
    before = {n: b.copy() for n, b in opt.momentum_buffer.items()}
    bad = {**opt.state_dict(), "momentum_buffer.b": np.zeros((5, 2))}
    with pytest.raises(ValueError, match=r"momentum_buffer\.b has shape \(5, 2\), expected \(2, 5\)"):
        Muon(params).load_state_dict({**bad})
    with pytest.raises(ValueError, match=r"lacks momentum_buffer\.a"):
        opt.load_state_dict({"step": np.array(1), "momentum_buffer.b": np.zeros((2, 5))})
    assert all(np.array_equal(opt.momentum_buffer[n], before[n]) for n in before)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), r"lr=-1\.0"),
    (dict(momentum=-0.1), r"momentum=-0\.1"),
    (dict(weight_decay=-0.5), r"weight_decay=-0\.5"),
    (dict(adjust_lr_fn="spectral"), r"adjust_lr_fn='spectral' is unknown"),
    (dict(ns_coefficients=(1.0, 2.0)), r"ns_coefficients must be 3 numbers"),
    (dict(ns_steps=100), r"ns_steps must lie in \[0, 100\)"),
])
def test_muon_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Muon({"w": np.zeros((2, 2))}, **kwargs)


def test_muon_only_takes_matrices():
    with pytest.raises(ValueError, match=r"only takes 2-D matrices; give these to AdamW: ln_1\.weight \(4,\)"):
        Muon({"w": np.zeros((2, 2)), "ln_1.weight": np.ones(4)})
