"""On a CUDA GPU: train_torch.py --preset shakespeare-char end to end, and what each fast path buys.

    python bench/gpu.py                       # needs a CUDA GPU; exits 0 with a message otherwise
    python bench/gpu.py --target 1.47 --json out/gpu.json
    python bench/gpu.py --variants default,no_compile

Runs train_torch.py (nanoGPT's baby GPT: 6 layers, 6 heads, 384 channels, block 256, batch 64,
dropout 0.2, 5000 iterations, evaluation every 250 steps on 200 batches) once per variant, one
after the other, and stops each at the first evaluation with val <= target (default 1.47):
    default       bf16 autocast, torch.compile, SDPA (flash) attention, fused AdamW
    no_compile    --compile false
    no_sdpa       --attention explicit (the masked softmax written out, as npgpt computes it)
    no_bf16       --dtype float32 (TF32 matmuls stay on)
Reported per variant: steps and wall time to val <= target (from launch: includes start-up and
compilation), training time (logged step times, evaluations excluded), the median tokens/s and
MFU of the iter lines after the first tenth (MFU as train_torch.py estimates it, against the
GPU's peak bf16 dense FLOP/s).
"""
from __future__ import annotations

import _common  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

VARIANTS = {
    "default": [],
    "no_compile": ["--compile", "false"],
    "no_sdpa": ["--attention", "explicit"],
    "no_bf16": ["--dtype", "float32"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=1.47)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure. "
              "Run it on a machine with an NVIDIA GPU.")
        return 0
    from time_to_loss import DEFAULT_DATA, reach, run_script, summary
    data = args.data or (DEFAULT_DATA if os.path.exists(DEFAULT_DATA) else None)
    info = _common.machine_info(os.cpu_count(), "default", with_torch=True)
    info["gpu"] = torch.cuda.get_device_name(0)
    info["cuda"] = torch.version.cuda
    _common.print_info(f"gpu: train_torch.py --preset shakespeare-char to val <= {args.target}", info)
    results = {"machine": info, "command": " ".join(sys.argv), "target": args.target}
    with tempfile.TemporaryDirectory(prefix="npgpt-gpu-") as tmp:
        for name in args.variants.split(","):
            cmd = [sys.executable, os.path.join(_common.ROOT, "train_torch.py"), "--preset", "shakespeare-char",
                   "--device", "cuda", "--out_dir", os.path.join(tmp, name), "--max_new_tokens", "0",
                   "--progress", "false"] + VARIANTS[name]
            if data:
                cmd += ["--data", data]
            run = run_script(cmd, args.target, name, args.verbose)
            results[name] = {**reach(run, args.target), **summary(run), "evals": run["evals"]}
    print(f"\n-- shakespeare-char to val <= {args.target}")
    print(f"   {'variant':11s} {'reached':>8s} {'steps':>6s} {'val':>7s} {'wall s':>8s} {'train s':>8s} "
          f"{'tok/s':>10s} {'MFU %':>6s}")
    for name in args.variants.split(","):
        r = results[name]
        tok = f"{r['median_tokens_per_s']:,.0f}" if r.get("median_tokens_per_s") else "-"
        mfu = f"{r['median_mfu_percent']:.1f}" if r.get("median_mfu_percent") else "-"
        if r["reached"]:
            print(f"   {name:11s} {'yes':>8s} {r['steps']:6d} {r['val']:7.4f} {r['wall_s']:8.1f} {r['train_s']:8.1f} "
                  f"{tok:>10s} {mfu:>6s}")
        else:
            print(f"   {name:11s} {'no':>8s} best val {r['best_val']} at step {r['best_step']}, "
                  f"{r['train_s_total']:.1f} s of training; {tok} tok/s, MFU {mfu} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
