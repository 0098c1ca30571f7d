"""What the bench/ scripts share: thread limits, the machine, running a training script
and reading its log, the epilogue. It imports neither numpy nor torch at the top: `limit_threads()` must
run before they load (their BLAS and OpenMP runtimes read their thread counts then). The scripts import
this module and nothing else of bench/.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from anywhere: `python bench/step_time.py`
    sys.path.insert(0, ROOT)

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
VOCAB = 65  # Tiny Shakespeare's characters


def threads_from_argv() -> int:
    """--threads N of sys.argv (before the script's own parser runs), else all cores."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int)
    return p.parse_known_args()[0].threads or os.cpu_count() or 1


def limit_threads(n: int) -> str:
    """Give every BLAS/OpenMP runtime n threads (this process and its children); returns how. threadpoolctl,
    when installed, also caps runtimes already loaded."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    how = "env " + " ".join(f"{v}={n}" for v in THREAD_VARS)
    try:
        from threadpoolctl import threadpool_limits  # optional
    except ImportError:
        return how
    threadpool_limits(n)
    return how + " + threadpoolctl"


def why_no_cuda(torch_version: str, cuda_build: str | None, devices: int) -> str | None:
    """Why torch cannot use a GPU here, or None when it can."""
    if cuda_build is None:
        return f"torch {torch_version} is a CPU-only build (torch.version.cuda is None)"
    return None if devices else f"torch {torch_version} (CUDA {cuda_build}) sees no CUDA device"


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def machine_info(threads: int, how: str, with_torch: bool = True) -> dict:
    """The CPU, the versions, each library's BLAS and the thread settings, for the report."""
    import numpy as np
    import scipy
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    info = {"cpu": lscpu().get("Model name", platform.processor() or "unknown").strip(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "numpy BLAS": f"{blas.get('name')} {blas.get('version')}", "threads": threads, "thread limits": how,
            "load average (1 min) at start": os.getloadavg()[0]}
    if with_torch:
        import torch
        text = torch.__config__.show()
        m, mkl = re.search(r"BLAS_INFO=(\w+)", text), re.search(r"Math Kernel Library Version ([\d.]+)", text)
        torch_blas = (m.group(1) if m else "unknown") + (f" (MKL {mkl.group(1)})" if mkl else "")
        info.update({"torch": torch.__version__, "torch BLAS": torch_blas, "torch threads": torch.get_num_threads()})
    try:
        from threadpoolctl import threadpool_info
        info["BLAS threads"] = ", ".join(f"{i['internal_api']}:{i['num_threads']}" for i in threadpool_info())
    except ImportError:
        info["BLAS threads"] = "threadpoolctl not installed; limits set by environment variables"
    return info


def print_info(title: str, info: dict) -> None:
    print(f"== {title}", *[f"   {k}: {v}" for k, v in info.items()], sep="\n", flush=True)
    if os.getloadavg()[0] > (info.get("cores") or 1) + 0.5:
        print(f"   WARNING: load average {os.getloadavg()[0]:.1f} > {info.get('cores')} cores: other processes share "
              "the CPU, absolute times are inflated (ratios from interleaved runs hold up better)", flush=True)


def describe(cfg) -> str:
    modern = (f", {cfg.norm}, {cfg.pos_emb} positions{', QK-norm' if cfg.qk_norm else ''}, {cfg.optimizer}"
              if cfg.norm != "layernorm" or cfg.pos_emb != "learned" or cfg.qk_norm or cfg.optimizer != "adamw" else "")
    return (f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} channels, block {cfg.block_size}, "
            f"batch {cfg.batch_size}, {cfg.activation}, bias {cfg.bias}, dropout {cfg.dropout}, "
            f"{'tied' if cfg.tie_weights else 'untied'} head{modern}")


def quartiles(xs):
    xs = sorted(xs)
    return xs[len(xs) // 4], xs[(3 * len(xs)) // 4]


# --- A training script as a subprocess, and what its log lines say ---------------------------
EVAL_RE = re.compile(r"^step (\d+): train loss ([\d.naif]+), val loss ([\d.naif]+)")
ITER_RE = re.compile(r"^iter (\d+): loss [^,]+, lr [^,]+, time ([\d.]+)ms")
SKIP_ITER_LINES = 5  # the first iter lines hold compilation and warm-up (nanoGPT skips 5 for MFU)


class LogReader:
    """A training script's output, fed one line at a time: the iter lines as (iteration, ms per step,
    steps the line covers: it times those since the previous line or evaluation, tok/s, mfu %), the
    evaluations as (step, val, seconds since t0). feed() says whether an evaluation's val <= stop_below."""

    def __init__(self, stop_below: float = float("-inf"), t0: float | None = None):
        self.stop_below, self.t0 = stop_below, time.perf_counter() if t0 is None else t0
        self.iters, self.evals = [], []

    def feed(self, line: str, now: float | None = None) -> bool:
        m = ITER_RE.match(line)
        if m:
            it = int(m.group(1))
            covered = 1 if not self.iters or (self.evals and self.evals[-1][0] == it) else it - self.iters[-1][0]
            tok, mfu = re.search(r"tok/s ([\d,]+)", line), re.search(r"mfu ([\d.]+)%", line)
            self.iters.append((it, float(m.group(2)), covered, float(tok.group(1).replace(",", "")) if tok else None,
                               float(mfu.group(1)) if mfu else None))
            return False
        m = EVAL_RE.match(line)
        if not m:
            return False
        self.evals.append((int(m.group(1)), float(m.group(3)), (time.perf_counter() if now is None else now) - self.t0))
        return self.evals[-1][1] <= self.stop_below


def run_script(cmd: list, stop_below: float, label: str, verbose: bool = False, env: dict | None = None,
               max_wall_s: float | None = None, log_path: str | None = None) -> dict:
    """Run a command in its own process group, echo its lines (iter lines with verbose), log them to
    log_path (after the command), stop it (SIGTERM to the group, then SIGKILL) at the first val <=
    stop_below or after max_wall_s. Returns the iter lines and evaluations (see LogReader), the return
    code, why it ended ("target", "time limit" or "exited"), whether it crashed (a non-zero exit not
    caused by a stop) and then its last 20 lines."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    reader = LogReader(stop_below, t0)
    log = open(log_path or os.devnull, "w")
    log.write(f"$ {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # a stop takes its children (torchrun's workers) along
    ended, tail = ["exited"], []

    def stop(why: str):
        if proc.poll() is None:
            ended[0] = ended[0] if ended[0] != "exited" else why
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait_s)
                    return
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
    timer = threading.Timer(max_wall_s, stop, ("time limit",)) if max_wall_s is not None else None
    if timer:
        timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip()
            log.write(line + "\n")
            tail = (tail + [line])[-20:]
            hit = reader.feed(line)
            if line and (verbose or not ITER_RE.match(line)):
                print(f"  [{label}] {line}", flush=True)
            if hit:
                stop("target")
                break
    finally:
        if timer:
            timer.cancel()
        stop(ended[0])
        proc.wait()
        log.close()
    crashed = proc.returncode != 0 and ended[0] == "exited"
    return {"iters": reader.iters, "evals": reader.evals, "returncode": proc.returncode, "ended": ended[0],
            "crashed": crashed, "wall_s": time.perf_counter() - t0, "tail": tail if crashed else []}


def reach(run: dict, target: float) -> dict:
    """When `run` first evaluated val <= target: steps, val, train_s, wall_s (or reached False)."""
    for it, val, wall in run["evals"]:
        if val <= target:
            return {"reached": True, "steps": it, "val": val, "wall_s": wall,
                    "train_s": sum(ms * n for i, ms, n, _, _ in run["iters"] if i < it) / 1e3}
    best = min(run["evals"], key=lambda e: e[1]) if run["evals"] else (None, None, None)
    return {"reached": False, "best_val": best[1], "best_step": best[0],
            "train_s_total": sum(ms * n for _, ms, n, _, _ in run["iters"]) / 1e3}


def summary(run: dict, skip: int = SKIP_ITER_LINES) -> dict:
    """Median step time, tok/s and MFU of the iter lines after the first `skip` (compile, warm-up)."""
    later = run["iters"][skip:] or run["iters"][-1:]
    ms = [x[1] for x in later]
    toks = [x[3] for x in later if x[3] is not None]
    mfus = [x[4] for x in later if x[4] is not None]
    return {"median_step_ms": median(ms) if ms else None,
            "median_tokens_per_s": median(toks) if toks else None,
            "median_mfu_percent": median(mfus) if mfus else None,
            "iter_lines": len(run["iters"]), "iter_lines_skipped": len(run["iters"]) - len(later)}


# --- Epilogue: verdicts, the load average at the end, the JSON file ----------------------------
def verdict(value: float, target: float, at_least: bool = False) -> str:
    """'met' or 'NOT met': value <= target (or >= with at_least)."""
    ok = value >= target if at_least else value <= target
    return "met" if ok else "NOT met"


def finish(results: dict, json_path: str | None) -> int:
    """Prints the load average at the end and writes `results` to json_path (if given); returns 0."""
    results["load average (1 min) at end"] = os.getloadavg()[0]
    print(f"\nload average (1 min) at end: {results['load average (1 min) at end']:.1f}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


# --------------------------------------------------------------------------- worker processes
# A step or memory worker (bench/step_time.py, bench/gpt2.py) answers one JSON line at start
# ("ready", or its memory figures), then one line of step times per number of steps it is sent.

def ask(proc, steps: int | None = None):
    """Send a worker `steps` to time (None: only read), and return its next JSON answer."""
    if steps is not None:
        proc.stdin.write(f"{steps}\n")
        proc.stdin.flush()
    answer = proc.stdout.readline()
    if not answer:
        raise RuntimeError(f"worker {' '.join(map(str, proc.args[2:6]))} exited with {proc.wait()}")
    return json.loads(answer)


def stop(proc, timeout: float = 120) -> None:
    """Close a worker's input (its loop ends) and wait for it to exit."""
    proc.stdin.close()
    proc.wait(timeout=timeout)


# --------------------------------------------------------------------------- peak memory of a step

def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def trim() -> None:
    """Free what Python and glibc's malloc hold unused, so that VmRSS counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_memory(run, rss_imports_kb: int, trace: bool = False) -> dict:
    """Peak RSS of one call of run(): "state" = resident before it beyond the imports, "step_peak" =
    VmHWM (reset through /proc/self/clear_refs) minus that, "total" = both; trace also reads
    tracemalloc's peak (NumPy's buffers) over the call."""
    import tracemalloc
    trim()
    rss_before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    if trace:
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
    run()
    peak = status_kb("VmHWM")
    out = {"total_mb": (peak - rss_imports_kb) / 1024, "state_mb": (rss_before - rss_imports_kb) / 1024,
           "step_peak_mb": (peak - rss_before) / 1024}
    if trace:
        out["tracemalloc_step_peak_mb"] = (tracemalloc.get_traced_memory()[1] - start) / 2**20
        tracemalloc.stop()
    return out
