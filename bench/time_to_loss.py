"""Time to reach a validation loss with the `cpu` recipe: train_np.py against train_torch.py.

    python bench/time_to_loss.py                        # targets 1.89 (the issue's), 1.95, 2.0
    nohup python bench/time_to_loss.py --json /tmp/ttl.json > /tmp/ttl.log 2>&1 &    # ~10 minutes
    python bench/time_to_loss.py --threads 1 --repeats 1 --targets 2.2

Both training scripts run unchanged as subprocesses, never at the same time, with the recipe's
settings plus --eval_interval 100 --log_interval 1 (every step logs its own time; the validation
loss is known every 100 steps) and --eval_iters (default 100 instead of the recipe's 20: 20 batches
give a val estimate that wanders by +-0.03, more than the gaps being measured; evaluation time is
not counted). With --repeats 2 the order is npgpt, torch, torch, npgpt, so a drift in the machine's
load over the runs hits both alike. A run stops at the first evaluation below the lowest target.
The runs are deterministic (fixed seeds), so repeats differ only in time; the fastest run of each
backend is compared (interference from other processes only ever adds time). For each target:
    steps      the first evaluated step with val <= target (a multiple of 100);
    train s    the sum of the logged step times before it (evaluations excluded): the figure compared;
    wall s     from launching the script to that evaluation's log line (imports, data, evaluations).
Both backends start from different random weights (numpy's and torch's generators) and draw
different batches, so they may need a different number of steps; the time is what counts.
"""
from __future__ import annotations

import _common  # noqa: E402

THREADS = _common.threads_from_argv()
HOW = _common.limit_threads(THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

SCRIPTS = {"npgpt": "train_np.py", "torch": "train_torch.py"}
EVAL_RE = re.compile(r"^step (\d+): train loss ([\d.naif]+), val loss ([\d.naif]+)")
ITER_RE = re.compile(r"^iter (\d+): loss [^,]+, lr [^,]+, time ([\d.]+)ms")
DEFAULT_DATA = os.path.join(_common.ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")


def run_script(cmd: list, stop_below: float, label: str, verbose: bool = False) -> dict:
    """Run a training script, echo its evaluations, stop it at the first val <= stop_below.

    Returns the iter lines as (iteration, ms per step, steps the line covers, tok/s, mfu) and the
    evaluations as (step, val, seconds since launch). An iter line gives the mean time of the steps
    since the previous line (or since the last evaluation, which resets the clock).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=_common.ROOT)
    iters, evals = [], []
    try:
        for line in proc.stdout:
            line = line.rstrip()
            m = ITER_RE.match(line)
            if m:
                it = int(m.group(1))
                covered = 1 if not iters or (evals and evals[-1][0] == it) else it - iters[-1][0]
                tok = re.search(r"tok/s ([\d,]+)", line)
                mfu = re.search(r"mfu ([\d.]+)%", line)
                iters.append((it, float(m.group(2)), covered,
                              float(tok.group(1).replace(",", "")) if tok else None,
                              float(mfu.group(1)) if mfu else None))
                if not verbose:
                    continue
            if line:
                print(f"  [{label}] {line}", flush=True)
            m = EVAL_RE.match(line)
            if m:
                evals.append((int(m.group(1)), float(m.group(3)), time.perf_counter() - t0))
                if evals[-1][1] <= stop_below:
                    break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
    return {"iters": iters, "evals": evals, "returncode": proc.returncode}


def reach(run: dict, target: float) -> dict:
    """When `run` first evaluated val <= target: steps, val, train_s, wall_s (or reached False)."""
    for it, val, wall in run["evals"]:
        if val <= target:
            return {"reached": True, "steps": it, "val": val, "wall_s": wall,
                    "train_s": sum(ms * n for i, ms, n, _, _ in run["iters"] if i < it) / 1e3}
    best = min(run["evals"], key=lambda e: e[1]) if run["evals"] else (None, None, None)
    return {"reached": False, "best_val": best[1], "best_step": best[0],
            "train_s_total": sum(ms * n for _, ms, n, _, _ in run["iters"]) / 1e3}


def summary(run: dict) -> dict:
    """Median step time, and the median tok/s and MFU after the first tenth of the run."""
    ms = [x[1] for x in run["iters"]]
    later = run["iters"][len(run["iters"]) // 10:]
    toks = [x[3] for x in later if x[3] is not None]
    mfus = [x[4] for x in later if x[4] is not None]
    return {"median_step_ms": _common.median(ms) if ms else None,
            "median_tokens_per_s": _common.median(toks) if toks else None,
            "median_mfu_percent": _common.median(mfus) if mfus else None,
            "steps_run": len(ms)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--targets", default="1.89,1.95,2.0", help="validation losses to reach")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--eval_interval", type=int, default=100)
    p.add_argument("--eval_iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2, help="runs per backend, in the order A B B A ...")
    p.add_argument("--data", default=DEFAULT_DATA if os.path.exists(DEFAULT_DATA) else None)
    p.add_argument("--verbose", action="store_true", help="echo every log line, not just evaluations")
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more flags for both scripts, after --")
    args = p.parse_args(argv)
    targets = sorted(float(t) for t in args.targets.split(","))
    info = _common.machine_info(args.threads, HOW)
    _common.print_info(f"time_to_loss: train_np.py vs train_torch.py, preset {args.preset}, val <= {targets}", info)
    order = []
    for r in range(args.repeats):
        order += ["npgpt", "torch"] if r % 2 == 0 else ["torch", "npgpt"]
    runs = {"npgpt": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="npgpt-ttl-") as tmp:
        for i, backend in enumerate(order):
            cmd = [sys.executable, os.path.join(_common.ROOT, SCRIPTS[backend]), "--preset", args.preset,
                   "--eval_interval", str(args.eval_interval), "--eval_iters", str(args.eval_iters),
                   "--log_interval", "1", "--out_dir", os.path.join(tmp, f"{backend}{i}"),
                   "--max_new_tokens", "0", "--progress", "false"]
            if args.data:
                cmd += ["--data", args.data]
            if backend == "torch":
                cmd += ["--device", "cpu"]
            runs[backend].append(run_script(cmd + args.extra, targets[0], backend, args.verbose))

    results = {"machine": info, "command": " ".join(sys.argv), "targets": targets,
               "runs": {b: [{"evals": r["evals"], **summary(r)} for r in rs] for b, rs in runs.items()}}
    print(f"\n-- preset {args.preset}, eval_iters {args.eval_iters}, {args.threads} thread(s), "
          f"{args.repeats} run(s) each")
    for b, rs in runs.items():
        s = [summary(r) for r in rs]
        print(f"   {b:6s} median step ms per run: {', '.join(format(x['median_step_ms'], '.1f') for x in s)}")
    for target in targets:
        print(f"\n   val <= {target}:")
        res = {}
        for b, rs in runs.items():
            hits = [reach(r, target) for r in rs]
            res[b] = hits
            for k, h in enumerate(hits):
                if h["reached"]:
                    print(f"   {b:6s} run {k}: step {h['steps']:5d}  val {h['val']:.4f}  train {h['train_s']:7.1f} s"
                          f"  wall {h['wall_s']:7.1f} s")
                else:
                    print(f"   {b:6s} run {k}: not reached; best val {h['best_val']:.4f} at step {h['best_step']}, "
                          f"{h['train_s_total']:.1f} s of training")
        if all(h["reached"] for hs in res.values() for h in hs):
            best = {b: min(h["train_s"] for h in hs) for b, hs in res.items()}
            res["ratio"] = best["npgpt"] / best["torch"]
            note = "  (the issue's target: <= 1.0)" if target == 1.89 else ""
            print(f"   ratio npgpt / torch, fastest run of each: {res['ratio']:.2f}{note}")
        else:
            print("   not reached by every run: no ratio")
        results[str(target)] = res
    results["load average (1 min) at end"] = os.getloadavg()[0]
    print(f"\nload average (1 min) at end: {results['load average (1 min) at end']:.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
