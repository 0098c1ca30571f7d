"""Smoke tests of torchgpt: names and shapes, the two attention paths, dropout masks, the KV cache,
generation and weight conversion. Small configs, float64 where exactness is claimed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from shapes import expected_param_shapes
from train_helpers import check  # the one print-then-assert comparison of tests/

from npgpt import bounds
from npgpt.sampling import sample_next
from torchgpt import (
    GPT,
    BigramLanguageModel,
    GPTConfig,
    load_nanogpt_state_dict,
    load_params,
    params_to_state_dict,
    state_dict_to_params,
)


# Two torchgpt forwards of small_config's 2-layer model that add their sums in other orders (the
# attention paths, a forward written out by hand, the KV cache): a chain over the forward's stages
# (half of PARITY_DEPTH), sums of at most 4 n_embd = 64 terms.
def forward_chain(dtype: torch.dtype) -> float:
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    return bounds.chain(np_dtype, 4 * small_config().n_embd, bounds.PARITY_DEPTH // 2, bounds.PARITY_AMPLIFICATION)


def small_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    kw.update(overrides)
    return GPTConfig(**kw)


def make(config: GPTConfig, attention="sdpa", dtype=torch.float64, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config, attention=attention, **kw).to(dtype)
    with torch.no_grad():  # nonzero biases and norm affines, so they take part in every check
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def twin(model: GPT, attention: str) -> GPT:
    """The same weights behind the other attention path."""
    other = GPT(model.config, attention=attention).to(model.transformer.wte.weight.dtype)
    other.load_state_dict(model.state_dict())
    return other


# --------------------------------------------------------------------------------------------
# Names, shapes, init
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_named_parameters_exact(bias, tie):
    cfg = small_config(bias=bias, tie_weights=tie)
    model = GPT(cfg)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert got == expected_param_shapes(cfg)
    assert list(got) == list(expected_param_shapes(cfg))  # nanoGPT's order
    assert set(model.state_dict()) == set(got)  # no buffers to trip strict loading
    if tie:
        assert model.head_weight() is model.transformer.wte.weight


def test_init_like_nanogpt_and_deterministic():
    cfg = small_config(n_layer=3, n_embd=64, n_head=4, vocab_size=200)
    torch.manual_seed(1)
    a = GPT(cfg)
    torch.manual_seed(1)
    b = GPT(cfg)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name:
            assert torch.all(p == 1), name
        elif name.endswith("c_proj.weight"):
            assert abs(p.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.002, name
        else:
            assert abs(p.std().item() - 0.02) < 0.002, name
    with pytest.raises(ValueError, match="attention"):
        GPT(cfg, attention="flash")


def test_untrained_loss_near_log_vocab():
    cfg = small_config(vocab_size=65, block_size=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 65, (4, 16))
    tgt = torch.randint(0, 65, (4, 16))
    logits, loss = model(idx, tgt)
    assert logits.shape == (4, 16, 65) and loss.dim() == 0
    assert abs(loss.item() - math.log(65)) < 0.05
    check("loss", loss, F.cross_entropy(logits.reshape(-1, 65), tgt.reshape(-1)),
          bounds.bitwise("the model's own F.cross_entropy call on the same logits and targets"))
    assert model(idx)[1] is None


# --------------------------------------------------------------------------------------------
# The two attention paths, and a manual forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_sdpa_matches_explicit(dtype, activation):
    cfg = small_config(activation=activation, tie_weights=activation != "relu", dropout=0.2)
    sdpa = make(cfg, "sdpa", dtype).eval()  # eval: dropout off
    explicit = twin(sdpa, "explicit").eval()
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    check(f"logits {activation} {dtype}", sdpa(idx)[0], explicit(idx)[0], forward_chain(dtype))
    sdpa.attention = "explicit"  # switching in place gives the explicit path
    check("logits after switch", sdpa(idx)[0], explicit(idx)[0],
          bounds.bitwise("both models run the explicit path on the same weights and batch"))


def manual_forward(model: GPT, idx, masks):
    """The architecture written out from the state dict, dropout as x * mask."""
    cfg, sd = model.config, model.state_dict()
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    hs = C // nh
    masks = list(masks)

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    x = (sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]) * masks.pop(0)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        qkv = lin(ln(x, h + "ln_1"), h + "attn.c_attn")
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, nh, hs).permute(0, 2, 1, 3) for j in range(3))
        att = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(future, -math.inf), -1)
        y = ((att * masks.pop(0)) @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + lin(y, h + "attn.c_proj") * masks.pop(0)
        a = lin(ln(x, h + "ln_2"), h + "mlp.c_fc")
        a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))  # exact GELU
        x = x + lin(a, h + "mlp.c_proj") * masks.pop(0)
    head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    return ln(x, "transformer.ln_f") @ head.T


def numpy_masks(model: GPT, B: int, T: int, seed: int):
    p = model.config.dropout
    rng = np.random.default_rng(seed)
    return [(rng.random(s) >= p).astype(np.float64) / (1.0 - p) for s in model.dropout_mask_shapes(B, T)]


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_given_dropout_masks_match_manual_forward(attention):
    cfg = small_config(dropout=0.3, tie_weights=False)
    model = make(cfg, attention).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 7))
    masks = numpy_masks(model, 2, 7, seed=3)
    logits, _ = model(idx, dropout_masks=masks)
    check("logits with masks", logits, manual_forward(model, idx, [torch.from_numpy(m) for m in masks]),
          forward_chain(torch.float64))
    assert len(model.last_dropout_masks) == len(masks)
    # other masks give other logits; eval mode is the manual forward with masks of ones
    assert not torch.allclose(logits, model(idx, dropout_masks=numpy_masks(model, 2, 7, seed=4))[0])
    model.eval()
    check("eval vs manual with unit masks", model(idx)[0],
          manual_forward(model, idx, [torch.ones(s, dtype=torch.float64) for s in model.dropout_mask_shapes(2, 7)]),
          forward_chain(torch.float64))


def test_dropout_mask_errors():
    cfg = small_config(dropout=0.25)
    model = make(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 5))
    masks = numpy_masks(model, 2, 5, seed=0)
    with pytest.raises(ValueError, match="expected 7 dropout_masks"):
        model(idx, dropout_masks=masks[:-1])
    bad = list(masks)
    bad[1] = np.ones((2, 2, 5, 4))
    with pytest.raises(ValueError, match=r"dropout_masks\[1\] has shape"):
        model(idx, dropout_masks=bad)
    bad = list(masks)
    bad[0] = masks[0] > 0  # booleans, not keep / (1 - p)
    with pytest.raises(ValueError, match="dtype"):
        model(idx, dropout_masks=bad)
    bad[0] = (masks[0] > 0).astype(np.float64)  # unscaled
    with pytest.raises(ValueError, match="other than 0"):
        model(idx, dropout_masks=bad)
    with pytest.raises(ValueError, match="dropout is off"):
        model.eval()(idx, dropout_masks=masks)
    model.eval()(idx, dropout_masks=[])  # no masks when dropout is off is fine


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_recorded_dropout_masks_replay(attention):
    cfg = small_config(dropout=0.5)
    model = make(cfg, attention, record_dropout_masks=True).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    logits, _ = model(idx)
    used = model.last_dropout_masks
    assert [tuple(m.shape) for m in used] == model.dropout_mask_shapes(2, 8)
    kept = torch.cat([m.flatten() for m in used])
    assert set(kept.unique().tolist()) == {0.0, 2.0}
    assert 0.4 < (kept == 0).double().mean().item() < 0.6
    check("replayed", model(idx, dropout_masks=used)[0], logits,
          bounds.bitwise("the masks the first forward drew, applied by the same operations"))
    model.record_dropout_masks = False  # fast path: F.dropout / SDPA dropout, nothing recorded
    assert model(idx)[0].shape == logits.shape and model.last_dropout_masks is None


# --------------------------------------------------------------------------------------------
# KV cache and generation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_kv_cache_matches_uncached_past_block_size(attention):
    cfg = small_config(block_size=6, dropout=0.1)
    model = make(cfg, attention).train()  # the cache must ignore train mode: no dropout
    bs = cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (2, 3))
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        logits, cache = model.prefill(idx)
        for t in range(tokens.size(1)):
            want = model.eval()(idx[:, -bs:])[0]
            model.train()
            check(f"step {t} ({idx.size(1)} tokens)", logits[:, -1], want[:, -1], forward_chain(torch.float64))
            if t == 0:
                check("prefill", logits, want, forward_chain(torch.float64))
            idx = torch.cat([idx, tokens[:, t:t + 1]], dim=1)
            if len(cache) == bs:  # positions shift: rebuild the cache from the last block
                logits, cache = model.prefill(idx[:, -bs:])
            else:
                logits = model.forward_cached(tokens[:, t:t + 1], cache, len(cache))
        assert idx.size(1) > 2 * bs
    with pytest.raises(ValueError, match="start_pos"):
        model.forward_cached(tokens[:, :1], cache, 0)


def uncached_generate(model, idx, n, temperature, top_k, rng):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        nxt = sample_next(logits[:, -1].double().numpy(), temperature, top_k, rng)
        idx = torch.cat([idx, torch.from_numpy(nxt)[:, None]], dim=1)
    return idx


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 3)])
def test_generate_equals_uncached_sampling(temperature, top_k):
    cfg = small_config(block_size=5)
    model = make(cfg).eval()
    with torch.no_grad():  # larger weights: the tokens then depend on every attention detail
        for p in model.parameters():
            p.mul_(15.0)
    idx = torch.randint(0, cfg.vocab_size, (3, 2))
    with torch.no_grad():
        want = uncached_generate(model, idx, 13, temperature, top_k, np.random.default_rng(7))
    got = model.generate(idx, 13, temperature, top_k, rng=np.random.default_rng(7))
    assert got.dtype == torch.long and got.shape == (3, 15)
    assert torch.equal(got, want)


def test_greedy_generate_deterministic_and_numpy_input():
    cfg = small_config(block_size=4)
    model = make(cfg, dtype=torch.float32)
    start = np.array([[1, 2, 3, 4, 5, 6]], dtype=np.int32)  # longer than block_size: cropped
    a = model.generate(start, 10, temperature=0.0)
    b = model.generate(torch.from_numpy(start).long(), 10, temperature=0.0)
    assert torch.equal(a, b) and a.shape == (1, 16)
    assert torch.equal(a[:, :6], torch.from_numpy(start).long())
    with torch.no_grad():
        first = model(a[:, 2:6])[0][:, -1].argmax(-1)
    assert a[0, 6] == first[0]
    assert model.training  # generate leaves the mode alone


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tie", [True, False])
def test_convert_round_trip_bit_exact(dtype, tie):
    cfg = small_config(tie_weights=tie, bias=not tie)
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s).astype(dtype) for n, s in expected_param_shapes(cfg).items()}
    sd = params_to_state_dict(params)
    assert all(sd[n].dtype == torch.from_numpy(params[n]).dtype for n in params)
    back = state_dict_to_params(sd)
    assert set(back) == set(params)
    for n in params:
        assert back[n].dtype == dtype and np.array_equal(back[n], params[n]), n
    model = GPT(cfg).to(torch.float32 if dtype == np.float32 else torch.float64)
    load_params(model, params)
    for n, p in state_dict_to_params(model).items():
        assert p.dtype == dtype and np.array_equal(p, params[n]), n
    params["transformer.wte.weight"][0, 0] = 123.0  # the model holds its own copy
    assert model.transformer.wte.weight[0, 0].item() != 123.0


def test_load_params_errors():
    cfg = small_config()
    model = GPT(cfg)
    params = state_dict_to_params(model)
    params.pop("transformer.ln_f.bias")
    params["lm_head.weight"] = np.zeros((cfg.vocab_size, cfg.n_embd), np.float32)
    params["transformer.wpe.weight"] = np.zeros((3, cfg.n_embd), np.float32)
    with pytest.raises(ValueError) as err:
        load_params(model, params)
    msg = str(err.value)
    assert "transformer.ln_f.bias" in msg and "lm_head.weight" in msg and "tie_weights" in msg
    assert "transformer.wpe.weight: got (3, 16)" in msg


def test_load_nanogpt_state_dict():
    cfg = small_config()
    model = make(cfg, dtype=torch.float32)
    sd = {"_orig_mod." + k: v.clone() for k, v in model.state_dict().items()}
    sd["_orig_mod.lm_head.weight"] = sd["_orig_mod.transformer.wte.weight"]  # tied, as nanoGPT saves
    for i in range(cfg.n_layer):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
    fresh = GPT(cfg)
    clean = load_nanogpt_state_dict(sd, fresh)
    assert set(clean) == set(dict(model.named_parameters()))
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    check("reloaded logits", fresh(idx)[0], model(idx)[0],
          bounds.bitwise("the same weights, loaded into the same model class, on the same batch"))


# --------------------------------------------------------------------------------------------
# float64 end to end, training helpers, the bigram baseline
# --------------------------------------------------------------------------------------------

def test_float64_backward_and_optimizer_groups():
    cfg = small_config(dropout=0.1)
    model = make(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.float64
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    N = model.get_num_params()
    assert N == sum(p.numel() for p in model.parameters()) - cfg.block_size * cfg.n_embd
    flops = (6 * N + 12 * 2 * 2 * 8 * 8) * 8 * 4
    # bitwise: the same integer FLOP count, divided by dt and then by flops_promised, in that order
    assert model.estimate_mfu(4, 0.5, flops_promised=1e12) == flops / 0.5 / 1e12


def test_bigram():
    torch.manual_seed(0)
    model = BigramLanguageModel(50)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {"token_embedding_table.weight": (50, 50)}
    assert abs(model.token_embedding_table.weight.std().item() - 1.0) < 0.05
    idx = torch.randint(0, 50, (4, 9))
    logits, loss = model(idx, idx)
    check("bigram logits", logits, model.token_embedding_table.weight[idx],
          bounds.bitwise("the logits are rows of the table, copied"))
    check("bigram loss", loss, F.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1)),
          bounds.bitwise("the model's own F.cross_entropy call on the same logits and targets"))
    out = model.generate(idx[:, :1], 20, temperature=0.0)
    assert out.shape == (4, 21) and torch.equal(out, model.generate(idx[:, :1], 20, temperature=0.0))
    table = model.token_embedding_table.weight
    assert torch.equal(out[:, 1:], table[out[:, :-1]].argmax(-1))
    a = model.generate(idx, 5, rng=np.random.default_rng(1))
    b = model.generate(idx, 5, rng=np.random.default_rng(1))
    assert torch.equal(a, b) and a.shape == (4, 14)
