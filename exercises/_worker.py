"""The worker: runs a student's file in a process of its own (exercises.sandbox starts it).

It reads the job from a temporary directory outside the student's (job.json and .npy arrays,
np.load(allow_pickle=False)), imports the student's file without writing bytecode, builds each
case's cache with the student's NAME_forward if the file defines one (else with the reference
forward), calls NAME_backward, checks the structure, shapes and dtypes of what it returned, and
writes the gradients back as .npy files and a result.json. It never raises: whatever goes wrong
in the student's code becomes result.json's one report, with only the student's frames. Before
each step it writes the step to phase.txt, so a time limit can say where the code was.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from . import registry

WRONG, BAD_INPUT = 1, 2  # the exit codes of `check` (exercises/__init__.py)
MAX_FILE_BYTES = 64 * 2 ** 20  # the most a job's process may write to one file


class Report(Exception):
    """What ends a job early: a message and the exit code of `check`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message, self.code = message, code


def _student_frames(exc: BaseException, path: str) -> str:
    """The traceback's frames that lie in the student's file, and the exception itself."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    lines = traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


def _raised(what: str, exc: BaseException, path: str, code: int = WRONG) -> Report:
    if isinstance(exc, NotImplementedError):
        return Report(f"{what} raises NotImplementedError: it is not written yet. Write it in {path}, "
                      f"then check again.", code)
    return Report(f"{what} raised {type(exc).__name__}:\n{_student_frames(exc, path)}", code)


def _load(path: str, module_name: str):
    """Import the student's file as a module (no bytecode is written: sys.dont_write_bytecode)."""
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    spec = importlib.util.spec_from_loader(module_name, loader)
    module = importlib.util.module_from_spec(spec)
    try:
        source = Path(path).read_bytes()
        code = compile(source, path, "exec")
    except SyntaxError as e:
        where = f"{e.filename or path}, line {e.lineno}"
        text = (e.text or "").rstrip("\n")
        detail = f"\n    {text.strip()}" if text.strip() else ""
        raise Report(f"{where}: {type(e).__name__}: {e.msg}{detail}", BAD_INPUT) from None
    except (OSError, ValueError) as e:  # unreadable, or a NUL byte in the source
        raise Report(f"{path}: cannot read it as Python source: {e}", BAD_INPUT) from None
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except BaseException as e:  # noqa: BLE001 (the student's module may raise anything, SystemExit too)
        raise _raised(f"importing {path}", e, path, BAD_INPUT) from None
    return module


def _phase(jobdir: Path, text: str) -> None:
    (jobdir / "phase.txt").write_text(text)


def _run(jobdir: Path) -> dict:
    job = json.loads((jobdir / "job.json").read_text())
    ex = registry.get(job["exercise"])
    path = job["file"]
    sys.path.append(str(Path(path).parent))  # the student's own helper modules, after everything else
    _phase(jobdir, f"importing {path}")
    module = _load(path, f"student_{ex.name}")
    def defined(name):  # a function of the file itself, not one it imported (from npgpt.layers import *)
        fn = getattr(module, name, None)
        return fn if callable(fn) and getattr(fn, "__module__", None) == module.__name__ else None

    backward = defined(f"{ex.name}_backward")
    if backward is None:
        functions = sorted(n for n in vars(module) if defined(n) is not None)
        found = f" (it defines: {', '.join(functions)})" if functions else ""
        imported = f"; its {ex.name}_backward is imported, not its own" if hasattr(module, f"{ex.name}_backward") else ""
        raise Report(f"{path} defines no function {ex.name}_backward(dout, cache){found}{imported}", BAD_INPUT)
    forward = defined(f"{ex.name}_forward")

    results = []
    for i, spec in enumerate(job["cases"]):
        arrays = {name: np.load(jobdir / file, allow_pickle=False) for name, file in spec["arrays"].items()}
        case = registry.Case(spec["label"], arrays, spec["options"], spec["fd"])
        dout = np.load(jobdir / spec["dout"], allow_pickle=False)
        dout = float(dout) if ex.scalar_out else dout
        entry = {"out": None, "grads": []}
        if forward is not None:
            reference_out, _ = ex.call(ex.forward, arrays, case.options)
            _phase(jobdir, f"running {ex.name}_forward on case '{case.label}'")
            try:
                raw = ex.call(forward, arrays, case.options)
            except BaseException as e:  # noqa: BLE001
                raise _raised(f"{ex.name}_forward (case '{case.label}')", e, path) from None
            try:
                out = registry.check_forward_return(ex, raw, reference_out)
            except registry.ReturnError as e:
                raise Report(f"{e} (case '{case.label}')", WRONG) from None
            cache = raw[1]
            entry["out"] = f"c{i}_out.npy"
            np.save(jobdir / entry["out"], np.asarray(out), allow_pickle=False)
        else:
            _, cache = ex.call(ex.forward, arrays, case.options)
        _phase(jobdir, f"running {ex.name}_backward on case '{case.label}'")
        try:
            raw = backward(dout, cache)
        except BaseException as e:  # noqa: BLE001
            raise _raised(f"{ex.name}_backward (case '{case.label}')", e, path) from None
        try:
            grads = registry.unpack(ex, raw, case)
        except registry.ReturnError as e:
            raise Report(f"{e} (case '{case.label}')", WRONG) from None
        for j, g in enumerate(grads):
            entry["grads"].append(f"c{i}_g{j}.npy")
            np.save(jobdir / entry["grads"][-1], g, allow_pickle=False)
        results.append(entry)
    return {"status": "ok", "used_forward": forward is not None, "cases": results}


def run_job(jobdir: str) -> None:
    """The process's whole work: result.json gets the gradients' files or one report."""
    sys.dont_write_bytecode = True  # nothing appears in the student's directory
    jobdir = Path(jobdir)
    os.chdir(jobdir)  # files the student's code writes by relative path land here
    out = os.open(jobdir / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(out, 1), os.dup2(out, 2)  # the student's prints, shown by the checker
    try:
        result = _run(jobdir)
    except Report as r:
        result = {"status": "error", "code": r.code, "message": r.message}
    except BaseException as e:  # noqa: BLE001 (a fault of the checker itself: say so, in one line)
        result = {"status": "error", "code": 2, "message": f"the checker failed: {type(e).__name__}: {e}"}
    try:
        sys.stdout.flush(), sys.stderr.flush()
    except BaseException:  # noqa: BLE001 (the student may have closed them)
        pass
    (jobdir / "result.tmp").write_text(json.dumps(result))
    os.replace(jobdir / "result.tmp", jobdir / "result.json")


def serve() -> None:
    """The fork server (python -m exercises._worker --serve): numpy and npgpt are imported once;
    each line "JOBDIR<TAB>TIMEOUT" on stdin forks a fresh process for that job, in a process
    group of its own, kills the group when the time limit passes, and answers one line on stdout:
    "done EXITCODE" (negative: the signal that ended it) or "timeout"."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for line in sys.stdin:
        jobdir, timeout = line.rstrip("\n").split("\t")
        pid = os.fork()
        if pid == 0:  # the job's process
            code = 0
            try:
                os.setpgid(0, 0)
                os.dup2(devnull, 0)  # the student's input() reads nothing, not the job lines
                # a print in an endless loop fills output.txt to this size, then raises OSError
                resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
                run_job(jobdir)
            except BaseException:  # noqa: BLE001 (run_job reports everything; this is the last guard)
                code = 70
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # as the child does: whichever runs first
        except OSError:
            pass
        deadline = time.monotonic() + float(timeout)
        answer = "timeout"
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                answer = f"done {os.waitstatus_to_exitcode(status)}"
                break
            time.sleep(0.005)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":  # --serve: the fork server; JOBDIR: one job in this process
    serve() if sys.argv[1:] == ["--serve"] else run_job(sys.argv[1])
