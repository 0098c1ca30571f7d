"""npgpt beside torchgpt (PyTorch eager) on the CPU, in one run: a training step's time (--mode time),
its peak memory (memory), where its time goes (profile), and generation with and without the KV
cache (generate). How each is measured: bench/RESULTS.md.

    python bench/step_time.py                      # configs cpu and large, all cores: fast vs torch
    python bench/step_time.py --threads 1 --config cpu --rounds 30
    python bench/step_time.py --config modern-cpu --reference --rounds 10   # + npgpt's plain layers
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/step_time.py --config modern-cpu   # as on a CPU without bfloat16
    python bench/step_time.py --config modern-cpu --muon_ns_dtype bfloat16   # torch's own Muon iteration
    python bench/step_time.py --mode memory
    python bench/step_time.py --mode profile --threads 1
    python bench/step_time.py --mode generate --tokens 255 --repeats 5

A step is what both training scripts do per iteration (forward, backward, clip_grad_norm, AdamW, or
Muon + AdamW for modern-cpu), float32, on the same random batches, in the backends fast (npgpt.fast),
reference (npgpt's plain layers; with --reference) and torch (torchgpt, SDPA attention, its
Newton-Schulz iteration in --muon_ns_dtype). time and memory run each backend in worker processes of
its own (time: `rounds` interleaved blocks of `block` steps; memory: one step in each of `repeats`
fresh workers); profile and generate run in this process. npgpt.fast tunes glibc's malloc itself; the
torch worker gets the same setting (keep_freed_memory) unless --torch_malloc default.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace

import common  # sets sys.path; imports neither numpy nor torch

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)  # before numpy or torch loads

TARGETS = {"time": {"cpu": 1.0, "large": 1.0}, "memory": {"cpu": 1.2, "large": 1.2},  # fast / torch at most
           "generate": {"cpu-256": 5.0, "shakespeare-char": 5.0}}  # fast's cache speed-up at least
PAUSE_S = 0.3  # before each block: idle OpenBLAS/OpenMP threads spin a while after their last call
EXTRA = ("erf", "attention_probs", "gelu", "softmax")  # helpers worth a profile line of their own


# --- One step of a backend, on the same random batches --------------------------------------------
def batches(cfg, n: int = 8) -> list:
    """n random (x, y) pairs of (batch_size, block_size) int64 token ids, the same for every backend."""
    import numpy as np
    rng = np.random.default_rng(0)
    return [tuple(rng.integers(0, common.VOCAB, (2, cfg.batch_size, cfg.block_size))) for _ in range(n)]


def make_step(backend: str, cfg, seed: int = 0):
    """One training step of `backend`, built as the training scripts build theirs: step(x, y) returns its
    (forward, backward, optimizer) seconds; step.as_input turns a NumPy batch into the backend's input."""
    if backend == "torch":
        import torch
        import torchgpt
        from torchgpt.model import configure_muon_adamw
        torch.manual_seed(seed)
        model = torchgpt.GPT(cfg.gpt_config(common.VOCAB)).train()  # attention="sdpa", float32
        betas = (cfg.beta1, cfg.beta2)
        opt = (configure_muon_adamw(model, cfg.weight_decay, cfg.learning_rate, cfg.muon_lr, betas, "cpu",
                                    cfg.muon_ns_dtype) if cfg.optimizer == "muon"
               else model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, "cpu"))
        params, as_input = list(model.parameters()), torch.from_numpy
        forward, backward = (lambda x, y: model(x, y)[1]), (lambda loss: loss.backward())

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
        model = GPT(cfg.gpt_config(common.VOCAB), seed=seed)  # float32
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
    """glibc malloc keeps up to `trim_threshold` freed bytes mapped and serves blocks below `mmap_threshold`
    from them (each step reuses the last one's memory); for torch only. False where there is no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-1, trim_threshold)) and bool(mallopt(-3, mmap_threshold))  # M_TRIM/M_MMAP_THRESHOLD


def config(name: str, muon_ns_dtype: str):
    """The benchmark shapes: the `cpu` preset, a larger one (6 layers, 256 channels, block 128), the
    `modern-cpu` preset (the cpu size with the modern block, Muon + AdamW, torch's iteration in
    muon_ns_dtype), and for generation the cpu preset at block 256 and nanoGPT's shakespeare-char."""
    from gptapp.settings import PRESETS as presets
    return {"cpu": presets["cpu"], "large": replace(presets["cpu"], n_layer=6, n_embd=256, block_size=128),
            "modern-cpu": replace(presets["modern-cpu"], muon_ns_dtype=muon_ns_dtype),
            "cpu-256": replace(presets["cpu"], block_size=256),  # generation's: a 256-position window
            "shakespeare-char": replace(presets["shakespeare-char"], dropout=0.0)}[name]


# --- Workers: one backend in its own process, driven over stdin/stdout (modes time and memory) ----
def worker(args) -> None:
    """memory: prints the step's figures as JSON. time: prints "ready", then answers each line K with
    the JSON list of K (forward, backward, optimizer) seconds, until stdin closes."""
    backend, memory = args.worker, args.mode == "memory"
    if backend == "torch" or memory:  # memory: torch loaded on both sides
        import torch
        torch.set_num_threads(THREADS)
    if backend == "torch" and args.torch_malloc == "same":
        keep_freed_memory()
    cfg = config(args.config, args.muon_ns_dtype)
    common.trim()
    rss_imports = common.status_kb("VmRSS")
    step = make_step(backend, cfg)
    data = [(step.as_input(x), step.as_input(y)) for x, y in batches(cfg, 1 if memory else 8)]
    for i in range(args.warmup):
        step(*data[i % len(data)])
    print(json.dumps(step_memory(backend, step, data[0], rss_imports) if memory else "ready"), flush=True)
    i = args.warmup
    for line in sys.stdin:
        time.sleep(PAUSE_S)  # let the other worker's idle BLAS/OpenMP threads stop spinning
        times = [step(*data[(i + k) % len(data)]) for k in range(int(line) + 1)]
        i += len(times)
        print(json.dumps(times[1:]), flush=True)  # the first step after the pause refills the caches


def step_memory(backend: str, step, xy, rss_imports: int) -> dict:
    npgpt = backend != "torch"
    if npgpt and hasattr(step.model, "_cache"):
        step.model._cache = None  # the activations it keeps for a second backward(); torch keeps none
    out = common.step_memory(lambda: step(*xy), rss_imports, trace=npgpt)
    out["rss_imports_mb"] = rss_imports / 1024
    return out


def start(args, backend: str, name: str):
    """A worker of backend on config name, and its first answer ("ready", or memory's figures)."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", backend, "--mode", args.mode,
                             "--config", name, "--threads", str(args.threads), "--warmup", str(args.warmup),
                             "--torch_malloc", args.torch_malloc, "--muon_ns_dtype", args.muon_ns_dtype],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, common.ask(proc)


def time_config(args, name: str, backends: list) -> dict:
    procs = {b: start(args, b, name)[0] for b in backends}  # one at a time: none warms up under another's load
    times = {b: [] for b in backends}
    try:
        for r in range(args.rounds):
            for b in backends[r % len(backends):] + backends[:r % len(backends)]:
                times[b] += common.ask(procs[b], args.block)
    finally:
        for proc in procs.values():
            common.stop(proc)
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
            proc, figures = start(args, b, name)
            common.stop(proc)
            runs[b].append(figures)
    return {b: {k: common.median([r[k] for r in rs]) for k in rs[0]} for b, rs in runs.items()}


# --- Profile: in this process, npgpt per layer function, torch per operator -----------------------
def layer_rows(stats: dict) -> dict:
    """{name: (inclusive seconds, calls)} of npgpt's layer functions in cProfile's stats (a numba kernel's
    time lands in its Python wrapper, which has its layer's name and a line of its own)."""
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
        rows = ({e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()} if backend == "torch"
                else layer_rows(pstats.Stats(prof).stats))
        what = "operator (self CPU time)" if backend == "torch" else "layer function (inclusive)"
        print(f"   {what:50s} {'ms/step':>8s} {'calls/step':>11s}")
        top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:args.rows if backend == "torch" else None]
        for n, (seconds, calls) in top:
            print(f"   {n[:50]:50s} {1e3 * seconds / args.steps:8.2f} {calls // args.steps:11d}")
        out[backend] = {"step_ms": mean, "ms_per_step": {n: 1e3 * s / args.steps for n, (s, _) in top}}
    return out


# --- Generation: tokens/s with and without the KV cache, in this process --------------------------
def generate_config(args, name: str, backends: list) -> dict:
    """From a one-token prompt, batch 1, greedy (cached and uncached must give the same tokens), args.tokens
    new tokens (255 fill a 256-position window) with and without each backend's KV cache (torch's uncached:
    the model on the whole context every token, written here); the runs alternate; median times."""
    import numpy as np
    import torch
    from npgpt.sampling import sample_next

    @torch.no_grad()
    def torch_uncached(model, idx):
        for _ in range(args.tokens):
            logits, _ = model(idx[:, -model.config.block_size:])  # (B, T, V)
            nxt = sample_next(logits[:, -1, :].double().numpy(), 0.0, None, None)  # (B,) greedy, as generate()
            idx = torch.cat((idx, torch.from_numpy(nxt).view(-1, 1)), dim=1)
        return idx.numpy()

    prompt, runs = np.zeros((1, 1), dtype=np.int64), {}
    for b in backends:
        m = make_step(b, config(name, args.muon_ns_dtype)).model.eval()
        if b == "torch":
            runs["torch cached"] = lambda m=m: m.generate(torch.from_numpy(prompt), args.tokens, 0.0).numpy()
            runs["torch uncached"] = lambda m=m: torch_uncached(m, torch.from_numpy(prompt))
        else:
            runs[f"{b} cached"] = lambda m=m: m.generate(prompt, args.tokens, temperature=0.0, use_cache=True)
            runs[f"{b} uncached"] = lambda m=m: m.generate(prompt, args.tokens, temperature=0.0, use_cache=False)
    outputs = {k: f() for k, f in runs.items()}  # warm-up, and the tokens to compare
    times = {k: [] for k in runs}
    for r in range(args.repeats):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    res = {k: {"tokens_per_s": args.tokens / common.median(t), "seconds": common.median(t)} for k, t in times.items()}
    print(f"   {'':16s} {'tokens/s':>10s}")
    for k in runs:
        print(f"   {k:16s} {res[k]['tokens_per_s']:10.1f}")
    for b in backends:
        res[f"{b} speedup"] = res[f"{b} cached"]["tokens_per_s"] / res[f"{b} uncached"]["tokens_per_s"]
        res[f"{b} same tokens"] = bool(np.array_equal(outputs[f"{b} cached"], outputs[f"{b} uncached"]))
    target = TARGETS["generate"].get(name)
    print("   cache speedup: " + ", ".join(f"{b} {res[f'{b} speedup']:.1f}x" + (f" (target >= {target:g}x: "
          f"{common.verdict(res[f'{b} speedup'], target, at_least=True)})" if b == "fast" and target else "")
                                          for b in backends))
    print("   cached == uncached tokens: " + ", ".join(f"{b} {res[f'{b} same tokens']}" for b in backends), flush=True)
    return res


# --- main -----------------------------------------------------------------------------------------
def traced(r: dict) -> str:
    return f"{r['tracemalloc_step_peak_mb']:.1f}" if "tracemalloc_step_peak_mb" in r else "-"


TABLES = {  # mode: the table's header and a backend's row; the figure compared to torch's
    "time": (f"{'step ms':>9s} {'(q1 - q3)':>17s} {'fwd':>7s} {'bwd':>7s} {'optim':>7s}", "step_ms", lambda r:
             f"{r['step_ms']:9.1f} {'(%.1f - %.1f)' % (r['q1_ms'], r['q3_ms']):>17s} {r['forward_ms']:7.1f} "
             f"{r['backward_ms']:7.1f} {r['optimizer_ms']:7.1f}"),
    "memory": (f"{'step MB':>8s} {'(tracemalloc)':>14s} {'state MB':>9s} {'total MB':>9s}", "step_peak_mb", lambda r:
               f"{r['step_peak_mb']:8.1f} {traced(r):>14s} {r['state_mb']:9.1f} {r['total_mb']:9.1f}"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("time", "memory", "profile", "generate"), default="time")
    p.add_argument("--threads", type=int, default=THREADS, help="for BLAS, OpenMP and torch (default: all cores)")
    p.add_argument("--config", choices=("cpu", "large", "both", "modern-cpu", "cpu-256", "shakespeare-char"),
                   help="both: cpu and large (the default; profile: cpu; generate: cpu-256 and shakespeare-char)")
    p.add_argument("--reference", action="store_true", help="also measure npgpt's plain reference layers")
    p.add_argument("--rounds", type=int, default=20, help="time: interleaved rounds")
    p.add_argument("--block", type=int, default=5, help="time: timed steps per backend per round")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 5; memory 2)")
    p.add_argument("--repeats", type=int, default=3, help="memory: fresh workers per backend; generate: runs")
    p.add_argument("--tokens", type=int, default=255, help="generate: new tokens")
    p.add_argument("--steps", type=int, default=20, help="profile: steps profiled")
    p.add_argument("--rows", type=int, default=14, help="profile: torch operators shown")
    p.add_argument("--torch_malloc", choices=("same", "default"), default="same", help="same: torch's worker "
                   "keeps freed memory mapped, as npgpt.fast does for itself; default: glibc's defaults")
    p.add_argument("--muon_ns_dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="torch's Muon iteration (modern-cpu), as train_torch.py's flag (default auto)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", choices=("fast", "reference", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.config = args.config or {"profile": "cpu", "generate": "cpu-256,shakespeare-char"}.get(args.mode, "both")
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
    what = {"time": "training step (fwd + bwd + clip + optimizer)", "memory": "peak RSS growth in a step",
            "generate": f"{args.tokens} new tokens from a 1-token prompt, batch 1, greedy"}
    common.print_info(f"step_time: {' vs '.join(backends)} {what.get(args.mode, 'profile of a step')}, float32", info)
    if args.mode in ("profile", "generate"):  # in this process
        import torch
        torch.set_num_threads(args.threads)
    results = {"machine": info, "command": " ".join(sys.argv), "mode": args.mode, "backends": backends}
    for name in (["cpu", "large"] if args.config == "both" else args.config.split(",")):
        print(f"\n-- config {name}: {common.describe(config(name, args.muon_ns_dtype))}", flush=True)
        res = results[name] = {"time": time_config, "memory": memory_config, "profile": profile_config,
                               "generate": generate_config}[args.mode](args, name, backends)
        if args.mode not in TABLES:
            continue
        header, key, row = TABLES[args.mode]
        res["ratios to torch"] = {b: res[b][key] / res["torch"][key] for b in backends if b != "torch"}
        res["ratio"] = res["ratios to torch"]["fast"]  # the target's ratio
        print(f"   {'backend':9s} {header} {'/ torch':>8s}")
        for b in backends:
            print(f"   {b:9s} {row(res[b])} {res['ratios to torch'].get(b, 1.0):8.2f}")
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
