"""Student files for tests/test_exercises.py, written from the reference's own source.

`reference_file` copies the reference backward's source (inspect.getsource) into a file under the
exercise's name, `name_backward`, and with forward=True the reference forward's as `name_forward`:
the worker imports and runs that copy, not npgpt's function (`function_file` does the same for any
function of the backward's signature). `variant_file` keeps the copy as
`_reference_backward` and wraps it in a plausible mistake on one returned gradient, drawn from
an rng: scaled by a factor, negated, transposed (where the gradient is square in its last two
axes), or dropped (zeroed). `mistake_file` writes a catalogue mistake's wrong backward
(exercises/catalogue.py) as the student's own NAME_backward: its source, the values of the
switches its factory closed over as module-level names, and the source of each catalogue helper
it calls: the file imports no backward.
"""
from __future__ import annotations

import inspect
import re
import textwrap
import types

from exercises import catalogue, registry

HEADER = """\
import math

import numpy as np
from npgpt import layers as L
from npgpt.layers import *  # the reference layers: the block and the model compose them
from npgpt.layers import _GELU_TANH_K, _sum_to_last_axis
from npgpt.model import BLOCK_PARAM_NAMES, GPTCache
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


def _global_names(code: types.CodeType) -> set:
    """Every name a code object (and the functions nested in it) may read as a global."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def mistake_file(ex: registry.Exercise, mistake: catalogue.Mistake) -> str:
    """A student's file whose NAME_backward is the catalogue mistake's wrong backward: its own
    source; the switches its factory closed over (e.g. mean_path = False) as module-level names;
    the source of each catalogue helper it calls (_block_backward, gpt_backward,
    _dropout_keep_scale, ...), and an import of any other catalogue name they read that the
    header does not define (BLOCK_PARAM_NAMES). The file imports no backward."""
    fn = mistake.backward
    available = {}
    exec(HEADER, available)
    helpers, imports, pending = {}, set(), [fn.__code__]
    while pending:
        for name in sorted(_global_names(pending.pop())):
            value = vars(catalogue).get(name)
            if name in available or name in helpers or value is None or name.startswith("__"):
                continue
            if inspect.isfunction(value) and value.__module__ == catalogue.__name__:
                helpers[name] = textwrap.dedent(inspect.getsource(value))
                pending.append(value.__code__)
            else:
                imports.add(name)
    lines = [f"from exercises.catalogue import {name}" for name in sorted(imports)]
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        value = cell.cell_contents
        assert eval(repr(value)) == value, f"{mistake.key}: {name} = {value!r} cannot be written as source"
        lines.append(f"{name} = {value!r}")
    header = "\n".join(lines) + "\n\n\n" + "\n\n".join(helpers[n] for n in sorted(helpers))
    return function_file(ex, fn, header=header)


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
