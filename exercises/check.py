"""`check`: a student's backward against the reference pair and centred finite differences.

For every case of the exercise (exercises.registry) the parent computes, once per process, the
reference forward's output and cache, the reference backward's gradients and the centred finite
differences of sum(out * dout) in float64; the worker (exercises._worker, in its own process)
computes the student's gradients. Each gradient is compared with both:

- the reference's, to kind ``chain`` of npgpt.bounds: the student's code may add its sums in
  another order and compute the cache with its own forward, so every stage of the forward and the
  backward rounds differently (depth: twice the exercise's stages), never bit for bit;
- the finite differences', to npgpt.gradcheck.finite_diff_bound (kind ``finite_diff``), except in
  the cases where centred differences do not apply (a kink at 0, a norm's row of zeros), and
  on a sample of entries of each tensor where the exercise says so (the block's and the model's, for time).

A student's NAME_forward, when the file defines one, is compared with the reference forward to
kind ``chain`` over the forward's stages. A failed gradient is explained in a sentence
(exercises.diagnose.explain) and matched to the catalogue of known mistakes (name_mistake).
"""
from __future__ import annotations

import functools
import json
import math
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt import bounds
from npgpt.compare import rel_error
from npgpt.gradcheck import Check, finite_diff_bound, numerical_gradient

from . import diagnose, registry, sandbox

PASS, WRONG, BAD_INPUT = 0, 1, 2
H = 1e-5  # the finite-difference step
DEFAULT_TIMEOUT = 20.0
MAX_OUTPUT_LINES = 20  # of the student's prints shown
MAX_LINE = 200  # characters of each
MAX_VAGUE = 3  # gradients told "wrong throughout" one by one; the rest in one line


@dataclass
class Prepared:
    """One case with everything the reference says about it."""
    case: registry.Case
    dout: object  # an array, or a float for a loss
    out: object  # the reference forward's output
    cache: object  # the reference forward's cache
    want: tuple  # the reference backward's gradients, in ex.grad_names(case) order
    numeric: tuple | None  # the finite differences of each, None where they do not apply
    terms: float  # ||out * dout||: the size of the terms of f = sum(out * dout)
    n: int  # the longest sum: the output's size or an input's


def _flat_grads(ex: registry.Exercise, raw, case: registry.Case) -> tuple:
    return tuple(registry.unpack(ex, raw, case))


def _numeric(f, x: np.ndarray, entries: int | None, rng) -> np.ndarray:
    """Centred differences of f w.r.t. every entry of x, or (entries given) of that many entries drawn
    at random, NaN elsewhere (CS231n's sparse gradient check): the comparison reads only those."""
    if entries is None or x.size <= entries:
        return numerical_gradient(f, x, H)
    return numerical_gradient(f, x, H, entries=rng.choice(x.size, entries, replace=False))


@functools.lru_cache(maxsize=None)
def prepared(name: str) -> tuple:
    """Every case of the exercise with its reference results (computed once per process)."""
    ex = registry.get(name)
    result = []
    rng = np.random.default_rng(0)  # the entries a sparse finite-difference check visits
    for i, case in enumerate(registry.cases(ex)):
        out, cache = ex.call(ex.forward, case.arrays, case.options)
        dout = registry.dout_for(ex, case, out, i)
        want = _flat_grads(ex, ex.backward(dout, cache), case)
        wrt = ex.wrt_names(case)
        numeric = None
        if case.fd:
            def f():
                return float(np.sum(np.asarray(ex.call(ex.forward, case.arrays, case.options)[0]) * dout))
            numeric = tuple(_numeric(f, case.arrays[x], ex.fd_entries, rng) for x in wrt)
        terms = float(np.linalg.norm(np.asarray(out, dtype=np.float64) * dout))
        n = max(np.size(out), *(case.arrays[x].size for x in wrt))
        for a in (*case.arrays.values(), dout, *want, *(numeric or ())):
            if isinstance(a, np.ndarray):
                a.flags.writeable = False  # shared by every check of this process: read only
        result.append(Prepared(case, dout, out, cache, want, numeric, terms, n))
    return tuple(result)


def reference_bound(ex: registry.Exercise, n: int) -> float:
    """Kind chain: the student's forward (or the reference's) and backward, each of ex.depth stages
    whose sums of up to n terms may be added in another order."""
    return bounds.chain(np.float64, n, 2 * ex.depth, ex.amplification)


def forward_bound(ex: registry.Exercise, n: int) -> float:
    return bounds.chain(np.float64, n, ex.depth, ex.amplification)


@dataclass
class Row:
    name: str
    max_abs: float = 0.0
    rel: float = 0.0
    fd_rel: float | None = None
    ok: bool = True
    worst: str = ""  # the label of the case that failed first
    nonfinite: str = ""  # the label of a case where it holds NaN or inf

    def update(self, label, max_abs, rel, ok, fd_rel=None):
        self.max_abs = max_abs if math.isnan(max_abs) else max(self.max_abs, max_abs)  # NaN sticks
        self.rel = rel if math.isnan(rel) else max(self.rel, rel)
        if fd_rel is not None:
            self.fd_rel = fd_rel if self.fd_rel is None else max(self.fd_rel, fd_rel)
        if not ok and self.ok:
            self.worst = label
        self.ok = self.ok and ok


def _errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    if not np.all(np.isfinite(got)):
        return math.nan, math.nan
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))
    return float(diff.max()) if diff.size else 0.0, rel_error(got, want)


def _fmt(x) -> str:
    if x is None:
        return "-"
    return "nan" if math.isnan(x) else f"{x:.2e}"


def _write_job(jobdir: Path, ex: registry.Exercise, path: Path, cases) -> None:
    specs = []
    for i, p in enumerate(cases):
        files = {}
        for j, (name, a) in enumerate(p.case.arrays.items()):
            files[name] = f"c{i}_a{j}.npy"
            np.save(jobdir / files[name], a, allow_pickle=False)
        np.save(jobdir / f"c{i}_dout.npy", np.asarray(p.dout, dtype=np.float64), allow_pickle=False)
        specs.append({"label": p.case.label, "options": p.case.options, "fd": p.case.fd, "arrays": files,
                      "dout": f"c{i}_dout.npy"})
    (jobdir / "job.json").write_text(json.dumps({"exercise": ex.name, "file": str(path), "cases": specs}))


def _job_dir() -> Path:
    """A fresh temporary directory (the caller makes sure it is not inside the student's)."""
    return Path(tempfile.mkdtemp(prefix="exercises-")).resolve()


@dataclass
class Result:
    code: int
    summary: str  # one line, for `status`


def _say(out, text: str = "") -> None:
    print(text, file=out)


def check(name: str, file: str, timeout: float = DEFAULT_TIMEOUT, out=None, err=None) -> Result:
    """Check FILE's NAME_backward: the table to `out` (stdout), a report that ends the check early
    to `err` (stderr). Returns the exit code and a one-line summary."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    ex = registry.get(name)
    if ex is None:
        msg = f"unknown exercise '{name}': `python -m exercises list` shows them"
        _say(err, f"error: {msg}")
        return Result(BAD_INPUT, msg)
    if not timeout > 0 or not math.isfinite(timeout):
        msg = f"--timeout must be a positive number of seconds, got {timeout}"
        _say(err, f"error: {msg}")
        return Result(BAD_INPUT, msg)
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "no such file"
        msg = f"{file}: {what} (`python -m exercises start {name}` writes one)"
        _say(err, f"error: {msg}")
        return Result(BAD_INPUT, msg)

    if Path(tempfile.gettempdir()).resolve().is_relative_to(path.parent):
        msg = (f"the temporary directory {tempfile.gettempdir()} lies inside {path.parent}, which check "
               f"leaves untouched: set TMPDIR to a directory elsewhere")
        _say(err, f"error: {msg}")
        return Result(BAD_INPUT, msg)
    cases = prepared(name)
    jobdir = _job_dir()
    try:
        _write_job(jobdir, ex, path, cases)
        outcome = sandbox.run(jobdir, timeout)
        got = None
        if outcome.result is not None and outcome.result["status"] == "ok":
            got = [([np.load(jobdir / f, allow_pickle=False) for f in entry["grads"]],
                    None if entry["out"] is None else np.load(jobdir / entry["out"], allow_pickle=False))
                   for entry in outcome.result["cases"]]
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)

    if outcome.output.strip():
        lines = outcome.output.rstrip("\n").splitlines()
        _say(out, f"your code printed ({len(lines)} line{'s' * (len(lines) != 1)}):")
        for line in lines[:MAX_OUTPUT_LINES]:
            _say(out, f"  | {line[:MAX_LINE]}" + (" ..." if len(line) > MAX_LINE else ""))
        if len(lines) > MAX_OUTPUT_LINES:
            _say(out, f"  | ... {len(lines) - MAX_OUTPUT_LINES} more")
    if outcome.timed_out:
        msg = (f"{name}: time limit of {timeout:g} s reached while {outcome.phase} (an infinite loop?); "
               f"--timeout sets the limit")
        _say(err, f"error: {msg}")
        return Result(WRONG, msg)
    if outcome.result is None:
        if outcome.exitcode is not None and outcome.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-outcome.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-outcome.exitcode}"
        else:
            how = f"exited with status {outcome.exitcode}"
        msg = f"{name}: the process running your code {how} while {outcome.phase} (os._exit? a crash?)"
        _say(err, f"error: {msg}")
        return Result(WRONG, msg)
    if outcome.result["status"] != "ok":
        message = outcome.result["message"]
        _say(err, f"error: {message}")
        return Result(outcome.result["code"], message.splitlines()[0].rstrip(":"))
    return _report(ex, file, cases, got, outcome.result["used_forward"], out)


def _report(ex, file, cases, got, used_forward, out) -> Result:
    rows: dict[str, Row] = {}
    forward_row = Row("loss (forward)" if ex.scalar_out else "out (forward)") if used_forward else None
    runs, notes = [], []
    for p, (grads, student_out) in zip(cases, got):
        label = p.case.label
        if forward_row is not None:
            max_abs, rel = _errors(student_out, p.out)
            forward_row.update(label, max_abs, rel, rel <= forward_bound(ex, p.n))
            if math.isnan(rel) and not forward_row.nonfinite:
                forward_row.nonfinite = label
        names = ex.grad_names(p.case)
        for j, (gname, g, want) in enumerate(zip(names, grads, p.want)):
            row = rows.setdefault(gname, Row(gname))
            max_abs, rel = _errors(g, want)
            ok = rel <= reference_bound(ex, p.n)
            fd_rel = None
            numeric = None if p.numeric is None else p.numeric[j]
            if numeric is not None:
                visited = ~np.isnan(numeric)  # every entry, or the sample (block, model)
                numeric, g_visited = numeric[visited], g[visited]
            rms = 0.0 if numeric is None else float(np.linalg.norm(numeric)) / math.sqrt(max(numeric.size, 1))
            if rms > 0.0 and not math.isnan(rel):  # a zero gradient (T = 1's dq) gives the bound no scale
                fd = Check(rel_error(g_visited, numeric), rms, p.terms)
                fd_rel = float(fd)
                ok = ok and fd <= finite_diff_bound(fd, H, p.n, ex.depth, ex.amplification)
            if math.isnan(rel) and not row.nonfinite:
                row.nonfinite = label
            row.update(label, max_abs, rel, ok, fd_rel)
        runs.append(diagnose.Run(label, p.dout, p.cache, p.want, tuple(grads), names))

    source = "your forward's caches" if used_forward else "the reference forward's caches"
    _say(out, f"{ex.name}: {file}, {len(cases)} cases, {ex.name}_backward on {source}")
    for p in cases:
        _say(out, f"  - {p.case.label}" + ("" if p.case.fd else " (against the reference only: centred "
                                                                  "differences do not hold there)"))
    table = ([forward_row] if forward_row else []) + list(rows.values())
    width = max(len("gradient"), *(len(r.name) for r in table))
    _say(out, f"{'gradient':<{width}}  {'max abs err':>11}  {'rel err':>9}  {'fd rel err':>10}  result")
    for r in table:
        result = "pass" if r.ok else f"FAIL (first in: {r.worst})"
        _say(out, f"{r.name:<{width}}  {_fmt(r.max_abs):>11}  {_fmt(r.rel):>9}  {_fmt(r.fd_rel):>10}  {result}")
    sample = f" on up to {ex.fd_entries} entries of each tensor" if ex.fd_entries else ""
    _say(out, "rel err: ||yours - reference|| / ||reference||, normwise, the worst case; fd rel err: against "
              f"centred finite differences{sample}")

    failed = [r for r in rows.values() if not r.ok]
    if forward_row is not None and not forward_row.ok:
        notes.append(f"{ex.name}_forward's output differs from the reference forward's"
                     + (f" (NaN or inf in case '{forward_row.nonfinite}')" if forward_row.nonfinite else "")
                     + "; the gradients above use your cache")
    for r in failed:
        if r.nonfinite:
            notes.append(f"{r.name} holds NaN or inf (case '{r.nonfinite}')")
    if not failed and (forward_row is None or forward_row.ok):
        _say(out, f"all {len(rows)} gradient{'s' * (len(rows) != 1)} pass")
        return Result(PASS, "pass")
    for note in notes:
        _say(out, note)
    vague = []
    for r in failed:
        sentence = _guarded(diagnose.explain, ex.name, r.name, runs)
        if not sentence:
            continue
        if sentence.startswith(f"{r.name} {diagnose.VAGUE}"):
            vague.append(r.name)
            if len(vague) > MAX_VAGUE:
                continue
        # explain's sentence names the gradient first; a failure of explain itself does not
        _say(out, sentence if sentence.startswith(f"{r.name} ") or sentence.startswith(f"{r.name}'") else
             f"{r.name}: {sentence}")
    if len(vague) > MAX_VAGUE:
        more = vague[MAX_VAGUE:]
        verb = diagnose.VAGUE if len(more) == 1 else "are " + diagnose.VAGUE.removeprefix("is ")
        _say(out, f"{len(more)} more {verb} as well: "
                  f"{', '.join(more[:3])}{', ...' if len(more) > 3 else ''}")
    mistake = _guarded(diagnose.name_mistake, ex.name, runs) if failed else None
    if mistake is not None:
        _say(out, f"Known mistake: {mistake.title} — see {mistake.doc}")
    wrong = [r.name for r in failed] + ([forward_row.name] if forward_row is not None and not forward_row.ok else [])
    _say(out, f"{len(wrong)} of {len(table)} wrong: {', '.join(wrong)}")
    return Result(WRONG, "wrong: " + ", ".join(wrong))


def _guarded(fn, *args):
    """The diagnosis is a help on top of the table: a fault in it is one line, not a traceback."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return f"(no diagnosis: {fn.__name__} failed with {type(e).__name__}: {e})" if fn is diagnose.explain else None
