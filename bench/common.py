"""What the bench/ scripts share: thread limits, the machine, the configs, the backends, the batches,
running a training script and reading its log, and the epilogue (verdicts, load average, JSON).

`limit_threads()` must run before numpy or torch is imported (the BLAS and OpenMP runtimes read
their thread counts when they load), so this module imports neither at the top.

The scripts import this module and nothing else of bench/ (no script imports another script).
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from anywhere: `python bench/step_time.py`
    sys.path.insert(0, ROOT)

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def threads_from_argv(default: int | None = None) -> int:
    """The value of --threads N in sys.argv (before argparse runs), else `default` or all cores."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default or os.cpu_count() or 1


def limit_threads(n: int) -> str:
    """Give every BLAS/OpenMP runtime n threads; returns how (for the report).

    Environment variables before the import are the portable way; threadpoolctl, when installed,
    also caps runtimes already loaded (and its report names each one).
    """
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    how = "env " + " ".join(f"{v}={n}" for v in THREAD_VARS)
    try:
        from threadpoolctl import threadpool_limits  # optional
    except ImportError:
        return how
    threadpool_limits(n)
    return how + " + threadpoolctl"


def torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def numpy_blas() -> str:
    import numpy as np
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy
        return "unknown"


def torch_blas() -> str:
    import torch
    text = torch.__config__.show()
    m = re.search(r"BLAS_INFO=(\w+)", text)
    blas = m.group(1) if m else "unknown"
    if "Math Kernel Library" in text:
        v = re.search(r"Math Kernel Library Version ([\d.]+)", text)
        blas += f" (MKL {v.group(1)})" if v else " (MKL)"
    return blas


def blas_threads() -> str:
    """The thread count each loaded BLAS runtime reports, via threadpoolctl when installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed; limits set by environment variables"
    return ", ".join(f"{i['internal_api']}:{i['num_threads']}" for i in threadpool_info())


def machine_info(threads: int, how: str, with_torch: bool = True) -> dict:
    import numpy as np
    import scipy
    cpu = lscpu()
    info = {
        "cpu": cpu.get("Model name", platform.processor() or "unknown").strip(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__, "scipy": scipy.__version__,
        "numpy BLAS": numpy_blas(),
        "threads": threads, "thread limits": how,
        "load average (1 min) at start": os.getloadavg()[0],
    }
    if with_torch:
        import torch
        info.update({"torch": torch.__version__, "torch BLAS": torch_blas(),
                     "torch threads": torch.get_num_threads()})
    info["BLAS threads"] = blas_threads()
    return info


def print_info(title: str, info: dict) -> None:
    print(f"== {title}")
    for k, v in info.items():
        print(f"   {k}: {v}")
    load = os.getloadavg()[0]
    if load > (info.get("cores") or 1) + 0.5:
        print(f"   WARNING: load average {load:.1f} > {info.get('cores')} cores: other processes share the CPU, "
              "absolute times are inflated (ratios from interleaved runs hold up better)")
    sys.stdout.flush()


def presets() -> dict:
    """The training presets of the app (gptapp.settings), imported only when a script needs them."""
    from gptapp.settings import PRESETS
    return PRESETS


def configs() -> dict:
    """The benchmark shapes: the `cpu` preset, a larger one (6 layers, 256 channels, block 128) and
    the `modern-cpu` preset (the cpu size with the modern block, trained with Muon + AdamW)."""
    cpu = presets()["cpu"]
    return {"cpu": cpu, "large": replace(cpu, n_layer=6, n_embd=256, block_size=128),
            "modern-cpu": presets()["modern-cpu"]}


def describe(cfg) -> str:
    modern = (f", {cfg.norm}, {cfg.pos_emb} positions{', QK-norm' if cfg.qk_norm else ''}, {cfg.optimizer}"
              if cfg.norm != "layernorm" or cfg.pos_emb != "learned" or cfg.qk_norm or cfg.optimizer != "adamw" else "")
    return (f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} channels, block {cfg.block_size}, "
            f"batch {cfg.batch_size}, {cfg.activation}, bias {cfg.bias}, dropout {cfg.dropout}, "
            f"{'tied' if cfg.tie_weights else 'untied'} head{modern}")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def quartiles(xs):
    xs = sorted(xs)
    return xs[len(xs) // 4], xs[(3 * len(xs)) // 4]


# --------------------------------------------------------------------------------------------
# Backends and batches: one training step of each, on the same random batches
# --------------------------------------------------------------------------------------------

VOCAB = 65  # Tiny Shakespeare's characters
N_BATCHES = 8
# fast: npgpt.fast (what train_np.py trains with); reference: the plain layers (train_np.py --reference)
BACKENDS = ("fast", "reference", "torch")


def batches(cfg, n: int = N_BATCHES) -> list:
    """n random (x, y) pairs of (batch_size, block_size) int64 token ids, the same for every backend."""
    import numpy as np
    rng = np.random.default_rng(0)
    return [tuple(rng.integers(0, VOCAB, (2, cfg.batch_size, cfg.block_size))) for _ in range(n)]


def make_step(backend: str, cfg, seed: int = 0):
    """One training step of `backend` (see BACKENDS): forward, backward, clip_grad_norm, AdamW update
    (nanoGPT's groups and settings; with cfg.optimizer "muon", Muon for the block matrices and AdamW
    for the rest, as the training scripts build them), float32. step(x, y) returns its (forward,
    backward, optimizer) seconds; step.model is the model, step.as_input turns a NumPy batch into
    the backend's input."""
    if backend == "torch":
        return _torch_step(cfg, seed)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    import numpy as np
    if backend == "fast":
        from npgpt.fast import GPT, AdamW, clip_grad_norm
    else:
        from npgpt import GPT
        from npgpt.optim import AdamW, clip_grad_norm
    model = GPT(cfg.gpt_config(VOCAB), seed=seed, dtype=np.float32)
    if cfg.optimizer == "muon":
        from gptapp.optimizers import MuonAdamW
        from gptapp.backends.numpy import muon_class
        opt = MuonAdamW(model.params, AdamW, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                        weight_decay=cfg.weight_decay, muon_lr=cfg.muon_lr, muon_class=muon_class(backend != "fast"))
    else:
        opt = AdamW(model.params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)

    def step(x, y):
        t0 = time.perf_counter()
        model.forward(x, y)
        t1 = time.perf_counter()
        grads = model.backward()
        t2 = time.perf_counter()
        clip_grad_norm(grads, cfg.grad_clip)
        opt.step(grads, lr=cfg.learning_rate)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    step.model = model
    step.as_input = lambda a: a
    return step


def _torch_step(cfg, seed: int):
    import torch
    import torchgpt
    torch.manual_seed(seed)
    model = torchgpt.GPT(cfg.gpt_config(VOCAB))  # attention="sdpa", float32
    model.train()
    if cfg.optimizer == "muon":
        from torchgpt.model import configure_muon_adamw
        opt = configure_muon_adamw(model, cfg.weight_decay, cfg.learning_rate, cfg.muon_lr, (cfg.beta1, cfg.beta2), "cpu",
                                   cfg.muon_ns_dtype)
    else:
        opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    params = list(model.parameters())

    def step(x, y):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    step.model = model
    step.as_input = torch.from_numpy
    return step


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory(trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20) -> bool:
    """glibc malloc keeps up to `trim_threshold` freed bytes mapped and serves blocks below
    `mmap_threshold` from them: each step reuses the last one's memory instead of page-faulting it in.

    For the torch workers only (an option of step_time.py and memory.py, so that torch may get the
    allocator setting npgpt.fast gives itself). npgpt.fast tunes its own allocator; the benchmarks
    never do it for npgpt. Returns False where the C library has no mallopt (macOS).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


# --------------------------------------------------------------------------------------------
# A training script as a subprocess, and what its log lines say
# --------------------------------------------------------------------------------------------

EVAL_RE = re.compile(r"^step (\d+): train loss ([\d.naif]+), val loss ([\d.naif]+)")
ITER_RE = re.compile(r"^iter (\d+): loss [^,]+, lr [^,]+, time ([\d.]+)ms")
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
SKIP_ITER_LINES = 5  # the first iter lines hold compilation and warm-up (nanoGPT skips 5 for MFU)


def parse_iter_line(line: str, iters: list, evals: list):
    """(iteration, ms per step, steps the line covers, tok/s, mfu %) of an iter line, else None.

    An iter line gives the mean time of the steps since the previous line (or since the last
    evaluation, which resets the clock)."""
    m = ITER_RE.match(line)
    if not m:
        return None
    it = int(m.group(1))
    covered = 1 if not iters or (evals and evals[-1][0] == it) else it - iters[-1][0]
    tok = re.search(r"tok/s ([\d,]+)", line)
    mfu = re.search(r"mfu ([\d.]+)%", line)
    return (it, float(m.group(2)), covered, float(tok.group(1).replace(",", "")) if tok else None,
            float(mfu.group(1)) if mfu else None)


def parse_eval_line(line: str):
    """(step, val loss) of an evaluation line, else None."""
    m = EVAL_RE.match(line)
    return (int(m.group(1)), float(m.group(3))) if m else None


class LogReader:
    """The iter lines (see parse_iter_line) and evaluations (step, val, seconds since start) of a
    training script's output, fed one line at a time; feed() says whether val <= stop_below."""

    def __init__(self, stop_below: float = float("-inf"), t0: float | None = None):
        self.stop_below, self.t0 = stop_below, time.perf_counter() if t0 is None else t0
        self.iters, self.evals = [], []

    def feed(self, line: str, now: float | None = None) -> bool:
        parsed = parse_iter_line(line, self.iters, self.evals)
        if parsed:
            self.iters.append(parsed)
            return False
        ev = parse_eval_line(line)
        if ev:
            now = time.perf_counter() if now is None else now
            self.evals.append((ev[0], ev[1], now - self.t0))
            return ev[1] <= self.stop_below
        return False


def run_script(cmd: list, stop_below: float, label: str, verbose: bool = False, env: dict | None = None,
               max_wall_s: float | None = None, log_path: str | None = None) -> dict:
    """Run a training script, echo its evaluations, stop it (SIGTERM) at the first val <= stop_below
    or once max_wall_s have passed.

    Returns the iter lines (see parse_iter_line), the evaluations as (step, val, seconds since
    launch), the return code, why it ended ("target", "time limit" or "exited") and whether it
    crashed (a non-zero exit that was not our stop). Every line goes to log_path when given.
    """
    import threading
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    reader = LogReader(stop_below, t0)
    log = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    ended, tail = ["exited"], []

    def stop_late():
        if proc.poll() is None:
            ended[0] = "time limit"
            proc.send_signal(signal.SIGTERM)
    timer = threading.Timer(max_wall_s, stop_late) if max_wall_s is not None else None
    if timer:
        timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if log:
                log.write(line + "\n")
            tail = (tail + [line])[-20:]
            hit = reader.feed(line)
            if line and (verbose or not ITER_RE.match(line)):
                print(f"  [{label}] {line}", flush=True)
            if hit and ended[0] == "exited":
                ended[0] = "target"
                break
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        if log:
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


# --------------------------------------------------------------------------------------------
# Epilogue: verdicts, the load average at the end, the JSON file
# --------------------------------------------------------------------------------------------

def verdict(value: float, target: float, at_least: bool = False) -> str:
    """'met' or 'NOT met': value <= target (or >= with at_least)."""
    ok = value >= target if at_least else value <= target
    return "met" if ok else "NOT met"


def finish(results: dict, json_path: str | None) -> int:
    """Prints the load average at the end, writes `results` to json_path (if given); returns 0."""
    results["load average (1 min) at end"] = os.getloadavg()[0]
    print(f"\nload average (1 min) at end: {results['load average (1 min) at end']:.1f}")
    write_json(json_path, results)
    return 0


def write_json(path: str | None, results: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
