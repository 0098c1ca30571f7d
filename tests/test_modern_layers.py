"""Unit tests of the modern block's pairs in npgpt.layers: RMSNorm, RoPE, ReLU², SwiGLU,
and attention and the block with QK-norm, RoPE and the new norms and activations composed in.

Every backward against centred finite differences in float64 (npgpt.gradcheck.gradcheck_layer, random
upstream gradient), each to its own finite_diff bound (npgpt.gradcheck.finite_diff_bound); every backward leaves dout and its cache
alone; RoPE's properties (a rotation: norms kept; q.k after RoPE depends only on the positions'
difference; its backward is the rotation by -angle); the forwards against their formulas written
out independently (loops over pairs, scalar sigmoid), each to the bound of its kind in npgpt.bounds.
Muon's own unit tests are at the end.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from npgpt import bounds
from npgpt import layers as L
from npgpt.gradcheck import gradcheck_layer, rel_error
from npgpt.muon import NS_COEFFICIENTS, Muon, adjusted_lr, zeropower_via_newton_schulz
from npgpt.optim import Muon as OptimMuon
from layer_helpers import qk_attention_backward, qk_attention_forward

F64 = np.float64
U64 = bounds.unit_roundoff(F64)
# A Newton-Schulz step x <- a x + (b A + c A^2) x, A = x x^T, is three matmuls whose roundings the
# rest of the iteration carries with at most |a| + |b| + |c| (the step's coefficients on s <= 1)
NS_STAGES = 3 * 5
NS_AMPLIFICATION = sum(abs(c) for c in NS_COEFFICIENTS)


def normal(rng, shape, scale=1.0, offset=0.0):
    return offset + scale * rng.standard_normal(shape)


# --------------------------------------------------------------------------------------------
# Gradient checks
# --------------------------------------------------------------------------------------------

def rmsnorm_case(shape, eps=1e-5, offset=0.0):
    def make(rng):
        C = shape[-1]
        inputs = {"x": normal(rng, shape, 2.0, offset), "w": 1.0 + normal(rng, (C,), 0.5)}
        return L.rmsnorm_forward, L.rmsnorm_backward, inputs, {"eps": eps}
    return make


def rope_case(B, nh, T, hs, theta=10000.0, offset=0):
    def make(rng):
        cos, sin = L.rope_angles(T, hs, theta, offset)
        return L.rope_forward, L.rope_backward, {"x": normal(rng, (B, nh, T, hs))}, {"cos": cos, "sin": sin}
    return make


def relu2_case(shape):
    def make(rng):
        x = normal(rng, shape)
        return L.relu2_forward, L.relu2_backward, {"x": x}, {}
    return make


def swiglu_case(shape, scale=2.0):
    def make(rng):
        return L.swiglu_forward, L.swiglu_backward, {"x": normal(rng, shape, scale)}, {}
    return make


def attention_case(B, T, C, n_head, qk_norm=True, rope=True, theta=50.0):
    """QK-norm and RoPE inside attention: gradients of qkv and of both gains."""
    def make(rng):
        hs = C // n_head
        inputs = {"qkv": normal(rng, (B, T, 3 * C))}
        if qk_norm:
            inputs["q_norm"] = 1.0 + normal(rng, (hs,), 0.3)
            inputs["k_norm"] = 1.0 + normal(rng, (hs,), 0.3)
        def forward(qkv, q_norm=None, k_norm=None):
            angles = L.rope_angles(T, hs, theta, dtype=qkv.dtype) if rope else None
            return qk_attention_forward(L.REFERENCE, qkv, n_head, q_norm, k_norm, angles)

        return forward, lambda dout, cache: qk_attention_backward(L.REFERENCE, dout, cache), inputs, {}
    return make


def block_case(B, T, C, n_head, activation, bias, norm="rmsnorm", qk_norm=True, rope=True, hidden=None):
    """The modern block: every parameter's gradient and the input's."""
    def make(rng):
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
        params = {n: (1.0 if n.endswith("norm.weight") or ".ln_" in f".{n}" else 0.0)
                  + normal(rng, shape, 0.4) for n, shape in shapes.items()}
        def forward(x, *arrays):
            angles = L.rope_angles(T, hs, 100.0, dtype=x.dtype) if rope else None
            return L.block_forward(x, dict(zip(names, arrays)),
                                   L.BlockOptions(n_head, activation, norm=norm, norm_eps=1e-5, rope=angles))

        def backward(dout, cache):
            dx, grads = L.block_backward(dout, cache)
            assert sorted(grads) == sorted(names), f"block grads {sorted(grads)} != params {sorted(names)}"
            return (dx, *(grads[n] for n in names))

        return forward, backward, {"x": normal(rng, (B, T, C)), **params}, {}
    return make


CASES = [
    pytest.param(rmsnorm_case((2, 3, 4)), id="rmsnorm-C4"),
    pytest.param(rmsnorm_case((6, 5), offset=1.5), id="rmsnorm-2d-C5-offset"),
    pytest.param(rmsnorm_case((2, 1, 1)), id="rmsnorm-C1"),
    pytest.param(rmsnorm_case((3, 4, 6), eps=0.5), id="rmsnorm-large-eps"),
    pytest.param(rmsnorm_case((2, 2, 3, 4)), id="rmsnorm-qk-per-head"),  # (B, nh, T, hs), as QK-norm
    pytest.param(rope_case(2, 2, 5, 4), id="rope-hs4"),
    pytest.param(rope_case(1, 3, 4, 2, theta=3.0), id="rope-hs2-theta3"),
    pytest.param(rope_case(2, 1, 3, 8, offset=17), id="rope-offset17"),
    pytest.param(relu2_case((2, 3, 7)), id="relu2"),
    pytest.param(swiglu_case((2, 3, 8)), id="swiglu-H4"),
    pytest.param(swiglu_case((5, 2)), id="swiglu-H1"),
    pytest.param(swiglu_case((2, 3, 6), scale=12.0), id="swiglu-saturated"),
    pytest.param(attention_case(2, 4, 8, 2), id="attention-qknorm-rope"),
    pytest.param(attention_case(2, 4, 8, 2, qk_norm=False), id="attention-rope"),
    pytest.param(attention_case(1, 5, 6, 3, rope=False), id="attention-qknorm-hs2"),
    pytest.param(block_case(2, 4, 8, 2, "swiglu", False, hidden=12), id="block-modern-swiglu"),
    pytest.param(block_case(2, 4, 8, 2, "relu2", True), id="block-modern-relu2-bias"),
    pytest.param(block_case(2, 3, 8, 2, "gelu", True, norm="layernorm", qk_norm=True, rope=False),
                 id="block-layernorm-qknorm"),
    pytest.param(block_case(2, 3, 8, 1, "gelu_tanh", False, qk_norm=False), id="block-rmsnorm-rope-nh1"),
]


@pytest.mark.parametrize("make", CASES)
def test_backward_matches_finite_differences(make, request, errors_below):
    forward, backward, inputs, kwargs = make(np.random.default_rng(0))
    errors = gradcheck_layer(forward, backward, inputs, **kwargs)
    assert sorted(errors) == sorted(inputs)  # every input was checked
    out, _ = forward(*inputs.values(), **kwargs)
    # as in tests/test_layers.py: f = sum(out * dout) sums over the output or within an input
    n = max(out.size, *(x.size for x in inputs.values()))
    block = request.node.callspec.id.startswith("block-")
    depth = bounds.BLOCK_DEPTH + 1 if block else (4 if "attention" in request.node.callspec.id else 2)
    errors_below(errors, request.node.callspec.id, n=n, depth=depth,
                 amplification=bounds.PARITY_AMPLIFICATION if block else 1.0)


@pytest.mark.parametrize("make", CASES)
def test_backward_writes_nothing(make):
    """The backward returns fresh arrays: dout, the inputs and the cache stay as they were."""
    rng = np.random.default_rng(1)
    forward, backward, inputs, kwargs = make(rng)
    out, cache = forward(*inputs.values(), **kwargs)
    dout = rng.standard_normal(out.shape)

    def freeze(obj):  # every array in the (nested) caches: a write raises
        if isinstance(obj, np.ndarray):
            obj.flags.writeable = False
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                freeze(item)

    freeze([dout, *inputs.values(), cache])
    grads = backward(dout, cache)
    assert isinstance(cache, tuple) and type(cache) is not tuple  # a NamedTuple, read by name
    for g, x in zip(grads, inputs.values()):
        assert g.shape == x.shape and g.flags.writeable  # fresh, not a view of anything frozen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", CASES)
def test_dtype_is_kept(make, dtype):
    rng = np.random.default_rng(2)
    forward, backward, inputs, kwargs = make(rng)
    inputs = {n: x.astype(dtype) for n, x in inputs.items()}
    kwargs = {n: v.astype(dtype) if isinstance(v, np.ndarray) else v for n, v in kwargs.items()}
    out, cache = forward(*inputs.values(), **kwargs)
    grads = backward(rng.standard_normal(out.shape).astype(dtype), cache)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)


# --------------------------------------------------------------------------------------------
# Forwards against their formulas written out another way
# --------------------------------------------------------------------------------------------

def test_rmsnorm_forward_formula():
    rng = np.random.default_rng(3)
    x, w = normal(rng, (4, 6)), normal(rng, (6,))
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
    x, w = normal(rng, (5, 7)), normal(rng, (7,))
    _, cache = L.rmsnorm_forward(x, w, eps=0.0)
    dx, _ = L.rmsnorm_backward(normal(rng, (5, 7)), cache)
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
    x = normal(rng, (B, nh, T, hs))
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
    x = normal(rng, (2, 3, 9, 8), 3.0)
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
    q, k = normal(rng, (hs,)), normal(rng, (hs,))

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
    dout = normal(rng, (2, 2, T, hs))
    cos, sin = L.rope_angles(T, hs, 10.0, 5)
    _, cache = L.rope_forward(normal(rng, dout.shape), cos, sin)
    (dx,) = L.rope_backward(dout, cache)
    back, _ = L.rope_forward(dout, cos, -sin)  # cos(-a) = cos a, sin(-a) = -sin a
    assert np.array_equal(dx, back)
    # the rotation by -angle undoes the forward: the backward of a rotation is its inverse
    x = normal(rng, dout.shape)
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
    x = normal(rng, (3, 10), 3.0)
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


# --------------------------------------------------------------------------------------------
# Muon (npgpt.optim.Muon); the parity with torch.optim.Muon is in parity_tests/test_modern.py
# --------------------------------------------------------------------------------------------

def test_muon_is_exported_by_optim():
    assert OptimMuon is Muon


def test_newton_schulz_pushes_singular_values_towards_one():
    """The quintic maps every singular value into a band around 1 and keeps the singular vectors."""
    rng = np.random.default_rng(10)
    u = normal(rng, (12, 7)) @ np.diag(np.logspace(-1, 1, 7))  # condition number ~100
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
    p0 = normal(rng, (6, 3))
    g1, g2 = normal(rng, (6, 3)), normal(rng, (6, 3))
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
    p0, g = normal(rng, (3, 5)), normal(rng, (3, 5))
    params = {"w": p0.copy()}
    Muon(params, lr=0.1, weight_decay=0.0, nesterov=False).step({"w": g})
    expected = p0 - 0.1 * zeropower_via_newton_schulz(0.05 * g)
    # the buffer 0.05 g is rounded once either way; Newton-Schulz and one update carry it
    assert rel_error(params["w"], expected) <= bounds.chain(F64, 5, NS_STAGES + 2, NS_AMPLIFICATION)


def test_muon_state_dict_round_trip_and_npz(tmp_path):
    rng = np.random.default_rng(13)
    make = lambda: {"a": normal(rng, (4, 3)), "b": normal(rng, (2, 5))}  # noqa: E731
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
