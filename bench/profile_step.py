"""Where a training step's time goes: npgpt per layer function, torch per operator.

    python bench/profile_step.py                      # config cpu, all cores, npgpt.fast
    python bench/profile_step.py --backend reference  # npgpt's plain layers (npgpt.layers)
    python bench/profile_step.py --config large --threads 1

npgpt: every public layer function (a name ending in _forward or _backward, or one of EXTRA) of
npgpt.layers (reference) or of npgpt.fast and its submodules (fast) is wrapped with a timer
wherever npgpt's modules hold it (inclusive wall time, so attention_forward includes the softmax
it calls). Compiled kernels (numba) are not Python functions: their time lands in their caller,
the Python wrapper in npgpt.fast.numba_kernels, which has a line of its own ("name (numba)").
torch: torch.profiler's self CPU time per aten operator. Both run common.make_step (forward,
backward, clip, AdamW) in this one process, npgpt first.
"""
from __future__ import annotations

import common  # noqa: E402

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import pkgutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

EXTRA = ("erf", "attention_probs", "gelu", "softmax")  # helpers worth a line of their own where they exist


def layer_functions(backend: str) -> dict:
    """{function: name} of the backend's layer functions."""
    if backend == "reference":
        modules = [importlib.import_module("npgpt.layers")]
    else:
        pkg = importlib.import_module("npgpt.fast")
        modules = [pkg] + [importlib.import_module(f"npgpt.fast.{m.name}")
                           for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))]
    found = {}
    for mod in modules:
        # a numba kernel's Python wrapper has its layer's name: its own line, inside the layer's time
        suffix = " (numba)" if mod.__name__.endswith("numba_kernels") else ""
        for name, f in vars(mod).items():
            if (inspect.isfunction(f) and not name.startswith("_")
                    and (name.endswith(("_forward", "_backward")) or name in EXTRA)):
                found.setdefault(f, name + suffix)
    return found


def patch(found: dict, replacement: dict) -> list:
    """Puts replacement[f] wherever an npgpt module holds f (as an attribute, or in a dict of functions
    or of tuples of functions); returns what to undo."""
    undo = []
    for mod_name, mod in list(sys.modules.items()):
        if not (mod_name == "npgpt" or mod_name.startswith("npgpt.")) or mod is None:
            continue
        for name, value in list(vars(mod).items()):
            if inspect.isfunction(value) and value in found:
                undo.append((vars(mod), name, value))
                setattr(mod, name, replacement[value])
            elif isinstance(value, dict):
                for k, v in list(value.items()):
                    if isinstance(v, tuple) and any(inspect.isfunction(x) and x in found for x in v):
                        undo.append((value, k, v))
                        value[k] = tuple(replacement.get(x, x) if inspect.isfunction(x) else x for x in v)
                    elif inspect.isfunction(v) and v in found:
                        undo.append((value, k, v))
                        value[k] = replacement[v]
    return undo


def profile_npgpt(backend: str, cfg, steps: int) -> None:
    spent, calls = defaultdict(float), defaultdict(int)

    def timed(name, f):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    found = layer_functions(backend)
    undo = patch(found, {f: timed(n, f) for f, n in found.items()})
    try:
        step = common.make_step(backend, cfg)
        data = common.batches(cfg)
        for i in range(5):
            step(*data[i % len(data)])
        spent.clear()
        calls.clear()
        parts = []
        for i in range(steps):
            parts.append(step(*data[i % len(data)]))
    finally:
        for holder, key, original in reversed(undo):
            holder[key] = original
    total = [sum(p) for p in parts]
    print(f"\n-- npgpt {backend}: {1e3 * np.mean(total):.1f} ms a step (mean of {steps}): forward "
          f"{1e3 * np.mean([p[0] for p in parts]):.1f}, backward {1e3 * np.mean([p[1] for p in parts]):.1f}, "
          f"clip + AdamW {1e3 * np.mean([p[2] for p in parts]):.1f}")
    if not calls:
        print(f"   no Python layer functions of {backend} were called (all compiled, or none found)")
        return
    print(f"   {'layer function (inclusive)':34s} {'ms/step':>8s} {'calls/step':>11s}")
    for n in sorted(calls, key=lambda n: -spent[n]):
        print(f"   {n:34s} {1e3 * spent[n] / steps:8.2f} {calls[n] // steps:11d}")


def profile_torch(cfg, steps: int, rows: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    common.torch_threads(THREADS)
    step = common.make_step("torch", cfg)
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in common.batches(cfg)]
    for i in range(5):
        step(*data[i % len(data)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(*data[i % len(data)])
    print(f"\n-- torch: self CPU time per operator, ms per step (profiler overhead included)")
    stats = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    for e in stats:
        print(f"   {e.key[:50]:50s} {e.self_cpu_time_total / 1e3 / steps:8.2f}  ({e.count // steps} calls)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--config", choices=("cpu", "large", "modern-cpu"), default="cpu")
    p.add_argument("--backend", choices=("fast", "reference"), default="fast")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args(argv)
    info = common.machine_info(args.threads, HOW)
    common.print_info(f"profile_step: config {args.config}, npgpt {args.backend} and torch", info)
    cfg = common.configs()[args.config]
    print(f"   {common.describe(cfg)}")
    profile_npgpt(args.backend, cfg, args.steps)
    profile_torch(cfg, args.steps, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
