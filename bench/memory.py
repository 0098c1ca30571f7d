"""Peak memory of one training step: npgpt's fast path (NumPy) against torchgpt (PyTorch eager), on the CPU.

    python bench/memory.py                 # configs cpu and large
    python bench/memory.py --config large
    python bench/memory.py --reference     # npgpt's plain reference layers as a third column

Method. Each (backend, config) runs in a fresh subprocess that imports numpy AND torch (so the
libraries' own memory is the same on both sides), builds the model and the optimizer, and runs
two warm-up steps (torch creates its AdamW state and .grad buffers lazily). Then:
  1. npgpt's GPT may keep the last forward's activations (so that backward() can be called again);
     they are dropped (its `_cache`, where it has one), as torch drops its saved tensors after a backward. gc.collect() and glibc's
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
Allocator: npgpt.fast tunes glibc's malloc itself; the torch worker gets the same kind of setting
from bench/ (common.keep_freed_memory); the reference runs on glibc's defaults.
"""
from __future__ import annotations

import common  # noqa: E402

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)

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

    import torch  # noqa: F401  (loaded on both sides)
    common.torch_threads(THREADS)
    if backend == "torch":
        common.keep_freed_memory()  # npgpt.fast gives itself this setting; torch gets it from here
    cfg = common.configs()[config]
    _trim()
    rss_imports = _status_kb("VmRSS")
    step = common.make_step(backend, cfg)
    x, y = common.batches(cfg, 1)[0]
    args = (step.as_input(x), step.as_input(y))
    for _ in range(2):
        step(*args)
    if backend != "torch" and hasattr(step.model, "_cache"):
        step.model._cache = None  # the activations it keeps for a second backward(); torch keeps none
    _trim()
    rss_before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if backend != "torch":
        tracemalloc.start()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
    step(*args)
    peak = _status_kb("VmHWM")
    out = {"total_mb": (peak - rss_imports) / 1024, "state_mb": (rss_before - rss_imports) / 1024,
           "step_peak_mb": (peak - rss_before) / 1024, "rss_imports_mb": rss_imports / 1024}
    if backend != "torch":
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
    p.add_argument("--reference", action="store_true", help="also measure npgpt's plain reference layers")
    p.add_argument("--worker", choices=common.BACKENDS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.config)))
        return 0
    common.torch_threads(args.threads)
    info = common.machine_info(args.threads, HOW)
    backends = ["fast", "reference", "torch"] if args.reference else ["fast", "torch"]
    common.print_info(f"memory: peak RSS growth during one training step, {' vs '.join(backends)}, float32",
                      info)
    results = {"machine": info, "command": " ".join(sys.argv), "backends": backends}
    for name in (["cpu", "large"] if args.config == "both" else [args.config]):
        cfg = common.configs()[name]
        runs = {b: [] for b in backends}
        for _ in range(args.repeats):
            for b in runs:  # alternate the backends
                runs[b].append(run_worker(b, name, args.threads))
        res = {}
        for b, rs in runs.items():
            res[b] = {k: common.median([r[k] for r in rs]) for k in rs[0]}
        res["ratio"] = res["fast"]["step_peak_mb"] / res["torch"]["step_peak_mb"]
        res["ratio_total"] = res["fast"]["total_mb"] / res["torch"]["total_mb"]
        res["ratios to torch"] = {b: res[b]["step_peak_mb"] / res["torch"]["step_peak_mb"]
                                  for b in backends if b != "torch"}
        results[name] = res
        print(f"\n-- config {name}: {common.describe(cfg)}")
        print(f"   {'backend':9s} {'step MB':>8s} {'(tracemalloc)':>14s} {'state MB':>9s} {'total MB':>9s}")
        for b in backends:
            r = res[b]
            tm = r.get("tracemalloc_step_peak_mb")
            print(f"   {b:9s} {r['step_peak_mb']:8.1f} {'-' if tm is None else format(tm, '.1f'):>14s} "
                  f"{r['state_mb']:9.1f} {r['total_mb']:9.1f}")
        print(f"   ratio fast / torch: step {res['ratio']:.2f} (target <= {TARGET}: "
              f"{common.verdict(res['ratio'], TARGET)}), total {res['ratio_total']:.2f}")
        if args.reference:
            print(f"   ratio reference / torch: step {res['ratios to torch']['reference']:.2f}")
    return common.finish(results, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
