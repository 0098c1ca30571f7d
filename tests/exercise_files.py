"""Student files for tests/test_exercises.py, written from the reference's own source.

`reference_file` copies the reference backward's source (inspect.getsource) into a file under the
exercise's name, `name_backward`, and with forward=True the reference forward's as `name_forward`:
the worker imports and runs that copy, not npgpt's function (`function_file` does the same for any
function of the backward's signature). `variant_file` keeps the copy as
`_reference_backward` and wraps it in a plausible mistake on one returned gradient, drawn from
an rng: scaled by a factor, negated, transposed (where the gradient is square in its last two
axes), or dropped (zeroed).
"""
from __future__ import annotations

import inspect
import re
import textwrap

from exercises import registry

HEADER = """\
import math

import numpy as np
from npgpt.layers import *  # the reference layers: the block and the model compose them
from npgpt.layers import _GELU_TANH_K, _sum_to_last_axis
from npgpt.model import GPTCache
"""

MISTAKES = ("scaled", "negated", "transposed", "zeroed")


def _renamed(fn, new_name: str) -> str:
    source = textwrap.dedent(inspect.getsource(fn))
    return re.sub(r"^def \w+\(", f"def {new_name}(", source, count=1, flags=re.M)


def function_file(ex: registry.Exercise, backward, forward: bool = False, header: str = "") -> str:
    """A student's file holding `backward`'s source (any function with the reference backward's
    signature and returns: the reference's, a catalogue mistake's) as NAME_backward, after HEADER
    and `header` (imports or helpers its source needs); with forward=True the reference forward's
    source as NAME_forward too."""
    parts = [HEADER + header, _renamed(backward, f"{ex.name}_backward")]
    if forward:
        parts.append(_renamed(ex.forward, f"{ex.name}_forward"))
    return "\n\n".join(parts)


def reference_file(ex: registry.Exercise, forward: bool = False) -> str:
    return function_file(ex, ex.backward, forward)


def variant_file(ex: registry.Exercise, rng, forward: bool = False) -> tuple[str, str]:
    """A wrong backward: (source, what is wrong with it). Which gradient, which mistake and the
    factor are drawn from rng; a gradient is picked among the names of the first case's gradients."""
    names = ex.grad_names(registry.cases(ex)[0])
    j = int(rng.integers(len(names)))
    mistake = MISTAKES[int(rng.integers(len(MISTAKES)))]
    factor = float(rng.choice([rng.uniform(0.3, 0.8), rng.uniform(1.3, 3.0)]))
    change = {"scaled": f"g * {factor!r}", "negated": "-g", "zeroed": "np.zeros_like(g)",
              "transposed": "np.swapaxes(g, -1, -2) if g.ndim >= 2 and g.shape[-1] == g.shape[-2] else -g"}[mistake]
    wrapper = f"""
def _wrong(g):
    return {change}


def {ex.name}_backward(dout, cache):
    grads = _reference_backward(dout, cache)
    kind = {ex.kind!r}
    if kind == "tuple":
        grads = list(grads)
        grads[{j}] = _wrong(grads[{j}])
        return tuple(grads)
    if kind == "block":
        dx, params = grads
        if {j} == 0:
            return _wrong(dx), params
        grads = params
    key = {names[j]!r}  # a key of the first case; a case without it (fewer layers) keeps its grads
    if key in grads:
        grads = {{**grads, key: _wrong(grads[key])}}
    return (dx, grads) if kind == "block" else grads
"""
    parts = [HEADER, _renamed(ex.backward, "_reference_backward"), wrapper]
    if forward:
        parts.append(_renamed(ex.forward, f"{ex.name}_forward"))
    what = f"{names[j]} {mistake}" + (f" by {factor:.3g}" if mistake == "scaled" else "")
    return "\n\n".join(parts), what
