"""Unit tests of npgpt.model and npgpt.sampling: gradients, names, dtypes, init, errors, KV cache,
generation; the modern block's switches (RMSNorm, RoPE, QK-norm, ReLU², SwiGLU, the MLP width,
norm_eps) as rows of the gradient and shape tables, with their init, the KV cache with RoPE, npgpt.fast
on them and a modern checkpoint.

The gradient checks run on float64 models whose parameters are re-drawn at O(1) scale (gains
near 1, non-zero biases, weights N(0, 1/fan_in)): at nanoGPT's N(0, 0.02) init the blocks are
nearly linear and the attention nearly uniform, so a wrong term could hide below the tolerance.
Each gradient is held to its own finite_diff bound (npgpt.gradcheck.finite_diff_bound, `fd_sizes`);
every other rounding comparison names its kind in npgpt.bounds.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.special import chdtri

from npgpt import GPT, BigramLanguageModel, GPTConfig, bounds, fast
from npgpt.config import ACTIVATIONS
from npgpt.compare import rel_error
from npgpt.gradcheck import NORM_STD_MIN, gradcheck_model
from npgpt.model import param_shapes
from npgpt.sampling import sample_next

from shapes import expected_param_shapes

H = 1e-5  # finite-difference step


def fd_sizes(config: GPTConfig, B: int, T: int) -> dict:
    """The sizes of a model's loss for its finite_diff bound: the longest forward sum (the MLP's
    hidden width, the vocabulary's log-sum-exp, the mean over B * T positions), the forward's stages,
    and the parity suite's amplification; the finite-difference step H."""
    n = max(config.mlp_hidden_size * (2 if config.activation == "swiglu" else 1), config.vocab_size, B * T)
    return dict(n=n, depth=bounds.forward_depth(config.n_layer), amplification=bounds.PARITY_AMPLIFICATION, h=H)


def longest_sum(config: GPTConfig, B: int, T: int) -> int:
    """The longest sum of a forward and backward: the MLP's width (both halves of swiglu's c_fc),
    the vocabulary's log-sum-exp, a weight gradient's sum over B * T positions."""
    return max(config.mlp_hidden_size * (2 if config.activation == "swiglu" else 1), config.vocab_size, B * T)


def small_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8)
    return GPTConfig(**{**base, **overrides})


SWITCHES = {
    "rmsnorm": dict(norm="rmsnorm"),
    "rmsnorm-nobias": dict(norm="rmsnorm", bias=False),
    "rope": dict(pos_emb="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "swiglu": dict(activation="swiglu"),
    "swiglu-H12-untied": dict(activation="swiglu", mlp_hidden=12, tie_weights=False),
    "mlp_hidden-20": dict(mlp_hidden=20),
    "norm_eps": dict(norm_eps=0.1),
    "modern": dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="swiglu", bias=False,
                   rope_theta=100.0),
    "modern-relu2-bias": dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="relu2"),
}


def randomize(params: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """Re-draw every parameter in place at O(1) scale (see the module docstring)."""
    for name, p in params.items():
        if name.endswith(".bias"):
            p[...] = 0.2 * rng.standard_normal(p.shape)
        elif p.ndim == 1:  # layernorm gains
            p[...] = 1.0 + 0.2 * rng.standard_normal(p.shape)
        elif "wte" in name or "wpe" in name or "lm_head" in name or "embedding" in name:
            p[...] = 0.5 * rng.standard_normal(p.shape)
        else:
            p[...] = rng.standard_normal(p.shape) / math.sqrt(p.shape[1])


def random_model(config: GPTConfig, seed: int = 0, dtype=np.float64) -> GPT:
    model = GPT(config, seed=seed, dtype=dtype)
    randomize(model.params, np.random.default_rng([seed, 99]))
    return model


def jittered_model(config: GPTConfig, seed: int = 0, dtype=np.float64, scale: float = 0.3, cls=GPT):
    """A model whose every parameter (gains and biases too) is moved off its init by N(0, scale)."""
    model = cls(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng([seed, 5])
    for p in model.params.values():
        p += rng.normal(0.0, scale, p.shape).astype(p.dtype)
    return model


def jittered_batch(config, B, T, seed=0):
    """The batch drawn for jittered_model's tests."""
    rng = np.random.default_rng([seed, 3])
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def batch(config, B, T, seed=0):
    rng = np.random.default_rng([seed, 7])
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def relu_margin(model, idx, targets, recording_relu) -> float:
    """Smallest |pre-activation| of any ReLU in the forward at the point being checked (inf if none)."""
    with recording_relu() as pre:
        model.forward(idx, targets)
    # the recorder must see every ReLU layer, or the precondition would hold vacuously
    assert len(pre) == (model.config.n_layer if model.config.activation == "relu" else 0)
    return min((float(np.abs(a).min()) for a in pre), default=math.inf)


# --------------------------------------------------------------------------------------------
# Whole-model gradient checks
# --------------------------------------------------------------------------------------------

GRAD_CONFIGS = {f"{a}-{'bias' if b else 'nobias'}-{'tied' if t else 'untied'}": dict(activation=a, bias=b, tie_weights=t)
                for a in ACTIVATIONS for b in (True, False) for t in (True, False)}
# every switch of the modern block alone, one block (half the cost), and the combined ones with two,
# so a block's input gradient is checked through the next block too
GRAD_CONFIGS.update({name: {"n_layer": 2 if name.startswith("modern") else 1, **overrides}
                     for name, overrides in SWITCHES.items()})


@pytest.mark.parametrize("name", GRAD_CONFIGS)
def test_gpt_gradients_match_finite_differences(name, errors_below, recording_relu):
    config = small_config(**GRAD_CONFIGS[name])
    model = random_model(config, seed=1)
    idx, targets = batch(config, B=2, T=5)
    margin = relu_margin(model, idx, targets, recording_relu)
    # centred differences must not straddle a ReLU kink: a step of H moves a pre-activation by
    # far less than 10 H here, so nothing within 10 H of zero means no kink is crossed
    assert margin > 10 * H, f"a ReLU pre-activation lies {margin:.2e} from 0; pick another seed"
    errors = gradcheck_model(model, idx, targets, h=H)
    assert list(errors) == list(model.params)
    errors_below(errors, name, **fd_sizes(config, 2, 5))


def test_gpt_gradients_with_dropout_masks(errors_below):
    config = small_config(dropout=0.25, activation="gelu_tanh")
    model = random_model(config, seed=2)
    idx, targets = batch(config, B=2, T=5, seed=2)
    _, loss = model.forward(idx, targets)  # draws the masks
    masks = [m.copy() for m in model.last_dropout_masks]
    assert len(masks) == 1 + 3 * config.n_layer
    assert all((m == 0).any() for m in masks), "every mask should drop something at p=0.25"
    assert model.forward(idx, targets, dropout_masks=masks)[1] == loss  # the masks reproduce it
    errors = gradcheck_model(model, idx, targets, h=H, dropout_masks=masks)
    errors_below(errors, "GPT with dropout masks", **fd_sizes(config, 2, 5))


def test_gpt_gradients_with_dropout_masks_and_every_switch(errors_below):
    config = small_config(**SWITCHES["modern"], dropout=0.25)
    model = jittered_model(config, seed=2)
    idx, targets = jittered_batch(config, B=2, T=5, seed=2)
    model.forward(idx, targets)  # draws the masks
    masks = [m.copy() for m in model.last_dropout_masks]
    assert len(masks) == 1 + 3 * config.n_layer
    errors = gradcheck_model(model, idx, targets, h=H, dropout_masks=masks)
    errors_below(errors, "modern with dropout masks", **fd_sizes(config, 2, 5))


@pytest.mark.parametrize("vocab_size,idx", [
    (5, [[0, 3, 3, 1, 4, 3], [2, 2, 2, 2, 0, 1]]),
    (2, [[1, 1, 1, 1, 1, 1, 1, 0]]),
])
def test_bigram_gradients_match_finite_differences(vocab_size, idx, errors_below):
    model = BigramLanguageModel(vocab_size, seed=3, dtype=np.float64)
    idx = np.array(idx)
    targets = np.roll(idx, -1, axis=1)
    errors = gradcheck_model(model, idx, targets, h=H)
    assert list(errors) == ["token_embedding_table.weight"]
    # a table lookup, the log-sum-exp over V and the mean over B * T positions
    errors_below(errors, f"bigram V={vocab_size}", n=max(vocab_size, idx.size), depth=3, h=H)


@pytest.mark.parametrize("overrides,B,idx", [
    (dict(vocab_size=2, block_size=4, n_layer=1, n_head=1, n_embd=4), 2, [[1], [0]]),  # T=1
    (dict(vocab_size=2, block_size=6, n_layer=1, n_head=2, n_embd=6, activation="relu"), 2,
     np.full((2, 6), 1)),  # one token id repeated over the whole block
    (dict(vocab_size=3, block_size=5, n_layer=2, n_head=1, n_embd=5, bias=False, tie_weights=False),
     1, [[2, 2, 0, 2, 2]]),  # odd channel count, one head
], ids=["vocab2-T1-nh1", "vocab2-one-id-run", "C5-nh1-nobias-untied"])
def test_gpt_gradients_edge_shapes(overrides, B, idx, errors_below, recording_relu):
    config = GPTConfig(**overrides)
    model = random_model(config, seed=11)
    idx = np.array(idx)
    targets = np.roll(idx, 1, axis=1) if idx.shape[1] > 1 else 1 - idx
    assert relu_margin(model, idx, targets, recording_relu) > 10 * H
    errors_below(gradcheck_model(model, idx, targets, h=H), str(config), **fd_sizes(config, *idx.shape))


@st.composite
def gpt_cases(draw):
    n_head = draw(st.sampled_from([1, 2]))
    block_size = draw(st.integers(1, 6))
    config = GPTConfig(
        vocab_size=draw(st.integers(2, 9)), block_size=block_size, n_layer=draw(st.integers(1, 2)),
        n_head=n_head, n_embd=draw(st.sampled_from([c for c in range(4, 9) if c % n_head == 0])),
        activation=draw(st.sampled_from(ACTIVATIONS)), bias=draw(st.booleans()),
        tie_weights=draw(st.booleans()))
    return config, draw(st.integers(1, 2)), draw(st.integers(1, block_size)), draw(st.integers(0, 2 ** 16))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=gpt_cases())
def test_gpt_gradient_property(case, errors_below, recording_relu, recording_norm_stds):
    config, B, T, seed = case
    model = random_model(config, seed=seed)
    idx, targets = batch(config, B, T, seed)
    assume(relu_margin(model, idx, targets, recording_relu) > 10 * H)
    with recording_norm_stds() as stds:  # finite_diff_bound's smoothness needs no flat layernorm row
        model.forward(idx, targets)
    assert len(stds) == 2 * config.n_layer + 1  # the recorder sees every layernorm
    assume(min(stds) >= NORM_STD_MIN)
    errors = gradcheck_model(model, idx, targets, h=H)
    errors_below(errors, f"{config} B={B} T={T} seed={seed}", **fd_sizes(config, B, T))


# --------------------------------------------------------------------------------------------
# Names, shapes, dtypes
# --------------------------------------------------------------------------------------------


SHAPE_CONFIGS = {
    "bias-tied": dict(bias=True, tie_weights=True), "bias-untied": dict(bias=True, tie_weights=False),
    "nobias-tied": dict(bias=False, tie_weights=True), "nobias-untied": dict(bias=False, tie_weights=False),
    **SWITCHES,
}


@pytest.mark.parametrize("name", SHAPE_CONFIGS)
def test_param_names_and_shapes_are_nanogpts(name):
    """Names in nanoGPT's order and shapes in nn.Linear's (out, in) layout, as tests/shapes.py has them
    (torchgpt's named_parameters() order: q_norm, k_norm after attn.c_proj, as modules register)."""
    config = small_config(**SHAPE_CONFIGS[name])
    model = GPT(config)
    expected = expected_param_shapes(config)
    assert list(model.params) == list(expected)
    assert {n: p.shape for n, p in model.params.items()} == expected
    assert param_shapes(config) == expected
    if not config.bias:
        assert not any(".bias" in n for n in model.params)
    if config.tie_weights:
        assert "lm_head.weight" not in model.params
        assert model.head_weight is model.params["transformer.wte.weight"]


@pytest.mark.parametrize("bias,tie,expected", [
    # per block: weights 12 C^2 (c_attn 3C^2, c_proj C^2, c_fc 4C^2, mlp c_proj 4C^2), linear
    # biases 9C (3C + C + 4C + C), layernorms 4C (2C without bias); embeddings V C + bs C;
    # ln_f 2C (C); an untied head another V C. With V=65, bs=32, C=64, L=2:
    (True, True, 2 * (12 * 64 * 64 + 13 * 64) + 65 * 64 + 32 * 64 + 2 * 64),   # 106,304
    (False, True, 2 * (12 * 64 * 64 + 2 * 64) + 65 * 64 + 32 * 64 + 64),      # 104,832
    (True, False, 2 * (12 * 64 * 64 + 13 * 64) + 2 * 65 * 64 + 32 * 64 + 2 * 64),
])
def test_num_params(bias, tie, expected):
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=bias, tie_weights=tie)
    assert GPT(config).num_params() == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias,tie,dropout", [(True, True, 0.0), (False, False, 0.2), (True, False, 0.2)])
def test_dtype_is_preserved(dtype, bias, tie, dropout):
    config = small_config(bias=bias, tie_weights=tie, dropout=dropout)
    model = GPT(config, dtype=dtype)
    idx, targets = batch(config, 2, 5)
    assert all(p.dtype == dtype for p in model.params.values())
    logits, loss = model.forward(idx, targets)
    assert logits.dtype == dtype and logits.shape == (2, 5, config.vocab_size)
    assert isinstance(loss, float) and math.isfinite(loss)
    assert all(m.dtype == dtype for m in model.last_dropout_masks)
    grads = model.backward()
    assert list(grads) == list(model.params), "grads must have params' keys in params' order"
    for name, p in model.params.items():
        assert grads[name].shape == p.shape, name
        assert grads[name].dtype == dtype, f"{name}: grad is {grads[name].dtype}"
        assert np.isfinite(grads[name]).all(), name
    assert model.forward(idx)[0].dtype == dtype
    assert model.forward_cached(idx, model.new_kv_cache(2)).dtype == dtype
    assert model.generate(idx[:, :2], 3, rng=np.random.default_rng(0)).dtype == np.int64


def test_bigram_dtype_and_names():
    for dtype in (np.float32, np.float64):
        model = BigramLanguageModel(5, dtype=dtype)
        logits, loss = model.forward(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
        assert logits.dtype == dtype and logits.shape == (1, 3, 5) and isinstance(loss, float)
        grads = model.backward()
        assert list(grads) == list(model.params) == ["token_embedding_table.weight"]
        assert grads["token_embedding_table.weight"].dtype == dtype
    assert model.num_params() == 25


def test_other_dtypes_are_rejected():
    with pytest.raises(ValueError, match="float32 or float64"):
        GPT(small_config(), dtype=np.float16)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------

def test_init_is_reproducible_and_seeded():
    config = small_config(tie_weights=False)
    a, b, c = GPT(config, seed=5), GPT(config, seed=5), GPT(config, seed=6)
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), f"{name} differs for the same seed"
        if name.endswith(".weight") and a.params[name].ndim == 2:
            assert not np.array_equal(a.params[name], c.params[name]), f"{name} ignores the seed"
    # one seed, one model: float64 holds the same draw that float32 rounds
    d = GPT(config, seed=5, dtype=np.float64)
    assert all(np.array_equal(d.params[n].astype(np.float32), a.params[n]) for n in a.params)


def test_init_statistics_follow_nanogpt():
    n_layer = 4
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=n_layer, n_head=4, n_embd=128, tie_weights=False)
    params = GPT(config, seed=0).params
    proj_std = 0.02 / math.sqrt(2 * n_layer)  # 0.00707: residual projections, GPT-2 paper
    for name, p in params.items():
        if name.endswith(".bias"):
            assert not p.any(), f"{name} should start at zero"
        elif p.ndim == 1:
            assert np.all(p == 1.0), f"{name} (layernorm gain) should start at one"
        else:
            target = proj_std if name.endswith("c_proj.weight") else 0.02
            n = p.size
            # sample std of n normals has relative standard error 1/sqrt(2n) (<= 0.8% here);
            # allow 5 of them (<= 3.9%), far below the 65% gap between 0.02 and 0.00707
            assert abs(p.std() / target - 1.0) < 5 / math.sqrt(2 * n), f"{name}: std {p.std():.5f} vs {target:.5f}"
            assert abs(p.mean()) < 5 * target / math.sqrt(n), f"{name}: mean {p.mean():.2e}"


def test_init_loss_is_log_vocab():
    """At N(0, 0.02) init the logits are nearly zero, so the loss is about ln V (the lecture's check)."""
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config, seed=0)
    idx, targets = batch(config, 4, 16)
    _, loss = model.forward(idx, targets)
    assert abs(loss - math.log(65)) < 0.05


def test_init_gains_are_ones_and_swiglu_rows():
    config = small_config(**SWITCHES["modern"], mlp_hidden=12)
    model = GPT(config, seed=3)
    for name, p in model.params.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_norm.weight", "k_norm.weight")):
            assert np.array_equal(p, np.ones_like(p)), name
    c_fc = model.params["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.shape == (24, 8) and 0.015 < c_fc.std() < 0.025  # gate and up rows both N(0, 0.02)
    assert 0.01 < c_fc[:12].std() and 0.01 < c_fc[12:].std()

def test_default_config_is_the_lecture_model():
    """A config dict without the modern fields builds the lecture's parameters, in nanoGPT's order."""
    old = dict(vocab_size=7, block_size=6, n_layer=1, n_head=2, n_embd=8, dropout=0.0, bias=True,
               activation="gelu", tie_weights=True)
    model = GPT(GPTConfig.from_dict(old), seed=4)
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    assert list(model.params) == (["transformer.wte.weight", "transformer.wpe.weight"]
                                  + [f"transformer.h.0.{n}" for n in block]
                                  + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    assert model.params["transformer.h.0.mlp.c_fc.weight"].shape == (32, 8)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_factory", [
    lambda: GPT(small_config()), lambda: BigramLanguageModel(7)], ids=["gpt", "bigram"])
def test_backward_without_loss_raises(model_factory):
    model = model_factory()
    idx, targets = batch(small_config(), 2, 4)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a loss.*targets"):
        model.backward()  # no forward at all
    model.forward(idx)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a loss.*targets"):
        model.backward()
    model.forward(idx, targets)
    model.backward()  # fine now
    model.forward(idx)  # a later forward without targets makes the old loss stale
    with pytest.raises(RuntimeError, match="needs a loss"):
        model.backward()


def test_forward_rejects_bad_idx_and_targets():
    config = small_config()
    model = GPT(config)
    good = np.zeros((2, 4), dtype=np.int64)
    cases = [
        (np.zeros((1, config.block_size + 1), np.int64), None, r"length 7 > block_size 6"),
        (np.array([[0, 7]]), None, r"outside \[0, 7\)"),
        (np.array([[-1, 0]]), None, r"outside \[0, 7\)"),
        (good.astype(np.float64), None, "integer"),
        (np.zeros(4, np.int64), None, r"\(B, T\)"),
        (good, np.full((2, 4), 7), r"targets holds token ids outside"),
        (good, np.full((2, 4), -2), r"targets holds token ids outside"),
        (good, np.zeros((2, 3), np.int64), "shape"),
    ]
    for idx, targets, message in cases:
        with pytest.raises(ValueError, match=message):
            model.forward(idx, targets)
    model.forward(np.zeros((1, config.block_size), np.int64))  # exactly block_size is fine
    with pytest.raises(ValueError, match="outside"):
        BigramLanguageModel(7).forward(np.array([[7]]))


def test_dropout_masks_are_validated():
    config = small_config(dropout=0.2)
    model = GPT(config)
    idx, targets = batch(config, 2, 4)
    model.forward(idx, targets)
    masks = model.last_dropout_masks
    with pytest.raises(ValueError, match="expected 7"):
        model.forward(idx, targets, dropout_masks=masks[:-1])
    with pytest.raises(ValueError, match="dropout is off"):
        model.eval().forward(idx, targets, dropout_masks=masks)


def test_kv_cache_and_generate_reject_bad_lengths():
    config = small_config()
    model = GPT(config)
    kv = model.new_kv_cache(1)
    model.forward_cached(np.zeros((1, 4), np.int64), kv)
    with pytest.raises(ValueError, match="exceed block_size"):
        model.forward_cached(np.zeros((1, 3), np.int64), kv)
    with pytest.raises(ValueError, match="at least one context token"):
        model.generate(np.zeros((1, 0), np.int64), 2)
    with pytest.raises(ValueError, match="outside"):
        model.generate(np.array([[9]]), 2)


def test_forward_cached_rejects_out_of_range_ids():
    model = GPT(small_config())
    for bad in ([[-1]], [[7]]):
        with pytest.raises(ValueError, match="outside"):
            model.forward_cached(np.array(bad), model.new_kv_cache(1))


# --------------------------------------------------------------------------------------------
# Forward behaviour: causality, train/eval, no side effects
# --------------------------------------------------------------------------------------------

def test_changing_a_future_token_leaves_earlier_logits_alone():
    config = small_config(n_layer=2, block_size=8)
    model = random_model(config, seed=4).eval()
    idx, _ = batch(config, 2, 8, seed=4)
    logits, _ = model.forward(idx)
    for t in range(1, 8):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 1) % config.vocab_size
        logits2, _ = model.forward(changed)
        assert np.array_equal(logits2[:, :t], logits[:, :t]), f"position < {t} saw token {t}"
        assert not np.allclose(logits2[:, t], logits[:, t]), f"position {t} ignores its own token"


def test_dropout_only_in_train_mode():
    p = 0.3
    config = small_config(dropout=p)
    model = GPT(config, seed=8)
    no_dropout = GPT(small_config(), seed=8)  # same seed, same parameters
    idx, targets = batch(config, 2, 5)
    assert model.training
    a, _ = model.forward(idx, targets)
    masks = model.last_dropout_masks
    b, _ = model.forward(idx, targets)
    assert not np.allclose(a, b), "two training forwards should draw different masks"
    assert [m.shape for m in masks] == [(2, 5, 8)] + [(2, 2, 5, 5), (2, 5, 8), (2, 5, 8)] * 2
    assert all(set(np.unique(m)) == {0.0, np.float32(1 / (1 - p))} for m in masks)
    assert np.array_equal(model.forward(idx, targets, dropout_masks=masks)[0], a)

    assert model.eval() is model and not model.training
    c, _ = model.forward(idx, targets)
    assert model.last_dropout_masks == []
    assert np.array_equal(c, model.forward(idx, targets)[0])
    assert np.array_equal(c, no_dropout.forward(idx, targets)[0]), "eval mode must be the p=0 model"
    assert model.train() is model and model.training
    assert not np.allclose(model.forward(idx, targets)[0], c)


def test_forward_and_backward_have_no_side_effects():
    config = small_config(tie_weights=False)
    model = random_model(config, seed=5)
    idx, targets = batch(config, 2, 5)
    params_before = {n: p.copy() for n, p in model.params.items()}
    idx_before = idx.copy()
    model.forward(idx, targets)
    g1 = model.backward()
    g2 = model.backward()  # a second backward from the same cache gives the same gradients
    assert all(np.array_equal(g1[n], g2[n]) for n in g1)
    assert all(np.array_equal(params_before[n], model.params[n]) for n in params_before)
    assert np.array_equal(idx, idx_before)
    assert all(not np.shares_memory(g1[n], p) for n in g1 for p in model.params.values())


def test_tied_head_collects_both_gradients():
    """Tied wte gradient = embedding part + head part: the untied model with lm_head := wte splits it."""
    tied = random_model(small_config(tie_weights=True), seed=6)
    untied = GPT(small_config(tie_weights=False), dtype=np.float64)
    for name, p in tied.params.items():
        untied.params[name][...] = p
    untied.params["lm_head.weight"][...] = tied.params["transformer.wte.weight"]
    idx, targets = batch(tied.config, 2, 5)
    _, loss_t = tied.forward(idx, targets)
    _, loss_u = untied.forward(idx, targets)
    assert loss_t == loss_u
    gt, gu = tied.backward(), untied.backward()
    both = gu["transformer.wte.weight"] + gu["lm_head.weight"]
    # the same forward (equal losses) and the same two backward parts, then one addition either way
    assert rel_error(gt["transformer.wte.weight"], both) <= bounds.bitwise(
        "the tied gradient is the embedding part plus the head part, the very sum formed here")
    assert rel_error(gu["lm_head.weight"], gu["transformer.wte.weight"]) > 0.1  # both parts matter


# --------------------------------------------------------------------------------------------
# KV cache and generation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation,bias,tie,chunks", [
    ("gelu", True, True, [3, 1, 1, 1, 1, 1]),
    ("relu", False, False, [1] * 8),
    ("gelu_tanh", True, False, [2, 3, 3]),
])
def test_kv_cache_matches_full_forward(activation, bias, tie, chunks, assert_close):
    """The cached forward runs the same formulas on (B, chunk) slices: sums of other lengths, so
    BLAS adds them in other orders, through the whole forward (a chain)."""
    config = small_config(block_size=8, activation=activation, bias=bias, tie_weights=tie, dropout=0.1)
    model = random_model(config, seed=7)  # left in train mode: forward_cached never drops
    idx, _ = batch(config, 2, 8, seed=7)
    full, _ = model.eval().forward(idx)
    model.train()
    kv = model.new_kv_cache(2)
    parts, start = [], 0
    for n in chunks:
        parts.append(model.forward_cached(idx[:, start:start + n], kv))
        start += n
        assert kv.length == start
    cached = np.concatenate(parts, axis=1)
    tol = bounds.chain(np.float64, max(4 * config.n_embd, config.vocab_size, 8),
                       bounds.forward_depth(config.n_layer) - 2, bounds.PARITY_AMPLIFICATION)  # no loss
    for t in range(8):
        assert_close(f"logits at position {t}", cached[:, t], full[:, t], tol)


@pytest.mark.parametrize("switch", ["rope", "modern", "modern-relu2-bias"])
@pytest.mark.parametrize("chunks", [(6,), (1, 1, 1, 1, 1, 1), (2, 3, 1)])
def test_kv_cache_with_rope_matches_full_forward(switch, chunks, assert_close):
    config = small_config(**SWITCHES[switch])
    model = jittered_model(config, seed=5).eval()
    idx, _ = jittered_batch(config, B=3, T=6, seed=5)
    full, _ = model.forward(idx)
    kv = model.new_kv_cache(3)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(model.forward_cached(idx[:, start:start + n], kv))
        start += n
    # the same formulas on (B, chunk) slices: sums of other lengths and orders through the forward
    tol = bounds.chain(np.float64, longest_sum(config, 3, 6), bounds.forward_depth(config.n_layer) - 2,
                       bounds.PARITY_AMPLIFICATION)  # no loss
    assert_close("cached logits", np.concatenate(pieces, axis=1), full, tol)

@pytest.mark.parametrize("switch", ["rope", "modern"])
def test_generate_with_rope_with_and_without_cache(switch):
    """Past block_size the window slides and the cache is refilled: positions restart at 0."""
    config = small_config(**SWITCHES[switch])
    model = jittered_model(config, seed=24, scale=1.0).eval()  # seed 24: no row settles into a cycle of 2
    idx = np.array([[1, 2], [3, 4]])
    cached = model.generate(idx, 14, temperature=0.0)
    uncached = model.generate(idx, 14, temperature=0.0, use_cache=False)
    ref = idx
    for _ in range(14):
        logits, _ = model.forward(ref[:, -config.block_size:])
        ref = np.concatenate([ref, logits[:, -1].argmax(-1)[:, None]], axis=1)
    assert np.array_equal(cached, ref) and np.array_equal(uncached, ref)
    assert all(len(set(row[2:])) > 2 for row in cached.tolist())  # not stuck on one or two tokens


def reference_generate(model, idx, n, temperature, top_k, rng):
    """The plain loop: full eval forward on the last block_size tokens, sample, append."""
    bs = model.config.block_size
    model.eval()
    for _ in range(n):
        logits, _ = model.forward(idx[:, -bs:])
        idx = np.concatenate([idx, sample_next(logits[:, -1], temperature, top_k, rng)[:, None]], axis=1)
    return idx


@pytest.mark.parametrize("prompt_len", [3, 8])  # 8 > block_size 6: the prompt itself is cropped
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.8, 3), (0.0, None)])
def test_generate_with_and_without_cache_and_reference_agree(prompt_len, temperature, top_k):
    config = small_config(vocab_size=9, dropout=0.2)
    model = random_model(config, seed=9)  # in train mode: generate must not drop (reference is eval)
    prompt = np.random.default_rng(1).integers(0, 9, (2, prompt_len))
    n = 12  # runs well past block_size, so the window slides
    cached = model.generate(prompt, n, temperature, top_k, np.random.default_rng(42), use_cache=True)
    uncached = model.generate(prompt, n, temperature, top_k, np.random.default_rng(42), use_cache=False)
    ref = reference_generate(model, prompt, n, temperature, top_k, np.random.default_rng(42))
    assert cached.shape == (2, prompt_len + n) and cached.dtype == np.int64
    assert np.array_equal(cached[:, :prompt_len], prompt)
    assert np.array_equal(cached, uncached)
    assert np.array_equal(cached, ref)
    if temperature > 0:
        other = model.generate(prompt, n, temperature, top_k, np.random.default_rng(43))
        assert not np.array_equal(other, cached), "the seed should matter when sampling"


def test_greedy_is_deterministic_and_top_k_1_is_greedy():
    config = small_config(vocab_size=9)
    model = random_model(config, seed=10)
    prompt = np.array([[1, 2], [3, 4]])
    greedy = model.generate(prompt, 10, temperature=0.0)
    assert np.array_equal(greedy, model.generate(prompt, 10, temperature=0.0, rng=np.random.default_rng(5)))
    for seed in range(3):
        top1 = model.generate(prompt, 10, temperature=1.0, top_k=1, rng=np.random.default_rng(seed))
        assert np.array_equal(top1, greedy)
    # and greedy is the argmax of the full forward at each step
    assert np.array_equal(greedy, reference_generate(model, prompt, 10, 0.0, None, None))


def test_bigram_generate():
    model = BigramLanguageModel(6, seed=1, dtype=np.float64)
    table = model.params["token_embedding_table.weight"]
    out = model.generate(np.array([[2]]), 8, temperature=0.0)
    assert all(out[0, i + 1] == np.argmax(table[out[0, i]]) for i in range(8))
    a = model.generate(np.array([[0], [5]]), 20, rng=np.random.default_rng(3))
    b = model.generate(np.array([[0], [5]]), 20, rng=np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == (2, 21) and a.min() >= 0 and a.max() < 6


def test_npgpt_never_imports_torch():
    code = ("import sys, npgpt, npgpt.gradcheck, npgpt.sampling, npgpt.data, npgpt.optim; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "importing npgpt pulled in torch"


@pytest.mark.parametrize("switch", SWITCHES)
def test_fast_gpt_equals_reference_on_the_switches(switch):
    """npgpt.fast.GPT runs the modern switches on its own layers (numba kernels as installed): the
    reference's numbers to float64 rounding (tests/test_fastpath.py checks them pair by pair)."""
    config = small_config(**SWITCHES[switch])
    ref = jittered_model(config, seed=8)
    quick = fast.GPT(config, seed=8, dtype=np.float64)
    for n, p in ref.params.items():
        quick.params[n][...] = p
    idx, targets = jittered_batch(config, B=2, T=6, seed=8)
    logits_r, loss_r = ref.forward(idx, targets)
    logits_f, loss_f = quick.forward(idx, targets)
    grads_r, grads_f = ref.backward(), quick.backward()
    assert quick.layers == fast.layers.FAST
    # the same formulas with other summation orders (numba loops, 2-D matmuls, in-place sums): the
    # forward is a chain; the backward adds as many stages again
    n, depth = longest_sum(config, 2, 6), bounds.forward_depth(config.n_layer)
    forward = bounds.chain(np.float64, n, depth, bounds.PARITY_AMPLIFICATION)
    backward = bounds.chain(np.float64, n, 2 * depth, bounds.PARITY_AMPLIFICATION)
    assert rel_error(logits_f, logits_r) <= forward and abs(loss_f - loss_r) <= forward * abs(loss_r)
    assert list(grads_f) == list(grads_r)
    worst = {n: rel_error(grads_f[n], grads_r[n]) for n in grads_r}
    assert all(worst[n] <= backward for n in grads_r), {n: e for n, e in worst.items() if e > backward}

def test_checkpoint_round_trip_carries_the_modern_fields(tmp_path):
    """A modern model's .npz checkpoint: the config's new fields and the params (no wpe, q_norm,
    (2H, C) c_fc) come back, and torchgpt loads the params strictly. A checkpoint config saved
    without the modern keys loads as the lecture's model."""
    import math

    pytest.importorskip("torch")  # torchgpt's strict load; the rest runs in the base install too
    from gptapp.checkpoint import Checkpoint, load_npz, save_npz
    from torchgpt import GPT as TorchGPT
    from torchgpt.convert import load_params

    config = small_config(**SWITCHES["modern"], mlp_hidden=12)
    model = jittered_model(config, seed=9, dtype=np.float32)
    ckpt = Checkpoint(backend="numpy", model="gpt", gpt_config=config, vocab="abcdefg", params=model.params,
                      train_config={}, iter_num=1, best_val_loss=math.inf, optimizer={}, rng=None)
    save_npz(tmp_path / "modern.npz", ckpt)
    back = load_npz(tmp_path / "modern.npz")
    assert back.gpt_config == config and back.gpt_config.pos_emb == "rope" and back.gpt_config.mlp_hidden == 12
    assert sorted(back.params) == sorted(model.params)
    assert all(np.array_equal(back.params[n], p) for n, p in model.params.items())
    load_params(TorchGPT(back.gpt_config), back.params)  # strict: names and shapes agree

    old = {k: v for k, v in small_config().to_dict().items()
           if k not in ("norm", "norm_eps", "pos_emb", "rope_theta", "qk_norm", "mlp_hidden")}
    lecture = GPT(GPTConfig.from_dict(old), seed=1)
    ckpt_old = Checkpoint(backend="numpy", model="gpt", gpt_config=GPTConfig.from_dict(old), vocab="abcdefg",
                          params=lecture.params, train_config={}, iter_num=1, best_val_loss=math.inf,
                          optimizer={}, rng=None)
    save_npz(tmp_path / "old.npz", ckpt_old)
    assert load_npz(tmp_path / "old.npz").gpt_config == small_config()


# --------------------------------------------------------------------------------------------
# Sampling (npgpt.sampling.sample_next, shared by both backends)
# --------------------------------------------------------------------------------------------

def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def chi_square(counts, probs):
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_sample_next_is_determined_by_the_rng():
    logits = np.random.default_rng(0).standard_normal((64, 10))
    a = sample_next(logits, 1.0, None, np.random.default_rng(5))
    b = sample_next(logits, 1.0, None, np.random.default_rng(5))
    c = sample_next(logits, 1.0, None, np.random.default_rng(6))
    assert a.dtype == np.int64 and a.shape == (64,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # top_k >= V keeps everything: identical to no top_k for the same draws
    assert np.array_equal(sample_next(logits, 1.0, 10, np.random.default_rng(5)), a)
    assert np.array_equal(sample_next(logits, 1.0, 50, np.random.default_rng(5)), a)


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 4)])
def test_sample_next_is_inverse_cdf_of_one_uniform_per_row(temperature, top_k):
    """The draw protocol torchgpt shares: one rng.random((B, 1)) per call, inverse CDF over softmax."""
    logits = np.random.default_rng(3).standard_normal((500, 9))
    rng = np.random.default_rng(8)
    tokens = sample_next(logits, temperature, top_k, rng)
    ref_rng = np.random.default_rng(8)
    u = ref_rng.random((500, 1))
    scaled = logits / temperature
    if top_k is not None:
        scaled = np.where(scaled < np.sort(scaled, axis=-1)[:, -top_k:-top_k + 1], -np.inf, scaled)
    cdf = np.cumsum(np.exp(scaled - scaled.max(-1, keepdims=True)), axis=-1)
    expected = (cdf <= u * cdf[:, -1:]).sum(axis=-1)
    assert np.array_equal(tokens, expected)
    assert rng.bit_generator.state == ref_rng.bit_generator.state, "sample_next drew more than B uniforms"


def test_greedy_and_top_1_are_argmax():
    logits = np.random.default_rng(1).standard_normal((50, 7))
    argmax = np.argmax(logits, axis=-1)
    assert np.array_equal(sample_next(logits, 0.0), argmax)  # no rng needed
    assert np.array_equal(sample_next(logits, 0.0, 3, np.random.default_rng(0)), argmax)
    assert np.array_equal(sample_next(logits, 1.7, 1, np.random.default_rng(0)), argmax)


@pytest.mark.parametrize("temperature", [1.0, 5.0])  # 5.0 flattens: a leak would show at once
def test_top_k_never_draws_a_token_outside_the_top_k(temperature):
    rng = np.random.default_rng(2)
    n, V, k = 20_000, 8, 3
    logits = rng.standard_normal((n, V))  # a different row for every draw
    tokens = sample_next(logits, temperature, k, rng)
    top = np.argsort(logits, axis=-1)[:, -k:]
    assert (top == tokens[:, None]).any(axis=-1).all(), "a token outside the top k was drawn"
    row = np.array([[0.5, 2.0, -1.0, 1.5, 0.0, 1.9]])
    drawn = sample_next(np.repeat(row, n, axis=0), temperature, 3, rng)
    assert set(np.unique(drawn)) == {1, 3, 5}  # all of the top 3, nothing else


@pytest.mark.parametrize("temperature,top_k", [(0.8, None), (1.0, 3), (2.0, None)])
def test_empirical_distribution_matches_softmax(temperature, top_k):
    """Pearson's chi-square of 200,000 draws against softmax(logits / T) over the kept tokens.

    The limit is the 1 - 1e-6 quantile of chi-square with (kept - 1) degrees of freedom: a correct
    sampler exceeds it for one seed in a million. The same counts against the distribution a
    plausible bug would give (temperature ignored, or top_k ignored) must land far above it,
    which shows the test can fail.
    """
    logits = np.array([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 200_000
    tokens = sample_next(np.tile(logits, (n, 1)), temperature, top_k, np.random.default_rng(3))
    counts = np.bincount(tokens, minlength=5).astype(np.float64)
    scaled = logits / temperature
    keep = np.ones(5, bool) if top_k is None else scaled >= np.sort(scaled)[-top_k]
    probs = softmax(np.where(keep, scaled, -np.inf))
    assert not counts[~keep].any(), "a token outside the top k was drawn"
    limit = chdtri(keep.sum() - 1, 1e-6)  # inverse survival function of chi-square
    stat = chi_square(counts[keep], probs[keep])
    print(f"chi-square {stat:.2f}, limit {limit:.2f}")
    assert stat < limit
    wrong = softmax(logits) if temperature != 1.0 else softmax(scaled)  # T ignored / top_k ignored
    assert chi_square(counts + 0.5, wrong) > 10 * limit  # (+0.5: no empty cells for the wrong fit)


def test_invalid_sampling_arguments_raise():
    logits = np.zeros((2, 4))
    for t in (-0.5, -1e-9):
        with pytest.raises(ValueError, match="temperature"):
            sample_next(logits, t, None, np.random.default_rng(0))
    for k in (0, -1):
        with pytest.raises(ValueError, match="top_k"):
            sample_next(logits, 1.0, k, np.random.default_rng(0))
    model = GPT(small_config())
    with pytest.raises(ValueError, match="temperature"):
        model.generate(np.array([[1]]), 2, temperature=-1.0)


def test_non_integer_top_k_raises():
    with pytest.raises(ValueError, match="top_k"):
        sample_next(np.zeros((1, 5)), 1.0, 2.5, np.random.default_rng(0))


def test_nan_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        sample_next(np.random.default_rng(0).standard_normal((3, 5)), float("nan"), None,
                    np.random.default_rng(0))
