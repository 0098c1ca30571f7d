"""Training step time on the CPU: npgpt's fast path, (with --reference) its plain layers, and torchgpt
(PyTorch eager), side by side in one run.

    python bench/step_time.py                  # all cores, configs cpu and large: fast vs torch
    python bench/step_time.py --reference      # the plain reference layers as a third column
    python bench/step_time.py --threads 1      # one thread each
    python bench/step_time.py --config cpu --rounds 30
    python bench/step_time.py --config modern-cpu   # the modern block, Muon + AdamW as train_*.py
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/step_time.py --config modern-cpu   # as on a CPU without bfloat16
    python bench/step_time.py --config modern-cpu --muon_ns_dtype bfloat16   # torch's own Muon iteration

One step is what both training scripts do per iteration: forward, backward, clip_grad_norm(1.0)
and an AdamW update (nanoGPT's groups and settings), in float32, on the same random batches.
    fast        npgpt.fast.GPT, npgpt.fast.AdamW, npgpt.fast.clip_grad_norm (train_np.py's default)
    reference   npgpt.GPT, npgpt.optim.AdamW, npgpt.optim.clip_grad_norm (train_np.py --reference)
    torch       torchgpt.GPT with SDPA attention, torch's AdamW, clip_grad_norm_
The reference is a column only with --reference: it is the slow, plain formulas, and the target
compares the fast path with torch. With Muon, torch's Newton-Schulz iteration runs in
--muon_ns_dtype (train_torch.py's setting; auto: float32 where oneDNN has no bfloat16 matmul, which
ONEDNN_MAX_CPU_ISA=AVX2 emulates on a CPU that has one).

Each backend runs in its own worker process (same thread count), so that none inherits another's
allocator state or busy-waiting threads. After a warm-up the measurements are interleaved:
`rounds` times, `block` steps of each worker in turn (the order rotates every round), so that
drift in the machine's load hits all alike. Before each block a worker sleeps 0.3 s (idle OpenBLAS
and OpenMP threads busy-wait for a while after their last call, which would steal a core from the
next worker) and its first step is not counted. Reported: the median step time with its
quartiles, the median forward / backward / optimizer parts, and each npgpt backend / torch.

Allocator: npgpt.fast tunes glibc's malloc itself (no setup call from here); the reference runs on
glibc's defaults, as a plain script would. The torch worker gets the same kind of setting from
bench/ (common.keep_freed_memory, glibc mallopt) by default; --torch_malloc default leaves
glibc's defaults for torch.
"""
from __future__ import annotations

import common  # noqa: E402  (sets sys.path; imports neither numpy nor torch)

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

TARGETS = {"cpu": 1.0, "large": 1.0}  # issue 12: npgpt.fast / torch step time at most this
PAUSE_S = 0.3  # before each block: OpenBLAS threads spin up to ~0.1 s after their last call


# --------------------------------------------------------------------------------------------
# Worker: one backend in its own process, driven over stdin/stdout
# --------------------------------------------------------------------------------------------

def worker(backend: str, config: str, warmup: int, torch_malloc: str, muon_ns_dtype: str) -> None:
    """Reads "run K" lines, answers each with a JSON list of K (fwd, bwd, optim) times."""
    if backend == "torch":
        common.torch_threads(THREADS)
        if torch_malloc == "same":
            common.keep_freed_memory()
    cfg = common.configs()[config]
    if cfg.optimizer == "muon":
        cfg = replace(cfg, muon_ns_dtype=muon_ns_dtype)
    step = common.make_step(backend, cfg)
    data = [(step.as_input(x), step.as_input(y)) for x, y in common.batches(cfg)]
    i = 0
    for _ in range(warmup):
        step(*data[i % len(data)])
        i += 1
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        time.sleep(PAUSE_S)  # let the other worker's idle BLAS/OpenMP threads stop spinning
        times = []
        for k in range(int(cmd[1]) + 1):
            parts = step(*data[i % len(data)])
            i += 1
            if k > 0:  # the first step after the pause refills the caches: not counted
                times.append(parts)
        print(json.dumps(times), flush=True)


class Worker:
    def __init__(self, backend, config, threads, warmup, torch_malloc, muon_ns_dtype):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--config", config,
               "--threads", str(threads), "--warmup", str(warmup), "--torch_malloc", torch_malloc,
               "--muon_ns_dtype", muon_ns_dtype]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, word):
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            raise RuntimeError(f"worker said {line!r}, expected {word!r}")

    def run(self, k: int) -> list:
        self.proc.stdin.write(f"run {k}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def bench_config(name: str, backends: list, threads: int, rounds: int, block: int, warmup: int,
                 torch_malloc: str, muon_ns_dtype: str = "auto") -> dict:
    # one worker at a time while warming up, so that none warms up under another's load
    workers = {b: Worker(b, name, threads, warmup, torch_malloc, muon_ns_dtype) for b in backends}
    times = {b: [] for b in workers}
    try:
        for r in range(rounds):
            k = r % len(backends)
            order = backends[k:] + backends[:k]
            for b in order:
                times[b] += workers[b].run(block)
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for b, ts in times.items():
        total = [sum(p) for p in ts]
        q1, q3 = common.quartiles(total)
        out[b] = {"step_ms": 1e3 * common.median(total), "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                  "forward_ms": 1e3 * common.median([p[0] for p in ts]),
                  "backward_ms": 1e3 * common.median([p[1] for p in ts]),
                  "optimizer_ms": 1e3 * common.median([p[2] for p in ts]),
                  "steps": len(ts)}
    out["ratio"] = out["fast"]["step_ms"] / out["torch"]["step_ms"]  # the target's ratio
    out["ratios to torch"] = {b: out[b]["step_ms"] / out["torch"]["step_ms"] for b in backends if b != "torch"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS, help="threads for BLAS, OpenMP and torch "
                   "(default: all cores)")
    p.add_argument("--config", choices=("cpu", "large", "both", "modern-cpu"), default="both",
                   help="both: cpu and large; modern-cpu: the modern block with Muon + AdamW (no target)")
    p.add_argument("--reference", action="store_true", help="also time npgpt's plain reference layers")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    p.add_argument("--block", type=int, default=5, help="timed steps per backend per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--torch_malloc", choices=("same", "default"), default="same",
                   help="same: torch's worker keeps freed memory mapped (glibc mallopt, as npgpt.fast does "
                        "for itself); default: glibc's defaults")
    p.add_argument("--muon_ns_dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="torch's Muon iteration (modern-cpu), as train_torch.py's flag (default auto)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", choices=common.BACKENDS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.config, args.warmup, args.torch_malloc, args.muon_ns_dtype)
        return 0
    backends = ["fast", "reference", "torch"] if args.reference else ["fast", "torch"]
    info = common.machine_info(args.threads, HOW)
    info["torch malloc"] = args.torch_malloc
    if args.config == "modern-cpu":
        from torchgpt.muon import resolve_ns_dtype
        info["muon ns dtype"] = f"{args.muon_ns_dtype} ({resolve_ns_dtype(args.muon_ns_dtype, 'cpu')})"
        info["ONEDNN_MAX_CPU_ISA"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "unset")
    common.print_info(f"step_time: {' vs '.join(backends)} training step (fwd + bwd + clip + AdamW), float32", info)
    results = {"machine": info, "command": " ".join(sys.argv), "backends": backends}
    for name in (["cpu", "large"] if args.config == "both" else [args.config]):
        cfg = common.configs()[name]
        res = bench_config(name, backends, args.threads, args.rounds, args.block, args.warmup, args.torch_malloc,
                           args.muon_ns_dtype)
        results[name] = res
        print(f"\n-- config {name}: {common.describe(cfg)}")
        print(f"   {'backend':9s} {'step ms':>9s} {'(q1 - q3)':>17s} {'fwd':>7s} {'bwd':>7s} {'optim':>7s} "
              f"{'/ torch':>8s}")
        for k in backends:
            r = res[k]
            q = f"({r['q1_ms']:.1f} - {r['q3_ms']:.1f})"
            ratio = res["ratios to torch"].get(k, 1.0)
            print(f"   {k:9s} {r['step_ms']:9.1f} {q:>17s} {r['forward_ms']:7.1f} {r['backward_ms']:7.1f} "
                  f"{r['optimizer_ms']:7.1f} {ratio:8.2f}")
        target = TARGETS.get(name)
        verdict = f"target <= {target}: {common.verdict(res['ratio'], target)}" if target else "no target"
        print(f"   ratio fast / torch = {res['ratio']:.2f}   ({verdict})", flush=True)
    return common.finish(results, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
