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
Step time, tok/s and MFU: medians of the iter lines after the first 5 (common.summary).
Both backends start from different random weights (numpy's and torch's generators) and draw
different batches, so they may need a different number of steps; the time is what counts.
"""
from __future__ import annotations

import common  # noqa: E402

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

SCRIPTS = {"npgpt": "train_np.py", "torch": "train_torch.py"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--targets", default="1.89,1.95,2.0", help="validation losses to reach")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--eval_interval", type=int, default=100)
    p.add_argument("--eval_iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2, help="runs per backend, in the order A B B A ...")
    p.add_argument("--data", default=common.DEFAULT_DATA if os.path.exists(common.DEFAULT_DATA) else None)
    p.add_argument("--verbose", action="store_true", help="echo every log line, not just evaluations")
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more flags for both scripts, after --")
    args = p.parse_args(argv)
    targets = sorted(float(t) for t in args.targets.split(","))
    info = common.machine_info(args.threads, HOW)
    common.print_info(f"time_to_loss: train_np.py vs train_torch.py, preset {args.preset}, val <= {targets}", info)
    order = []
    for r in range(args.repeats):
        order += ["npgpt", "torch"] if r % 2 == 0 else ["torch", "npgpt"]
    runs = {"npgpt": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="npgpt-ttl-") as tmp:
        for i, backend in enumerate(order):
            cmd = [sys.executable, os.path.join(common.ROOT, SCRIPTS[backend]), "--preset", args.preset,
                   "--eval_interval", str(args.eval_interval), "--eval_iters", str(args.eval_iters),
                   "--log_interval", "1", "--out_dir", os.path.join(tmp, f"{backend}{i}"),
                   "--max_new_tokens", "0", "--progress", "false"]
            if args.data:
                cmd += ["--data", args.data]
            if backend == "torch":
                cmd += ["--device", "cpu"]
            runs[backend].append(common.run_script(cmd + args.extra, targets[0], backend, args.verbose))

    results = {"machine": info, "command": " ".join(sys.argv), "targets": targets,
               "runs": {b: [{"evals": r["evals"], **common.summary(r)} for r in rs] for b, rs in runs.items()}}
    print(f"\n-- preset {args.preset}, eval_iters {args.eval_iters}, {args.threads} thread(s), "
          f"{args.repeats} run(s) each")
    for b, rs in runs.items():
        s = [common.summary(r) for r in rs]
        print(f"   {b:6s} median step ms per run: {', '.join(format(x['median_step_ms'], '.1f') for x in s)}")
    for target in targets:
        print(f"\n   val <= {target}:")
        res = {}
        for b, rs in runs.items():
            hits = [common.reach(r, target) for r in rs]
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
    crashed = [(b, k, r["returncode"]) for b, rs in runs.items() for k, r in enumerate(rs) if r["crashed"]]
    results["crashed"] = crashed
    for b, k, rc in crashed:
        print(f"   {b} run {k} CRASHED with exit code {rc}")
    common.finish(results, args.json)
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
