"""The backprop exercises (exercises/): list, start, check, status.

For every exercise, the reference backward's own source copied into a file passes `check` (exit 0),
with and without the reference forward beside it, and a wrong-but-plausible variant of it (one
gradient scaled, negated, transposed or dropped, drawn from a seed of the exercise's name) fails
(exit 1) on that gradient's row, as does the reference with one term of its formula deleted from
its source. Every catalogue mistake (exercises/catalogue.py), its wrong backward's source written
into a student's file, fails and is named with its paragraph of docs/gradients.md, on the
exercise's own cases. Each kind of bad input ends in one report, the documented exit
code, no traceback of the checker, and the student's directory unchanged. The CLI runs in this
process (exercises.cli.main); the student's code runs in the worker's forked process, one per check.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from exercises import catalogue, cli, diagnose, registry, template
from exercises import check as checker
from exercises.reference import model_backward, model_forward
from npgpt import layers as L
from npgpt.config import GPTConfig
from npgpt.model import GPT

from exercise_files import mistake_file, reference_file, variant_file

ROOT = Path(__file__).resolve().parents[1]
NAMES = [ex.name for ex in registry.EXERCISES]
# npgpt.layers' backwards that are compositions or dispatchers of the exercises' pairs, not pairs
# of their own: the lecture's fused attention (split, causal attention, merge) and norm_backward.
NOT_EXERCISES = {"attention_backward", "norm_backward"}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def digest(directory: Path) -> dict:
    """Every file under directory (names and contents): what `check` must leave as it was."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*"))} | {"dirs": sorted(str(p) for p in directory.rglob("*") if p.is_dir())}


def row(out: str, gradient: str) -> str:
    """The table's row of `gradient` (the lines between the header and the legend)."""
    table = out.split("\ngradient ", 1)[1].split("\nrel err: ", 1)[0].splitlines()[1:]
    lines = [line for line in table if line.split(" ")[0] == gradient]
    assert len(lines) == 1, f"no single row for {gradient} in:\n{out}"
    return lines[0]


# --------------------------------------------------------------------------------------------
# list, and the exercises covering every pair
# --------------------------------------------------------------------------------------------

def test_every_pair_of_npgpt_layers_is_an_exercise():
    backwards = {name for name, fn in vars(L).items()
                 if name.endswith("_backward") and inspect.isfunction(fn) and fn.__module__ == L.__name__}
    covered = {ex.backward.__name__ for ex in registry.EXERCISES}
    assert backwards - NOT_EXERCISES <= covered, f"pairs without an exercise: {backwards - NOT_EXERCISES - covered}"
    assert "model" in NAMES and "block" in NAMES


def test_list_prints_every_exercise_with_an_existing_section(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == NAMES

    def anchor(heading: str) -> str:  # GitHub's rule, as tests/test_docs.py
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", (ROOT / "docs/gradients.md").read_text(), flags=re.M)}
    for ex, line in zip(registry.EXERCISES, lines):
        assert f"(docs/gradients.md#{ex.anchor})" in line
        assert ex.anchor in headings, f"{ex.name}: no heading for #{ex.anchor}"


# --------------------------------------------------------------------------------------------
# start
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_template_holds_the_question_not_the_answer(name):
    ex = registry.get(name)
    text = template.text(name, f"my_backprop/{name}.py")
    compile(text, f"{name}.py", "exec")
    assert f"def {name}_backward(dout, cache):" in text
    assert "raise NotImplementedError" in text
    assert ex.doc in text and f"python -m exercises check {name} my_backprop/{name}.py" in text
    for field in ex.cache_type._fields:  # the cache's fields, with the first case's shapes
        assert re.search(rf"^#\s+{field}\s", text, flags=re.M), f"{name}: field {field} missing"
    assert inspect.cleandoc(ex.forward.__doc__).splitlines()[0] in text  # the forward's formula
    answer = inspect.cleandoc(ex.backward.__doc__).splitlines()[0]
    assert answer not in text, f"{name}: the template gives the backward's formula away"


def test_start_writes_the_file_and_never_overwrites_it_unasked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "start", "layernorm")
    path = tmp_path / "my_backprop" / "layernorm.py"
    assert code == 0 and path.is_file() and str(Path("my_backprop") / "layernorm.py") in out
    path.write_text(path.read_text() + "# my work\n")
    code, _, err = run(capsys, "start", "layernorm")
    assert code == 2 and "exists" in err and "--force" in err and len(err.splitlines()) == 1
    assert path.read_text().endswith("# my work\n")
    assert run(capsys, "start", "layernorm", "--dir", "other")[0] == 0 and (tmp_path / "other/layernorm.py").exists()
    assert run(capsys, "start", "layernorm", "--force")[0] == 0
    assert not path.read_text().endswith("# my work\n")
    code, _, err = run(capsys, "start", "no_such_layer")
    assert code == 2 and "unknown exercise" in err
    # the untouched template is not an answer: check says so
    code, _, err = run(capsys, "check", "layernorm", str(path))
    assert code == 1 and "NotImplementedError" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# check: the reference passes, a wrong variant fails
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_reference_backward_passes(name, tmp_path, capsys):
    ex = registry.get(name)
    student = write(tmp_path / "student", f"{name}.py", reference_file(ex))
    before = digest(tmp_path / "student")
    code, out, err = run(capsys, "check", name, str(student))
    assert code == 0, out + err
    for gradient in ex.grad_names(registry.cases(ex)[0]):
        assert row(out, gradient).endswith(" pass")
    assert "reference forward's caches" in out
    assert digest(tmp_path / "student") == before  # no __pycache__, nothing written


@pytest.mark.parametrize("name", NAMES)
def test_backward_through_the_students_own_forward_passes(name, tmp_path, capsys):
    ex = registry.get(name)
    student = write(tmp_path, f"{name}.py", reference_file(ex, forward=True))
    code, out, err = run(capsys, "check", name, str(student))
    assert code == 0, out + err
    assert "your forward's caches" in out
    assert row(out, "loss" if ex.scalar_out else "out").endswith(" pass")


@pytest.mark.parametrize("name", NAMES)
def test_wrong_variant_fails_on_its_gradient(name, tmp_path, capsys):
    ex = registry.get(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    source, what = variant_file(ex, rng, forward=bool(rng.integers(2)))
    student = write(tmp_path, f"{name}.py", source)
    code, out, err = run(capsys, "check", name, str(student))
    assert code == 1, f"{what}: {out + err}"
    assert "FAIL" in row(out, what.split()[0]), f"{what}:\n{out}"
    others = [g for g in ex.grad_names(registry.cases(ex)[0]) if g != what.split()[0]]
    assert all(row(out, g).endswith(" pass") for g in others[:3])  # the others still pass


def test_an_equivalent_formula_in_another_order_passes(tmp_path, capsys):
    """CS231n's step-by-step layernorm backward (through the variance, then the mean) and a
    scatter-add by np.add.at round differently from the reference: kind chain, not bitwise."""
    layernorm = write(tmp_path, "layernorm.py", '''
import numpy as np

def layernorm_forward(x, w, b=None, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    return xhat * w + b, (x, mu, var, eps, w)

def layernorm_backward(dout, cache):
    x, mu, var, eps, w = cache
    N = x.shape[-1]
    dxhat = dout * w
    dvar = np.sum(dxhat * (x - mu) * -0.5 * (var + eps) ** -1.5, axis=-1, keepdims=True)
    dmu = np.sum(-dxhat / np.sqrt(var + eps), axis=-1, keepdims=True) + dvar * np.mean(-2 * (x - mu), -1, keepdims=True)
    dx = dxhat / np.sqrt(var + eps) + dvar * 2 * (x - mu) / N + dmu / N
    xhat = (x - mu) / np.sqrt(var + eps)
    return dx, np.sum(dout * xhat, axis=tuple(range(x.ndim - 1))), np.sum(dout, axis=tuple(range(x.ndim - 1)))
''')
    assert run(capsys, "check", "layernorm", str(layernorm))[0] == 0
    embedding = write(tmp_path, "embedding.py", '''
import numpy as np

def embedding_backward(dout, cache):
    dwte = np.zeros(cache.wte_shape)
    np.add.at(dwte, cache.idx, dout)
    dwpe = np.zeros(cache.wpe_shape)
    dwpe[:dout.shape[1]] = dout.sum(axis=0)
    return dwte, dwpe
''')
    assert run(capsys, "check", "embedding", str(embedding))[0] == 0


def test_failed_gradients_are_explained_and_named(tmp_path, capsys, monkeypatch):
    """The checker hands diagnose the runs of every case and prints its sentence and mistake."""
    seen = {}

    def explain(exercise, grad_name, runs):
        seen[grad_name] = runs
        return f"{grad_name} is off"

    monkeypatch.setattr(diagnose, "explain", explain)
    monkeypatch.setattr(diagnose, "name_mistake", lambda exercise, runs: type("M", (), {
        "title": "softmax backward without the subtracted dot product", "doc": "docs/gradients.md#softmax"})())
    student = write(tmp_path, "softmax.py", "def softmax_backward(dout, cache):\n    return (cache.y * dout,)\n")
    code, out, _ = run(capsys, "check", "softmax", str(student))
    assert code == 1
    assert "\ndx is off\n" in out and "dx: dx" not in out  # the sentence names the gradient once
    assert "Known mistake: softmax backward without the subtracted dot product — see docs/gradients.md#softmax" in out
    runs = seen["dx"]
    assert [r.label for r in runs] == [c.label for c in registry.cases(registry.get("softmax"))]
    for r in runs:
        assert isinstance(r, diagnose.Run) and r.grad_names == ("dx",)
        assert r.got[0].shape == r.want[0].shape == r.dout.shape and r.got[0].dtype == np.float64
        np.testing.assert_array_equal(r.got[0], r.cache.y * r.dout)


def test_without_a_diagnosis_nothing_extra_is_printed(tmp_path, capsys, monkeypatch):
    """When diagnose has no sentence and no mistake, the table's legend is followed by the count alone."""
    monkeypatch.setattr(diagnose, "explain", lambda exercise, grad_name, runs: None)
    monkeypatch.setattr(diagnose, "name_mistake", lambda exercise, runs: None)
    student = write(tmp_path, "softmax.py", "def softmax_backward(dout, cache):\n    return (cache.y * dout,)\n")
    code, out, _ = run(capsys, "check", "softmax", str(student))
    assert code == 1
    assert out.split("\nrel err: ", 1)[1].splitlines()[1:] == ["1 of 1 wrong: dx"]


def test_a_failing_diagnosis_is_one_line(tmp_path, capsys, monkeypatch):
    def explain(exercise, grad_name, runs):
        raise ValueError("broken")

    monkeypatch.setattr(diagnose, "explain", explain)
    student = write(tmp_path, "softmax.py", "def softmax_backward(dout, cache):\n    return (cache.y * dout,)\n")
    code, out, _ = run(capsys, "check", "softmax", str(student))
    assert code == 1 and "dx: (no diagnosis: explain failed with ValueError: broken)" in out
    assert "Known mistake: dx is y * dout" in out  # name_mistake still runs


def diagnosis(out: str) -> list:
    """The lines under the table: notes, sentences, the known mistake, the count."""
    return out.split("\nrel err: ", 1)[1].splitlines()[1:]


MISTAKES = [(name, m) for name, ms in catalogue.MISTAKES.items() for m in ms]


@pytest.mark.parametrize("name,mistake", MISTAKES, ids=[m.key for _, m in MISTAKES])
def test_every_catalogue_mistake_fails_and_is_named(name, mistake, tmp_path, capsys):
    """The issue's done-when: each catalogue entry's wrong backward, written into a student's file
    (its own source, tests/exercise_files.mistake_file), fails through the CLI on the exercise's own
    cases and is named with its paragraph; each failed gradient is said once, under its own name."""
    ex = registry.get(name)
    student = write(tmp_path, f"{name}.py", mistake_file(ex, mistake))
    assert re.search(rf"^def {name}_backward\(", student.read_text(), flags=re.M)
    code, out, err = run(capsys, "check", name, str(student))
    assert code == 1, out + err
    assert f"Known mistake: {mistake.title} — see {mistake.doc}" in out
    lines = diagnosis(out)
    failed = lines[-1].split(" wrong: ", 1)[1].split(", ")
    assert failed and all("FAIL" in row(out, g) for g in failed)
    told = [line for line in lines if any(line.startswith(f"{g} ") or line.startswith(f"{g}'") for g in failed)]
    assert told, f"{mistake.key}: no failed gradient explained:\n{out}"
    assert not any(line.startswith(f"{g}: {g}") for line in lines for g in failed)
    vague = [line for line in lines if diagnose.VAGUE in line]
    assert len(vague) <= checker.MAX_VAGUE + 1, out


def _drop(source: str, term: str, by: str = "") -> str:
    assert source.count(term) == 1, f"the reference's source holds {term!r} {source.count(term)} times: update DROPPED"
    return source.replace(term, by, 1)


# A term of the reference backward's own source left out, as a student leaves it out: (exercise,
# the gradient it breaks, the text removed, what replaces it, what the diagnosis says of it or None).
DROPPED = [
    ("layernorm", "dx", "g - g.mean(axis=-1, keepdims=True)", "g", "misses the path through the mean"),
    ("layernorm", "dx", "\n                 - xhat * (g * xhat).mean(axis=-1, keepdims=True)", "",
     "misses the path through the variance"),
    ("softmax", "dx", " - (dout * y).sum(axis=-1, keepdims=True)", "", "misses the subtracted dot product"),
    ("attention", "dq", "(dscores,) = softmax_backward(datt, SoftmaxCache(att))", "dscores = att * datt",
     "misses the softmax backward's subtracted dot product"),
    ("rmsnorm", "dx", " - cache.xhat * mean_gx", "", "misses the path through the rms"),
    ("gelu", "dx", "(phi + x * pdf)", "phi", "misses the product rule's second term"),
    ("rope", "dx", " - rotate_half(dout) * cache.sin", "", "misses the term -rotate_half(dout) * sin"),
    ("swiglu", "dx", "sig * (1.0 + gate * (1.0 - sig))", "sig", "misses silu's second term"),
    ("cross_entropy", "dlogits", "(probs - one_hot)", "probs", "misses the one-hot of the targets"),
]


@pytest.mark.parametrize("name,gradient,term,by,says", DROPPED, ids=[f"{d[0]}-{i}" for i, d in enumerate(DROPPED)])
def test_a_term_dropped_from_the_reference_fails(name, gradient, term, by, says, tmp_path, capsys):
    """A wrong-but-plausible variant made from the reference backward's source with one term of
    its formula deleted (not a zeroed gradient): it fails on that gradient, and the diagnosis names
    the term."""
    ex = registry.get(name)
    source = _drop(reference_file(ex), term, by)
    student = write(tmp_path, f"{name}.py", source)
    code, out, err = run(capsys, "check", name, str(student))
    assert code == 1, out + err
    assert "FAIL" in row(out, gradient)
    assert any(line.startswith(f"{gradient} ") and says in line for line in diagnosis(out)), out


# --------------------------------------------------------------------------------------------
# check: bad input
# --------------------------------------------------------------------------------------------

LINEAR_OK = """
def linear_backward(dout, cache):
    x2, d2 = cache.x.reshape(-1, cache.x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return {dx}, {dw}, d2.sum(axis=0)
"""

BAD = {  # name: (file contents or None for no file, exit code, what the report says)
    "missing file": (None, 2, "no such file"),
    "syntax error": ("import numpy as np\n\ndef linear_backward(dout, cache)\n    return dout\n", 2,
                     "linear.py, line 3: SyntaxError"),
    "missing function": ("def linear_bwd(dout, cache):\n    return dout\n", 2,
                         "defines no function linear_backward(dout, cache) (it defines: linear_bwd)"),
    "exception on import": ("x = 1 / 0\n", 2, "importing"),
    "wrong arity": ("def linear_backward(dout, cache):\n    return dout @ cache.w, None\n", 1,
                    "linear_backward returned 2 arrays, expected 3: dx, dw, db"),
    "wrong shape": (LINEAR_OK.format(dx="dout @ cache.w", dw="x2.T @ d2"), 1, "dw has shape (4, 5), expected (5, 4)"),
    "wrong dtype": (LINEAR_OK.format(dx="(dout @ cache.w).astype('float32')", dw="d2.T @ x2"), 1,
                    "dx has dtype float32, expected float64"),
    "infinite loop": ("def linear_backward(dout, cache):\n    while True:\n        pass\n", 1,
                      "time limit of 2 s reached while running linear_backward"),
    "an exception": ("def helper(a):\n    return a @ a\n\ndef linear_backward(dout, cache):\n    return helper(dout)\n",
                     1, "linear_backward (case 'B=2 T=3 in=4 out=5') raised ValueError"),
    "unknown exercise": ("", 2, "unknown exercise 'linearr'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_report_and_its_exit_code(case, tmp_path, capsys):
    contents, expected_code, says = BAD[case]
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    path = student_dir / "linear.py"
    if contents is not None:
        path.write_text(contents)
    write(student_dir, "notes.txt", "mine")
    before = digest(student_dir)
    name = "linearr" if case == "unknown exercise" else "linear"
    code, out, err = run(capsys, "check", name, str(path), "--timeout", "2")
    assert code == expected_code, out + err
    assert says in err, err
    assert err.startswith("error: ") and out == ""
    assert "Traceback" not in err and "exercises/" not in err and "npgpt/" not in err  # no frame of ours
    if case == "an exception":  # the student's frames, both of them
        assert err.count(str(path)) == 2 and "return a @ a" in err
    elif case == "exception on import":
        assert err.count(str(path)) == 2 and "x = 1 / 0" in err
    else:
        assert len(err.strip().splitlines()) <= 2  # one line (a syntax error adds the line it is on)
    assert digest(student_dir) == before


def test_nan_is_a_wrong_gradient(tmp_path, capsys):
    student = write(tmp_path, "linear.py", LINEAR_OK.format(dx="dout @ cache.w / 0.0", dw="d2.T @ x2"))
    code, out, _ = run(capsys, "check", "linear", str(student))
    assert code == 1
    assert "nan" in row(out, "dx") and "FAIL" in row(out, "dx") and "dx holds NaN or inf" in out
    assert row(out, "dw").endswith(" pass")


def test_the_students_prints_and_helper_modules(tmp_path, capsys):
    """The student's file may import a module of its own directory (no bytecode is written) and
    print: the prints are shown above the table."""
    student_dir = tmp_path / "student"
    write(student_dir, "helpers.py", "def relu_grad(dout, positive):\n    return dout * positive\n")
    student = write(student_dir, "relu.py", "from helpers import relu_grad\n\ndef relu_backward(dout, cache):\n"
                                             "    print('shape', dout.shape)\n"
                                             "    return (relu_grad(dout, cache.positive),)\n")
    before = digest(student_dir)
    code, out, _ = run(capsys, "check", "relu", str(student))
    assert code == 0 and "  | shape (2, 3, 4)" in out
    assert digest(student_dir) == before


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------

def test_status_table(tmp_path, capsys):
    d = tmp_path / "my_backprop"
    write(d, "linear.py", reference_file(registry.get("linear")))
    write(d, "relu.py", "def relu_backward(dout, cache):\n    return (dout,)\n")
    write(d, "softmax.py", "def softmax_backward(dout, cache)\n")
    write(d, "gelu.py", template.text("gelu", str(d / "gelu.py")))  # started, not written
    code, out, _ = run(capsys, "status", str(d))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert list(rows) == NAMES
    assert rows["linear"].endswith(" pass")
    assert rows["relu"].endswith("FAIL: dx")
    assert "cannot check" in rows["softmax"] and "SyntaxError" in rows["softmax"]
    assert rows["layernorm"].endswith("not started")
    assert rows["gelu"].endswith("not written yet (raises NotImplementedError)")
    assert out.splitlines()[-1].startswith("1 of 16 pass (4 started)")
    code, _, err = run(capsys, "status", str(tmp_path / "nowhere"))
    assert code == 2 and "no such directory" in err


# --------------------------------------------------------------------------------------------
# the model exercise's reference pair is GPT's
# --------------------------------------------------------------------------------------------

def test_model_pair_is_gpt_forward_and_backward():
    config = GPTConfig(vocab_size=7, block_size=5, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))
    _, loss = model.forward(idx, targets)
    grads = model.backward()
    ours, cache = model_forward(idx, targets, model.params, config)
    assert ours == loss  # bounds.bitwise: the same layers in the same order
    mine = model_backward(1.0, cache)
    assert sorted(mine) == sorted(grads)
    for name in grads:
        np.testing.assert_array_equal(mine[name], grads[name])  # bitwise, as above
    half = model_backward(0.5, cache)
    np.testing.assert_array_equal(half["transformer.wte.weight"], 0.5 * grads["transformer.wte.weight"])

