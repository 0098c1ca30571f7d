"""One training step on the CPU, npgpt beside torchgpt (PyTorch eager) in one run: its time (--mode
time), its peak memory (memory) or where its time goes (profile).

    python bench/step_time.py                      # configs cpu and large, all cores: fast vs torch
    python bench/step_time.py --threads 1 --config cpu --rounds 30
    python bench/step_time.py --config modern-cpu --reference --rounds 10   # + npgpt's plain layers
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/step_time.py --config modern-cpu   # as on a CPU without bfloat16
    python bench/step_time.py --config modern-cpu --muon_ns_dtype bfloat16   # torch's own Muon iteration
    python bench/step_time.py --mode memory
    python bench/step_time.py --mode profile --threads 1

One step is what both training scripts do per iteration: forward, backward, clip_grad_norm(1.0) and
the optimizer (AdamW with nanoGPT's groups; with modern-cpu Muon for the block matrices and AdamW for
the rest), float32, on the same random batches, in the backends fast (npgpt.fast: train_np.py),
reference (npgpt's plain layers: train_np.py --reference; with --reference) and torch (torchgpt, SDPA
attention). The targets compare fast with torch. torch's Newton-Schulz iteration runs in
--muon_ns_dtype (train_torch.py's; auto: float32 where oneDNN has no bfloat16 matmul).
time: each backend in its own worker process; after a warm-up, `rounds` times `block` steps of each
worker in turn (the order rotates every round); before each block a worker sleeps 0.3 s (idle
OpenBLAS and OpenMP threads busy-wait) and its first step is not counted. Median step time, its
quartiles, the median forward / backward / optimizer parts.
memory: `repeats` fresh workers per backend, all importing numpy and torch; after the warm-up npgpt's
kept activations are dropped, freed memory returned (malloc_trim), the kernel's peak-RSS counter reset
and one step run. step = VmHWM - RSS before the step (compared), state = RSS before the step - RSS
after the imports, total = both; tracemalloc's peak of npgpt's NumPy buffers as a check. Medians.
profile: in this process, cProfile's inclusive time of npgpt's public layer functions (a numba
kernel's in its Python wrapper, "name (numba)"), torch.profiler's self CPU time per operator.
Allocator: npgpt.fast tunes glibc's malloc itself, the reference runs on its defaults, the torch
worker gets the same kind of setting (keep_freed_memory) unless --torch_malloc default.
"""
from __future__ import annotations

import common  # noqa: E402  (sets sys.path; imports neither numpy nor torch)

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import replace  # noqa: E402

BACKENDS = ("fast", "reference", "torch")
TARGETS = {"time": {"cpu": 1.0, "large": 1.0}, "memory": {"cpu": 1.2, "large": 1.2}}  # fast / torch at most
PAUSE_S = 0.3  # before each block: OpenBLAS threads spin up to ~0.1 s after their last call
EXTRA = ("erf", "attention_probs", "gelu", "softmax")  # helpers worth a profile line of their own


# --------------------------------------------------------------------------------------------
# One step of a backend, on the same random batches
# --------------------------------------------------------------------------------------------

def batches(cfg, n: int = 8) -> list:
    """n random (x, y) pairs of (batch_size, block_size) int64 token ids, the same for every backend."""
    import numpy as np
    rng = np.random.default_rng(0)
    return [tuple(rng.integers(0, common.VOCAB, (2, cfg.batch_size, cfg.block_size))) for _ in range(n)]


def make_step(backend: str, cfg, seed: int = 0):
    """One training step of `backend`, built as the training scripts build it. step(x, y) returns its
    (forward, backward, optimizer) seconds; step.model is the model, step.as_input turns a NumPy batch
    into the backend's input."""
    import numpy as np
    if backend == "torch":
        import torch
        import torchgpt
        from torchgpt.model import configure_muon_adamw
        torch.manual_seed(seed)
        model = torchgpt.GPT(cfg.gpt_config(common.VOCAB))  # attention="sdpa", float32
        model.train()
        betas = (cfg.beta1, cfg.beta2)
        opt = (configure_muon_adamw(model, cfg.weight_decay, cfg.learning_rate, cfg.muon_lr, betas, "cpu",
                                    cfg.muon_ns_dtype) if cfg.optimizer == "muon"
               else model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, "cpu"))
        params, as_input = list(model.parameters()), torch.from_numpy

        def forward(x, y):
            return model(x, y)[1]

        def backward(loss):
            loss.backward()

        def update(_):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        if backend == "fast":
            from npgpt.fast import GPT, AdamW, clip_grad_norm
        else:
            from npgpt import GPT
            from npgpt.optim import AdamW, clip_grad_norm
        model = GPT(cfg.gpt_config(common.VOCAB), seed=seed, dtype=np.float32)
        kw = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        opt = AdamW(model.params, **kw) if cfg.optimizer != "muon" else None
        if opt is None:  # the app's pairing: Muon for the block matrices, AdamW for the rest
            from gptapp.backends.numpy import muon_class
            from gptapp.optimizers import MuonAdamW
            opt = MuonAdamW(model.params, AdamW, muon_lr=cfg.muon_lr, muon_class=muon_class(backend != "fast"), **kw)
        forward, backward, as_input = model.forward, (lambda _: model.backward()), (lambda a: a)

        def update(grads):
            clip_grad_norm(grads, cfg.grad_clip)
            opt.step(grads, lr=cfg.learning_rate)

    def step(x, y):
        t0 = time.perf_counter()
        out = forward(x, y)
        t1 = time.perf_counter()
        grads = backward(out)
        t2 = time.perf_counter()
        update(grads)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    step.model, step.as_input = model, as_input
    return step


def keep_freed_memory(trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20) -> bool:
    """glibc malloc keeps up to `trim_threshold` freed bytes mapped and serves blocks below
    `mmap_threshold` from them: each step reuses the last one's memory instead of page-faulting it in.
    For the torch worker only (npgpt.fast tunes its own allocator). False where there is no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-1, trim_threshold)) and bool(mallopt(-3, mmap_threshold))  # M_TRIM/M_MMAP_THRESHOLD


def config(name: str, muon_ns_dtype: str):
    cfg = common.configs()[name]
    return replace(cfg, muon_ns_dtype=muon_ns_dtype) if cfg.optimizer == "muon" else cfg


# --------------------------------------------------------------------------------------------
# Workers: one backend in its own process, driven over stdin/stdout (modes time and memory)
# --------------------------------------------------------------------------------------------

def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(args) -> None:
    """memory: prints the step's figures as JSON. time: says "ready", then answers each "run K" line
    with the JSON list of K (forward, backward, optimizer) seconds."""
    backend, memory = args.worker, args.mode == "memory"
    if backend == "torch" or memory:
        common.torch_threads(THREADS)  # memory: torch loaded on both sides
    if backend == "torch" and args.torch_malloc == "same":
        keep_freed_memory()
    cfg = config(args.config, args.muon_ns_dtype)
    trim()
    rss_imports = status_kb("VmRSS")
    step = make_step(backend, cfg)
    data = [(step.as_input(x), step.as_input(y)) for x, y in batches(cfg, 1 if memory else 8)]
    for i in range(args.warmup):
        step(*data[i % len(data)])
    if memory:
        print(json.dumps(step_memory(backend, step, data[0], rss_imports)), flush=True)
        return
    print(json.dumps("ready"), flush=True)
    i = args.warmup
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        time.sleep(PAUSE_S)  # let the other worker's idle BLAS/OpenMP threads stop spinning
        times = [step(*data[(i + k) % len(data)]) for k in range(int(cmd[1]) + 1)]
        i += len(times)
        print(json.dumps(times[1:]), flush=True)  # the first step after the pause refills the caches


def step_memory(backend: str, step, xy, rss_imports: int) -> dict:
    import tracemalloc
    npgpt = backend != "torch"
    if npgpt and hasattr(step.model, "_cache"):
        step.model._cache = None  # the activations it keeps for a second backward(); torch keeps none
    trim()
    rss_before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if npgpt:
        tracemalloc.start()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
    step(*xy)
    peak = status_kb("VmHWM")
    out = {"total_mb": (peak - rss_imports) / 1024, "state_mb": (rss_before - rss_imports) / 1024,
           "step_peak_mb": (peak - rss_before) / 1024, "rss_imports_mb": rss_imports / 1024}
    if npgpt:
        out["tracemalloc_step_peak_mb"] = (tracemalloc.get_traced_memory()[1] - start) / 2**20
        tracemalloc.stop()
    return out


class Worker:
    def __init__(self, args, backend: str, config_name: str):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--mode", args.mode, "--config",
               config_name, "--threads", str(args.threads), "--warmup", str(args.warmup), "--torch_malloc",
               args.torch_malloc, "--muon_ns_dtype", args.muon_ns_dtype]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.first = self.read()  # "ready", or memory's figures

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {' '.join(self.proc.args[3:6])} exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, k: int) -> list:
        self.proc.stdin.write(f"run {k}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def time_config(args, name: str, backends: list) -> dict:
    # the workers start (and warm up) one at a time, so that none warms up under another's load
    workers = {b: Worker(args, b, name) for b in backends}
    times = {b: [] for b in backends}
    try:
        for r in range(args.rounds):
            k = r % len(backends)
            for b in backends[k:] + backends[:k]:
                times[b] += workers[b].run(args.block)
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for b, ts in times.items():
        q1, q3 = common.quartiles([sum(p) for p in ts])
        out[b] = {"step_ms": 1e3 * common.median([sum(p) for p in ts]), "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                  **{f"{part}_ms": 1e3 * common.median([p[j] for p in ts])
                     for j, part in enumerate(("forward", "backward", "optimizer"))}, "steps": len(ts)}
    return out


def memory_config(args, name: str, backends: list) -> dict:
    runs = {b: [] for b in backends}
    for _ in range(args.repeats):
        for b in backends:  # alternate the backends
            w = Worker(args, b, name)
            runs[b].append(w.first)
            w.close()
    return {b: {k: common.median([r[k] for r in rs]) for k in rs[0]} for b, rs in runs.items()}


# --------------------------------------------------------------------------------------------
# Profile: in this process, npgpt per layer function (cProfile), torch per operator (torch.profiler)
# --------------------------------------------------------------------------------------------

def layer_rows(stats: dict) -> dict:
    """{name: (inclusive seconds, calls)} of npgpt's public layer functions in cProfile's stats; a numba
    kernel's time lands in its Python wrapper, which has its layer's name and a line of its own."""
    rows = defaultdict(lambda: [0.0, 0])
    for (path, _, name), (_, calls, _, inclusive, _) in stats.items():
        if (f"{os.sep}npgpt{os.sep}" in path and not name.startswith("_")
                and (name.endswith(("_forward", "_backward")) or name in EXTRA)):
            row = rows[name + (" (numba)" if path.endswith("numba_kernels.py") else "")]
            row[0], row[1] = row[0] + inclusive, row[1] + calls
    return rows


def profile_config(args, name: str, backends: list) -> dict:
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity, profile
    cfg, out = config(name, args.muon_ns_dtype), {}
    for backend in backends:
        step = make_step(backend, cfg)
        data = [(step.as_input(x), step.as_input(y)) for x, y in batches(cfg)]
        for i in range(5):
            step(*data[i % len(data)])
        prof = cProfile.Profile() if backend != "torch" else profile(activities=[ProfilerActivity.CPU])
        with prof:
            parts = [step(*data[i % len(data)]) for i in range(args.steps)]
        mean = [1e3 * sum(p[j] for p in parts) / args.steps for j in range(3)]
        print(f"\n   {backend}: {sum(mean):.1f} ms a step (mean of {args.steps}): forward {mean[0]:.1f}, "
              f"backward {mean[1]:.1f}, clip + optimizer {mean[2]:.1f} (profiler overhead included)")
        if backend == "torch":
            rows = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
            print(f"   {'operator (self CPU time)':50s} {'ms/step':>8s} {'calls/step':>11s}")
        else:
            rows = layer_rows(pstats.Stats(prof).stats)
            print(f"   {'layer function (inclusive)':50s} {'ms/step':>8s} {'calls/step':>11s}")
        top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:args.rows if backend == "torch" else None]
        for n, (seconds, calls) in top:
            print(f"   {n[:50]:50s} {1e3 * seconds / args.steps:8.2f} {calls // args.steps:11d}")
        out[backend] = {"step_ms": mean, "ms_per_step": {n: 1e3 * s / args.steps for n, (s, _) in top}}
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

COLUMNS = {  # mode: the table's columns, (header, width, a backend's figure)
    "time": [("step ms", 9, lambda r: f"{r['step_ms']:.1f}"),
             ("(q1 - q3)", 17, lambda r: f"({r['q1_ms']:.1f} - {r['q3_ms']:.1f})"),
             ("fwd", 7, lambda r: f"{r['forward_ms']:.1f}"), ("bwd", 7, lambda r: f"{r['backward_ms']:.1f}"),
             ("optim", 7, lambda r: f"{r['optimizer_ms']:.1f}")],
    "memory": [("step MB", 8, lambda r: f"{r['step_peak_mb']:.1f}"),
               ("(tracemalloc)", 14, lambda r: f"{r['tracemalloc_step_peak_mb']:.1f}"
                if "tracemalloc_step_peak_mb" in r else "-"),
               ("state MB", 9, lambda r: f"{r['state_mb']:.1f}"), ("total MB", 9, lambda r: f"{r['total_mb']:.1f}")],
}
COMPARED = {"time": "step_ms", "memory": "step_peak_mb"}  # the figure of the ratio to torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("time", "memory", "profile"), default="time")
    p.add_argument("--threads", type=int, default=THREADS, help="threads for BLAS, OpenMP and torch "
                   "(default: all cores)")
    p.add_argument("--config", choices=("cpu", "large", "both", "modern-cpu"), default=None,
                   help="both: cpu and large (the default; profile: cpu); modern-cpu: the modern block with "
                        "Muon + AdamW (no target)")
    p.add_argument("--reference", action="store_true", help="also measure npgpt's plain reference layers")
    p.add_argument("--rounds", type=int, default=20, help="time: interleaved rounds")
    p.add_argument("--block", type=int, default=5, help="time: timed steps per backend per round")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 5; memory 2)")
    p.add_argument("--repeats", type=int, default=3, help="memory: fresh processes per backend; the median is shown")
    p.add_argument("--steps", type=int, default=20, help="profile: steps profiled")
    p.add_argument("--rows", type=int, default=14, help="profile: torch operators shown")
    p.add_argument("--torch_malloc", choices=("same", "default"), default="same",
                   help="same: torch's worker keeps freed memory mapped (glibc mallopt, as npgpt.fast does "
                        "for itself); default: glibc's defaults")
    p.add_argument("--muon_ns_dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="torch's Muon iteration (modern-cpu), as train_torch.py's flag (default auto)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", choices=BACKENDS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.config = args.config or ("cpu" if args.mode == "profile" else "both")
    args.warmup = (2 if args.mode == "memory" else 5) if args.warmup is None else args.warmup
    if args.worker:
        worker(args)
        return 0
    backends = ["fast", "reference", "torch"] if args.reference else ["fast", "torch"]
    info = common.machine_info(args.threads, HOW)
    info["torch malloc"] = args.torch_malloc
    if args.config == "modern-cpu":
        from torchgpt.muon import resolve_ns_dtype
        info["muon ns dtype"] = f"{args.muon_ns_dtype} ({resolve_ns_dtype(args.muon_ns_dtype, 'cpu')})"
        info["ONEDNN_MAX_CPU_ISA"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "unset")
    what = {"time": "training step (fwd + bwd + clip + optimizer)", "memory": "peak RSS growth during one "
            "training step", "profile": "where a training step's time goes"}[args.mode]
    common.print_info(f"step_time --mode {args.mode}: {' vs '.join(backends)} {what}, float32", info)
    if args.mode == "profile":
        common.torch_threads(args.threads)
    results = {"machine": info, "command": " ".join(sys.argv), "mode": args.mode, "backends": backends}
    for name in (["cpu", "large"] if args.config == "both" else [args.config]):
        print(f"\n-- config {name}: {common.describe(config(name, args.muon_ns_dtype))}", flush=True)
        res = results[name] = {"time": time_config, "memory": memory_config, "profile": profile_config}[args.mode](
            args, name, backends)
        if args.mode == "profile":
            continue
        key, columns = COMPARED[args.mode], COLUMNS[args.mode]
        res["ratios to torch"] = {b: res[b][key] / res["torch"][key] for b in backends if b != "torch"}
        res["ratio"] = res["ratios to torch"]["fast"]  # the target's ratio
        print("   " + " ".join([f"{'backend':9s}"] + [f"{h:>{w}s}" for h, w, _ in columns] + [f"{'/ torch':>8s}"]))
        for b in backends:
            print("   " + " ".join([f"{b:9s}"] + [f"{f(res[b]):>{w}s}" for _, w, f in columns]
                                   + [f"{res['ratios to torch'].get(b, 1.0):8.2f}"]))
        target = TARGETS[args.mode].get(name)
        verdict = f"target <= {target}: {common.verdict(res['ratio'], target)}" if target else "no target"
        line = f"   ratio fast / torch = {res['ratio']:.2f}   ({verdict})"
        if args.mode == "memory":
            res["ratio_total"] = res["fast"]["total_mb"] / res["torch"]["total_mb"]
            line += f", total {res['ratio_total']:.2f}"
        print(line, flush=True)
    return common.finish(results, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
