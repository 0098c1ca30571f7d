"""The whole model, npgpt against torchgpt: logits, loss and every parameter's gradient.

npgpt's GPT is built with random parameters; torchgpt's twin loads them (convert.load_params, after
casting the twin to the dtype, since load_params casts to the model's dtype). One forward and
backward on the same batch; with dropout on, npgpt draws the masks and torch replays them
(model.last_dropout_masks -> forward(..., dropout_masks=...)). torch's gradients are read from
dict(model.named_parameters()) and matched to npgpt's by name; with tied weights both sides have
one transformer.wte.weight whose gradient includes the output head's contribution.

`check_model_parity` (parity_tests/twins.py) is reused by test_cuda.py with device="cuda".

The modern block's switches: torchgpt's parameter names and shapes against tests/shapes.py, its values
against a forward composed of npgpt.layers' pairs (both attention paths), the KV cache with RoPE,
F.rms_norm's fallback; whole models over the switch combinations; generation with RoPE.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import npgpt
import torchgpt
from npgpt import bounds
from npgpt import layers as L
from npgpt.compare import compare_all, compare_outputs_and_grads
from npgpt.compare import rel_error as compare_rel
from npgpt.compare import bounds as parity_bounds
from npgpt.compare import rel_error
from npgpt.config import GPTConfig
from parity_tests.twins import (ATTENTIONS, MODEL_CLASSES, SWITCHES, TORCH_DTYPE, block_parity_sizes, check_model_parity,
                                describe, expected_param_shapes, make_npgpt, model_pair_results, modern_config,
                                parity_sizes, randn, small_config, torch_twin)
from torchgpt import model as tm
from torchgpt.convert import load_params, params_to_state_dict, state_dict_to_params

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
IMPLEMENTATIONS = list(MODEL_CLASSES)  # "reference" (npgpt.GPT) and "fast" (npgpt.fast.GPT)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt_logits_loss_grads(implementation, dtype, activation, bias, tie, dropout, attention):
    cfg = small_config(activation=activation, bias=bias, tie_weights=tie, dropout=dropout)
    rows, _ = check_model_parity(cfg, dtype, attention, implementation=implementation)
    names = [r.name for r in rows]
    assert ("lm_head.weight" in names) != tie and ("transformer.ln_f.bias" in names) == bias


def layernorm_backward_dropping(term: str):
    """A planted bug: npgpt.layers.layernorm_backward with one of dx's two terms dropped, the path
    through the row's mean ("mean") or through its variance ("variance"); dw and db stay right."""
    right = L.layernorm_backward

    def wrong(dout, cache):
        _, dw, db = right(dout, cache)
        g = dout * cache.w
        mean_term = g.mean(axis=-1, keepdims=True)
        variance_term = cache.xhat * (g * cache.xhat).mean(axis=-1, keepdims=True)
        dx = cache.rstd * (g - (variance_term if term == "mean" else mean_term))
        return dx, dw, db

    return wrong


@pytest.mark.parametrize("term", ["mean", "variance"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_bug_fails_the_bound(monkeypatch, dtype, term):
    """A dropped gradient term is caught by the model's bound in either dtype: the same comparison
    that passes with npgpt's layernorm_backward fails with the planted one, and every gradient
    upstream of a layernorm misses its bound by a wide margin (a factor of 10 at least)."""
    cfg = small_config(dropout=0.0)
    n, depth = parity_sizes(cfg, 3)
    check_model_parity(cfg, dtype, "explicit")  # the right backward passes
    monkeypatch.setattr(L.REFERENCE, "layernorm_backward", layernorm_backward_dropping(term))
    with pytest.raises(AssertionError, match="over the bound") as failure:
        check_model_parity(cfg, dtype, "explicit")
    assert "transformer.wte.weight" in str(failure.value)  # upstream of every layernorm
    _, theirs_fwd, ours, theirs = model_pair_results(cfg, dtype, "explicit")
    worst = max(compare_rel(ours[k], theirs[k]) for k in theirs)
    assert worst > 10 * parity_bounds(dtype, n, depth)["grad"], worst


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt_short_sequences(implementation, dtype, attention, T):
    """T < block_size: positions >= T of wpe get exactly zero gradient on both sides."""
    cfg = small_config(dropout=0.1)
    rows, ours_grads = check_model_parity(cfg, dtype, attention, B=2, T=T, implementation=implementation)
    assert np.all(ours_grads["transformer.wpe.weight"][T:] == 0)
    assert rows[0].shape == (2, T, cfg.vocab_size)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt_eval_mode_ignores_dropout(implementation, dtype, attention):
    """dropout > 0 but eval mode: no dropout on either side (SDPA's fast path in torch)."""
    cfg = small_config(dropout=0.5)
    model = make_npgpt(cfg, dtype, model_class=MODEL_CLASSES[implementation]).eval()
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, cfg.block_size))
    logits, _ = model.forward(idx)
    assert model.last_dropout_masks == []
    twin = torch_twin(model, attention).eval()
    with torch.no_grad():
        logits_t, _ = twin(torch.from_numpy(idx))
    compare_outputs_and_grads({"logits": logits}, {"logits": logits_t}, {}, {}, dtype, f"eval {attention}",
                              *parity_sizes(cfg, *idx.shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bigram(dtype):
    V = 13
    ours = npgpt.BigramLanguageModel(V, seed=3, dtype=dtype)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, V, (4, 9))
    idx[0] = 7  # a long run of one id: its row collects 9+ gradient rows
    targets = rng.integers(0, V, (4, 9))
    logits, loss = ours.forward(idx, targets)
    grads = ours.backward()
    theirs = torchgpt.BigramLanguageModel(V).to(TORCH_DTYPE[np.dtype(dtype)])  # cast, then load
    load_params(theirs, ours.params)
    logits_t, loss_t = theirs(torch.from_numpy(idx), torch.from_numpy(targets))
    loss_t.backward()
    # the lookup (exact), the loss; its gradient sums a row of the table over the B*T positions
    compare_outputs_and_grads({"logits": logits, "loss": loss}, {"logits": logits_t, "loss": loss_t},
                              grads, {n: p.grad for n, p in theirs.named_parameters()}, dtype, "bigram",
                              n=max(V, idx.size), depth=2)


@pytest.mark.parametrize("bias,tie", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_weights_round_trip_bit_exact(implementation, dtype, bias, tie):
    """npgpt -> torch -> npgpt gives back the very same bits, dtype and names."""
    cfg = small_config(bias=bias, tie_weights=tie)
    model = make_npgpt(cfg, dtype, model_class=MODEL_CLASSES[implementation])
    twin = torch_twin(model)
    back = state_dict_to_params(twin)
    assert list(back) == list(model.params)
    for name, value in model.params.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    via_sd = state_dict_to_params(params_to_state_dict(model.params))
    assert all(np.array_equal(via_sd[n], v) and via_sd[n].dtype == v.dtype for n, v in model.params.items())
    compare_all(back, model.params, rtol=bounds.bitwise("a copy: no arithmetic on either way"),
                header=f"round trip {np.dtype(dtype).name}")


def test_report_parity_table(capsys):
    """`python -m parity_tests.report` runs, and its numbers are within the bounds for its shapes."""
    from parity_tests import report

    n, depth = parity_sizes(report.DEFAULT_CONFIG, 4)  # report.parity_table's default batch size
    for dtype in (np.float64, np.float32):
        table = report.parity_table(dtype)
        b = parity_bounds(dtype, n, depth)
        assert [t[0] for t in table[:2]] == ["logits", "loss"] and len(table) > 10
        assert all(rel <= (b["forward"] if name in report.FORWARD_NAMES else b["grad"])
                   for name, _, _, rel in table), table
    report.main([])
    out = capsys.readouterr().out
    assert "float64: worst relative error" in out and "float32: worst relative error" in out


def test_float64_parity_bound_of_the_largest_shapes_is_1e_12():
    """The README's claim, "npgpt equals torch autograd in float64 to 1e-12": the bound of the
    suite's largest model comparison (the report's GPT, whose shapes npgpt.bounds' PARITY_N and
    PARITY_DEPTH describe) is at most 1e-12, for one forward and backward."""
    from parity_tests import report

    n, depth = parity_sizes(report.DEFAULT_CONFIG, 4)
    assert n <= bounds.PARITY_N and 2 * depth <= bounds.PARITY_DEPTH, (n, depth)
    assert parity_bounds(np.float64, n, depth)["grad"] <= bounds.parity(np.float64) <= 1e-12
    assert parity_bounds(np.float64)["grad"] == bounds.parity(np.float64)


def test_key_bias_gradient_is_rounding_noise():
    """The key part of c_attn.bias has an exactly zero gradient: it adds q.b_k to every score of a
    query's row, and the softmax ignores a constant shift. Both backends return rounding noise
    there (which is why test_training compares the trained key bias by absolute error)."""
    cfg = small_config(bias=True, dropout=0.2)
    _, _, ours, theirs = model_pair_results(cfg, np.float64, "explicit")
    C = cfg.n_embd
    # the noise is rounding of terms no larger than the rest of the gradient
    noise = parity_bounds(np.float64, *parity_sizes(cfg, 3))["grad"]
    for i in range(cfg.n_layer):
        for side, grads in (("npgpt", ours), ("torch", theirs)):
            g = np.asarray(grads[f"transformer.h.{i}.attn.c_attn.bias"].tolist())  # (3C,)
            key, rest = g[C:2 * C], np.concatenate([g[:C], g[2 * C:]])
            assert np.abs(key).max() <= noise * np.abs(rest).max(), (side, i, key)


# --------------------------------------------------------------------------------------------
# torchgpt's modern switches: names and shapes, values against npgpt's pairs, the KV cache with RoPE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switch", SWITCHES)
def test_torchgpt_parameter_names_and_shapes(switch):
    config = modern_config(**SWITCHES[switch])
    model = tm.GPT(config)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = expected_param_shapes(config)
    assert sorted(got) == sorted(expected)  # no wpe with rope, no norm biases with rmsnorm
    assert got == expected
    assert list(got) == list(expected)  # named_parameters() order
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
# Whole models over the modern block's switch combinations
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
    uncached forward (tests/test_model.py checks npgpt's cache alone)."""
    config = modern_config(**SWITCHES["modern"])
    model = make_npgpt(config, np.float64, seed=24, scale=0.5).eval()
    twin = torch_twin(model).eval()
    idx = np.array([[1, 2], [3, 4]])
    ours = model.generate(idx, 14, temperature=0.0)
    theirs = twin.generate(torch.from_numpy(idx), 14, temperature=0.0).numpy()
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, model.generate(idx, 14, temperature=0.0, use_cache=False))
