"""Helpers for the tests of train_np.py and train_torch.py: run a script in-process or as a
subprocess, and check that a failure is one clear line on stderr. Imported by tests/test_train_*.py,
tests/test_checkpoint.py, tests/test_cli_errors.py and the reliability tests; tests/test_train_np.py
checks the helpers' premises (the data file is found, the scripts have a main).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from npgpt import compare

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"np": "train_np", "torch": "train_torch"}


def data_path() -> Path:
    env = os.environ.get("NPGPT_DATA", "")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"


DATA = data_path()
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"Tiny Shakespeare not found at {DATA}; set NPGPT_DATA")

# One thread per process: the tests run two workers on two cores, and OpenMP threads that
# outnumber the cores spin against each other (a tiny torch step goes from ~5 ms to ~1 s).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def load_script(backend: str):
    """train_np.py / train_torch.py as a module (they are scripts at the repository root)."""
    name = SCRIPTS[backend]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    if backend == "torch":
        import torch
        torch.set_num_threads(1)
    return sys.modules[name]


def run_main(backend: str, argv: list, capsys) -> Result:
    """main(argv) in this process; a SystemExit (argparse) counts as its exit status."""
    argv = [str(a) for a in argv]
    assert "--out_dir" in argv or argv[:1] in (["sample"], ["export"]), \
        "a test run must not write into the repository's out/"
    capsys.readouterr()
    try:
        rc = load_script(backend).main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return Result(rc, captured.out, captured.err)


@contextlib.contextmanager
def working_directory(path):
    """os.chdir(path) for the block, then back (contextlib.chdir from Python 3.11 on)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_subprocess(backend: str, argv: list, cwd: Path, timeout: float = 120) -> Result:
    cmd = [sys.executable, str(ROOT / f"{SCRIPTS[backend]}.py"), *map(str, argv)]
    p = subprocess.run(cmd, cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def tiny_args(out_dir: Path, *extra) -> list:
    """A `tiny` run (seconds) with its output in out_dir."""
    return ["--preset", "tiny", "--data", DATA, "--out_dir", out_dir, "--max_new_tokens", 20, *extra]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict:
    """A finished 20-step `tiny` run of each script (seed 1337): {"np": out_dir, "torch": out_dir}.

    One pair per test process, shared by every module that imports this fixture (test_cli_errors,
    test_reliability, test_train_cross): a test never writes into these directories, it copies one.
    """
    if not DATA.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {DATA}")
    dirs = {}
    for backend in SCRIPTS:
        out = tmp_path_factory.mktemp(f"tiny_run_{backend}") / "out"
        extra = ["--device", "cpu"] if backend == "torch" else []
        with contextlib.redirect_stdout(io.StringIO()):
            rc = load_script(backend).main([str(a) for a in tiny_args(out, "--max_iters", 20, *extra)])
        assert rc == 0
        dirs[backend] = out
    return dirs


def assert_one_error_line(res: Result, *words: str, rc: int | None = None) -> str:
    """Non-zero exit, exactly one line on stderr starting "error:" and holding every word, no traceback."""
    assert "Traceback" not in res.out + res.err, f"a traceback was printed:\n{res.err}"
    assert res.rc != 0, f"exit status 0; stderr: {res.err!r}"
    if rc is not None:
        assert res.rc == rc, f"exit status {res.rc}, expected {rc}; stderr: {res.err!r}"
    assert len(res.err_lines) == 1, f"expected one line on stderr, got:\n{res.err}"
    line = res.err_lines[0]
    assert line.startswith("error: "), line
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in the error line: {line}"
    print(line)
    return line


EVAL_LINE = re.compile(r"^step (\d+): train loss \d+\.\d{4}, val loss \d+\.\d{4}$", re.M)
ITER_LINE = re.compile(r"^iter (\d+): loss \d+\.\d{4}, lr \d\.\d\de[-+]\d\d, time [\d.]+ms, tok/s [\d,]+$", re.M)


def check_run_dir(out_dir, ext: str, max_iters: int) -> None:
    """The files a finished run leaves: both checkpoints, metrics.jsonl with every eval, a PNG."""
    for name in (f"ckpt_best{ext}", f"ckpt_last{ext}", "metrics.jsonl", "loss.png"):
        assert (out_dir / name).is_file(), f"{name} missing in {sorted(p.name for p in out_dir.iterdir())}"
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    iters = [r for r in records if r["kind"] == "iter"]
    assert [r["iter"] for r in evals][-1] == max_iters
    assert all(r["val_loss"] > 0 and r["train_loss"] > 0 for r in evals)
    assert iters and all(r["tokens_per_s"] > 0 for r in iters)
    assert not list(out_dir.glob(".*.tmp")), "a temporary checkpoint file was left behind"


def check(name, got, want, rtol):
    """npgpt.compare.assert_close for one tensor (torch or NumPy): print its max abs and normwise
    relative error, then assert the latter is at most rtol (a bound of npgpt.bounds; bitwise(...)
    is 0: equal bit for bit)."""
    return compare.assert_close(name, got, want, rtol=rtol)
