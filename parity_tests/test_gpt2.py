"""GPT-2 three ways: npgpt, torchgpt and Hugging Face transformers on the same weights.

Tiny random GPT2LMHeadModels are built offline from GPT2Config (float64, eager attention, no
dropout), saved with save_pretrained and loaded through gptapp.hf.load_pretrained, so the loader's
key mapping and Conv1D transposes are part of what is proven. On one batch, the logits, the loss
and every parameter's gradient agree within npgpt.bounds' parity bound for the computation's sizes
(below the 1e-12 the README states, asserted too); greedy generation gives the same ids in all three, with
and without the KV cache.

The loss: HF's `labels=idx` shifts inside the model (logits[:, :-1] against idx[:, 1:], the mean
over B (T - 1) positions) but upcasts with `logits.float()`, which for a float64 model rounds the
logits to float32 first. So the float64 comparison computes the same shifted mean cross-entropy
from HF's float64 logits with torch.nn.functional.cross_entropy and backpropagates that through
HF's model; npgpt and torchgpt get idx[:, :-1] with targets idx[:, 1:]. HF's own labels loss is
checked too, against float32's parity bound.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import npgpt
import torchgpt
from npgpt.compare import bounds, compare_outputs_and_grads
from gptapp.hf import hf_to_ours, is_conv1d, load_pretrained
from parity_tests.twins import parity_sizes
from torchgpt.convert import load_params

# GPT2Config fields of each model: 1-3 layers, 1-4 heads, 8-32 channels, a small vocabulary; one
# with n_inner set, one untied, and every activation GPT-2's loader maps.
CASES = {
    "L1-nh1-C8-V50": dict(n_layer=1, n_head=1, n_embd=8, vocab_size=50),
    "L2-nh2-C16-V64-pytorch_tanh": dict(n_layer=2, n_head=2, n_embd=16, vocab_size=64,
                                        activation_function="gelu_pytorch_tanh"),
    "L3-nh4-C32-V100-n_inner48-gelu": dict(n_layer=3, n_head=4, n_embd=32, vocab_size=100, n_inner=48,
                                           activation_function="gelu", layer_norm_epsilon=1e-6),
    "L2-nh4-C24-V77-untied-relu": dict(n_layer=2, n_head=4, n_embd=24, vocab_size=77, tie_word_embeddings=False,
                                       activation_function="relu"),
}
BLOCK = 10  # n_positions
B = 3  # batch rows


def hf_model(transformers, fields: dict, seed: int):
    """A random GPT2LMHeadModel in float64 with noise on every parameter (HF's init has zero biases
    and unit gains, which would then play no part), eager attention, no dropout."""
    config = transformers.GPT2Config(n_positions=BLOCK, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{case: (HF model, GPTConfig, params)}: each saved with save_pretrained and loaded back."""
    import transformers  # the test extra
    root = tmp_path_factory.mktemp("gpt2")
    out = {}
    for seed, (name, fields) in enumerate(CASES.items()):
        model = hf_model(transformers, fields, seed)
        assert model.config._attn_implementation == "eager" and model.dtype == torch.float64
        model.save_pretrained(root / name)
        config, params, tokenizer = load_pretrained(root / name, np.float64)
        assert tokenizer is None and config.block_size == BLOCK
        assert config.tie_weights == fields.get("tie_word_embeddings", True)
        out[name] = (model, config, params)
    return out


def npgpt_model(config, params):
    model = npgpt.GPT(config, dtype=np.float64)
    model.params = {k: v.copy() for k, v in params.items()}
    return model


def torch_model(config, params):
    model = torchgpt.GPT(config, attention="explicit").double()
    load_params(model, params)
    return model


def hf_grads(model) -> dict:
    """HF's gradients under our names, Conv1D ones transposed to (out, in); a tied head is one
    parameter (wte) in named_parameters, as in ours."""
    return {hf_to_ours(name): (p.grad.T if is_conv1d(name) else p.grad) for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_logits_loss_and_every_gradient_three_ways(models, case):
    model, config, params = models[case]
    idx = np.random.default_rng([len(case), 5]).integers(0, config.vocab_size, (B, BLOCK))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    n, depth = parity_sizes(config, B, BLOCK)  # the full-length forward's sizes bound the shorter one's too
    b = bounds(np.float64, n, depth)
    assert b["grad"] <= 1e-12 and b["forward"] <= 1e-12  # the README's "to 1e-12", from the analysis

    ours = npgpt_model(config, params)
    logits_full, _ = ours.forward(idx)
    logits, loss = ours.forward(inputs, targets)
    ours_grads = ours.backward()

    twin = torch_model(config, params)
    t_logits, t_loss = twin(torch.from_numpy(inputs), torch.from_numpy(targets))
    t_loss.backward()
    t_grads = {name: p.grad for name, p in twin.named_parameters()}

    model.zero_grad(set_to_none=True)
    idx_t = torch.from_numpy(idx)
    h_logits = model(idx_t).logits  # (B, T, V)
    h_loss = torch.nn.functional.cross_entropy(h_logits[:, :-1].reshape(-1, config.vocab_size),
                                               idx_t[:, 1:].reshape(-1))  # HF's shift, in float64
    h_loss.backward()
    h_grads = hf_grads(model)
    assert list(ours_grads) == list(t_grads) and set(h_grads) == set(ours_grads)

    ours_out = {"logits": logits, "loss": loss, "logits_full": logits_full}
    hf_out = {"logits": h_logits[:, :-1], "loss": h_loss, "logits_full": h_logits}
    compare_outputs_and_grads(ours_out, hf_out, ours_grads, h_grads, np.float64, f"npgpt vs HF {case}", n, depth)
    compare_outputs_and_grads({"logits": logits, "loss": loss}, {"logits": t_logits, "loss": t_loss},
                              ours_grads, t_grads, np.float64, f"npgpt vs torchgpt {case}", n, depth)
    compare_outputs_and_grads({"logits": t_logits, "loss": t_loss}, {"logits": h_logits[:, :-1], "loss": h_loss},
                              t_grads, h_grads, np.float64, f"torchgpt vs HF {case}", n, depth)

    with torch.no_grad():  # HF's own labels loss: the same shifted targets, its logits rounded to float32
        labels_loss = model(idx_t, labels=idx_t).loss
    assert labels_loss.dtype == torch.float32
    compare_outputs_and_grads({"labels loss": loss}, {"labels loss": labels_loss}, {}, {}, np.float32,
                              f"npgpt vs HF labels=idx {case}", n, depth)


def uncached_greedy(model, idx, steps):
    """Greedy tokens from full uncached forwards, the smallest top-2 logit gap met and the largest
    norm of a last position's logits (B, V) (the window never slides: T + steps <= block_size)."""
    gap, norm = np.inf, 0.0
    for _ in range(steps):
        last = model.forward(idx)[0][:, -1]  # (B, V)
        top2 = np.sort(last, axis=-1)[:, -2:]
        gap = min(gap, float((top2[:, 1] - top2[:, 0]).min()))
        norm = max(norm, float(np.linalg.norm(last)))
        idx = np.concatenate([idx, last.argmax(-1)[:, None]], axis=1)
    return idx, gap, norm


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_same_ids_three_ways(models, case):
    model, config, params = models[case]
    prompt = np.random.default_rng([len(case), 6]).integers(0, config.vocab_size, (2, 2))
    steps = BLOCK - prompt.shape[1]  # HF's learned positions end at n_positions: no sliding window
    ours = npgpt_model(config, params).eval()
    reference, gap, norm = uncached_greedy(ours, prompt, steps)
    # a near-tie could flip on rounding alone: each logit errs by at most the forward's bound times
    # the logits' norm, so a gap of twice that is safe
    error = bounds(np.float64, *parity_sizes(config, prompt.shape[0], BLOCK))["forward"] * norm
    assert gap > 2 * error, (gap, error)
    print(f"{case}: greedy ids {reference.tolist()}, smallest top-2 gap {gap:.3g}")

    results = {
        "npgpt cached": ours.generate(prompt, steps, temperature=0.0, use_cache=True),
        "npgpt uncached": ours.generate(prompt, steps, temperature=0.0, use_cache=False),
        "torchgpt cached": torch_model(config, params).eval().generate(torch.from_numpy(prompt), steps,
                                                                      temperature=0.0).numpy(),
    }
    prompt_t = torch.from_numpy(prompt)
    for use_cache in (True, False):
        with torch.no_grad():
            out = model.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=steps,
                                 min_new_tokens=steps, do_sample=False, use_cache=use_cache, pad_token_id=0)
        results[f"HF use_cache={use_cache}"] = out.numpy()
    for name, ids in results.items():
        assert np.array_equal(ids, reference), (name, ids.tolist(), reference.tolist())
