"""`start`: the file a student begins from. It holds the question, never the answer: the forward's
formula (the reference forward's docstring), the cache's fields with their shapes in the first
case, what the backward returns, the link to the derivation, and a body that raises
NotImplementedError."""
from __future__ import annotations

import inspect
import re

import numpy as np

from . import registry


def _field_comments(cache_type) -> dict[str, str]:
    """The comment after each field in the cache class's source: `xhat: np.ndarray  # (..., C) ...`."""
    comments = {}
    for line in inspect.getsource(cache_type).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"list of {len(value)} {'/'.join(kinds) or 'items'}"
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _comment(text: str, indent: str = "#     ") -> list[str]:
    return [(indent + line).rstrip() for line in text.splitlines()]


def text(name: str, path: str) -> str:
    """The file `start NAME` writes at `path` (the path appears in the check command it shows)."""
    ex = registry.get(name)
    first = registry.cases(ex)[0]
    _, cache = ex.call(ex.forward, first.arrays, first.options)
    comments = _field_comments(ex.cache_type)
    rows = [(f, _describe(getattr(cache, f)), comments.get(f, "")) for f in ex.cache_type._fields]
    w1, w2 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    fields = [f"#     {f:<{w1}}  {d:<{w2}}  {c}".rstrip() for f, d, c in rows]
    forward_name = f"{ex.forward.__module__}.{ex.forward.__qualname__}"
    formula = inspect.cleandoc(ex.forward.__doc__ or "")
    if ex.scalar_out:
        dout = "dout is a float: the gradient of the final value with respect to the loss (dloss)."
    else:
        dout = "dout is the gradient of the loss with respect to out, an array shaped like out."
    doc_line = "dout: dloss, a float." if ex.scalar_out else "dout: shaped like the forward's out."
    if ex.kind == "tuple":
        ins = ", ".join(ex.wrt)
        returns = [f"Return {ex.returns()}: the gradients of the loss with respect to {ins}, each an array",
                   "of its input's shape and dtype (float64), fresh (never write into dout or the cache)."]
    else:
        keys = ex.grad_names(first)[1:] if ex.kind == "block" else ex.grad_names(first)
        returns = [f"Return {ex.returns()},", "fresh arrays of each input's shape and dtype. In the first case the "
                   "keys are:"] + [f"    {k}" for k in keys]
    lines = [
        f'"""Exercise {name}: write {name}_backward(dout, cache).',
        "",
        f"    {ex.title}",
        "",
        f"Check it:    python -m exercises check {name} {path}",
        f"Derivation:  {ex.doc}  (it holds the answer: try first)",
        '"""',
        "import numpy as np",
        "",
        f"# The forward, {forward_name}, called as {ex.signature}:",
        *_comment(formula),
        "#",
        f"# cache is its {ex.cache_type.__name__}, with these fields (shown for the case {first.label}):",
        *fields,
        "#",
        *_comment(dout, "# "),
        *_comment("\n".join(returns), "# "),
        *(["#", *_comment(ex.notes, "# ")] if ex.notes else []),
        "#",
        f"# Optional: define {ex.signature} -> ({'loss' if ex.scalar_out else 'out'}, cache) too,",
        "# with a cache of your own: check then compares your forward with the reference's and runs your",
        "# backward on your cache.",
        "",
        "",
        f"def {name}_backward(dout, cache):",
        f'    """{doc_line}"""',
        f'    raise NotImplementedError("{name}_backward: not written yet")',
        "",
    ]
    return "\n".join(lines)
