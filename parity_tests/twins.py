"""The same model built twice: an npgpt model with random parameters and its torchgpt twin.

Used by test_model, test_cuda, test_properties, test_training, test_generate and report, so that
every model-level comparison builds its pair the same way.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch

import npgpt
from npgpt import bounds
import npgpt.fast
import torchgpt
from npgpt.compare import compare_outputs_and_grads
from npgpt.config import GPTConfig
from torchgpt.convert import load_params



def _tests_helper(name: str):
    """A helper module of tests/ (a folder of modules, not a package) by its path, once per process."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tests" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


# The one parameter-shape oracle of the tests (tests/shapes.py): names and shapes from the contract.
expected_param_shapes = _tests_helper("shapes").expected_param_shapes

def randn(rng, shape, dtype, scale=1.0, offset=0.0) -> np.ndarray:
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}

# The two npgpt implementations every model-level parity test runs: the plain reference and the
# fast path (same constructor, params and methods), as pytest params with readable ids.
MODEL_CLASSES = {"reference": npgpt.GPT, "fast": npgpt.fast.GPT}


def small_config(**overrides) -> npgpt.GPTConfig:
    """The default parity config: small enough that one forward + backward takes milliseconds,
    big enough that every part (2 layers, 2 heads, full block) takes part."""
    kw = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    kw.update(overrides)
    return npgpt.GPTConfig(**kw)


# Stages of one layer's forward: 2 norms, 4 attention matmuls (qkv, q k^T, att v, the projection),
# the softmax, 2 MLP matmuls, the activation; QK-norm adds 2 norms, RoPE 2 rotations.
STAGES_PER_LAYER = 10


def block_parity_sizes(config: npgpt.GPTConfig, B: int, T: int) -> tuple[int, int]:
    """(n, depth) of one block's forward on a (B, T, n_embd) input, for npgpt.compare.bounds:
    n is its longest sum (a matmul's inner dimension: n_embd; 3 n_embd for the qkv projection's
    input gradient; the MLP's hidden width, twice that for SwiGLU's input gradient; T keys; the
    head size; or the B*T positions a weight's gradient sums over), depth its stages
    (STAGES_PER_LAYER, plus QK-norm's two norms and RoPE's two rotations)."""
    C, H, hs = config.n_embd, config.mlp_hidden_size, config.head_size
    fc = 2 * H if config.activation == "swiglu" else H
    n = max(3 * C, fc, T, hs, B * T)
    return n, STAGES_PER_LAYER + 2 * bool(config.qk_norm) + 2 * (config.pos_emb == "rope")


def parity_sizes(config: npgpt.GPTConfig, B: int, T: int | None = None) -> tuple[int, int]:
    """(n, depth) of a GPT's forward on a (B, T) batch (T = block_size by default), for
    npgpt.compare.bounds: the blocks' (block_parity_sizes), with the vocabulary among the sums (the
    head's input gradient), and depth n_layer blocks plus the embedding, the head and the loss."""
    T = config.block_size if T is None else T
    n, per_layer = block_parity_sizes(config, B, T)
    return max(n, config.vocab_size), config.n_layer * per_layer + 3


def training_bound(config: npgpt.GPTConfig, B: int, T: int, steps: int, n_params: int) -> float:
    """The float64 bound of a training run of `steps` steps in both backends, from the same init on
    the same batches: the loss at every step and the parameters at the end, normwise.

    Each step is a forward and backward (npgpt.bounds.parity over parity_sizes(config, B, T), the
    backward retracing the forward's stages) and a gradient clip, whose global norm sums the squares
    of all n_params parameters (bounds.reordered, terms of one sign); the optimizer's update is
    elementwise, a few roundings more. A step's errors carry into the parameters and from there into
    every later step, independent of the other steps' errors: they add in quadrature, sqrt(steps)
    times one step's (bounds.chain's rule).
    """
    n, depth = parity_sizes(config, B, T)
    step = math.hypot(bounds.parity(np.float64, n, 2 * depth),
                      bounds.reordered(np.float64, n_params, cancellation=1.0))
    return math.sqrt(steps) * step


def describe(config: npgpt.GPTConfig) -> str:
    """A short name for a config in table headers: 'L2 nh2 C16 V11 bs8 gelu bias tied p=0.2'."""
    c = config
    return (f"L{c.n_layer} nh{c.n_head} C{c.n_embd} V{c.vocab_size} bs{c.block_size} {c.activation} "
            f"{'bias' if c.bias else 'nobias'} {'tied' if c.tie_weights else 'untied'} p={c.dropout}")


def randomize(params: dict, seed: int, scale: float = 0.2) -> None:
    """Add N(0, scale^2) noise to every parameter, in place.

    nanoGPT's init has zero biases, unit gains and std 0.02 weights: the biases would then play no
    part in the forward, and the attention would be nearly uniform. Noise makes every parameter
    matter, so a wrong gradient anywhere changes the result.
    """
    rng = np.random.default_rng([seed, 7])
    for p in params.values():
        p += rng.normal(0.0, scale, p.shape).astype(p.dtype)


def make_npgpt(config: npgpt.GPTConfig, dtype=np.float64, seed: int = 0, scale: float = 0.2,
               model_class=npgpt.GPT) -> npgpt.GPT:
    """A `model_class` (npgpt.GPT or npgpt.fast.GPT) of `config` with noisy parameters."""
    model = model_class(config, seed=seed, dtype=dtype)
    randomize(model.params, seed, scale)
    return model


def torch_twin(model: npgpt.GPT, attention: str = "explicit", device: str = "cpu") -> torchgpt.GPT:
    """A torchgpt.GPT holding exactly npgpt's weights, in npgpt's dtype, on `device`."""
    twin = torchgpt.GPT(model.config, attention=attention).to(TORCH_DTYPE[model.dtype])  # cast first:
    load_params(twin, model.params)  # load_params casts to the model's dtype
    return twin.to(device)


def batch(config: npgpt.GPTConfig, B: int, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 3])
    return (rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T)))


def torch_forward_backward(twin: torch.nn.Module, idx, targets, masks=None, device: str = "cpu"):
    """One training step's forward and backward in torch: ({"logits", "loss"}, {name: grad})."""
    twin.zero_grad(set_to_none=True)
    idx_t = torch.as_tensor(idx, dtype=torch.long, device=device)
    tgt_t = torch.as_tensor(targets, dtype=torch.long, device=device)
    masks_t = None if masks is None else [torch.from_numpy(np.asarray(m)).to(device) for m in masks]
    logits, loss = twin(idx_t, tgt_t, dropout_masks=masks_t)
    loss.backward()
    grads = {}
    for name, p in twin.named_parameters():
        if p.grad is None:
            raise AssertionError(f"torch gave no gradient for {name}")
        grads[name] = p.grad
    return {"logits": logits, "loss": loss}, grads


def pair_results(model: npgpt.GPT, idx, targets, attention: str = "explicit", device: str = "cpu",
                 masks: list | None = None):
    """Forward + backward of `model` (training mode) and of its torch twin on the same batch.

    With dropout on, npgpt uses `masks` if given, else draws them; torch replays npgpt's masks.
    Returns (ours_fwd, theirs_fwd, ours_grads, theirs_grads), the forward dicts keyed "logits", "loss".
    """
    model.train()
    logits, loss = model.forward(idx, targets, dropout_masks=masks)
    grads = model.backward()
    masks = model.last_dropout_masks if model.config.dropout > 0 else None
    if model.config.dropout > 0:
        assert len(masks) == 1 + 3 * model.config.n_layer
    twin = torch_twin(model, attention, device).train()
    theirs_fwd, theirs_grads = torch_forward_backward(twin, idx, targets, masks, device)
    return {"logits": logits, "loss": loss}, theirs_fwd, grads, theirs_grads


def model_pair_results(config: npgpt.GPTConfig, dtype=np.float64, attention: str = "explicit",
                       device: str = "cpu", B: int = 3, T: int | None = None, seed: int = 0,
                       model_class=npgpt.GPT):
    """pair_results for a random GPT of `config` on a random (B, T) batch (T = block_size)."""
    T = config.block_size if T is None else T
    model = make_npgpt(config, dtype, seed, model_class=model_class)
    idx, targets = batch(config, B, T, seed)
    return pair_results(model, idx, targets, attention, device)


# --------------------------------------------------------------------------------------------
# Shared by the parity tests of the model, CUDA, properties, optimizers and training
# --------------------------------------------------------------------------------------------

def modern_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    kw.update(overrides)
    return GPTConfig(**kw)


SWITCHES = {
    "default": dict(),
    "rmsnorm": dict(norm="rmsnorm"),
    "rope": dict(pos_emb="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "swiglu-H24": dict(activation="swiglu", mlp_hidden=24),
    "mlp_hidden-40": dict(mlp_hidden=40, activation="gelu_tanh"),
    "modern": dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="swiglu", bias=False,
                   tie_weights=False, norm_eps=1e-6, rope_theta=500.0),
    "modern-relu2-bias": dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="relu2"),
}


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


ATTENTIONS = ["explicit", "sdpa"]


def newton_schulz_bound(dtype, shapes, ns_steps: int, ns_coefficients, steps: int = 1) -> float:
    """The normwise bound of `steps` Muon updates, each a Newton-Schulz iteration: per iteration 3
    matmul stages (the Gram matrix, the polynomial, the new iterate), plus the normalisation and the
    momentum's lerp; the longest sum is a matrix's larger side. Each iterate a x + b (x x^T) x +
    c (x x^T)^2 x adds terms up to sum |coefficient| times the result (singular values <= 1): the
    amplification. bounds.chain over all the stages of all the steps."""
    n = max(max(s) for s in shapes)
    amplification = sum(abs(c) for c in ns_coefficients)
    return bounds.chain(dtype, n, steps * (3 * ns_steps + 2), amplification)


def torch_muon_step_float64(params, grads, bufs, lr, weight_decay, momentum, nesterov,
                            ns_coefficients, eps, ns_steps, adjust_lr_fn):
    """torch.optim.Muon's step (torch/optim/_muon.py, _single_tensor_muon), restated with every
    operation in float64: the same lerps, the same addmm forms, but no cast to bfloat16."""
    a, b, c = ns_coefficients
    for name, p in params.items():
        g, buf = grads[name], bufs[name]
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        x = update.T if update.size(0) > update.size(1) else update
        x = x / x.norm().clamp(min=eps)
        for _ in range(ns_steps):
            gram = x @ x.T
            gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, gram_update, x, beta=a)
        if update.size(0) > update.size(1):
            x = x.T
        rows, cols = p.shape
        if adjust_lr_fn in (None, "original"):
            adj = lr * math.sqrt(max(1, rows / cols))
        else:
            adj = lr * 0.2 * math.sqrt(max(rows, cols))
        p.mul_(1 - lr * weight_decay)
        p.add_(x, alpha=-adj)
