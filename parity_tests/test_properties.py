"""Property tests (hypothesis): parity over drawn shapes, configurations and values.

Drawn: batch B and time T (1 up to block_size), n_embd, n_head (1 included), n_layer, vocabulary
(2 included), activation, bias, tied head, dropout with shared masks, both torch attention paths,
the modern block's switches (norm, RoPE and its theta, QK-norm, relu2/swiglu, the MLP width),
token ids (random, or long runs of one id), and large logits (the output head scaled up 30x,
and logits of +-1e3 fed to softmax and cross-entropy).

Profiles (parity_tests/conftest.py): "ci" by default (few derandomized examples), "deep" with
HYPOTHESIS_PROFILE=deep for hunting.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import npgpt
from npgpt import bounds
from npgpt import layers as L
from npgpt.compare import bounds as parity_bounds
from npgpt.compare import compare_all, compare_outputs_and_grads
from parity_tests.layer_twins import (
    cross_entropy_loss_rounding_bound,
    cross_entropy_rounding_bound,
    softmax_backward_rounding_bound,
    torch_attention,
)
from parity_tests.twins import describe, make_npgpt, pair_results, parity_sizes, torch_twin
from torchgpt.model import LayerNorm


@st.composite
def model_cases(draw, n_embd_choices=None):
    """(config, attention, idx, head_scale, seed); n_embd >= 4 unless n_embd_choices is given.

    With n_embd >= 4 the modern block's fields are drawn too: norm, pos_emb (RoPE
    needs an even head size), rope_theta, qk_norm (over hs >= 2: an RMSNorm over one channel is
    x / |x|, as ill-conditioned as layernorm's narrow rows), activation relu2/swiglu, mlp_hidden.
    The narrow cases keep the lecture's block, whose layernorm their bounds are derived for.
    """
    modern = {}
    if n_embd_choices is None:
        n_head = draw(st.integers(1, 3))
        head_size = draw(st.integers(max(1, -(-4 // n_head)), 6))  # n_embd = n_head * hs >= 4
        pos_emb = draw(st.sampled_from(["learned", "rope"]))
        if pos_emb == "rope":
            head_size += head_size % 2  # even
        n_embd = n_head * head_size
        modern = dict(
            norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
            pos_emb=pos_emb,
            rope_theta=draw(st.sampled_from([10000.0, 10.0])),
            qk_norm=head_size >= 2 and draw(st.booleans()),
            mlp_hidden=draw(st.sampled_from([None, 5, 3 * n_embd])),
        )
        activations = ["relu", "gelu", "gelu_tanh", "relu2", "swiglu"]
    else:
        n_embd = draw(st.sampled_from(n_embd_choices))
        n_head = draw(st.sampled_from([h for h in (1, 2, 3) if n_embd % h == 0]))
        activations = ["relu", "gelu", "gelu_tanh"]
    block_size = draw(st.integers(1, 8))
    config = npgpt.GPTConfig(
        vocab_size=draw(st.integers(2, 12)),
        block_size=block_size,
        n_layer=draw(st.integers(1, 2)),
        n_head=n_head,
        n_embd=n_embd,
        dropout=draw(st.sampled_from([0.0, 0.3])),
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(activations)),
        tie_weights=draw(st.booleans()),
        **modern,
    )
    B = draw(st.integers(1, 3))
    T = draw(st.one_of(st.just(block_size), st.just(1), st.integers(1, block_size)))
    ids = draw(st.sampled_from(["random", "one id", "runs"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    V = config.vocab_size
    if ids == "random":
        idx = rng.integers(0, V, (B, T))
    elif ids == "one id":  # every position the same token
        idx = np.full((B, T), int(rng.integers(0, V)))
    else:  # each row one long run of a single id, then random
        idx = rng.integers(0, V, (B, T))
        idx[:, : max(1, 3 * T // 4)] = rng.integers(0, V, (B, 1))
    attention = draw(st.sampled_from(["explicit", "sdpa"]))
    head_scale = draw(st.sampled_from([1.0, 30.0]))
    return config, attention, idx, head_scale, seed


def run_model_case(case, dtype=np.float64):
    """Build the pair, scale the head, pick targets; returns (model, pair_results(...), scale, targets).

    A gradient is a sum over the N = B*T positions of per-position gradients g_n, and these can
    cancel: hypothesis found V = 2, B*T = 2 cases where block 1's gradients were 1e-3 of the
    positions' terms (rel error 2e-12 at 3e-16 absolute), and, with a scaled-up head, two
    saturated rows pulling in exactly opposite directions ("0 not 1" and "1 not 0") that left
    ln_f.bias's gradient at ~1e-13 of its terms (rel 2.7e-2 at 4e-16 absolute). The rounding
    error of such a sum is relative to its terms, not to the result, in any implementation. So
    here the error of each gradient is measured against ||scale||, scale = sum_n |g_n| (from
    torch), which equals ||gradient|| when the positions agree and is at most ~sqrt(N) times it
    for random data. test_model keeps the plain relative bound on its fixed cases.

    Targets are random. With the head scaled up 30x the logits are ~30 apart, and a row whose
    target is its top token has a gradient p - onehot ~ e^-30 made of O(1) terms: rounding, in
    any implementation, even per position (test_layers.test_cross_entropy_confident_rows). So
    with a scaled head every target is its row's LEAST likely token: each row's gradient is O(1/N).
    """
    config, attention, idx, head_scale, seed = case
    model = make_npgpt(config, dtype, seed).train()
    rng = np.random.default_rng([seed, 1])
    targets = rng.integers(0, config.vocab_size, idx.shape)
    masks = None
    if head_scale != 1.0:
        key = "transformer.wte.weight" if config.tie_weights else "lm_head.weight"
        model.params[key] *= model.dtype.type(head_scale)
        logits, _ = model.forward(idx)  # draws the dropout masks, which the real pass reuses
        masks = model.last_dropout_masks or None
        targets = np.argmin(logits, axis=-1)  # (B, T): every row confidently wrong
    results = pair_results(model, idx, targets, attention, masks=masks)
    masks = model.last_dropout_masks or None
    return model, results, per_position_magnitudes(model, idx, targets, masks, attention), targets


def case_bounds(case) -> dict[str, float]:
    """npgpt.compare.bounds for the case's model and batch: {"forward": logits and loss, "grad"}."""
    config, _, idx, _, _ = case
    return parity_bounds(np.float64, *parity_sizes(config, *idx.shape))


def per_position_magnitudes(model, idx, targets, masks, attention) -> dict[str, np.ndarray]:
    """{name: sum over positions n of |d loss_n / d param|}, loss = sum_n loss_n, in torch float64."""
    twin = torch_twin(model, attention).train()
    masks_t = None if masks is None else [torch.from_numpy(m) for m in masks]
    logits, _ = twin(torch.from_numpy(idx), dropout_masks=masks_t)
    V = logits.shape[-1]
    losses = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(targets).reshape(-1), reduction="none")
    losses = losses / losses.numel()  # (N,) the mean's terms
    named = dict(twin.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    for n in range(losses.numel()):
        grads = torch.autograd.grad(losses[n], list(named.values()), retain_graph=True, allow_unused=True)
        for name, g in zip(named, grads):
            if g is not None:
                total[name] += g.abs()
    return {n: t.numpy() for n, t in total.items()}


def compare_model(case, ours_fwd, theirs_fwd, ours_grads, theirs_grads, scale, rtol: dict, atol: dict,
                  extra=""):
    """Logits and loss to the case's forward bound; gradients to `rtol`, relative to ||scale|| (see
    run_model_case)."""
    tight = case_bounds(case)["forward"]
    compare_all({**ours_fwd, **ours_grads}, {**theirs_fwd, **theirs_grads},
                rtol={"logits": tight, "loss": tight, **rtol}, atol=atol, header=header(case, extra),
                scale={n: scale[n] for n in rtol if n in scale})


def header(case, extra=""):
    config, attention, idx, head_scale, _ = case
    return f"{describe(config)} {attention} B,T={idx.shape} head x{head_scale:g}{extra}"


# --------------------------------------------------------------------------------------------
# Whole model, n_embd >= 4: float64 at the case's parity bound
# --------------------------------------------------------------------------------------------

@given(model_cases())
@example((npgpt.GPTConfig(vocab_size=2, block_size=1, n_layer=1, n_head=1, n_embd=4), "explicit",
          np.zeros((1, 1), dtype=np.int64), 1.0, 0))  # the smallest model: V=2, T=1, one head
@example((npgpt.GPTConfig(vocab_size=3, block_size=8, n_layer=2, n_head=1, n_embd=4, dropout=0.3),
          "sdpa", np.full((2, 8), 2), 30.0, 1))  # one id everywhere, T = block_size, large logits
def test_model_parity_float64(case):
    _, (ours_fwd, theirs_fwd, ours_grads, theirs_grads), scale, _ = run_model_case(case)
    tight = case_bounds(case)["grad"]
    rtol, atol = {n: tight for n in theirs_grads}, {}
    config = case[0]
    for i in range(config.n_layer if config.qk_norm else 0):
        # QK-norm's gains reach the loss only through the attention weights. Where those cannot
        # matter, their true gradient is 0 and both sides hold rounding noise (~1e-18 seen): with
        # T = 1 (one key per query, weight 1), or when every value a query sees is the same (one
        # token id everywhere: any weights average equal v's). There sum_n |g_n| (`scale`, from
        # torch) is itself noise (at most the rounding bound times c_attn's), so rel means nothing;
        # such a gain is held, on both sides, to an absolute bound: the rounding bound times the
        # gradient the same positions give c_attn (its v rows).
        c_attn = f"transformer.h.{i}.attn.c_attn.weight"
        c_attn_norm = float(np.linalg.norm(theirs_grads[c_attn].numpy()))
        for gain in ("q_norm", "k_norm"):
            name = f"transformer.h.{i}.attn.{gain}.weight"
            if np.linalg.norm(scale[name]) <= tight * np.linalg.norm(scale[c_attn]):
                del rtol[name]
                atol[name] = tight * c_attn_norm
                assert np.abs(ours_grads[name]).max() <= atol[name], name
    compare_model(case, ours_fwd, theirs_fwd, ours_grads, theirs_grads, scale, rtol, atol)


# --------------------------------------------------------------------------------------------
# Whole model, n_embd 1..3: a layernorm over so few channels is ill-conditioned
# --------------------------------------------------------------------------------------------

# A layernorm's input gradient is g = dout * w with its components along (1, .., 1) and along xhat
# removed (test_layers.test_layernorm_narrow): what is left lives in C - 2 dimensions.
# n_embd = 2: nothing is left but an eps / (var + eps) ~ 1e-5 remainder (less for larger
#   activations: the head scaled 30x with tied weights scales the embeddings too), so every
#   gradient upstream of a layernorm loses log10((var + eps) / eps) ~ 5-7 digits, and up to 2 more
#   when the two channels nearly coincide.
# n_embd = 3: one direction is left, and g can by chance lie almost in the removed plane: dx then
#   cancels to a fraction t of rstd |g| with probability ~t (hypothesis found a row with t = 1e-3:
#   rel 2.3e-12). For C >= 4 the chance is ~t^(C-2), which is why tight cases use n_embd >= 4.
# Both get narrow_rtol on every gradient upstream of a layernorm: the parity bound times the
# amplification the narrow rows give it (narrow_amplification, measured on the case's own rows; the
# worst error seen over ~5000 "deep" examples was 5e-8); ln_f.bias and the head are upstream of none
# and keep the tight bound.
# n_embd = 1: x - mean = 0 exactly, every layernorm outputs its bias, and the logits do not depend
#   on anything before ln_f: those gradients are exactly 0 (ours are, which is asserted), and so is
#   the head's without biases (ln_f then outputs 0). torch's are rounding noise of size
#   eps_mach * rstd * |g| per position, rstd = 1/sqrt(1e-5) ~ 316, g the gradient at ln_f's output,
#   at most 2 max|W_head| max|ln_f.weight| / N per element; a parameter sums N positions. They are
#   compared by absolute error against zero_grad_atol, 64 eps_mach rstd 2 max|W_head| max|w_lnf|
#   (bounds.elementwise, eps_mach = 2 u; the worst seen over ~2000 "deep" examples was 0.05 of it).
#   With a tied head, wte's gradient
#   is the head's (nonzero) plus such noise, so it is held to the same absolute bound; ln_f.bias
#   and an untied head carry no noise and keep the tight relative bound.
def narrow_amplification(model, idx, masks, attention) -> float:
    """How far a narrow layernorm's input gradient cancels below the terms it is computed from,
    maximised over the rows of the case's layernorms (read from torch's forward): the amplification
    (npgpt.bounds.chain's) of the rounding error of every gradient upstream of one.

    test_layers.test_layernorm_narrow: over two channels dx is exactly a fraction eps / (var + eps)
    of its terms, rstd |g|, each rounded with a further factor (1 + max|x| rstd) from x - mean's
    own rounding: the amplification (var + eps) / eps (1 + max|x| rstd), ~1e5 for unit variance.
    Over three channels dx cancels to a fraction t by chance (probability ~t); the same factor
    covers t down to eps / (var + eps).
    """
    twin = torch_twin(model, attention).train()
    worst = [1.0]

    def hook(module, args, _output):
        x = args[0].detach().double()
        var = x.var(dim=-1, unbiased=False)
        rstd = 1.0 / torch.sqrt(var + module.eps)
        factor = (var + module.eps) / module.eps * (1 + x.abs().amax(dim=-1) * rstd)
        worst.append(float(factor.max()))

    handles = [m.register_forward_hook(hook) for m in twin.modules() if isinstance(m, LayerNorm)]
    masks_t = None if masks is None else [torch.from_numpy(m) for m in masks]
    with torch.no_grad():
        twin(torch.from_numpy(idx), dropout_masks=masks_t)
    for h in handles:
        h.remove()
    return max(worst)


def zero_grad_atol(model) -> float:
    P = model.params
    head = P["transformer.wte.weight" if model.config.tie_weights else "lm_head.weight"]
    g_sum = 2 * np.abs(head).max() * np.abs(P["transformer.ln_f.weight"]).max()  # N positions x g_max
    return float(bounds.elementwise(np.float64, 64 * g_sum / np.sqrt(L.LAYERNORM_EPS)))


@given(model_cases(n_embd_choices=[1, 2, 3]))
@example((npgpt.GPTConfig(vocab_size=2, block_size=4, n_layer=2, n_head=1, n_embd=1, tie_weights=False),
          "explicit", np.array([[0, 1, 1, 0]]), 1.0, 0))
def test_model_parity_narrow(case):
    config = case[0]
    model, (ours_fwd, theirs_fwd, ours_grads, theirs_grads), scale, _ = run_model_case(case)
    noise_free = ("transformer.ln_f.bias", "lm_head.weight")  # no layernorm backward before them
    tight = case_bounds(case)["grad"]
    if config.n_embd == 1:
        rtol, atol = {}, {}
        for name in theirs_grads:
            if config.bias and name in noise_free:
                rtol[name] = tight  # nonzero, and no noise in them
            else:
                if not (config.bias and config.tie_weights and name == "transformer.wte.weight"):
                    assert np.all(ours_grads[name] == 0), name  # the exact value, 0
                atol[name] = zero_grad_atol(model)
    else:
        masks = model.last_dropout_masks or None
        narrow = tight * narrow_amplification(model, case[2], masks, case[1])
        rtol = {n: tight if n in noise_free else narrow for n in theirs_grads}
        atol = {}
    compare_model(case, ours_fwd, theirs_fwd, ours_grads, theirs_grads, scale, rtol, atol, " (narrow)")


# --------------------------------------------------------------------------------------------
# Softmax and cross-entropy with large logits
# --------------------------------------------------------------------------------------------

logit_rows = st.tuples(
    st.integers(1, 6),  # N rows
    st.integers(2, 12),  # V, 2 included
    st.sampled_from([-1e3, 0.0, 1e3]),  # offset: exp(+-1e3) overflows/underflows without the max shift
    st.sampled_from([0.1, 1.0, 10.0, 100.0, 1e3]),  # spread: up to one-hot in floating point
    st.sampled_from(["random", "argmax", "argmin"]),  # cross-entropy targets
    st.integers(0, 2**16),
    st.sampled_from([np.float64, np.float32]),
)


@given(logit_rows)
def test_softmax_cross_entropy_large_logits(case):
    """Outputs to the tight relative bound; gradients per element to their rounding-error bound
    (test_layers), which stays meaningful when rows are nearly one-hot."""
    N, V, offset, spread, target_rule, seed, dtype = case
    rng = np.random.default_rng(seed)
    x = (offset + spread * rng.standard_normal((N, V))).astype(dtype)
    dout = rng.standard_normal((N, V)).astype(dtype)
    targets = {"random": rng.integers(0, V, N), "argmax": x.argmax(-1), "argmin": x.argmin(-1)}[target_rule]
    dloss = float(rng.uniform(0.5, 2.0))

    y, cache = L.softmax_forward(x)
    (dx,) = L.softmax_backward(dout, cache)
    loss, c_loss = L.cross_entropy_forward(x, targets)
    (dlogits,) = L.cross_entropy_backward(dloss, c_loss)

    x_t = torch.tensor(x, requires_grad=True)
    y_t = F.softmax(x_t, dim=-1)
    (dx_t,) = torch.autograd.grad(y_t, x_t, torch.from_numpy(dout))
    loss_t = F.cross_entropy(x_t, torch.from_numpy(targets))
    (dlogits_t,) = torch.autograd.grad(loss_t, x_t, torch.tensor(dloss, dtype=x_t.dtype))

    tol = parity_bounds(dtype, V, 1)["forward"]  # one stage: a row's V exps
    compare_all(
        {"softmax": y, "dx": dx, "loss": loss, "dlogits": dlogits},
        {"softmax": y_t, "dx": dx_t, "loss": loss_t, "dlogits": dlogits_t},
        rtol={"softmax": tol},
        atol={"dx": softmax_backward_rounding_bound(y_t.detach().numpy(), dout, dtype),
              "loss": cross_entropy_loss_rounding_bound(x, targets, dtype),
              "dlogits": cross_entropy_rounding_bound(x, targets, dloss, dtype)},
        header=f"softmax/CE N={N} V={V} offset={offset:g} spread={spread:g} {target_rule} "
               f"[{np.dtype(dtype).name}]")


# --------------------------------------------------------------------------------------------
# Attention over drawn shapes
# --------------------------------------------------------------------------------------------

@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 9), st.booleans(),
       st.integers(0, 2**16))
def test_attention_shapes(B, n_head, head_size, T, dropout, seed):
    rng = np.random.default_rng(seed)
    C = n_head * head_size
    qkv = rng.standard_normal((B, T, 3 * C))
    mask = L.dropout_mask((B, n_head, T, T), 0.4, rng, np.float64) if dropout else None
    out, cache = L.attention_forward(qkv, n_head, 0.4 if dropout else 0.0, mask=mask)
    dout = rng.standard_normal(out.shape)
    (dqkv,) = L.attention_backward(dout, cache)
    qkv_t = torch.tensor(qkv, requires_grad=True)
    out_t = torch_attention(qkv_t, n_head, None if mask is None else torch.from_numpy(mask))
    (dqkv_t,) = torch.autograd.grad(out_t, qkv_t, torch.from_numpy(dout))
    compare_outputs_and_grads({"out": out}, {"out": out_t}, {"dqkv": dqkv}, {"dqkv": dqkv_t}, np.float64,
                              f"attention B={B} nh={n_head} hs={head_size} T={T} dropout={dropout}",
                              n=max(head_size, T), depth=3)  # the scores, the softmax, the values
