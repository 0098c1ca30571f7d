"""What is wrong with a wrong gradient, in a sentence, and which known mistake it is.

`explain` looks at one gradient over every case of a check (a `Run` each) and tries, in order:
NaN or inf; zero everywhere; a constant factor (the least-squares scale of each case, named when it
is a known constant: 2, 1/2, -1, N = B*T, B, T, sqrt(hs), 1/(1-p) and their inverses); a transpose;
the halves of the last axis swapped; dout minus the right gradient (a mask inverted); a sum over
positions left out (the gradient equals one position's or one batch row's term); a missing term
(the error want - got lies in the span of a term of the reference's formula, computed from the
case's cache: a least-squares fit with a residual at rounding level); a wrong formula that
derivations commonly write (att @ dout for dv, a sum on the wrong axis, the local derivative
without dout); an error confined to masked entries (units a ReLU or dropout zeroes) or to the rows
of repeated token ids; an error confined to some indices along one axis (the first time step,
say); a factor that differs from row to row. Each sentence starts with the gradient's name; the
last resort's goes on with VAGUE.

`name_mistake` runs every wrong backward of the catalogue (exercises/catalogue.py) on each case's
(dout, cache) and names the entry whose gradients equal the student's, on every case, to the bound
of two programs of the same formula (npgpt.bounds.chain: the student may sum in another order and
run their own forward).

"Equal" here is always that bound, normwise over a tensor; nothing is tuned to the data.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from npgpt import bounds
from npgpt import layers as L

from . import catalogue


VAGUE = "is wrong throughout"  # how the last resort's sentence goes on after the gradient's name


class Run(NamedTuple):
    """One case of a check: what the student's backward got and what the reference gives."""

    label: str                  # the case, e.g. "B=2 T=1 (one time step)"
    dout: object                # the upstream gradient handed to both backwards
    cache: tuple                # the reference forward's cache for the case's inputs
    want: tuple                 # the reference backward's gradients, in its return order
    got: tuple                  # the student's gradients: same count, shapes and dtypes (checked before)
    grad_names: tuple           # names of the gradients, e.g. ("dx", "dw", "db")


# --------------------------------------------------------------------------------------------
# Gradients by name, and the bound of "equal"
# --------------------------------------------------------------------------------------------

def flatten(result, names=()) -> dict:
    """A backward's result as {name: array or None}. A tuple's i-th entry takes names[i] (or "#i");
    a dict (the model's gradients, a block's parameter gradients) gives its own keys."""
    if isinstance(result, dict):
        return dict(result)
    if not isinstance(result, (tuple, list)):
        result = (result,)
    flat = {}
    for i, item in enumerate(result):
        if isinstance(item, dict):
            flat.update(item)
        else:
            flat[names[i] if i < len(names) else f"#{i}"] = item
    return flat


def _aligned(a: dict, b: dict):
    """Pairs of a's and b's gradients: by name when both have the same names, else by position."""
    if a.keys() == b.keys():
        return [(k, a[k], b[k]) for k in a]
    if len(a) == len(b):
        return [(ka, va, vb) for (ka, va), vb in zip(a.items(), b.values())]
    return None


# (depth, amplification) of a forward and backward through each exercise, as npgpt.bounds.chain
# counts them: elementwise layers and plain products round once or twice a pass, the norms, softmax
# and the loss a few times with layernorm's 1 / std and softmax's Jacobian, a block or a model many.
_DEPTH = {
    "embedding": (2, 1.0), "linear": (2, 1.0), "relu": (2, 1.0), "gelu": (4, 1.0),
    "gelu_tanh": (4, 1.0), "dropout": (2, 1.0), "rope": (2, 1.0), "relu2": (2, 1.0),
    "swiglu": (4, 1.0), "layernorm": (6, bounds.MODEL_AMPLIFICATION),
    "rmsnorm": (6, bounds.MODEL_AMPLIFICATION), "softmax": (4, bounds.MODEL_AMPLIFICATION),
    "cross_entropy": (6, bounds.MODEL_AMPLIFICATION), "attention": (10, bounds.MODEL_AMPLIFICATION),
    "block": (2 * bounds.BLOCK_DEPTH, bounds.MODEL_AMPLIFICATION),
}


def _arrays(obj):
    """Every ndarray inside a cache, dout or result (nested tuples, NamedTuples, lists, dicts)."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _arrays(v)


def tolerance(exercise: str, run: Run) -> float:
    """The normwise relative bound within which two backwards of the same formula agree on `run`:
    bounds.chain over the exercise's forward and backward (_DEPTH; a model counts its blocks), its
    longest sum at most the size of the largest array involved, in the gradients' dtype."""
    arrays = [a for a in _arrays((run.dout, run.want, run.got)) if np.issubdtype(a.dtype, np.floating)]
    dtype = np.result_type(*[a.dtype for a in arrays]) if arrays else np.float64
    n = max([a.size for a in arrays] + [1])
    if exercise == "model":
        n_layer = len(run.cache.blocks)
        depth, amplification = 2 * bounds.forward_depth(n_layer), bounds.MODEL_AMPLIFICATION
    else:
        depth, amplification = _DEPTH.get(exercise, (2 * bounds.BLOCK_DEPTH, bounds.MODEL_AMPLIFICATION))
    return bounds.chain(dtype, n, depth, amplification)


def _norm(a) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64).ravel()))


def _close(a, b, tol: float, scale: float | None = None) -> bool:
    """||a - b|| <= tol * scale (scale: the larger of ||a||, ||b|| unless given)."""
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return False
    if scale is None:
        scale = max(_norm(a), _norm(b))
    return _norm(a - b) <= tol * scale


def _distance(a: dict, b: dict, tol: float) -> float:
    """max over the gradients of ||a - b|| / (tol * max(||a||, ||b||)): <= 1 means equal to the bound."""
    pairs = _aligned(a, b)
    if pairs is None:
        return math.inf
    worst = 0.0
    for _, x, y in pairs:
        if x is None or y is None:
            if not (x is None and y is None):
                return math.inf
            continue
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            return math.inf
        err = _norm(x - y)
        if err == 0.0:
            continue
        worst = max(worst, err / (tol * max(_norm(x), _norm(y))))
    return worst


# --------------------------------------------------------------------------------------------
# name_mistake
# --------------------------------------------------------------------------------------------

def _run_backward(backward, run: Run):
    """The wrong backward's gradients on the run's reference (dout, cache), or None if it fails."""
    try:
        with np.errstate(all="ignore"):
            return flatten(backward(run.dout, run.cache), run.grad_names)
    except Exception:  # a wrong backward that cannot run on this case matches nothing
        return None


def mistake_distances(exercise: str, runs: list) -> list:
    """[(Mistake, distance to the student's gradients, distance to the reference's)], each distance
    the worst over the runs of `_distance` (<= 1: equal to the bound on every run)."""
    out = []
    for mistake in catalogue.MISTAKES.get(exercise, ()):
        to_got, to_want = 0.0, 0.0
        for run in runs:
            wrong = _run_backward(mistake.backward, run)
            if wrong is None:
                to_got = to_want = math.inf
                break
            tol = tolerance(exercise, run)
            to_got = max(to_got, _distance(flatten(run.got, run.grad_names), wrong, tol))
            to_want = max(to_want, _distance(flatten(run.want, run.grad_names), wrong, tol))
        out.append((mistake, to_got, to_want))
    return out


def name_mistake(exercise: str, runs: list):
    """The catalogue's Mistake that the student's gradients match on every run, or None.

    An entry matches when its wrong backward, run on each case's (dout, cache), gives the student's
    gradients to the bound of `tolerance`. An entry that these cases cannot tell from the reference
    (it equals the reference on every run: the bug needs a case they lack) is never named. Of the
    entries that match, the closest."""
    if not runs:
        return None
    best = None
    for mistake, to_got, to_want in mistake_distances(exercise, runs):
        if to_got <= 1.0 and to_want > 1.0 and (best is None or to_got < best[1]):
            best = (mistake, to_got)
    return None if best is None else best[0]


# --------------------------------------------------------------------------------------------
# The sizes of a case: N positions (B, T), the head size, the dropout probability
# --------------------------------------------------------------------------------------------

def _positions(exercise: str, run: Run) -> tuple:
    """The shape of the case's positions: (B, T), or (N,) where the layer saw a 2-D input."""
    c = run.cache
    try:
        if exercise == "embedding":
            return tuple(c.idx.shape)
        if exercise == "model":
            return tuple(c.embedding.idx.shape)
        if exercise == "cross_entropy":
            return tuple(c.logits_shape[:-1])
        if exercise == "linear":
            return tuple(c.x.shape[:-1])
        if exercise == "attention":
            return (c.q.shape[0], c.q.shape[2])
        if exercise == "block":
            return (c.attention.q.shape[0], c.attention.q.shape[2])
        if exercise == "rope":
            return (run.dout.shape[0], run.dout.shape[2])
        if isinstance(run.dout, np.ndarray) and run.dout.ndim >= 2:
            return tuple(run.dout.shape[:-1])
    except (AttributeError, IndexError, TypeError):
        pass
    return ()


def _head_size(exercise: str, run: Run):
    c = run.cache
    if exercise == "attention":
        return c.q.shape[-1]
    if exercise == "block":
        return c.attention.q.shape[-1]
    if exercise == "model" and c.blocks:
        return c.blocks[0].attention.q.shape[-1]
    return None


def _keep_scale(exercise: str, run: Run):
    """1 / (1 - p) of a dropout case (the mask's kept value), or None."""
    if exercise == "dropout":
        mask = np.asarray(run.cache.mask)
        if mask.size and (mask != 0).any():
            return float(mask.max())
    return None


def _known_factors(exercise: str, run: Run) -> list:
    """[(name of the factor, name of its inverse, value on this run)] that a scale is named after,
    most specific first."""
    out = [("2", "1/2", 2.0)]
    pos = _positions(exercise, run)
    if pos:
        n = float(np.prod(pos))
        out.append(("N = B*T (the number of positions)", "1/N (N = B*T, the number of positions)", n))
        if len(pos) == 2:
            out.append(("B (the batch size)", "1/B (B the batch size)", float(pos[0])))
            out.append(("T (the number of time steps)", "1/T (T the number of time steps)", float(pos[1])))
    hs = _head_size(exercise, run)
    if hs:
        out.append(("sqrt(hs) (the attention scale 1/sqrt(hs) left out)",
                    "1/sqrt(hs) (the attention scale applied once more)", math.sqrt(hs)))
    keep = _keep_scale(exercise, run)
    if keep:
        out.append(("1/(1-p) (dropout's rescaling applied once more)",
                    "(1-p) (dropout's rescaling 1/(1-p) left out)", keep))
        out.append(("1/(1-p)^2 (dropout's rescaling applied twice more)",
                    "(1-p)^2 (dropout's rescaling 1/(1-p) inverted: multiplied by 1-p where it divides)",
                    keep * keep))
    return out


# --------------------------------------------------------------------------------------------
# Terms a wrong gradient may be missing, per exercise and gradient
# --------------------------------------------------------------------------------------------

def _terms(exercise: str, grad_name: str, run: Run) -> list:
    """[(description, array shaped like the gradient)]: the terms of the reference's formula that a
    derivation commonly leaves out, each with the sign it has in the right gradient."""
    c, dout = run.cache, run.dout
    if exercise == "layernorm" and grad_name == "dx":
        g = dout * c.w
        return [("the path through the mean, -rstd * mean(g)",
                 np.broadcast_to(-c.rstd * g.mean(axis=-1, keepdims=True), g.shape)),
                ("the path through the variance, -rstd * xhat * mean(g * xhat)",
                 -c.rstd * c.xhat * (g * c.xhat).mean(axis=-1, keepdims=True))]
    if exercise == "rmsnorm" and grad_name == "dx":
        g = dout * c.w
        return [("the path through the rms, -rstd * xhat * mean(g * xhat)",
                 -c.rstd * c.xhat * (g * c.xhat).mean(axis=-1, keepdims=True)),
                ("a subtracted mean, -rstd * mean(g) (which RMSNorm does not have)",
                 np.broadcast_to(c.rstd * g.mean(axis=-1, keepdims=True), g.shape))]
    if exercise == "softmax" and grad_name == "dx":
        dot = (dout * c.y).sum(axis=-1, keepdims=True)
        return [("the subtracted dot product, -y * sum(dout * y)", -c.y * dot),
                ("the Jacobian's off-diagonal part, -y_i sum over j != i of y_j dout_j",
                 -c.y * (dot - dout * c.y))]
    if exercise == "attention" and grad_name in ("dq", "dk"):
        datt = dout @ c.v.transpose(0, 1, 3, 2)
        if c.att_mask is not None:
            datt = datt * c.att_mask
        dot = -c.att * (c.att * datt).sum(axis=-1, keepdims=True)  # the softmax's subtracted dot product
        term = dot @ c.k if grad_name == "dq" else dot.transpose(0, 1, 3, 2) @ c.q
        return [("the softmax backward's subtracted dot product, carried to " + grad_name, term * c.scale)]
    if exercise == "cross_entropy" and grad_name == "dlogits":
        n = c.probs.shape[0]
        hot = np.zeros_like(c.probs)
        hot[np.arange(n), c.targets] = 1.0
        return [("the one-hot of the targets, -onehot * dloss / N",
                 (-hot * (float(dout) / n)).reshape(c.logits_shape))]
    if exercise == "gelu" and grad_name == "dx":
        pdf = np.exp(-0.5 * c.x * c.x) / math.sqrt(2.0 * math.pi)
        return [("the product rule's second term, dout * x * pdf(x)", dout * c.x * pdf)]
    if exercise == "gelu_tanh" and grad_name == "dx":
        k = math.sqrt(2.0 / math.pi)
        sech2 = 0.5 * c.x * (1.0 - c.th * c.th)
        return [("the product rule's term dout * x/2 (1 - tanh^2 u) du/dx",
                 dout * sech2 * k * (1.0 + 3 * 0.044715 * c.x * c.x)),
                ("the cubic's share of du/dx, dout * x/2 (1 - tanh^2 u) sqrt(2/pi) 3 * 0.044715 x^2",
                 dout * sech2 * k * 3 * 0.044715 * c.x * c.x)]
    if exercise == "swiglu" and grad_name == "dx":
        second = dout * c.up * c.gate * c.sig * (1.0 - c.sig)
        return [("silu's second term, dout * up * gate * sigmoid(gate) (1 - sigmoid(gate)), in the gate half",
                 np.concatenate([second, np.zeros_like(second)], axis=-1))]
    if exercise == "rope" and grad_name == "dx":
        return [("the term -rotate_half(dout) * sin", -L.rotate_half(dout) * c.sin)]
    if exercise == "block" and grad_name == "dx":
        dx, _ = L.block_backward(dout, c)
        no_attn, _ = catalogue._block_backward(dout, c, attn_identity=False)
        return [("the attention residual's identity path, dx_mid (the gradient at the block's middle)",
                 dx - no_attn)]
    if exercise == "model" and grad_name == "transformer.wte.weight":
        (dlogits,) = L.cross_entropy_backward(dout, c.loss)
        _, dhead, _ = L.linear_backward(dlogits, c.lm_head)
        dwte = catalogue.gpt_backward(dout, c, head_into_wte=False)["transformer.wte.weight"]
        return [("the tied head's gradient, dhead = dlogits^T x", dhead),
                ("the embedding's gradient, dwte (the scatter-add of the blocks' dx)", dwte)]
    return []


def _wrong_forms(exercise: str, grad_name: str, run: Run) -> list:
    """[(sentence, array shaped like the gradient)]: a wrong formula that derivations commonly
    write for the gradient, and the sentence that says what it is when the student's equals it."""
    c, dout, name = run.cache, run.dout, grad_name
    forms = []
    if exercise == "attention" and name in ("dv", "dk"):
        att = c.att if c.att_mask is None else c.att * c.att_mask
        if name == "dv":
            forms.append((f"{name} equals att @ dout instead of att^T @ dout: the transpose of the attention "
                          f"weights is missing.", att @ dout))
        else:
            datt = dout @ c.v.transpose(0, 1, 3, 2)
            if c.att_mask is not None:
                datt = datt * c.att_mask
            (dscores,) = L.softmax_backward(datt, L.SoftmaxCache(c.att))
            forms.append((f"{name} equals dscores @ q * scale instead of dscores^T @ q * scale: the transpose "
                          f"of the scores' gradient is missing (dq = dscores @ k * scale, dk = "
                          f"dscores^T @ q * scale).", (dscores @ c.q) * c.scale))
    if exercise == "dropout" and name == "dx":
        forms.append((f"{name} is dout unchanged: it ignores the mask, so it is nonzero on the dropped "
                      f"units (where it must be zero) and lacks the factor 1/(1-p) on the kept ones.", dout))
    if exercise == "rope" and name == "dx":
        adjacent = np.empty_like(dout)
        adjacent[..., 0::2], adjacent[..., 1::2] = -dout[..., 1::2], dout[..., 0::2]
        forms.append((f"{name} rotates adjacent pairs (x0, x1), (x2, x3), ... where the forward rotates the "
                      f"halves' pairs (x_i, x_(i + hs/2)), as rotate_half does: the RoPE paper's "
                      f"interleaved layout, not this one's.", dout * c.cos - adjacent * c.sin))
    if exercise == "rmsnorm" and name == "dx":
        g = dout  # the gain w left out of g = dout * w
        forms.append((f"{name} is the gradient for a gain of 1: w is missing from g = dout * w (the "
                      f"gradient reaching xhat).",
                      c.rstd * (g - c.xhat * (g * c.xhat).mean(axis=-1, keepdims=True))))
    if exercise == "cross_entropy" and name == "dlogits":
        n = c.probs.shape[0]
        rows = np.arange(n)
        d = np.zeros_like(c.probs)
        d[rows, c.targets] = -1.0 / c.probs[rows, c.targets]
        forms.append((f"{name} is the gradient of the loss w.r.t. the probabilities (-dloss / (N p) at the "
                      f"target, zero elsewhere): it stops at softmax's output and is not carried through "
                      f"the softmax to the logits.", (d * (float(dout) / n)).reshape(c.logits_shape)))
    if exercise == "softmax" and name == "dx":
        for axis in range(dout.ndim - 1):
            forms.append((f"{name} takes the sum sum(dout * y) over axis {axis} instead of the last axis, "
                          f"the one the softmax normalises.",
                          c.y * (dout - (dout * c.y).sum(axis=axis, keepdims=True))))
    if exercise in ("relu", "relu2", "gelu", "gelu_tanh", "swiglu", "dropout") and \
            isinstance(dout, np.ndarray) and dout.shape == np.shape(run.want[0]):
        nonzero = dout != 0
        local = np.divide(np.asarray(run.want[0], dtype=np.float64), dout, out=np.zeros(dout.shape), where=nonzero)
        forms.append((f"{name} is the layer's local derivative alone: it is not multiplied by dout (the "
                      f"chain rule's product is missing).", local))
    return forms


def _equals_wrong_form(exercise: str, name: str, data) -> str | None:
    """The sentence of the _wrong_forms entry that the student's gradient equals on every case."""
    per_run = [_wrong_forms(exercise, name, run) for run, *_ in data]
    for j in range(len(per_run[0]) if per_run else 0):
        if all(j < len(forms) and np.shape(forms[j][1]) == g.shape and
               _close(g, forms[j][1], t, max(_norm(g), _norm(w)))
               for forms, (run, g, w, t) in zip(per_run, data)):
            return per_run[0][j][0]
    return None


def _per_position_terms(exercise: str, grad_name: str, run: Run):
    """(terms, what a term is) for a gradient that sums over positions: terms has the positions'
    axes first (B, T or N, then the gradient's shape), or None."""
    c, dout = run.cache, run.dout
    if exercise == "linear" and grad_name in ("dw", "db"):
        lead = dout.shape[:-1]
        d2, x2 = dout.reshape(-1, dout.shape[-1]), c.x.reshape(-1, c.x.shape[-1])
        t = d2 if grad_name == "db" else np.einsum("no,ni->noi", d2, x2)
        return t.reshape(lead + t.shape[1:])
    if exercise in ("layernorm", "rmsnorm") and grad_name in ("dw", "db"):
        return dout * c.xhat if grad_name == "dw" else dout
    if exercise == "embedding" and grad_name == "dwpe" and c.wpe_shape is not None:
        T = dout.shape[1]
        t = np.zeros((dout.shape[0],) + tuple(c.wpe_shape), dtype=np.float64)
        t[:, :T] = dout
        return t[:, None]  # (B, 1, block_size, C): one term per batch row
    return None


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------

def _fraction(value: float) -> str:
    return f"{value:.4g}"


def _name_factor(exercise: str, runs, scales) -> str | None:
    """The known constant each run's scale equals (or its inverse), with "and the wrong sign" for a
    negative scale; "-1" for the sign alone; None when no known constant fits every run."""
    signs = {math.copysign(1.0, s) for s in scales}
    if len(signs) != 1:
        return None
    negative = signs.pop() < 0
    mags = [abs(s) for s in scales]

    def same(a, b, run):
        return abs(a - b) <= tolerance(exercise, run) * max(abs(a), abs(b))

    if all(same(m, 1.0, r) for m, r in zip(mags, runs)):
        return "-1" if negative else None
    factors = [{f[0]: f for f in _known_factors(exercise, r)} for r in runs]
    for name, inverse_name, _ in _known_factors(exercise, runs[0]):
        values = [f[name][2] if name in f else None for f in factors]
        if None in values or all(v == 1.0 for v in values):
            continue
        for label, want in ((name, values), (inverse_name, [1.0 / v for v in values])):
            if all(same(m, x, r) for m, x, r in zip(mags, want, runs)):
                return f"a factor {label}" + (" and the wrong sign" if negative else "")
    return None


def _mask_regions(exercise: str, run: Run, grad_name: str, shape) -> list:
    """[(description, boolean array)] of entries a cache marks as special, shaped like the gradient."""
    c = run.cache
    out = []
    if exercise == "relu" and np.shape(c.positive) == tuple(shape):
        out += [("where x <= 0 (the units the ReLU zeroes)", ~c.positive),
                ("where x > 0 (the units the ReLU passes)", c.positive)]
    if exercise == "relu2" and np.shape(c.relu_x) == tuple(shape):
        out += [("where x <= 0 (the units relu^2 zeroes)", c.relu_x == 0),
                ("where x > 0", c.relu_x > 0)]
    if exercise == "dropout" and np.shape(c.mask) == tuple(shape):
        out += [("on the dropped units (mask 0)", c.mask == 0),
                ("on the kept units", c.mask != 0)]
    emb = c if exercise == "embedding" else c.embedding if exercise == "model" else None
    if emb is not None and grad_name in ("dwpe", "transformer.wpe.weight") and len(shape) == 2:
        unused = np.zeros(shape, dtype=bool)
        unused[emb.idx.shape[1]:] = True
        out.append(("on the rows t >= T of wpe, which the forward did not use (their gradient is zero)", unused))
    idx = None
    if exercise == "embedding" and grad_name == "dwte":
        idx = c.idx
    if exercise == "model" and grad_name == "transformer.wte.weight":
        idx = c.embedding.idx
    if idx is not None and len(shape) == 2:
        counts = np.bincount(np.asarray(idx).reshape(-1), minlength=shape[0])[:shape[0]]
        rows = lambda sel: np.broadcast_to(sel[:, None], shape)
        out += [("on the rows of token ids that occur more than once (repeated ids)", rows(counts > 1)),
                ("on the rows of token ids that never occur", rows(counts == 0)),
                ("on the rows of token ids that occur in idx", rows(counts > 0))]
    return out


def _axis_names(exercise: str, grad_name: str, shape) -> tuple:
    n = len(shape)
    if exercise == "embedding":
        return ("token id", "channel") if grad_name == "dwte" else ("position", "channel")
    if exercise == "model":
        if grad_name == "transformer.wpe.weight":
            return ("position", "channel")
        if grad_name == "transformer.wte.weight":
            return ("token id", "channel")
        return ("output", "input")[:n] if n == 2 else ("channel",) * n
    if exercise == "linear" and grad_name in ("dw", "db"):
        return ("output", "input")[:n]
    if exercise in ("layernorm", "rmsnorm") and grad_name in ("dw", "db"):
        return ("channel",)
    if exercise == "block" and grad_name != "dx":
        return ("output", "input")[:n] if n == 2 else ("channel",) * n
    if n == 4:
        return ("batch", "head", "time step", "channel")
    if n == 3:
        return ("batch", "time step", "channel")
    if n == 2:
        return ("position", "channel")
    return ("entry",) * n


def _what_there(got, want, dout, bad, tol) -> str:
    """What the student's gradient holds on the wrong entries: zero, dout itself, or nothing said."""
    g = np.asarray(got, dtype=np.float64)[bad]
    scale = max(_norm(want), _norm(got))
    if _norm(g) <= tol * scale:
        return ", where it is zero"
    if isinstance(dout, np.ndarray) and dout.shape == np.shape(got) and _close(g, dout[bad], tol, scale):
        return ", where it passes dout through unchanged"
    return ""


def explain(exercise: str, grad_name: str, runs: list) -> str | None:
    """One sentence about what is wrong with gradient `grad_name` over `runs`, or None if unsure
    (or if it is right)."""
    data = []
    for run in runs:
        got = flatten(run.got, run.grad_names).get(grad_name)
        want = flatten(run.want, run.grad_names).get(grad_name)
        if got is None or want is None:
            continue
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            return f"{grad_name} has shape {got.shape}, expected {want.shape}."
        data.append((run, got, want, tolerance(exercise, run)))
    if not data:
        return None
    name = grad_name

    # NaN, inf
    bad = sum(int((~np.isfinite(g)).sum()) for _, g, _, _ in data)
    if bad:
        total = sum(g.size for _, g, _, _ in data)
        kinds = " or ".join(k for k, f in (("NaN", np.isnan), ("inf", np.isinf))
                            if any(f(g).any() for _, g, _, _ in data))
        return f"{name} holds {kinds} in {bad} of its {total} entries (over all cases)."
    if all(_close(g, w, t) for _, g, w, t in data):
        return None
    if all(_norm(g) == 0.0 for _, g, _, _ in data):
        return f"{name} is zero everywhere: returned zeros, not computed."

    # a constant factor
    scales, fits = [], True
    for run, g, w, t in data:
        ww = float(np.vdot(w, w))
        if ww == 0.0:
            fits = fits and _norm(g) == 0.0
            continue
        s = float(np.vdot(g, w)) / ww
        fits = fits and s != 0.0 and _close(g, s * w, t, max(_norm(g), abs(s) * _norm(w)))
        scales.append((run, s))
    if fits and any(abs(s - 1.0) > tolerance(exercise, r) for r, s in scales):
        # cases where the gradient is right (scale 1) cannot name a factor: name it on the others
        wrong = [(r, s) for r, s in scales if abs(s - 1.0) > tolerance(exercise, r)]
        right = len(scales) - len(wrong)
        where = f" on the {len(wrong)} cases where it is wrong (right on the other {right})" if right else ""
        runs_s, ss = [r for r, _ in wrong], [s for _, s in wrong]
        named = _name_factor(exercise, runs_s, ss)
        if named is not None:
            if named == "-1":
                return f"{name} has the wrong sign{where}: it is -1 times the right gradient."
            return f"{name} is off by {named}{where}: it is the right gradient times that factor."
        spread = max(ss) - min(ss)
        if spread <= max(t for *_, t in data) * max(abs(s) for s in ss):
            return f"{name} is off by a constant factor {_fraction(ss[0])}{where}: it is that multiple of the right gradient."
        listed = ", ".join(_fraction(s) for _, s in scales)
        return f"{name} is a multiple of the right gradient, by a factor that changes from case to case ({listed})."

    # transposed, or a transpose read in the wrong shape
    if all(g.ndim >= 2 and g.shape[-1] == g.shape[-2] for _, g, _, _ in data) and \
            all(_close(np.swapaxes(g, -1, -2), w, t) for _, g, w, t in data):
        return f"{name} is transposed: its transpose is the right gradient."
    if all(g.ndim == 2 for _, g, _, _ in data) and \
            all(_close(g, w.T.reshape(g.shape), t) for _, g, w, t in data):
        return (f"{name} is the right gradient's transpose reshaped to {name}'s shape: a reshape "
                f"where a transpose belongs.")

    # the two halves of the last axis swapped (a concatenation in the wrong order)
    if all(g.shape[-1] % 2 == 0 and g.shape[-1] > 0 for _, g, _, _ in data) and all(
            _close(np.concatenate(np.split(g, 2, axis=-1)[::-1], axis=-1), w, t) for _, g, w, t in data):
        return f"{name} has the two halves of its last axis swapped: concatenated in the wrong order."

    # dout minus the right gradient: a mask or a selection inverted
    if all(isinstance(r.dout, np.ndarray) and r.dout.shape == g.shape for r, g, _, _ in data) and all(
            _close(g, r.dout - w, t, max(_norm(g), _norm(w), _norm(r.dout))) for r, g, w, t in data):
        return (f"{name} is dout minus the right gradient: it passes dout exactly where the right "
                f"gradient blocks it, and blocks it where it passes (a mask inverted).")

    # a sum over positions left out
    terms_ok = {}
    for run, g, w, t in data:
        terms = _per_position_terms(exercise, name, run)
        if terms is None:
            terms_ok = None
            break
        per_position = terms.reshape((-1,) + g.shape)  # (positions, *gradient's shape)
        options = {
            "the first position's term alone: it is not summed over the positions": per_position[0],
            "the last position's term alone: it is not summed over the positions (an assignment in a "
            "loop where += belongs?)": per_position[-1],
        }
        if terms.ndim - g.ndim == 2:  # (B, T, ...) terms
            options["the first batch row's terms summed over time: it is not summed over the batch"] = terms[0].sum(axis=0)
            options["the first time step's terms summed over the batch: it is not summed over time"] = terms[:, 0].sum(axis=0)
            if exercise == "embedding":  # dwpe: one term per batch row
                options = {"the first batch row's alone: it is not summed over the batch": terms[0, 0],
                           "the last batch row's alone: it is not summed over the batch": terms[-1, 0]}
        for k, v in options.items():
            held, cases = terms_ok.get(k, (True, 0))
            terms_ok[k] = (held and _close(g, v, t, max(_norm(g), _norm(w))), cases + 1)
    if terms_ok:
        for k, (held, cases) in terms_ok.items():
            if held and cases == len(data):  # on every case
                return f"{name} equals {k}."

    # a missing term
    found = _missing_term(exercise, name, data)
    if found:
        return found

    # a wrong formula derivations commonly write (a transpose left out, a sum on the wrong axis)
    found = _equals_wrong_form(exercise, name, data)
    if found:
        return found

    # the error sits on entries a cache marks (masked units, repeated ids)
    regions = None
    for run, g, w, t in data:
        err = np.abs(g - w)
        wrong = err > t * max(float(np.abs(w).max()), float(np.abs(g).max()))
        marks = _mask_regions(exercise, run, name, g.shape)
        if regions is None:
            regions = [[desc, True, False] for desc, _ in marks]
        for slot, (desc, sel) in zip(regions, marks):
            inside = not wrong[~sel].any()
            slot[1] = slot[1] and inside
            slot[2] = slot[2] or (wrong.any() and inside and bool((~sel).any()))
    for desc, inside, informative in regions or []:
        if inside and informative:
            run, g, w, t = next((d for d in data if not _close(d[1], d[2], d[3])), data[0])
            wrong = np.abs(g - w) > t * max(float(np.abs(w).max()), float(np.abs(g).max()))
            return f"{name} is right except {desc}{_what_there(g, w, run.dout, wrong, t)}."

    # the error sits at some indices along one axis
    found = _axis_subset(exercise, name, data)
    if found:
        return found

    # a factor that differs from row to row (one per position)
    if all(g.ndim >= 2 and g.shape[-1] > 1 for _, g, _, _ in data):
        row_ok, varies = True, False
        for _, g, w, t in data:
            ww = (w * w).sum(axis=-1, keepdims=True)
            s = np.where(ww > 0, (g * w).sum(axis=-1, keepdims=True) / np.where(ww > 0, ww, 1.0), 0.0)
            row_ok = row_ok and _close(g, s * w, t, max(_norm(g), _norm(w)))
            varies = varies or float(np.ptp(s)) > t * float(np.abs(s).max())
        if row_ok and varies:
            return (f"{name} is off by a factor that differs from row to row: each row (position) is a "
                    f"multiple of the right one, as when a per-position scale such as rstd is left out "
                    f"or applied twice.")
    err = math.sqrt(sum(_norm(g - w) ** 2 for _, g, w, _ in data))
    rel = err / math.sqrt(sum(_norm(w) ** 2 for _, _, w, _ in data) or 1.0)
    if rel < 1e-2:
        return (f"{name} is close to the right gradient but not equal (normwise relative error "
                f"{rel:.2g}, far above rounding): an approximation of the formula, or a small term "
                f"gone wrong.")
    return (f"{name} {VAGUE} (normwise relative error {rel:.2g}): not a constant "
            f"multiple, a transpose, or a known missing term of the right gradient.")


def _missing_term(exercise: str, name: str, data) -> str | None:
    per_run = [_terms(exercise, name, run) for run, *_ in data]
    if not per_run or not per_run[0]:
        return None
    k = len(per_run[0])
    err = np.concatenate([(w - g).ravel() for _, g, w, _ in data])
    scale = max(np.linalg.norm(np.concatenate([w.ravel() for *_, w, _ in data])),
                np.linalg.norm(np.concatenate([g.ravel() for _, g, _, _ in data])))
    tol = max(t for *_, t in data)
    columns = [np.concatenate([np.asarray(terms[j][1], dtype=np.float64).ravel() for terms in per_run])
               for j in range(k)]
    subsets = [(j,) for j in range(k)] + [(i, j) for i in range(k) for j in range(i + 1, k)]
    for subset in subsets:
        A = np.stack([columns[j] for j in subset], axis=1)
        if np.linalg.norm(A) == 0.0:
            continue
        coef, *_ = np.linalg.lstsq(A, err, rcond=None)
        if np.linalg.norm(err - A @ coef) <= tol * scale:
            parts = []
            for j, c in zip(subset, coef):
                desc = per_run[0][j][0]
                if abs(c - 1.0) <= math.sqrt(tol):
                    parts.append(f"misses {desc}")
                elif abs(c - 2.0) <= math.sqrt(tol):
                    parts.append(f"has {desc} with the wrong sign")
                elif abs(c + 1.0) <= math.sqrt(tol):
                    parts.append(f"counts {desc} twice")
                elif abs(c) > math.sqrt(tol):
                    parts.append(f"is off by {_fraction(c)} times {desc}")
            if parts:
                return f"{name} " + " and ".join(parts) + "."
    # one term, its coefficient changing from case to case
    for j in range(k):
        coefs = []
        for (run, g, w, t), terms in zip(data, per_run):
            col = np.asarray(terms[j][1], dtype=np.float64).ravel()
            e = (w - g).ravel()
            cc = float(col @ col)
            if cc == 0.0:
                if np.linalg.norm(e) > t * max(_norm(w), _norm(g)):
                    break
                continue
            c = float(col @ e) / cc
            if np.linalg.norm(e - c * col) > t * max(_norm(w), _norm(g)):
                break
            coefs.append(c)
        else:
            if coefs:
                listed = ", ".join(_fraction(c) for c in coefs)
                return (f"{name}'s error lies along {per_run[0][j][0]}, with a coefficient that "
                        f"changes from case to case ({listed}).")
    return None


def _axis_subset(exercise: str, name: str, data) -> str | None:
    shape0 = data[0][1].shape
    axes = _axis_names(exercise, name, shape0)
    order = sorted(range(len(shape0)), key=lambda a: 0 if axes[a] == "time step" else 1)
    for a in order:
        labels, seen_long, proper, everywhere = None, False, False, False
        for run, g, w, t in data:
            wrong = np.abs(g - w) > t * max(float(np.abs(w).max()), float(np.abs(g).max()))
            other = tuple(i for i in range(g.ndim) if i != a)
            hit = list(np.flatnonzero(wrong.any(axis=other)))
            n = g.shape[a]
            if not hit:
                continue
            seen_long = seen_long or n > 1
            proper = proper or len(hit) < n
            if len(hit) == n and n > 1:
                everywhere = True
                break
            fits = {"some"}  # the labels this run's wrong indices fit
            if hit == [0]:
                fits.add("first")
            if hit == [n - 1]:
                fits.add("last")
            if hit == list(range(n - 1)):
                fits.add("all but the last")
            if hit == list(range(1, n)):
                fits.add("all but the first")
            labels = fits if labels is None else labels & fits
        if labels is None or everywhere or not (seen_long and proper):
            continue
        pattern = next(p for p in ("first", "last", "all but the last", "all but the first", "some") if p in labels)
        run, g, w, t = next(d for d in data if not _close(d[1], d[2], d[3]))
        wrong = np.abs(g - w) > t * max(float(np.abs(w).max()), float(np.abs(g).max()))
        there = _what_there(g, w, run.dout, wrong, t)
        axis = axes[a] if a < len(axes) else f"axis {a}"
        if pattern == "first":
            where = f"the first {axis} ({axis} 0)"
        elif pattern == "last":
            where = f"the last {axis}"
        elif pattern != "some":
            right_at = pattern.split()[-1]
            note = ""
            if exercise == "attention" and axis == "time step" and right_at == "last":
                note = (" (the query that sees every key, where the causal mask changes nothing: "
                        "is the mask applied?)")
            return f"{name} is right only at the {right_at} {axis}{note}, and wrong at every other."
        else:
            hit = np.flatnonzero(wrong.any(axis=tuple(i for i in range(g.ndim) if i != a)))
            listed = ", ".join(str(i) for i in hit[:8]) + (", ..." if hit.size > 8 else "")
            where = f"some indices along the {axis} axis ({listed} of {g.shape[a]}, case {run.label!r})"
        return f"{name} is wrong only at {where}{there}; elsewhere it is right."
    return None
