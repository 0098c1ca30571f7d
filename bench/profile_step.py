"""Where a training step's time goes: npgpt per layer function, torch per operator.

    python bench/profile_step.py                      # config cpu, all cores
    python bench/profile_step.py --config large --threads 1

npgpt: every layer function of npgpt.layers is wrapped with a timer (inclusive wall time, so
attention_forward includes attention_probs, which includes softmax_forward; gelu_forward includes
erf). torch: torch.profiler's self CPU time per aten operator. Both run the step of
bench/step_time.py (forward, backward, clip, AdamW) in this one process, npgpt first.
"""
from __future__ import annotations

import _common  # noqa: E402

THREADS = _common.threads_from_argv()
HOW = _common.limit_threads(THREADS)

import argparse  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

LAYER_FUNCTIONS = ("embedding_forward", "embedding_backward", "linear_forward", "linear_backward",
                   "layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward", "erf",
                   "softmax_forward", "softmax_backward", "attention_probs", "attention_forward",
                   "attention_backward", "cross_entropy_forward", "cross_entropy_backward")


def profile_npgpt(cfg, steps: int) -> None:
    import npgpt.layers as L
    import npgpt.model as M
    from step_time import batches, make_backends
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

    originals = {n: getattr(L, n) for n in LAYER_FUNCTIONS}
    acts = dict(L.ACTIVATION_FUNCTIONS)
    try:
        for n, f in originals.items():
            setattr(L, n, timed(n, f))
            if hasattr(M, n):
                setattr(M, n, getattr(L, n))
        for a, (fwd, bwd) in acts.items():
            L.ACTIVATION_FUNCTIONS[a] = (getattr(L, fwd.__name__, fwd), getattr(L, bwd.__name__, bwd))
        step, _ = make_backends(cfg, only="npgpt")
        data = batches(cfg)
        for i in range(5):
            step(*data[i % len(data)])
        spent.clear()
        calls.clear()
        parts = []
        for i in range(steps):
            parts.append(step(*data[i % len(data)]))
    finally:
        for n, f in originals.items():
            setattr(L, n, f)
            if hasattr(M, n):
                setattr(M, n, f)
        L.ACTIVATION_FUNCTIONS.update(acts)
    total = [sum(p) for p in parts]
    print(f"\n-- npgpt: {1e3 * np.mean(total):.1f} ms a step (mean of {steps}): forward "
          f"{1e3 * np.mean([p[0] for p in parts]):.1f}, backward {1e3 * np.mean([p[1] for p in parts]):.1f}, "
          f"clip + AdamW {1e3 * np.mean([p[2] for p in parts]):.1f}")
    print(f"   {'layer function (inclusive)':28s} {'ms/step':>8s} {'calls/step':>11s}")
    for n in LAYER_FUNCTIONS:
        if calls[n]:
            print(f"   {n:28s} {1e3 * spent[n] / steps:8.2f} {calls[n] // steps:11d}")


def profile_torch(cfg, steps: int, rows: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from step_time import batches, make_backends
    _common.torch_threads(THREADS)
    _, step = make_backends(cfg, only="torch")
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches(cfg)]
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
    p.add_argument("--config", choices=("cpu", "large"), default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args(argv)
    info = _common.machine_info(args.threads, HOW)
    _common.print_info(f"profile_step: config {args.config}", info)
    cfg = _common.configs()[args.config]
    print(f"   {_common.describe(cfg)}")
    profile_npgpt(cfg, args.steps)
    profile_torch(cfg, args.steps, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
