"""Training step time on the CPU: npgpt (NumPy) against torchgpt (PyTorch eager), side by side.

    python bench/step_time.py                  # all cores, configs cpu and large
    python bench/step_time.py --threads 1      # one thread each
    python bench/step_time.py --config cpu --rounds 30

One step is what both training scripts do per iteration: forward, backward, clip_grad_norm(1.0)
and an AdamW update (nanoGPT's groups and settings), in float32, on the same random batches.

Each backend runs in its own worker process (same thread count), so that neither inherits the
other's allocator state or busy-waiting threads. After a warm-up the measurements are interleaved:
`rounds` times, `block` steps of one worker and then `block` of the other (which goes first
alternates), so that drift in the machine's load hits both alike. Before each block a worker
sleeps 0.3 s (idle OpenBLAS and OpenMP threads busy-wait for a while after their last call, which
would steal a core from the other worker) and its first step is not counted. Reported: the median step time
with its quartiles, the median forward / backward / optimizer parts, and the ratio npgpt / torch.

Allocator: train_np.py (and the npgpt worker here) sets glibc's malloc to keep freed memory (npgpt.model.keep_freed_memory);
the torch worker gets the same setting (--torch_malloc default leaves glibc's defaults for torch).
"""
from __future__ import annotations

import _common  # noqa: E402  (sets sys.path; imports neither numpy nor torch)

THREADS = _common.threads_from_argv()
HOW = _common.limit_threads(THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

VOCAB = 65  # Tiny Shakespeare's characters
TARGETS = {"cpu": 1.0, "large": 1.2}  # issue 5: npgpt / torch step time at most this
N_BATCHES = 8
PAUSE_S = 0.3  # before each block: OpenBLAS threads spin up to ~0.1 s after their last call


def batches(cfg, n: int = N_BATCHES):
    rng = np.random.default_rng(0)
    return [tuple(rng.integers(0, VOCAB, (2, cfg.batch_size, cfg.block_size))) for _ in range(n)]


def make_backends(cfg, seed: int = 0, only: str | None = None):
    """(npgpt step, torch step): each runs one training step on (x, y) and returns its part times.

    only="npgpt" or "torch" builds just that one (the other is None).
    """
    gcfg = cfg.gpt_config(VOCAB)
    betas = (cfg.beta1, cfg.beta2)
    np_step = torch_step = None
    if only != "torch":
        np_step = _npgpt_step(cfg, gcfg, betas, seed)
    if only != "npgpt":
        torch_step = _torch_step(cfg, gcfg, betas, seed)
    return np_step, torch_step


def _npgpt_step(cfg, gcfg, betas, seed):
    import npgpt
    from npgpt.optim import AdamW, clip_grad_norm
    np_model = npgpt.GPT(gcfg, seed=seed, dtype=np.float32)
    np_opt = AdamW(np_model.params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay)

    def np_step(x, y):
        t0 = time.perf_counter()
        np_model.forward(x, y)
        t1 = time.perf_counter()
        grads = np_model.backward()
        t2 = time.perf_counter()
        clip_grad_norm(grads, cfg.grad_clip)
        np_opt.step(grads, lr=cfg.learning_rate)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    np_step.model = np_model  # for bench/memory.py
    np_step.as_input = lambda a: a
    return np_step


def _torch_step(cfg, gcfg, betas, seed):
    import torch
    import torchgpt
    torch.manual_seed(seed)
    t_model = torchgpt.GPT(gcfg)  # attention="sdpa", float32
    t_model.train()
    t_opt = t_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, "cpu")
    params = list(t_model.parameters())

    def torch_step(x, y):
        t0 = time.perf_counter()
        _, loss = t_model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        t_opt.step()
        t_opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    torch_step.as_input = torch.from_numpy
    return torch_step


# --------------------------------------------------------------------------------------------
# Worker: one backend in its own process, driven over stdin/stdout
# --------------------------------------------------------------------------------------------

def worker(backend: str, config: str, warmup: int, torch_malloc: str) -> None:
    """Reads "run K" lines, answers each with a JSON list of K (fwd, bwd, optim) times."""
    if backend == "torch":
        _common.torch_threads(THREADS)
    if backend == "npgpt" or torch_malloc == "same":
        from npgpt.model import keep_freed_memory
        keep_freed_memory()
    cfg = _common.configs()[config]
    step = make_backends(cfg, only=backend)[0 if backend == "npgpt" else 1]
    data = [(step.as_input(x), step.as_input(y)) for x, y in batches(cfg)]
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
    def __init__(self, backend, config, threads, warmup, torch_malloc):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--config", config,
               "--threads", str(threads), "--warmup", str(warmup), "--torch_malloc", torch_malloc]
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


def bench_config(name: str, threads: int, rounds: int, block: int, warmup: int, torch_malloc: str) -> dict:
    # one worker at a time while warming up, so that neither warms up under the other's load
    workers = {b: Worker(b, name, threads, warmup, torch_malloc) for b in ("npgpt", "torch")}
    times = {b: [] for b in workers}
    try:
        for r in range(rounds):
            order = list(workers) if r % 2 == 0 else list(workers)[::-1]
            for b in order:
                times[b] += workers[b].run(block)
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for b, ts in times.items():
        total = [sum(p) for p in ts]
        q1, q3 = _common.quartiles(total)
        out[b] = {"step_ms": 1e3 * _common.median(total), "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                  "forward_ms": 1e3 * _common.median([p[0] for p in ts]),
                  "backward_ms": 1e3 * _common.median([p[1] for p in ts]),
                  "optimizer_ms": 1e3 * _common.median([p[2] for p in ts]),
                  "steps": len(ts)}
    out["ratio"] = out["npgpt"]["step_ms"] / out["torch"]["step_ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS, help="threads for BLAS, OpenMP and torch "
                   "(default: all cores)")
    p.add_argument("--config", choices=("cpu", "large", "both"), default="both")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    p.add_argument("--block", type=int, default=5, help="timed steps per backend per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--torch_malloc", choices=("same", "default"), default="same",
                   help="same: torch's worker gets npgpt's malloc setting too; default: glibc's defaults")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", choices=("npgpt", "torch"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.config, args.warmup, args.torch_malloc)
        return 0
    info = _common.machine_info(args.threads, HOW)
    info["torch malloc"] = args.torch_malloc
    _common.print_info("step_time: npgpt vs torchgpt training step (fwd + bwd + clip + AdamW), float32", info)
    results = {"machine": info, "command": " ".join(sys.argv)}
    for name in (["cpu", "large"] if args.config == "both" else [args.config]):
        cfg = _common.configs()[name]
        res = bench_config(name, args.threads, args.rounds, args.block, args.warmup, args.torch_malloc)
        results[name] = res
        print(f"\n-- config {name}: {_common.describe(cfg)}")
        print(f"   {'backend':8s} {'step ms':>9s} {'(q1 - q3)':>17s} {'fwd':>7s} {'bwd':>7s} {'optim':>7s}")
        for k in ("npgpt", "torch"):
            r = res[k]
            q = f"({r['q1_ms']:.1f} - {r['q3_ms']:.1f})"
            print(f"   {k:8s} {r['step_ms']:9.1f} {q:>17s} {r['forward_ms']:7.1f} {r['backward_ms']:7.1f} "
                  f"{r['optimizer_ms']:7.1f}")
        target = TARGETS[name]
        verdict = "met" if res["ratio"] <= target else "NOT met"
        print(f"   ratio npgpt / torch = {res['ratio']:.2f}   (target <= {target}: {verdict})", flush=True)
    results["load average (1 min) at end"] = os.getloadavg()[0]
    print(f"\nload average (1 min) at end: {results['load average (1 min) at end']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
