"""The whole model, npgpt against torchgpt: logits, loss and every parameter's gradient.

npgpt's GPT is built with random parameters; torchgpt's twin loads them (convert.load_params, after
casting the twin to the dtype, since load_params casts to the model's dtype). One forward and
backward on the same batch; with dropout on, npgpt draws the masks and torch replays them
(model.last_dropout_masks -> forward(..., dropout_masks=...)). torch's gradients are read from
dict(model.named_parameters()) and matched to npgpt's by name; with tied weights both sides have
one transformer.wte.weight whose gradient includes the output head's contribution.

`check_model_parity` is reused by test_cuda.py with device="cuda".
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import npgpt
import torchgpt
from npgpt import bounds
from npgpt import layers as L
from npgpt.compare import compare_all, compare_outputs_and_grads
from npgpt.compare import rel_error as compare_rel
from npgpt.compare import bounds as parity_bounds
from parity_tests.twins import (MODEL_CLASSES, TORCH_DTYPE, describe, make_npgpt, model_pair_results,
                                parity_sizes, small_config, torch_twin)
from torchgpt.convert import load_params, params_to_state_dict, state_dict_to_params

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
ATTENTIONS = ["explicit", "sdpa"]
IMPLEMENTATIONS = list(MODEL_CLASSES)  # "reference" (npgpt.GPT) and "fast" (npgpt.fast.GPT)


def check_model_parity(config: npgpt.GPTConfig, dtype, attention: str, device: str = "cpu",
                       B: int = 3, T: int | None = None, seed: int = 0, header: str = "",
                       implementation: str = "reference"):
    """Forward + backward of the same GPT in both backends, compared. `implementation` picks
    npgpt's side: "reference" (npgpt.GPT) or "fast" (npgpt.fast.GPT).

    Each tensor is held to npgpt.compare.bounds for the config's and batch's sizes (parity_sizes).
    Returns (table rows, npgpt's gradients)."""
    n, depth = parity_sizes(config, B, T)
    ours_fwd, theirs_fwd, ours_grads, theirs_grads = model_pair_results(
        config, dtype, attention, device, B=B, T=T, seed=seed, model_class=MODEL_CLASSES[implementation])
    assert list(ours_grads) == list(theirs_grads)  # the same names in named_parameters() order
    rows = compare_outputs_and_grads(ours_fwd, theirs_fwd, ours_grads, theirs_grads, dtype,
                                     header or f"GPT {implementation} {describe(config)} {attention} {device}",
                                     n=n, depth=depth)
    return rows, ours_grads


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
