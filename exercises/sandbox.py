"""Runs a student's file in a process of its own, with a time limit.

A fork server (python -m exercises._worker --serve, one per checking process, started on first
use) has numpy and npgpt imported already; for each check it forks a fresh process that imports
the student's file and runs the cases, so a check starts in milliseconds yet the student's code
never runs in the checker's process. The server kills that process's group when the time limit
passes. Jobs and answers are lines of text; arrays go both ways through a temporary directory
outside the student's directory, as .npy files read with allow_pickle=False: nothing is
pickled. Where the platform cannot fork, each check runs a fresh interpreter
(python -m exercises._worker JOBDIR) under the same limit.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]  # the directory holding exercises/ and npgpt/
MAX_OUTPUT_BYTES = 100_000  # of the student's prints read back
SLACK = 30.0  # seconds the server may take beyond a job's limit before it is presumed dead

_server: subprocess.Popen | None = None


class Outcome(NamedTuple):
    result: dict | None  # result.json of the worker, None when it never wrote one
    output: str  # what the student's code printed
    timed_out: bool
    phase: str  # the step the worker was in last
    exitcode: int | None


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=path)


def _stop_server() -> None:
    global _server
    if _server is not None:
        _server.stdin.close()
        try:
            _server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _server.kill()
            _server.wait()
        _server = None


def _get_server() -> subprocess.Popen:
    global _server
    if _server is not None and _server.poll() is not None:
        _server = None  # it died (a job's code may kill its parent): start another
    if _server is None:
        _server = subprocess.Popen([sys.executable, "-m", "exercises._worker", "--serve"], env=_env(),
                                   cwd=tempfile.gettempdir(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, bufsize=1)
        atexit.register(_stop_server)
    return _server


def _run_served(jobdir: Path, timeout: float) -> tuple[bool, int | None]:
    server = _get_server()
    try:
        server.stdin.write(f"{jobdir}\t{timeout!r}\n")
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], timeout + SLACK)
        answer = server.stdout.readline().strip() if ready else ""
    except (BrokenPipeError, OSError):
        answer = ""
    if answer == "timeout":
        return True, None
    if answer.startswith("done "):
        return False, int(answer.split()[1])
    _stop_server()  # no answer: the server is gone; the next check starts a new one
    return False, None


def _run_fresh(jobdir: Path, timeout: float) -> tuple[bool, int | None]:
    try:
        proc = subprocess.run([sys.executable, "-m", "exercises._worker", str(jobdir)], env=_env(),
                              cwd=jobdir, timeout=timeout, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return True, None
    return False, proc.returncode


def run(jobdir: Path, timeout: float) -> Outcome:
    """Run the job in jobdir (job.json and its arrays, written by exercises.check)."""
    runner = _run_served if hasattr(os, "fork") else _run_fresh
    timed_out, exitcode = runner(jobdir, timeout)
    result_file, output_file, phase_file = jobdir / "result.json", jobdir / "output.txt", jobdir / "phase.txt"
    result = json.loads(result_file.read_text()) if result_file.exists() and not timed_out else None
    output = ""
    if output_file.exists():
        with open(output_file, "rb") as f:
            output = f.read(MAX_OUTPUT_BYTES).decode(errors="replace")
    phase = phase_file.read_text() if phase_file.exists() else "starting"
    return Outcome(result, output, timed_out, phase, exitcode)
