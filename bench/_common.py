"""Helpers shared by the bench/ scripts: thread limits, the machine description, the configs.

`limit_threads()` must run before numpy or torch is imported (the BLAS and OpenMP runtimes read
their thread counts when they load), so this module imports neither at the top.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
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


def _lscpu() -> dict:
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
    cpu = _lscpu()
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


def configs() -> dict:
    """The two benchmark shapes: the `cpu` preset and a larger one (6 layers, 256 channels, block 128)."""
    from gptapp.settings import PRESETS
    cpu = PRESETS["cpu"]
    return {"cpu": cpu, "large": replace(cpu, n_layer=6, n_embd=256, block_size=128)}


def describe(cfg) -> str:
    return (f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} channels, block {cfg.block_size}, "
            f"batch {cfg.batch_size}, {cfg.activation}, bias {cfg.bias}, dropout {cfg.dropout}, "
            f"{'tied' if cfg.tie_weights else 'untied'} head")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def quartiles(xs):
    xs = sorted(xs)
    return xs[len(xs) // 4], xs[(3 * len(xs)) // 4]
