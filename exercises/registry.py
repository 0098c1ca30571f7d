"""The exercises: one per forward/backward pair of npgpt/layers.py, the block and the model.

Each `Exercise` names the reference pair it follows, the docs/gradients.md section that derives it,
how its forward is called on a case's arrays, which gradients its backward returns, and its cases:
several shapes and seeds, edge cases included (T = 1, one head, a repeated token id, zero inputs
where they matter). Everything is float64. The checker (exercises.check) runs the same cases in the
parent and in the worker (exercises._worker), which builds the caches and calls the student's code.

Dimension letters as in npgpt.layers: B batch, T time, C channels, nh heads, hs head size, V vocab.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from npgpt import bounds
from npgpt import layers as L
from npgpt.config import GPTConfig
from npgpt.model import BLOCK_PARAM_NAMES, GPTCache, param_shapes

from . import reference

GRADIENTS_MD = "docs/gradients.md"


@dataclass
class Case:
    """One input to a pair: the forward's arrays (inputs and constants, by name), its JSON-able
    settings, and whether centred finite differences apply (not at a kink or a flat norm row)."""
    label: str
    arrays: dict
    options: dict = field(default_factory=dict)
    fd: bool = True


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str  # one line for `list`
    anchor: str  # the section of docs/gradients.md that derives the backward
    forward: Callable  # the reference pair
    backward: Callable
    cache_type: type  # the reference forward's cache: its fields go into the template
    signature: str  # the forward's parameters as the student's NAME_forward takes them
    kind: str  # "tuple": returns a tuple of arrays; "block": (dx, {name: grad}); "model": {name: grad}
    call: Callable  # call(forward_fn, arrays, options) -> (out, cache)
    make_cases: Callable  # make_cases(rng) -> list[Case]
    grads: tuple = ()  # "tuple" kind: the returned gradients' names, in order ...
    wrt: tuple = ()  # ... and the inputs they are gradients of
    scalar_out: bool = False  # the forward returns a loss: dout is a float (dloss)
    depth: int = 2  # stages of the forward and the final sum(out * dout), for the bounds
    amplification: float = 1.0
    fd_entries: int | None = None  # finite differences on this many entries of each tensor (None: all)
    notes: str = ""  # extra lines for the template

    @property
    def doc(self) -> str:
        return f"{GRADIENTS_MD}#{self.anchor}"

    def grad_names(self, case: Case) -> tuple:
        if self.kind == "tuple":
            return self.grads
        if self.kind == "block":
            return ("dx", *case.options["params"])
        return tuple(case.options["params"])

    def wrt_names(self, case: Case) -> tuple:
        if self.kind == "tuple":
            return self.wrt
        if self.kind == "block":
            return ("x", *case.options["params"])
        return tuple(case.options["params"])

    def returns(self, case: Case | None = None) -> str:
        """What the backward returns, in words, for the template and the messages."""
        if self.kind == "tuple":
            return "(" + ", ".join(self.grads) + ("," if len(self.grads) == 1 else "") + ")"
        if self.kind == "block":
            return "(dx, grads): grads a dict keyed by the block's local parameter names"
        return "a dict of gradients keyed by the parameter names"


# --------------------------------------------------------------------------------------------
# Drawing cases
# --------------------------------------------------------------------------------------------

def _normal(rng, shape, scale=1.0, offset=0.0):
    return offset + scale * rng.standard_normal(shape)


def _away_from_zero(rng, shape, margin=0.1):
    """Unit-scale values at least `margin` from 0, where a kink at 0 spoils finite differences."""
    x = rng.standard_normal(shape)
    return np.sign(x) * (margin + np.abs(x))


def _with_zeros(rng, shape):
    """Unit-scale values, a third of them exactly 0."""
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 1 / 3] = 0.0
    x.flat[0] = 0.0
    return x


def _gain(rng, C):
    return 1.0 + _normal(rng, (C,), 0.3)


def _activation_cases(rng, kink: bool):
    """Cases of an elementwise activation: kink=True keeps the points away from 0 (ReLU, ReLU²),
    and puts the zeros in a case of their own without finite differences."""
    draw = _away_from_zero if kink else (lambda r, s: _normal(r, s, 2.0))
    return [
        Case("B=2 T=3 C=4", {"x": draw(rng, (2, 3, 4))}),
        Case("B=1 T=1 C=5 (one time step)", {"x": draw(rng, (1, 1, 5))}),
        Case("B=2 T=2 C=3, a third of x exactly 0", {"x": _with_zeros(rng, (2, 2, 3))}, fd=not kink),
    ]


def _linear_cases(rng):
    def case(label, x_shape, n_out):
        n_in = x_shape[-1]
        return Case(label, {"x": _normal(rng, x_shape), "w": _normal(rng, (n_out, n_in), 1 / math.sqrt(n_in)),
                            "b": _normal(rng, (n_out,), 0.5)})
    return [case("B=2 T=3 in=4 out=5", (2, 3, 4), 5),
            case("B=1 T=1 in=3 out=3 (one time step, square w)", (1, 1, 3), 3),
            case("N=4 in=3 out=2 (2-D input)", (4, 3), 2)]


def _norm_cases(rng, with_bias: bool):
    def case(label, shape, fd=True, zero_row=False, offset=0.0):
        x = _normal(rng, shape, 2.0, offset)
        if zero_row:
            x[0, 0] = 0.0
        arrays = {"x": x, "w": _gain(rng, shape[-1])}
        if with_bias:
            arrays["b"] = _normal(rng, (shape[-1],), 0.5)
        return Case(label, arrays, fd=fd)
    return [case("B=2 T=3 C=6", (2, 3, 6)),
            case("B=1 T=1 C=4 (one time step)", (1, 1, 4)),
            case("B=2 T=2 C=5, rows offset by 3 (mean far from 0)", (2, 2, 5), offset=3.0),
            case("B=2 T=2 C=4, one row all zeros", (2, 2, 4), fd=False, zero_row=True)]


def _softmax_cases(rng):
    return [Case("B=2 T=3 V=5", {"x": _normal(rng, (2, 3, 5), 2.0)}),
            Case("B=1 T=1 V=4 (one time step)", {"x": _normal(rng, (1, 1, 4), 2.0)}),
            Case("B=2 T=2 V=3, all inputs 0 (uniform rows)", {"x": np.zeros((2, 2, 3))})]


def _dropout_cases(rng):
    def case(label, shape, p):
        return Case(label, {"x": _normal(rng, shape), "mask": L.dropout_mask(shape, p, rng, np.float64)},
                    {"p": p})
    return [case("B=2 T=3 C=4 p=0.5", (2, 3, 4), 0.5),
            case("B=1 T=1 C=6 p=0.25 (one time step)", (1, 1, 6), 0.25),
            case("B=2 T=2 C=3 p=0 (nothing dropped)", (2, 2, 3), 0.0)]


def _cross_entropy_cases(rng):
    def case(label, shape, targets, logits=None):
        logits = _normal(rng, shape, 2.0) if logits is None else logits
        return Case(label, {"logits": logits, "targets": np.array(targets, dtype=np.int64)},
                    {"dloss": float(rng.uniform(0.5, 2.0))})
    return [case("B=2 T=3 V=5", (2, 3, 5), rng.integers(0, 5, (2, 3))),
            case("B=1 T=1 V=4 (one time step)", (1, 1, 4), [[2]]),
            case("B=2 T=3 V=4, every target the same id", (2, 3, 4), np.full((2, 3), 1)),
            case("N=4 V=3 (2-D logits), all logits 0", (4, 3), [0, 2, 2, 1], logits=np.zeros((4, 3)))]


def _embedding_cases(rng):
    def case(label, idx, V, C, block_size):
        return Case(label, {"idx": np.array(idx, dtype=np.int64), "wte": _normal(rng, (V, C)),
                            "wpe": _normal(rng, (block_size, C))})
    return [case("B=2 T=3 V=6 C=4 block_size=5", rng.permutation(6)[:6].reshape(2, 3), 6, 4, 5),
            case("B=1 T=1 V=4 C=3 block_size=3 (one time step)", [[2]], 4, 3, 3),
            case("B=2 T=4 V=5 C=3, token id 3 repeated", [[3, 3, 1, 3], [0, 3, 3, 4]], 5, 3, 4)]


def _attention_cases(rng):
    def case(label, B, nh, T, hs, p=None, zero_q=False):
        arrays = {name: _normal(rng, (B, nh, T, hs)) for name in ("q", "k", "v")}
        if zero_q:
            arrays["q"][:] = 0.0
        options = {}
        if p is not None:
            arrays["mask"] = L.dropout_mask((B, nh, T, T), p, rng, np.float64)
            options["p"] = p
        return Case(label, arrays, options)
    return [case("B=2 nh=2 T=4 hs=3", 2, 2, 4, 3),
            case("B=1 nh=2 T=1 hs=4 (one time step)", 1, 2, 1, 4),
            case("B=2 nh=1 T=3 hs=4 (one head)", 2, 1, 3, 4),
            case("B=1 nh=2 T=3 hs=2, dropout p=0.25 on the probabilities", 1, 2, 3, 2, p=0.25),
            case("B=1 nh=2 T=3 hs=2, q all 0 (uniform attention over the past)", 1, 2, 3, 2, zero_q=True)]


def _rope_cases(rng):
    def case(label, B, nh, T, hs, offset=0, theta=50.0):
        cos, sin = L.rope_angles(T, hs, theta, offset, np.float64)
        return Case(label, {"x": _normal(rng, (B, nh, T, hs)), "cos": cos, "sin": sin})
    return [case("B=2 nh=2 T=3 hs=4", 2, 2, 3, 4),
            case("B=1 nh=1 T=1 hs=6 (one time step, one head)", 1, 1, 1, 6),
            case("B=1 nh=2 T=2 hs=4, positions 5 and 6", 1, 2, 2, 4, offset=5)]


def _swiglu_cases(rng):
    zero_gate = _normal(rng, (2, 2, 6))
    zero_gate[..., :3] = 0.0
    return [Case("B=2 T=3 2H=8", {"x": _normal(rng, (2, 3, 8), 2.0)}),
            Case("B=1 T=1 2H=4 (one time step)", {"x": _normal(rng, (1, 1, 4), 2.0)}),
            Case("B=2 T=2 2H=6, gate all 0", {"x": zero_gate})]


def _block_params(rng, C, H, modern=False):
    """O(1) activations everywhere: gains near 1, non-zero biases, weights N(0, 1/fan_in). The
    modern block: RMSNorm (no norm biases), QK-norm's gains (hs,), SwiGLU's c_fc (2H, C)."""
    hs = C // 2
    n_fc = 2 * H if modern else H
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C),
              "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
              "attn.q_norm.weight": (hs,), "attn.k_norm.weight": (hs,),
              "ln_2.weight": (C,), "ln_2.bias": (C,), "mlp.c_fc.weight": (n_fc, C), "mlp.c_fc.bias": (n_fc,),
              "mlp.c_proj.weight": (C, H), "mlp.c_proj.bias": (C,)}
    absent = {"ln_1.bias", "ln_2.bias"} if modern else {"attn.q_norm.weight", "attn.k_norm.weight"}
    params = {}
    for name in BLOCK_PARAM_NAMES:
        shape = shapes[name]
        if name in absent:
            continue
        if name.endswith(".bias"):
            params[name] = _normal(rng, shape, 0.2)
        elif name.startswith("ln_") or name.endswith("_norm.weight"):
            params[name] = _gain(rng, shape[0])
        else:
            params[name] = _normal(rng, shape, 1.0 / math.sqrt(shape[1]))
    return params


def _block_cases(rng):
    def case(label, B, T, C, n_head, activation="gelu", p=None, modern=False):
        params = _block_params(rng, C, 4 * C, modern)
        arrays = {"x": _normal(rng, (B, T, C)), **params}
        options = {"params": list(params), "n_head": n_head, "activation": activation,
                   "dropout_p": 0.0 if p is None else p, "norm": "rmsnorm" if modern else "layernorm"}
        if p is not None:
            for name, shape in (("mask.attention", (B, n_head, T, T)), ("mask.attn_residual", (B, T, C)),
                                ("mask.mlp_residual", (B, T, C))):
                arrays[name] = L.dropout_mask(shape, p, rng, np.float64)
        if modern:
            arrays["rope.cos"], arrays["rope.sin"] = L.rope_angles(T, C // n_head, 50.0, 0, np.float64)
        return Case(label, arrays, options)
    return [case("B=2 T=3 C=4 nh=2", 2, 3, 4, 2),
            case("B=1 T=1 C=4 nh=1 (one time step, one head)", 1, 1, 4, 1, "gelu_tanh"),
            case("B=1 T=3 C=4 nh=2, dropout p=0.25", 1, 3, 4, 2, p=0.25),
            case("B=1 T=3 C=4 nh=2, the modern block: RMSNorm, QK-norm, RoPE, SwiGLU", 1, 3, 4, 2, "swiglu",
                 modern=True)]


def _model_cases(rng):
    def case(label, idx, targets, dloss, **config):
        config = dict(vocab_size=5, block_size=4, n_layer=2, n_head=2, n_embd=4) | config
        cfg = GPTConfig(**config)
        arrays = {"idx": np.array(idx, dtype=np.int64), "targets": np.array(targets, dtype=np.int64)}
        for name, shape in param_shapes(cfg).items():
            if name.endswith(".bias"):
                arrays[name] = _normal(rng, shape, 0.2)
            elif ".ln_" in name:
                arrays[name] = _gain(rng, shape[0])
            elif name.startswith("transformer.w"):  # wte, wpe
                arrays[name] = _normal(rng, shape)
            else:
                arrays[name] = _normal(rng, shape, 1.0 / math.sqrt(shape[1]))
        params = [n for n in param_shapes(cfg)]
        return Case(label, arrays, {"params": params, "config": config, "dloss": dloss})
    return [case("B=2 T=3 V=5 C=4 nh=2, 2 layers", [[0, 1, 2], [3, 4, 0]], [[1, 2, 3], [4, 0, 1]], 1.0),
            case("B=1 T=1, 1 layer, 1 head (one time step)", [[2]], [[4]], 1.0, n_layer=1, n_head=1),
            case("B=2 T=4, token id 1 repeated, dloss=0.5", [[1, 1, 3, 1], [1, 0, 1, 1]],
                 [[1, 3, 1, 1], [0, 1, 1, 2]], 0.5, n_layer=1)]


# --------------------------------------------------------------------------------------------
# How each forward is called on a case's arrays
# --------------------------------------------------------------------------------------------

def _call_x(f, a, o):
    return f(a["x"])


def _call_block(f, a, o):
    names = ("mask.attention", "mask.attn_residual", "mask.mlp_residual")
    masks = [a[n] for n in names] if names[0] in a else None
    rope = L.RopeAngles(a["rope.cos"], a["rope.sin"]) if "rope.cos" in a else None
    options = L.BlockOptions(o["n_head"], o["activation"], o["dropout_p"], None, o["norm"], L.LAYERNORM_EPS, rope)
    return f(a["x"], {n: a[n] for n in o["params"]}, options, masks)


def _call_model(f, a, o):
    return f(a["idx"], a["targets"], {n: a[n] for n in o["params"]}, GPTConfig(**o["config"]))


def _call_attention(f, a, o):
    if "mask" in a:
        return f(a["q"], a["k"], a["v"], o["p"], None, a["mask"])
    return f(a["q"], a["k"], a["v"])


def _activation(name, title, anchor, formula_cache, kink, depth=2):
    forward, backward = L.ACTIVATION_FUNCTIONS[name]
    return Exercise(name, title, anchor, forward, backward, formula_cache, f"{name}_forward(x)", "tuple",
                    _call_x, lambda rng: _activation_cases(rng, kink), ("dx",), ("x",), depth=depth)


EXERCISES: list[Exercise] = [
    Exercise("linear", "out = x @ w.T + b: three gradients, one of them summed over positions", "linear",
             L.linear_forward, L.linear_backward, L.LinearCache, "linear_forward(x, w, b=None)", "tuple",
             lambda f, a, o: f(a["x"], a["w"], a["b"]), _linear_cases, ("dx", "dw", "db"), ("x", "w", "b")),
    _activation("relu", "out = max(x, 0): the gradient is a gate", "relu", L.ReluCache, kink=True),
    _activation("gelu", "out = x Phi(x), the exact GELU: the product rule", "gelu", L.GeluCache, kink=False),
    _activation("gelu_tanh", "GPT-2's tanh GELU: the chain rule through tanh", "tanh-gelu", L.GeluTanhCache,
                kink=False),
    Exercise("dropout", "out = x * mask: inverted dropout with a given mask", "dropout",
             L.dropout_forward, L.dropout_backward, L.DropoutCache,
             "dropout_forward(x, p, rng=None, mask=None)", "tuple",
             lambda f, a, o: f(a["x"], o["p"], None, a["mask"]), _dropout_cases, ("dx",), ("x",)),
    Exercise("softmax", "softmax over the last axis: the Jacobian without forming it", "softmax",
             L.softmax_forward, L.softmax_backward, L.SoftmaxCache, "softmax_forward(x)", "tuple",
             _call_x, _softmax_cases, ("dx",), ("x",)),
    Exercise("cross_entropy", "mean cross-entropy of softmax(logits): the fused gradient", "cross-entropy",
             L.cross_entropy_forward, L.cross_entropy_backward, L.CrossEntropyCache,
             "cross_entropy_forward(logits, targets)", "tuple",
             lambda f, a, o: f(a["logits"], a["targets"]), _cross_entropy_cases, ("dlogits",), ("logits",),
             scalar_out=True, depth=3),
    Exercise("layernorm", "layer normalisation: the paths through the mean and the variance", "layernorm",
             L.layernorm_forward, L.layernorm_backward, L.LayerNormCache,
             "layernorm_forward(x, w, b=None, eps=1e-5)", "tuple",
             lambda f, a, o: f(a["x"], a["w"], a["b"]), lambda rng: _norm_cases(rng, True),
             ("dx", "dw", "db"), ("x", "w", "b"), depth=3),
    Exercise("embedding", "x = wte[idx] + wpe[t]: a scatter-add into the tables", "embedding",
             L.embedding_forward, L.embedding_backward, L.EmbeddingCache,
             "embedding_forward(idx, wte, wpe=None)", "tuple",
             lambda f, a, o: f(a["idx"], a["wte"], a["wpe"]), _embedding_cases, ("dwte", "dwpe"), ("wte", "wpe")),
    Exercise("attention", "causal self-attention per head: q, k, v through the masked softmax", "attention",
             L.causal_attention_forward, L.causal_attention_backward, L.AttentionCache,
             "attention_forward(q, k, v, dropout_p=0.0, rng=None, mask=None)", "tuple",
             _call_attention, _attention_cases, ("dq", "dk", "dv"), ("q", "k", "v"), depth=4,
             notes="The pair is npgpt.layers.causal_attention_forward / causal_attention_backward. One case\n"
                   "runs dropout on the probabilities: there att_mask is its mask (0 or 1 / (1 - p)) and\n"
                   "y = (att * att_mask) @ v."),
    Exercise("block", "the transformer block: the residual fan-in of its two branches", "transformer-block",
             L.block_forward, L.block_backward, L.BlockCache,
             "block_forward(x, p, options, masks=None)", "block", _call_block, _block_cases,
             depth=bounds.BLOCK_DEPTH + 1, amplification=bounds.PARITY_AMPLIFICATION, fd_entries=16,
             notes="You may call the reference layer backwards (from npgpt.layers import linear_backward,\n"
                   "layernorm_backward, ...): the exercise is the composition. cache.layers holds them too.\n"
                   "One case runs dropout: there attn_dropout, mlp_dropout and attention.att_mask are set.\n"
                   "The last case is the modern block (RMSNorm, QK-norm, RoPE, SwiGLU): there ln_1 and ln_2 are\n"
                   "RMSNormCaches, q_norm, k_norm, q_rope, k_rope are not None, and the grads' keys follow its\n"
                   "parameters (attn.q_norm.weight, attn.k_norm.weight; no ln_*.bias)."),
    Exercise("model", "the GPT's backward: blocks, ln_f, the head, the tied embedding's two gradients",
             "model-backward", reference.model_forward, reference.model_backward, GPTCache,
             "model_forward(idx, targets, params, config)", "model", _call_model, _model_cases,
             scalar_out=True, depth=bounds.forward_depth(2), amplification=bounds.PARITY_AMPLIFICATION,
             fd_entries=8, notes="You may call the reference backwards (from npgpt.layers import block_backward,\n"
                   "norm_backward, linear_backward, embedding_backward, cross_entropy_backward): the\n"
                   "exercise is the composition. The head's weight is wte (tied weights), learned positions."),
    Exercise("rmsnorm", "RMSNorm: layernorm without the mean, one path fewer", "rmsnorm",
             L.rmsnorm_forward, L.rmsnorm_backward, L.RMSNormCache, "rmsnorm_forward(x, w, eps=1e-5)", "tuple",
             lambda f, a, o: f(a["x"], a["w"]), lambda rng: _norm_cases(rng, False),
             ("dx", "dw"), ("x", "w"), depth=3),
    Exercise("rope", "rotary position embedding: the backward of a rotation", "rope",
             L.rope_forward, L.rope_backward, L.RopeCache, "rope_forward(x, cos, sin)", "tuple",
             lambda f, a, o: f(a["x"], a["cos"], a["sin"]), _rope_cases, ("dx",), ("x",),
             notes="cos and sin are constants (npgpt.layers.rope_angles): only x gets a gradient."),
    _activation("relu2", "out = relu(x)^2, the squared ReLU", "squared-relu", L.Relu2Cache, kink=True),
    Exercise("swiglu", "out = silu(gate) * up: the product rule on a gated unit", "swiglu",
             L.swiglu_forward, L.swiglu_backward, L.SwigluCache, "swiglu_forward(x)", "tuple",
             _call_x, _swiglu_cases, ("dx",), ("x",)),
]

BY_NAME = {ex.name: ex for ex in EXERCISES}


def get(name: str) -> Exercise | None:
    return BY_NAME.get(name)


def cases(ex: Exercise) -> list[Case]:
    """The exercise's cases, the same in every process: drawn from a seed of its name."""
    return ex.make_cases(np.random.default_rng(zlib.crc32(ex.name.encode())))


def dout_for(ex: Exercise, case: Case, out, index: int):
    """The upstream gradient of a case: random, never all ones (a float dloss for a loss)."""
    if ex.scalar_out:
        return float(case.options["dloss"])
    rng = np.random.default_rng([zlib.crc32(ex.name.encode()), index, 1])
    return rng.standard_normal(np.shape(out))


# --------------------------------------------------------------------------------------------
# What the student's backward returned
# --------------------------------------------------------------------------------------------

class ReturnError(Exception):
    """The student's function returned something of the wrong structure, shape or dtype."""


def _kind_of(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _check_array(fn: str, name: str, value, like: np.ndarray, of: str):
    if not isinstance(value, np.ndarray):
        raise ReturnError(f"{fn}: {name} is {_kind_of(value)}, expected an array of shape {like.shape} "
                          f"(the shape of {of})")
    if value.shape != like.shape:
        raise ReturnError(f"{fn}: {name} has shape {value.shape}, expected {like.shape} (the shape of {of})")
    if value.dtype != like.dtype:
        raise ReturnError(f"{fn}: {name} has dtype {value.dtype}, expected {like.dtype} (the dtype of {of})")


def unpack(ex: Exercise, raw, case: Case) -> list:
    """The gradients the student's backward returned, in the order of ex.grad_names(case); raises
    ReturnError naming what is wrong with the return value."""
    fn = f"{ex.name}_backward"
    names, wrt = ex.grad_names(case), ex.wrt_names(case)
    if ex.kind == "tuple":
        if not isinstance(raw, (tuple, list)):
            raise ReturnError(f"{fn} returned {_kind_of(raw)}, expected a tuple of {len(names)}: {ex.returns()}")
        if len(raw) != len(names):
            raise ReturnError(f"{fn} returned {len(raw)} array{'s' * (len(raw) != 1)}, expected {len(names)}: "
                              + ", ".join(names))
        values = list(raw)
    else:
        if ex.kind == "block":
            if not isinstance(raw, (tuple, list)) or len(raw) != 2:
                got = f"{len(raw)} values" if isinstance(raw, (tuple, list)) else _kind_of(raw)
                raise ReturnError(f"{fn} returned {got}, expected 2: dx and a dict of parameter gradients")
            dx, grads = raw
            keys = names[1:]
        else:
            dx, grads, keys = None, raw, names
        if not isinstance(grads, dict):
            raise ReturnError(f"{fn} returned {_kind_of(grads)} for the parameter gradients, expected a dict "
                              f"keyed by parameter name")
        missing = [k for k in keys if k not in grads]
        extra = sorted(str(k) for k in grads if k not in keys)
        if missing:
            raise ReturnError(f"{fn}'s dict lacks {', '.join(missing)}")
        if extra:
            raise ReturnError(f"{fn}'s dict has keys no parameter has: {', '.join(extra)}")
        values = ([dx] if ex.kind == "block" else []) + [grads[k] for k in keys]
    for name, of, value in zip(names, wrt, values):
        _check_array(fn, name, value, case.arrays[of], of)
    return values


def check_forward_return(ex: Exercise, raw, reference_out):
    """The student's NAME_forward must return (out, cache) with out shaped like the reference's."""
    fn = f"{ex.name}_forward"
    if not isinstance(raw, (tuple, list)) or len(raw) != 2:
        got = f"{len(raw)} values" if isinstance(raw, (tuple, list)) else _kind_of(raw)
        raise ReturnError(f"{fn} returned {got}, expected 2: (out, cache)")
    out = raw[0]
    if ex.scalar_out:
        if not isinstance(out, (float, np.floating)) and not (isinstance(out, np.ndarray) and out.shape == ()):
            raise ReturnError(f"{fn} returned {_kind_of(out)} as the loss, expected a float")
        return np.asarray(out, dtype=np.float64)
    _check_array(fn, "out", out, np.asarray(reference_out), "the reference forward's out")
    return out
