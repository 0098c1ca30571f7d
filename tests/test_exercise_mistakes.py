"""The catalogue of known mistakes (exercises/catalogue.py) and the diagnosis (exercises/diagnose.py).

Every catalogue entry is a real wrong backward: run on a few tiny float64 cases of its exercise
(T = 1, repeated token ids, one head among them), `name_mistake` names it and no other entry; the
reference backward is named by nothing. `explain` says the right kind of sentence for synthetic
wrong gradients (scaled by 2, by 1/N, negated, transposed, zeroed at the first time step, a term
dropped) and for some of the catalogue's mistakes. In process, no subprocess: a few seconds.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from exercises import catalogue
from exercises.diagnose import Run, explain, flatten, mistake_distances, name_mistake
from npgpt import bounds
from npgpt import layers as L
from npgpt.config import GPTConfig
from npgpt.model import GPT, param_shapes

ROOT = Path(__file__).resolve().parents[1]
GRADIENTS = (ROOT / "docs" / "gradients.md").read_text()

EXERCISES = ("embedding", "linear", "layernorm", "relu", "gelu", "gelu_tanh", "dropout", "softmax",
             "attention", "cross_entropy", "rmsnorm", "rope", "swiglu", "relu2", "block", "model")

BACKWARD = {
    "embedding": L.embedding_backward, "linear": L.linear_backward, "layernorm": L.layernorm_backward,
    "relu": L.relu_backward, "gelu": L.gelu_backward, "gelu_tanh": L.gelu_tanh_backward,
    "dropout": L.dropout_backward, "softmax": L.softmax_backward,
    "attention": L.causal_attention_backward, "cross_entropy": L.cross_entropy_backward,
    "rmsnorm": L.rmsnorm_backward, "rope": L.rope_backward, "swiglu": L.swiglu_backward,
    "relu2": L.relu2_backward, "block": L.block_backward, "model": catalogue.gpt_backward,
}

NAMES = {
    "embedding": ("dwte", "dwpe"), "linear": ("dx", "dw", "db"), "layernorm": ("dx", "dw", "db"),
    "attention": ("dq", "dk", "dv"), "cross_entropy": ("dlogits",), "rmsnorm": ("dx", "dw"),
    "block": ("dx", "grads"), "model": (),
}


def _normal(rng, *shape):
    return rng.normal(size=shape)


def _block_params(rng, C, activation="gelu", bias=True):
    config = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=C, activation=activation,
                       bias=bias)
    prefix = "transformer.h.0."
    p = {}
    for name, shape in param_shapes(config).items():
        if name.startswith(prefix):
            local = name[len(prefix):]
            p[local] = (1.0 + 0.1 * rng.normal(size=shape)) if "ln_" in local else 0.5 * rng.normal(size=shape)
    return p


def _model(rng, B, T, **overrides):
    config = GPTConfig(**{**dict(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=8), **overrides})
    model = GPT(config, seed=int(rng.integers(1 << 30)), dtype=np.float64)
    for name, value in model.params.items():  # unit-scale parameters: every path carries weight
        value[...] = (1.0 + 0.1 * rng.normal(size=value.shape)) if ".ln_" in name else 0.5 * rng.normal(size=value.shape)
    idx = rng.integers(0, config.vocab_size, size=(B, T))
    idx[0, 0] = idx[-1, -1]  # a repeated id
    targets = rng.integers(0, config.vocab_size, size=(B, T))
    model.forward(idx, targets)
    return model._cache


def _forward_cases(exercise: str):
    """[(label, dout, cache)] of the exercise: tiny float64 cases, T = 1 and repeated ids among them."""
    rng = np.random.default_rng(sorted(EXERCISES).index(exercise))
    out = []
    if exercise == "embedding":
        for B, T, wpe in ((2, 3, True), (3, 1, True), (1, 4, False)):
            idx = rng.integers(0, 4, size=(B, T))
            idx[0, 0] = idx[-1, -1]  # a repeated id
            _, cache = L.embedding_forward(idx, _normal(rng, 5, 3), _normal(rng, 4, 3) if wpe else None)
            out.append((f"B={B} T={T}", _normal(rng, B, T, 3), cache))
    elif exercise == "linear":
        for xs, ws, bias in (((2, 3, 4), (5, 4), True), ((3, 4), (4, 4), True), ((2, 1, 3), (2, 3), False),
                             ((1, 1, 3), (2, 3), True)):
            _, cache = L.linear_forward(_normal(rng, *xs), _normal(rng, *ws), _normal(rng, ws[0]) if bias else None)
            out.append((f"x{xs} w{ws}", _normal(rng, *xs[:-1], ws[0]), cache))
    elif exercise in ("layernorm", "rmsnorm"):
        for shape, bias in (((2, 3, 5), True), ((2, 1, 4), False)):
            C = shape[-1]
            w = 1.0 + 0.3 * _normal(rng, C)
            if exercise == "layernorm":
                _, cache = L.layernorm_forward(_normal(rng, *shape), w, _normal(rng, C) if bias else None)
            else:
                _, cache = L.rmsnorm_forward(_normal(rng, *shape), w)
            out.append((f"x{shape}", _normal(rng, *shape), cache))
    elif exercise in ("relu", "gelu", "gelu_tanh", "relu2", "softmax"):
        forward = {"relu": L.relu_forward, "gelu": L.gelu_forward, "gelu_tanh": L.gelu_tanh_forward,
                   "relu2": L.relu2_forward, "softmax": L.softmax_forward}[exercise]
        for shape in ((2, 3, 4), (2, 1, 5)):
            _, cache = forward(1.5 * _normal(rng, *shape))
            out.append((f"x{shape}", _normal(rng, *shape), cache))
    elif exercise == "dropout":
        for shape, p in (((2, 3, 4), 0.5), ((2, 1, 5), 0.25)):
            _, cache = L.dropout_forward(_normal(rng, *shape), p, rng)
            out.append((f"x{shape} p={p}", _normal(rng, *shape), cache))
    elif exercise == "swiglu":
        for shape in ((2, 3, 6), (2, 1, 4)):
            _, cache = L.swiglu_forward(1.5 * _normal(rng, *shape))
            out.append((f"x{shape}", _normal(rng, *shape[:-1], shape[-1] // 2), cache))
    elif exercise == "rope":
        for shape in ((2, 2, 3, 4), (1, 1, 1, 6), (1, 2, 4, 6)):
            angles = L.rope_angles(shape[2], shape[3], theta=3.0)
            _, cache = L.rope_forward(_normal(rng, *shape), *angles)
            out.append((f"x{shape}", _normal(rng, *shape), cache))
    elif exercise == "attention":
        for shape in ((2, 2, 3, 4), (1, 1, 1, 4), (1, 1, 4, 2)):
            _, cache = L.causal_attention_forward(*(_normal(rng, *shape) for _ in range(3)))
            out.append((f"q{shape}", _normal(rng, *shape), cache))
    elif exercise == "cross_entropy":
        for B, T, dloss in ((2, 3, 1.0), (2, 1, 0.7), (1, 4, 1.3)):
            _, cache = L.cross_entropy_forward(_normal(rng, B, T, 5), rng.integers(0, 5, size=(B, T)))
            out.append((f"B={B} T={T}", dloss, cache))
    elif exercise == "block":
        for B, T in ((2, 3), (1, 1)):
            options = L.BlockOptions(n_head=2)
            _, cache = L.block_forward(_normal(rng, B, T, 8), _block_params(rng, 8), options)
            out.append((f"B={B} T={T}", _normal(rng, B, T, 8), cache))
    elif exercise == "model":
        for B, T in ((2, 3), (1, 1)):
            out.append((f"B={B} T={T}", 1.0, _model(rng, B, T)))
    return out


def _runs(exercise: str, backward=None) -> list[Run]:
    """The exercise's cases as Runs whose student gradients come from `backward` (the reference's by default)."""
    runs = []
    for label, dout, cache in _forward_cases(exercise):
        want = BACKWARD[exercise](dout, cache)
        got = (backward or BACKWARD[exercise])(dout, cache)
        want = want if isinstance(want, (tuple, dict)) else (want,)
        got = got if isinstance(got, (tuple, dict)) else (got,)
        runs.append(Run(label, dout, cache, want, got, NAMES.get(exercise, ("dx",))))
    return runs


def _with_got(runs: list[Run], change) -> list[Run]:
    """The runs with the student's gradients replaced by change(run) (a tuple)."""
    return [run._replace(got=change(run)) for run in runs]


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------

def test_catalogue_covers_every_exercise_and_links_its_paragraphs():
    assert set(catalogue.MISTAKES) == set(EXERCISES)
    keys = [m.key for ms in catalogue.MISTAKES.values() for m in ms]
    assert len(keys) == len(set(keys)), "duplicate keys"
    anchors = set(re.findall(r'<a id="(mistake-[\w-]+)"></a>', GRADIENTS))
    for exercise, mistakes in catalogue.MISTAKES.items():
        assert len(mistakes) >= 3, f"{exercise} has {len(mistakes)} mistakes, expected >= 3"
        for m in mistakes:
            assert m.doc == f"docs/gradients.md#mistake-{m.key}", m
            assert f"mistake-{m.key}" in anchors, f"docs/gradients.md has no paragraph for {m.key}"
            assert m.title.endswith(".") and len(m.title) > 20, m.title
    assert len(anchors) == len(keys), f"paragraphs without a mistake: {sorted(anchors - {f'mistake-{k}' for k in keys})}"


def test_model_backward_is_gpt_backward():
    rng = np.random.default_rng(0)
    for overrides in ({}, {"tie_weights": False, "dropout": 0.2, "bias": False}):
        config = GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=8, **overrides)
        model = GPT(config, seed=1, dtype=np.float64)
        model.forward(rng.integers(0, 7, size=(2, 3)), rng.integers(0, 7, size=(2, 3)))
        want = model.backward()
        got = catalogue.gpt_backward(1.0, model._cache, tied=config.tie_weights)
        assert list(got) == list(want)
        bound = bounds.bitwise("GPT.backward's steps in its order; the tied wte adds 0 + dwte + dhead, "
                               "and 0 + dwte is exact")
        for name in want:
            assert np.max(np.abs(got[name] - want[name])) <= bound, name


@pytest.mark.parametrize("exercise", EXERCISES)
def test_reference_backward_is_named_by_nothing(exercise):
    runs = _runs(exercise)
    assert name_mistake(exercise, runs) is None
    assert all(explain(exercise, name, runs) is None for name in flatten(runs[0].want, runs[0].grad_names))


@pytest.mark.parametrize("exercise", EXERCISES)
def test_every_mistake_is_named_and_told_from_the_others(exercise):
    """Each entry's own backward as the student's: named, and every other entry is off by more
    than the bound on some case (the entries are distinguishable); a sentence for a wrong gradient."""
    for mistake in catalogue.MISTAKES[exercise]:
        runs = _runs(exercise, mistake.backward)
        assert name_mistake(exercise, runs) == mistake, mistake.key
        distances = {m.key: (d_got, d_want) for m, d_got, d_want in mistake_distances(exercise, runs)}
        assert distances[mistake.key][1] > 1.0, f"{mistake.key}: these cases cannot tell it from the reference"
        close = [k for k, (d, _) in distances.items() if k != mistake.key and d <= 1.0]
        assert not close, f"{mistake.key} is indistinguishable from {close}"
        sentences = [explain(exercise, name, runs) for name in flatten(runs[0].want, runs[0].grad_names)]
        assert any(sentences), f"{mistake.key}: no gradient explained"


# --------------------------------------------------------------------------------------------
# explain on synthetic wrong gradients
# --------------------------------------------------------------------------------------------

def _scaled(runs, grad_index, factor_of):
    def change(run):
        got = list(run.want)
        if got[grad_index] is not None:
            got[grad_index] = run.want[grad_index] * factor_of(run)
        return tuple(got)
    return _with_got(runs, change)


def test_explain_names_a_factor_of_two_half_and_the_sign():
    runs = _runs("layernorm")
    assert "factor 2:" in explain("layernorm", "dx", _scaled(runs, 0, lambda r: 2.0))
    assert "factor 1/2:" in explain("layernorm", "dw", _scaled(runs, 1, lambda r: 0.5))
    assert "wrong sign" in explain("layernorm", "db", _scaled(runs, 2, lambda r: -1.0))
    sentence = explain("layernorm", "dx", _scaled(runs, 0, lambda r: -2.0))
    assert "factor 2 and the wrong sign" in sentence
    sentence = explain("layernorm", "dx", _scaled(runs, 0, lambda r: 0.731))
    assert "constant factor 0.731" in sentence


def test_explain_names_one_over_n_and_the_attention_scale():
    runs = _runs("linear")
    n = lambda r: 1.0 / np.prod(r.cache.x.shape[:-1])
    assert "1/N (N = B*T" in explain("linear", "dw", _scaled(runs, 1, n))
    runs = _runs("cross_entropy")
    assert "factor N = B*T" in explain("cross_entropy", "dlogits",
                                       _scaled(runs, 0, lambda r: r.cache.probs.shape[0]))
    runs = _runs("attention")
    assert "sqrt(hs)" in explain("attention", "dq", _scaled(runs, 0, lambda r: np.sqrt(r.cache.q.shape[-1])))


def test_explain_names_a_transpose():
    runs = [r for r in _runs("linear") if r.cache.w.shape[0] == r.cache.w.shape[1]]  # the square case
    bad = _with_got(runs, lambda r: (r.want[0], r.want[1].T, r.want[2]))
    assert "transposed" in explain("linear", "dw", bad)
    bad = _runs("linear", catalogue.MISTAKES["linear"][0].backward)  # reshaped: every case
    assert "reshape where a transpose belongs" in explain("linear", "dw", bad)


def test_explain_names_the_first_time_step():
    def zero_first(run):
        dx = run.want[0].copy()
        dx[:, 0] = 0.0
        return (dx,) + tuple(run.want[1:])
    sentence = explain("layernorm", "dx", _with_got(_runs("layernorm"), zero_first))
    assert "only at the first time step" in sentence and "where it is zero" in sentence


def test_explain_names_a_dropped_term():
    runs = _runs("layernorm")
    for mistake, words in (("layernorm-no-mean-path", "misses the path through the mean"),
                           ("layernorm-no-variance-path", "misses the path through the variance")):
        backward = next(m.backward for m in catalogue.MISTAKES["layernorm"] if m.key == mistake)
        assert words in explain("layernorm", "dx", _runs("layernorm", backward)), mistake

    def without_dot(run):  # softmax's dx with its subtracted dot product dropped
        y = run.cache.y
        return (run.want[0] + y * (run.dout * y).sum(axis=-1, keepdims=True),)
    assert "misses the subtracted dot product" in explain("softmax", "dx", _with_got(_runs("softmax"), without_dot))
    sentence = explain("model", "transformer.wte.weight", _runs("model", catalogue.MISTAKES["model"][0].backward))
    assert "misses the tied head's gradient" in sentence


def test_explain_names_a_sum_left_out():
    def first_row(run):  # db = dout's first position: not summed over the positions
        return run.want[:2] + (None if run.want[2] is None else run.dout.reshape(-1, run.dout.shape[-1])[0],)
    sentence = explain("linear", "db", _with_got(_runs("linear"), first_row))
    assert "first position's term alone: it is not summed over the positions" in sentence

    def divided_by_b(run):  # dlogits / B instead of / N: right on the cases with T = 1
        B, T = run.cache.logits_shape[:2]
        return (run.want[0] * T,)
    sentence = explain("cross_entropy", "dlogits", _with_got(_runs("cross_entropy"), divided_by_b))
    assert "factor T (the number of time steps) on the 2 cases where it is wrong (right on the other 1)" in sentence


def test_explain_names_zeros_nan_and_positions():
    runs = _runs("gelu")
    assert "zero everywhere" in explain("gelu", "dx", _with_got(runs, lambda r: (np.zeros_like(r.want[0]),)))

    def one_nan(run):
        dx = run.want[0].copy()
        dx.flat[0] = np.nan
        return (dx,)
    assert "NaN in 2 of" in explain("gelu", "dx", _with_got(runs, one_nan))
    by_key = {m.key: m.backward for ms in catalogue.MISTAKES.values() for m in ms}
    cases = (
        ("embedding", "embedding-assign-repeated-ids", "dwte", "repeated ids"),
        ("embedding", "embedding-dwpe-first-batch-row", "dwpe", "first batch row's alone"),
        ("embedding", "embedding-dwpe-mean-over-batch", "dwpe", "1/B"),
        ("relu", "relu-identity", "dx", "where x <= 0 (the units the ReLU zeroes), where it passes dout"),
        ("dropout", "dropout-not-rescaled", "dx", "(1-p) (dropout's rescaling 1/(1-p) left out)"),
        ("linear", "linear-db-last-position", "db", "last position's term alone"),
        ("attention", "attention-no-scale", "dq", "sqrt(hs)"),
        ("attention", "attention-unmasked-recompute", "dq", "right only at the last time step (the query that sees every key"),
        ("embedding", "embedding-dwpe-unused-rows", "dwpe", "rows t >= T of wpe"),
        ("cross_entropy", "cross-entropy-no-one-hot", "dlogits", "misses the one-hot"),
        ("rope", "rope-no-sin-term", "dx", "misses the term -rotate_half(dout) * sin"),
        ("swiglu", "swiglu-silu-no-second-term", "dx", "misses silu's second term"),
        ("relu2", "relu2-no-factor-two", "dx", "factor 1/2"),
        ("gelu", "gelu-no-pdf-term", "dx", "misses the product rule's second term"),
        ("rmsnorm", "rmsnorm-no-projection", "dx", "misses the path through the rms"),
        ("block", "block-no-attention-residual-path", "dx", "misses the attention residual's identity path"),
    )
    for exercise, key, grad, words in cases:
        sentence = explain(exercise, grad, _runs(exercise, by_key[key]))
        assert sentence and words in sentence, (key, sentence)


def test_explain_names_a_wrong_formula():
    """Mistakes that are neither a factor, a transpose of the whole gradient nor a missing term: the
    sentence says which wrong formula the gradient equals, not "wrong throughout"."""
    by_key = {m.key: m.backward for ms in catalogue.MISTAKES.values() for m in ms}
    cases = (
        ("attention", "attention-dv-not-transposed", "dv", "dv equals att @ dout instead of att^T @ dout"),
        ("attention", "attention-dk-not-transposed", "dk", "dk equals dscores @ q * scale instead of dscores^T"),
        ("rope", "rope-interleaved-pairs", "dx", "dx rotates adjacent pairs"),
        ("dropout", "dropout-identity", "dx", "dx is dout unchanged: it ignores the mask"),
        ("rmsnorm", "rmsnorm-no-gain", "dx", "dx is the gradient for a gain of 1"),
        ("cross_entropy", "cross-entropy-stops-at-probs", "dlogits", "dlogits is the gradient of the loss w.r.t. the probabilities"),
        ("softmax", "softmax-wrong-axis", "dx", "dx takes the sum sum(dout * y) over axis 0 instead of the last"),
        ("gelu", "gelu-local-derivative-only", "dx", "dx is the layer's local derivative alone"),
        ("relu2", "relu2-local-derivative-only", "dx", "dx is the layer's local derivative alone"),
    )
    for exercise, key, grad, words in cases:
        sentence = explain(exercise, grad, _runs(exercise, by_key[key]))
        assert sentence and sentence.startswith(words), (key, sentence)
