"""The one comparison helper of the unit tests and the parity suite: print every tensor's error,
then assert. NumPy only: it reads a torch tensor without importing torch.

Every test compares "ours" with "theirs" (the reference: PyTorch in parity_tests/, the plain
npgpt layers or finite differences in tests/) through `compare_all` or `assert_close`, or
computes a normwise error with `rel_error`. The first two print a table, one row per tensor,

    tensor                       shape               max abs        rel  bound
    transformer.h.0.ln_1.weight  (16,)             1.110e-16  4.527e-16  rel<=5.8e-13 ok

where rel is the normwise relative error ||ours - theirs|| / ||theirs|| (Frobenius norm over the
whole tensor), then fail with a message that names every tensor over its bound and its errors.
Both sides are converted to NumPy float64 before any arithmetic, so the comparison itself adds no
rounding beyond float64's.

Why normwise: an elementwise relative error is meaningless for entries that are 0 or nearly 0 in
the true gradient (a dropped unit, a masked attention weight), while the normwise error measures
the error against the size of the whole tensor, which is what a gradient step sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bounds as _bounds

PARITY_FORWARD_DEPTH = _bounds.PARITY_DEPTH // 2
"""Stages of the suite's largest forward (a model's: per layer 2 norms, 4 attention matmuls,
softmax, 2 MLP matmuls, the activation; two layers; embedding, head, loss); its backward retraces
each of them, which makes the PARITY_DEPTH of npgpt.bounds."""


def bounds(dtype, n: int = _bounds.PARITY_N, depth: int = PARITY_FORWARD_DEPTH) -> dict[str, float]:
    """{"forward": bound for outputs, logits and losses, "grad": bound for gradients} of a forward of
    `depth` stages whose longest sum has n terms (npgpt.bounds.parity): the outputs carry the
    forward's depth stages, the gradients twice that (the backward retraces every stage). At the
    defaults, the suite's largest shapes: 5.9e-13 / 8.3e-13 in float64, 3.2e-4 / 4.5e-4 in float32."""
    return {"forward": _bounds.parity(dtype, n, depth), "grad": _bounds.parity(dtype, n, 2 * depth)}


# The suite-wide bounds (npgpt.bounds.parity at its largest shapes), for a table or a figure.
RTOL = {np.dtype(d): bounds(d) for d in (np.float64, np.float32)}


def to_numpy64(x) -> np.ndarray:
    """A torch tensor (any device, with or without grad), NumPy array or Python number as float64."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class Row:
    """One line of the table.

    atol is a number (a bound on the max absolute error) or "elementwise" (an array of per-element
    bounds was given, e.g. from a rounding-error analysis); atol_ratio is max |ours - theirs| / atol
    over the elements, so the absolute bound holds when it is <= 1.
    """

    name: str
    shape: tuple
    max_abs: float
    rel: float
    rtol: float | None = None
    atol: float | str | None = None  # a number, or "elementwise"
    atol_ratio: float | None = None
    scaled: bool = False  # rel is ||ours - theirs|| / ||scale||, not / ||theirs|| (see compare_all)

    @property
    def ok(self) -> bool:
        if np.isnan(self.max_abs) or np.isnan(self.rel):
            return False  # a NaN or inf in either tensor
        if self.rtol is not None and not self.rel <= self.rtol:
            return False
        if self.atol is not None and not self.atol_ratio <= 1.0:
            return False
        return True

    @property
    def bound(self) -> str:
        parts = []
        if self.rtol is not None:
            parts.append(f"rel<={self.rtol:.1e}" + (" (vs ||scale||)" if self.scaled else ""))
        if isinstance(self.atol, str):
            parts.append(f"abs<={self.atol} bound (worst {self.atol_ratio:.2g} of it)")
        elif self.atol is not None:
            parts.append(f"abs<={self.atol:.1e}")
        return " ".join(parts) or "-"

    def describe(self) -> str:
        return (f"{self.name} {self.shape}: max abs {self.max_abs:.3e}, rel {self.rel:.3e} "
                f"(bound {self.bound})")


def errors(ours, theirs) -> tuple[float, float]:
    """(max absolute error, normwise relative error ||ours - theirs|| / ||theirs||) in float64.

    rel is 0 when both are exactly zero and inf when theirs is zero but ours is not; a NaN or inf
    in either makes both errors NaN (so the row fails).
    """
    a, b = to_numpy64(ours), to_numpy64(theirs)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: ours {a.shape}, theirs {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan"), float("nan")
    diff = a - b
    max_abs = float(np.max(np.abs(diff)))
    num, den = float(np.linalg.norm(diff)), float(np.linalg.norm(b))
    if den == 0.0:
        return max_abs, 0.0 if num == 0.0 else float("inf")
    return max_abs, num / den


def rel_error(a, b) -> float:
    """Normwise relative error ||a - b|| / ||b|| in float64 (||a - b|| itself when b is all zero,
    so two zero tensors give 0). npgpt.gradcheck reports this for every gradient it checks."""
    a, b = to_numpy64(a), to_numpy64(b)
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    if denom == 0.0:
        return float(diff)
    return float(diff / denom)


def _bound_for(bound, name: str):
    """A bound is one value for every tensor, or a dict {name: value} (None: no such bound)."""
    return bound.get(name) if isinstance(bound, dict) else bound


def error_rows(ours: dict, theirs: dict, rtol=None, atol=None, scale: dict | None = None) -> list[Row]:
    """One Row per key of `theirs`, in its order. Keys must agree exactly: a missing gradient is
    an error, not a skipped row. rtol: a number, or a dict {name: number}; atol: the same, where
    a value may also be an array of per-element bounds."""
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing or extra:
        raise AssertionError(f"tensor names differ: missing from ours {missing}, only in ours {extra}")
    rows = []
    for name in theirs:
        a, b = to_numpy64(ours[name]), to_numpy64(theirs[name])
        if a.shape != b.shape:
            raise AssertionError(f"{name}: shape mismatch, ours {a.shape}, theirs {b.shape}")
        max_abs, rel = errors(a, b)
        scaled = scale is not None and name in scale
        if scaled and np.isfinite(rel):  # ||a - b|| / ||scale||
            num, den = float(np.linalg.norm(a - b)), float(np.linalg.norm(to_numpy64(scale[name])))
            rel = num / den if den > 0 else (0.0 if num == 0.0 else float("inf"))
        row = Row(name, tuple(b.shape), max_abs, rel, _bound_for(rtol, name), scaled=scaled)
        tol = _bound_for(atol, name)
        if tol is not None:
            tol = np.asarray(tol, dtype=np.float64)
            if tol.ndim == 0:
                row.atol = float(tol)
                ratio = max_abs / row.atol if row.atol > 0 else (0.0 if max_abs == 0 else np.inf)
            else:  # one bound per element; 0/0 (exact where the bound is 0) counts as within
                row.atol = "elementwise"
                diff = np.abs(a - b)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios = np.where(diff == 0, 0.0, diff / np.broadcast_to(tol, diff.shape))
                ratio = float(np.max(ratios)) if ratios.size else 0.0
            row.atol_ratio = float(ratio)
        rows.append(row)
    return rows


def format_table(rows: list[Row], header: str = "", show_bounds: bool = True) -> str:
    """The table as text: name, shape, max abs, rel, and (show_bounds) each bound and ok/FAIL."""
    width = max([len("tensor")] + [len(r.name) for r in rows])
    lines = [f"== {header} ==" if header else "=="]
    title = f"{'tensor':<{width}}  {'shape':<16} {'max abs':>10} {'rel':>10}"
    lines.append(title + ("  bound" if show_bounds else ""))
    for r in rows:
        line = f"{r.name:<{width}}  {str(r.shape):<16} {r.max_abs:>10.3e} {r.rel:>10.3e}"
        if show_bounds:
            line += f"  {r.bound} {'ok' if r.ok else 'FAIL'}"
        lines.append(line)
    return "\n".join(lines)


def compare_all(ours: dict, theirs: dict, rtol=None, atol=None, header: str = "",
                scale: dict | None = None) -> list[Row]:
    """Print the error table of every tensor in `theirs`, then assert each is within bound.

    rtol bounds the normwise relative error, atol the absolute error (for tensors whose true value
    is 0, where a relative error has no meaning, or per element where a rounding-error analysis
    gives a bound). Each is one value for all tensors or a dict {name: value}; an atol value may be
    an array of per-element bounds. Every tensor needs at least one bound. Returns the rows.

    scale ({name: array}, optional) replaces ||theirs|| as the denominator of rel for those
    tensors: for a result that is a sum of terms which may cancel, the rounding error is relative to
    the terms' magnitudes (e.g. the sum of |per-position gradients|), not to the sum itself.
    """
    rows = error_rows(ours, theirs, rtol, atol, scale)
    unbounded = [r.name for r in rows if r.rtol is None and r.atol is None]
    if unbounded:
        raise ValueError(f"compare_all: no bound given for {unbounded}")
    print(format_table(rows, header))
    bad = [r for r in rows if not r.ok]
    if bad:
        raise AssertionError(f"{header}: {len(bad)} of {len(rows)} tensor(s) over the bound: "
                             + "; ".join(r.describe() for r in bad))
    return rows


def assert_close(name: str, ours, theirs, rtol: float | None = None, atol: float | None = None,
                 header: str = "") -> Row:
    """compare_all for a single tensor."""
    return compare_all({name: ours}, {name: theirs}, rtol, atol, header or name)[0]


def compare_outputs_and_grads(ours_out: dict, theirs_out: dict, ours_grads: dict, theirs_grads: dict,
                              dtype, header: str = "", n: int = _bounds.PARITY_N,
                              depth: int = PARITY_FORWARD_DEPTH) -> list[Row]:
    """One table for a forward's outputs and a backward's gradients, each under its bound for the
    dtype and the computation's sizes (`bounds(dtype, n, depth)`: n the longest sum, depth the
    forward's stages; the defaults are the suite's largest shapes)."""
    clash = set(theirs_out) & set(theirs_grads)
    if clash:
        raise ValueError(f"output and gradient names clash: {sorted(clash)}")
    b = bounds(dtype, n, depth)
    rtol = {**{k: b["forward"] for k in theirs_out}, **{k: b["grad"] for k in theirs_grads}}
    return compare_all({**ours_out, **ours_grads}, {**theirs_out, **theirs_grads}, rtol=rtol,
                       header=f"{header} [{np.dtype(dtype).name}, n={n}, depth={depth}]")
