"""npgpt.GPT with the modern block's switches: gradients, shapes, init, KV cache.

Every switch alone and all together: the whole model's gradients against centred finite
differences (float64, each to its finite_diff bound); parameter names and shapes from the contract; the init
(unit gains, swiglu's (2H, C) c_fc); the KV cache with RoPE equal to the uncached forward,
chunk by chunk and through generate(); npgpt.fast.GPT equal to the reference on these configs;
configs and checkpoints of the lecture's model unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, bounds, fast
from npgpt.gradcheck import gradcheck_model, rel_error
from npgpt.model import param_shapes

H = 1e-5

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


def longest_sum(config: GPTConfig, B: int, T: int) -> int:
    """The longest sum of a forward and backward: the MLP's width (both halves of swiglu's c_fc),
    the vocabulary's log-sum-exp, a weight gradient's sum over B * T positions."""
    return max(config.mlp_hidden_size * (2 if config.activation == "swiglu" else 1), config.vocab_size, B * T)


def fd_sizes(config: GPTConfig, B: int, T: int) -> dict:
    """errors_below's sizes for a model's loss: its forward's stages, carried with the parity suite's
    amplification; the finite-difference step H."""
    return dict(n=longest_sum(config, B, T), depth=bounds.forward_depth(config.n_layer),
                amplification=bounds.PARITY_AMPLIFICATION, h=H)


def small_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.0)
    kw.update(overrides)
    return GPTConfig(**kw)


def random_model(config: GPTConfig, seed: int = 0, dtype=np.float64, scale: float = 0.3, cls=GPT):
    """A model whose every parameter (gains and biases too) is moved off its init."""
    model = cls(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng([seed, 5])
    for p in model.params.values():
        p += rng.normal(0.0, scale, p.shape).astype(p.dtype)
    return model


def batch(config, B, T, seed=0):
    rng = np.random.default_rng([seed, 3])
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def contract_shapes(config: GPTConfig) -> dict:
    """Every parameter's shape, written out from the modern block's contract (independently of model.py)."""
    V, C, hs, Hd = config.vocab_size, config.n_embd, config.head_size, config.mlp_hidden_size
    fc = 2 * Hd if config.activation == "swiglu" else Hd
    norm_bias = config.bias and config.norm == "layernorm"
    shapes = {"transformer.wte.weight": (V, C)}
    if config.pos_emb == "learned":
        shapes["transformer.wpe.weight"] = (config.block_size, C)
    for i in range(config.n_layer):
        local = {"ln_1.weight": (C,), "ln_1.bias": (C,) if norm_bias else None,
                 "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,) if config.bias else None,
                 "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,) if config.bias else None,
                 "attn.q_norm.weight": (hs,) if config.qk_norm else None,
                 "attn.k_norm.weight": (hs,) if config.qk_norm else None,
                 "ln_2.weight": (C,), "ln_2.bias": (C,) if norm_bias else None,
                 "mlp.c_fc.weight": (fc, C), "mlp.c_fc.bias": (fc,) if config.bias else None,
                 "mlp.c_proj.weight": (C, Hd), "mlp.c_proj.bias": (C,) if config.bias else None}
        shapes.update({f"transformer.h.{i}.{n}": s for n, s in local.items() if s is not None})
    shapes["transformer.ln_f.weight"] = (C,)
    if norm_bias:
        shapes["transformer.ln_f.bias"] = (C,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


@pytest.mark.parametrize("switch", SWITCHES)
def test_gradients_match_finite_differences(switch, errors_below):
    # one block per single switch (half the cost); the combined ones keep two, so a block's
    # input gradient is checked through the next block too
    n_layer = 2 if switch.startswith("modern") else 1
    config = small_config(**{"n_layer": n_layer, **SWITCHES[switch]})
    model = random_model(config, seed=1)
    idx, targets = batch(config, B=2, T=5)
    errors = gradcheck_model(model, idx, targets, h=H)
    assert list(errors) == list(model.params)
    errors_below(errors, switch, **fd_sizes(config, 2, 5))


def test_gradients_with_dropout_masks_and_every_switch(errors_below):
    config = small_config(**SWITCHES["modern"], dropout=0.25)
    model = random_model(config, seed=2)
    idx, targets = batch(config, B=2, T=5, seed=2)
    model.forward(idx, targets)  # draws the masks
    masks = [m.copy() for m in model.last_dropout_masks]
    assert len(masks) == 1 + 3 * config.n_layer
    errors = gradcheck_model(model, idx, targets, h=H, dropout_masks=masks)
    errors_below(errors, "modern with dropout masks", **fd_sizes(config, 2, 5))


@pytest.mark.parametrize("switch", SWITCHES)
def test_param_names_and_shapes_follow_the_contract(switch):
    config = small_config(**SWITCHES[switch])
    model = GPT(config)
    expected = contract_shapes(config)
    assert param_shapes(config) == expected
    assert {n: p.shape for n, p in model.params.items()} == expected
    # torchgpt's named_parameters() order: q_norm, k_norm after attn.c_proj, as modules register
    names = list(model.params)
    if config.qk_norm:
        i = names.index("transformer.h.0.attn.q_norm.weight")
        assert names[i - 1].startswith("transformer.h.0.attn.c_proj") and names[i + 1].endswith("k_norm.weight")


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


@pytest.mark.parametrize("switch", ["rope", "modern", "modern-relu2-bias"])
@pytest.mark.parametrize("chunks", [(6,), (1, 1, 1, 1, 1, 1), (2, 3, 1)])
def test_kv_cache_with_rope_matches_full_forward(switch, chunks, assert_close):
    config = small_config(**SWITCHES[switch])
    model = random_model(config, seed=5).eval()
    idx, _ = batch(config, B=3, T=6, seed=5)
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
    model = random_model(config, seed=24, scale=1.0).eval()  # seed 24: no row settles into a cycle of 2
    idx = np.array([[1, 2], [3, 4]])
    cached = model.generate(idx, 14, temperature=0.0)
    uncached = model.generate(idx, 14, temperature=0.0, use_cache=False)
    ref = idx
    for _ in range(14):
        logits, _ = model.forward(ref[:, -config.block_size:])
        ref = np.concatenate([ref, logits[:, -1].argmax(-1)[:, None]], axis=1)
    assert np.array_equal(cached, ref) and np.array_equal(uncached, ref)
    assert all(len(set(row[2:])) > 2 for row in cached.tolist())  # not stuck on one or two tokens


@pytest.mark.parametrize("switch", SWITCHES)
def test_fast_gpt_equals_reference_on_the_switches(switch):
    """npgpt.fast.GPT runs the modern switches on its own layers (numba kernels as installed): the
    reference's numbers to float64 rounding (tests/test_fast_modern.py checks them pair by pair)."""
    config = small_config(**SWITCHES[switch])
    ref = random_model(config, seed=8)
    quick = fast.GPT(config, seed=8, dtype=np.float64)
    for n, p in ref.params.items():
        quick.params[n][...] = p
    idx, targets = batch(config, B=2, T=6, seed=8)
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
    model = random_model(config, seed=9, dtype=np.float32)
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
