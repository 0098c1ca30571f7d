"""Peak memory of one training step: npgpt (NumPy) against torchgpt (PyTorch eager), on the CPU.

    python bench/memory.py                 # configs cpu and large
    python bench/memory.py --config large

Method. Each (backend, config) runs in a fresh subprocess that imports numpy AND torch (so the
libraries' own memory is the same on both sides), builds the model and the optimizer, and runs
two warm-up steps (torch creates its AdamW state and .grad buffers lazily). Then:
  1. npgpt's GPT keeps the last forward's activations (so that backward() can be called again);
     they are dropped, as torch drops its saved tensors after a backward. gc.collect() and glibc's
     malloc_trim(0) give memory freed earlier back to the OS, so the resident set (RSS) is the live
     memory: interpreter, libraries, parameters, optimizer state.
  2. "5" is written to /proc/self/clear_refs, which resets the kernel's peak-RSS counter (VmHWM).
  3. One training step (forward, backward, clip_grad_norm, AdamW), exactly as bench/step_time.py.
  4. The step's peak = VmHWM - RSS before the step: activations kept for the backward, gradients,
     and the largest temporaries alive at the same moment.
Reported: "step" = the step's peak above the state (the target compares these), "state" = RSS
before the step minus RSS after the imports (parameters, optimizer moments and buffers, and for
torch the buffers its runtime sets up on the first steps), and "total" = their sum. For npgpt, tracemalloc also reports the peak
of the step's NumPy allocations (NumPy registers its array buffers with tracemalloc; torch does
not), a check on the RSS figure that does not depend on the allocator.
"""
from __future__ import annotations

import _common  # noqa: E402

THREADS = _common.threads_from_argv()
HOW = _common.limit_threads(THREADS)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

TARGET = 1.2  # issue 5: npgpt's peak memory per step at most 1.2x torch's


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(backend: str, config: str) -> dict:
    import tracemalloc

    import numpy as np
    import torch  # noqa: F401  (loaded on both sides)
    from npgpt.model import keep_freed_memory
    from step_time import VOCAB, make_backends
    _common.torch_threads(THREADS)
    keep_freed_memory()  # train_np.py sets it; torch gets the same allocator settings
    cfg = _common.configs()[config]
    _trim()
    rss_imports = _status_kb("VmRSS")
    np_step, torch_step = None, None
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, VOCAB, (2, cfg.batch_size, cfg.block_size))
    if backend == "npgpt":
        step, _ = make_backends(cfg, only="npgpt")
        args = (x, y)
    else:
        _, step = make_backends(cfg, only="torch")
        args = (torch.from_numpy(x), torch.from_numpy(y))
    for _ in range(2):
        step(*args)
    if backend == "npgpt":
        step.model._cache = None  # the activations it keeps for a second backward(); torch keeps none
    _trim()
    rss_before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if backend == "npgpt":
        tracemalloc.start()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
    step(*args)
    peak = _status_kb("VmHWM")
    out = {"total_mb": (peak - rss_imports) / 1024, "state_mb": (rss_before - rss_imports) / 1024,
           "step_peak_mb": (peak - rss_before) / 1024, "rss_imports_mb": rss_imports / 1024}
    if backend == "npgpt":
        out["tracemalloc_step_peak_mb"] = (tracemalloc.get_traced_memory()[1] - start) / 2**20
        tracemalloc.stop()
    return out


def run_worker(backend: str, config: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--config", config,
           "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {backend} {config} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--config", choices=("cpu", "large", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per backend; the median is shown")
    p.add_argument("--worker", choices=("npgpt", "torch"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.config)))
        return 0
    _common.torch_threads(args.threads)
    info = _common.machine_info(args.threads, HOW)
    _common.print_info("memory: peak RSS growth during one training step, npgpt vs torchgpt, float32", info)
    results = {"machine": info}
    for name in (["cpu", "large"] if args.config == "both" else [args.config]):
        cfg = _common.configs()[name]
        runs = {b: [] for b in ("npgpt", "torch")}
        for _ in range(args.repeats):
            for b in runs:  # alternate the backends
                runs[b].append(run_worker(b, name, args.threads))
        res = {}
        for b, rs in runs.items():
            res[b] = {k: _common.median([r[k] for r in rs]) for k in rs[0]}
        res["ratio"] = res["npgpt"]["step_peak_mb"] / res["torch"]["step_peak_mb"]
        res["ratio_total"] = res["npgpt"]["total_mb"] / res["torch"]["total_mb"]
        results[name] = res
        print(f"\n-- config {name}: {_common.describe(cfg)}")
        print(f"   {'backend':8s} {'step MB':>8s} {'(tracemalloc)':>14s} {'state MB':>9s} {'total MB':>9s}")
        for b in ("npgpt", "torch"):
            r = res[b]
            tm = r.get("tracemalloc_step_peak_mb")
            print(f"   {b:8s} {r['step_peak_mb']:8.1f} {'-' if tm is None else format(tm, '.1f'):>14s} "
                  f"{r['state_mb']:9.1f} {r['total_mb']:9.1f}")
        verdict = "met" if res["ratio"] <= TARGET else "NOT met"
        print(f"   ratio npgpt / torch: step {res['ratio']:.2f} (target <= {TARGET}: {verdict}), "
              f"total {res['ratio_total']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
