"""On a CUDA GPU: train_torch.py --preset shakespeare-char end to end, and what each fast path buys.

    python bench/gpu.py                            # needs a CUDA GPU: exits 2 without one
    python bench/gpu.py --targets 1.50,1.47 --json out/gpu.json
    python bench/gpu.py --variants default,no_compile --ablation_iters 300
    python bench/gpu.py --allow-no-gpu             # exit 0 (with a message) where there is no GPU

Runs train_torch.py (nanoGPT's baby GPT: 6 layers, 6 heads, 384 channels, block 256, batch 64,
dropout 0.2, 5000 iterations, evaluation every 250 steps on 200 batches) once per variant, one
after the other:
    default       bf16 autocast, torch.compile, SDPA (flash) attention, fused AdamW
    no_compile    --compile false
    no_sdpa       --attention explicit (the masked softmax written out, as npgpt computes it)
    no_bf16       --dtype float32 (TF32 matmuls stay on)
Targets: val <= 1.50 (the target) and 1.47 (the stretch: nanoGPT's best for this recipe is 1.4697,
so a run may never get there); a run stops at the first evaluation at or below the lowest target.
With --ablation_iters N the variants other than default run exactly N steps (evaluation only at 0
and N, on 20 batches) and report step time, tokens/s and MFU, not the targets: shorter, to fit a
time budget. Every variant starts with an empty inductor/triton cache of its own
(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), so its wall time includes its whole compilation and
does not depend on which variant ran first.

Reported per variant: steps and wall time to each target (from launch: includes start-up and
compilation), training time (logged step times before that evaluation, evaluations excluded), the
median step time, tokens/s and MFU of the iter lines after the first 5 (compilation and warm-up;
MFU as train_torch.py estimates it, against the GPU's peak bf16 dense FLOP/s). A variant that
crashes (non-zero exit we did not cause) fails the script, with its exit code; so does the
default variant not reaching the first target. Exit codes: 0 all good, 1 a failure above, 2 no GPU.
"""
from __future__ import annotations

import common  # noqa: E402

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

VARIANTS = {
    "default": [],
    "no_compile": ["--compile", "false"],
    "no_sdpa": ["--attention", "explicit"],
    "no_bf16": ["--dtype", "float32"],
}
DEFAULT_TARGETS = (1.50, 1.47)  # the target, then the stretch target (nanoGPT's best: 1.4697)
ABLATION_EVAL_ITERS = 20
NO_GPU_EXIT = 2


# --------------------------------------------------------------------------------------------
# Parsing and verdicts (pure: tested on canned train_torch.py output, no GPU)
# --------------------------------------------------------------------------------------------

def parse_targets(text: str) -> list:
    """'1.50,1.47' -> [1.5, 1.47]: validation losses, highest (the target) first."""
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--targets {text!r}: expected comma-separated numbers, e.g. 1.50,1.47")
    if not targets or any(not 0 < t < 100 for t in targets):
        raise argparse.ArgumentTypeError(f"--targets {text!r}: expected positive validation losses, e.g. 1.50,1.47")
    return sorted(set(targets), reverse=True)


def parse_variants(text: str) -> list:
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--variants {text!r}: unknown {unknown}; choose from {','.join(VARIANTS)}")
    return names


def variant_result(run: dict, targets: list, fixed_steps: bool) -> dict:
    """The figures of one variant's run (see common.run_script): per target reached or not, or for a
    fixed-step run only the speed; the return code and how the run ended."""
    res = {"returncode": run["returncode"], "ended": run["ended"], "crashed": run["crashed"],
           "wall_s": run["wall_s"], "fixed_steps": fixed_steps, **common.summary(run), "evals": run["evals"]}
    if run.get("tail"):
        res["last_lines"] = run["tail"]
    if not fixed_steps:
        res["targets"] = {f"{t:.2f}": common.reach(run, t) for t in targets}
    return res


def verdict(results: dict, targets: list) -> list:
    """What fails the run, one line each (empty: all good): a crashed variant (with its exit code),
    a variant without a single timed step, the default variant short of the first target."""
    problems = []
    for name, r in results.items():
        if r["crashed"]:
            problems.append(f"variant {name} crashed with exit code {r['returncode']}")
        elif not r["iter_lines"]:
            problems.append(f"variant {name} logged no training step ({r['ended']}, exit code {r['returncode']})")
    d = results.get("default")
    if d is not None and not d["crashed"] and not d["fixed_steps"]:
        first = d["targets"][f"{targets[0]:.2f}"]
        if not first["reached"]:
            problems.append(f"variant default did not reach val <= {targets[0]:.2f} (best {first['best_val']} at "
                            f"step {first['best_step']}, {d['ended']})")
    return problems


def table(results: dict, targets: list) -> list:
    """The summary lines: one per variant and target, then the speed columns."""
    lines = [f"{'variant':11s} {'target':>6s} {'reached':>8s} {'steps':>6s} {'val':>7s} {'wall s':>8s} "
             f"{'train s':>8s}"]
    for name, r in results.items():
        if r["fixed_steps"]:
            lines.append(f"{name:11s} {'-':>6s} {'fixed':>8s} (speed only: {r['iter_lines']} iter lines, "
                         f"wall {r['wall_s']:.1f} s incl. start-up and compile)")
            continue
        for t, h in r["targets"].items():
            if h["reached"]:
                lines.append(f"{name:11s} {t:>6s} {'yes':>8s} {h['steps']:6d} {h['val']:7.4f} {h['wall_s']:8.1f} "
                             f"{h['train_s']:8.1f}")
            else:
                best = "-" if h["best_val"] is None else f"{h['best_val']:.4f} at step {h['best_step']}"
                lines.append(f"{name:11s} {t:>6s} {'no':>8s} best {best}, {h['train_s_total']:.1f} s of training")
    lines.append("")
    lines.append(f"{'variant':11s} {'step ms':>8s} {'tok/s':>11s} {'MFU %':>6s} {'exit':>5s}  ended")
    for name, r in results.items():
        ms = f"{r['median_step_ms']:.1f}" if r.get("median_step_ms") else "-"
        tok = f"{r['median_tokens_per_s']:,.0f}" if r.get("median_tokens_per_s") else "-"
        mfu = f"{r['median_mfu_percent']:.1f}" if r.get("median_mfu_percent") else "-"
        lines.append(f"{name:11s} {ms:>8s} {tok:>11s} {mfu:>6s} {r['returncode']:>5d}  "
                     f"{'CRASHED' if r['crashed'] else r['ended']}")
    return lines


# --------------------------------------------------------------------------------------------
# Running the variants
# --------------------------------------------------------------------------------------------

def variant_command(name: str, out_dir: str, data: str | None, ablation_iters: int) -> list:
    cmd = [sys.executable, os.path.join(common.ROOT, "train_torch.py"), "--preset", "shakespeare-char",
           "--device", "cuda", "--out_dir", out_dir, "--max_new_tokens", "0", "--progress", "false"]
    cmd += VARIANTS[name]
    if name != "default" and ablation_iters:
        n = str(ablation_iters)
        cmd += ["--max_iters", n, "--eval_interval", n, "--eval_iters", str(ABLATION_EVAL_ITERS)]
    if data:
        cmd += ["--data", data]
    return cmd


def fresh_cache_env(root: str) -> dict:
    """The environment of a variant: its own, empty compile caches under root."""
    os.makedirs(os.path.join(root, "triton"), exist_ok=True)
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=root, TRITON_CACHE_DIR=os.path.join(root, "triton"))


def cuda_or_reason():
    """(torch, None) when CUDA works, else (None or torch, why not)."""
    try:
        import torch
    except ImportError as err:
        return None, f"torch cannot be imported ({err})"
    if torch.version.cuda is None:
        return torch, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return torch, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return torch, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=parse_targets, default=list(DEFAULT_TARGETS),
                   help="validation losses, comma-separated (default 1.50,1.47: target, stretch)")
    p.add_argument("--variants", type=parse_variants, default=list(VARIANTS))
    p.add_argument("--ablation_iters", type=int, default=0,
                   help="run the variants other than default for exactly this many steps (0: to the targets)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="wall-clock budget of the whole script; the default variant gets what the others leave")
    p.add_argument("--ablation_reserve_s", type=float, default=50.0,
                   help="with --budget_s: seconds kept for each fixed-step variant")
    p.add_argument("--data", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--log_dir", default=None, help="keep each variant's full output here")
    p.add_argument("--allow-no-gpu", dest="allow_no_gpu", action="store_true",
                   help="without a CUDA GPU say so and exit 0 instead of 2")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.ablation_iters < 0:
        p.error("--ablation_iters must be >= 0")

    t_start = time.perf_counter()
    torch, why = cuda_or_reason()
    if why:
        print(f"gpu.py: no usable CUDA GPU: {why}. Run it on a machine with an NVIDIA GPU and a CUDA build of "
              f"torch{'' if args.allow_no_gpu else ' (or pass --allow-no-gpu to accept this)'}.", file=sys.stderr)
        return 0 if args.allow_no_gpu else NO_GPU_EXIT
    data = args.data or (common.DEFAULT_DATA if os.path.exists(common.DEFAULT_DATA) else None)
    info = common.machine_info(os.cpu_count(), "default", with_torch=True)
    info.update({"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda})
    targets = args.targets
    common.print_info(f"gpu: train_torch.py --preset shakespeare-char to val <= {', '.join(map(str, targets))}", info)
    results = {}
    with tempfile.TemporaryDirectory(prefix="npgpt-gpu-") as tmp:
        for i, name in enumerate(args.variants):
            fixed = name != "default" and args.ablation_iters > 0
            max_wall = None
            if args.budget_s is not None:
                left = args.budget_s - (time.perf_counter() - t_start)
                later_fixed = sum(1 for v in args.variants[i + 1:] if v != "default" and args.ablation_iters > 0)
                max_wall = max(left - later_fixed * args.ablation_reserve_s, 1.0)
            log_path = os.path.join(args.log_dir, f"gpu-{name}.log") if args.log_dir else None
            if log_path:
                os.makedirs(args.log_dir, exist_ok=True)
            run = common.run_script(variant_command(name, os.path.join(tmp, name, "out"), data, args.ablation_iters),
                                    float("-inf") if fixed else targets[-1], name, args.verbose,
                                    env=fresh_cache_env(os.path.join(tmp, name, "cache")), max_wall_s=max_wall,
                                    log_path=log_path)
            results[name] = variant_result(run, targets, fixed)
            if run["crashed"]:
                print(f"  [{name}] CRASHED with exit code {run['returncode']}; its last lines:\n    "
                      + "\n    ".join(run["tail"]), flush=True)
    problems = verdict(results, targets)
    print(f"\n-- shakespeare-char, targets val <= {', '.join(f'{t:.2f}' for t in targets)}"
          + (f", ablations {args.ablation_iters} steps each" if args.ablation_iters else ""))
    lines = table(results, targets)
    for line in lines:
        print(f"   {line}")
    for line in problems:
        print(f"FAILED: {line}")
    out = {"machine": info, "command": " ".join(sys.argv), "targets": targets,
           "ablation_iters": args.ablation_iters, "variants": results, "problems": problems,
           "table": lines, "wall_s": time.perf_counter() - t_start}
    common.finish(out, args.json)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
