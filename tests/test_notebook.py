"""notebooks/build_gpt.ipynb runs headless from top to bottom, and is stored without outputs.

The notebook asserts its own claims (the three averaging versions agree, attention_forward equals
the hand-written head, every gradcheck is below 1e-6, ...); this test runs it with nbclient and
also reads the printed gradcheck errors back.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from gptapp.data import DATA_ENV_VAR, resolve_data_path  # noqa: E402
from npgpt.bounds import finite_diff  # noqa: E402
from npgpt.data import DataError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "build_gpt.ipynb"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
GRADCHECK_LINE = re.compile(r"^gradcheck (?P<title>[^:]+): (?P<errors>.+)$", re.MULTILINE)
# every layer the notebook introduces must be gradchecked in it
EXPECTED_CHECKS = {"embedding (wte, wpe)", "cross_entropy", "linear", "softmax", "attention, 1 head",
                   "attention, 4 heads", "layernorm", "relu", "gelu", "gelu_tanh", "block", "GPT",
                   "rmsnorm", "rope", "swiglu", "relu2", "modern GPT"}  # section 9, the modern block


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_clean():
    nb = read_notebook()
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} hold outputs; clear them before committing (keeps diffs small)"


def test_notebook_runs(monkeypatch):
    if not os.environ.get(DATA_ENV_VAR) and SHARED_DATA.is_file():
        monkeypatch.setenv(DATA_ENV_VAR, str(SHARED_DATA))
    try:
        resolve_data_path(download=False)
    except DataError as exc:
        pytest.skip(f"no Tiny Shakespeare without a download: {exc}")
    # The kernel inherits this environment: one BLAS thread (tiny arrays, and the test suite runs
    # in parallel on few cores) and no display.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = read_notebook()
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    stdout = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    checks = {}
    for m in GRADCHECK_LINE.finditer(stdout):
        values = [float(v) for v in re.findall(r"\d\.\de[-+]\d+", m["errors"])]
        assert values, f"no numbers in gradcheck line {m[0]!r}"
        checks[m["title"]] = max(values)
    for title, worst in sorted(checks.items()):
        print(f"gradcheck {title:22s} worst relative error {worst:.1e}")
    missing = EXPECTED_CHECKS - set(checks)
    assert not missing, f"the notebook no longer gradchecks {sorted(missing)}"
    assert max(checks.values()) <= finite_diff()  # float64, the gradchecks' default step h = 1e-5
    assert "ROMEO:" in stdout  # the autocomplete at the end produced its sample
