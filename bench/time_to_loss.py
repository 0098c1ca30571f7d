"""Race the training scripts to a validation loss: train_np.py and train_torch.py, unchanged, as
subprocesses one after the other, in three configurations that differ only in their defaults:

    python bench/time_to_loss.py                   # cpu: numpy,torch x preset cpu, 2 repeats, to val 2.0, 1.95,
        # 1.89, --eval_interval 100 --eval_iters 100 (20 batches: a val that wanders by +-0.03) --log_interval 1
    python bench/time_to_loss.py --threads 1 --repeats 1 --targets 2.2
    python bench/time_to_loss.py modern            # torch,numpy x presets cpu,modern-cpu, --eval_interval 250
    python bench/time_to_loss.py modern --json out/modern.json --png docs/figures/modern_vs_cpu.png
    python bench/time_to_loss.py modern --backends torch --presets modern-cpu --extra "--muon_lr 0.04"
    python bench/time_to_loss.py modern --max_iters 20 --eval_interval 10 --extra "--n_layer 1"  # smoke run
    python bench/time_to_loss.py gpu               # torch on CUDA x shakespeare-char x VARIANTS, to 1.50, 1.47
    python bench/time_to_loss.py gpu --variants default,no_compile --ablation_iters 300 --allow-no-gpu

Runs: repeats x backends (reversed every second repeat) x presets x variants, each with the same data,
seed and threads (gpu: unset), no sample, its own --out_dir and compile caches, --extra last, stopped at
the first evaluation at or below the lowest target (with --ablation_iters N the variants other than
default run N steps). Reported per run and in --json: its val, wall and training time, speed, and each
target's first evaluation; numpy / torch of the fastest run of each; modern's verdicts (torch modern-cpu
at val 1.78, stretch 1.74, no later than torch cpu's whole run; numpy modern-cpu's final val within 0.01
of torch's). Exit 1 when a run crashed, logged no step or missed the first target outside a fixed-step
run; 2 for bad options and, with gpu, for no usable GPU (--allow-no-gpu: 0). Method: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import textwrap
import time

import common  # sets sys.path
from gptapp.cli import OneLineArgumentParser, UsageError, train_config_from_args, train_parser
from gptapp.settings import PRESETS

SCRIPTS = {"torch": os.path.join(common.ROOT, "train_torch.py"), "numpy": os.path.join(common.ROOT, "train_np.py")}
VARIANTS = {"default": [], "no_compile": ["--compile", "false"], "no_sdpa": ["--attention", "explicit"],
            "no_bf16": ["--dtype", "float32"]}
CONFIGS = {  # each configuration's defaults, on top of DEFAULTS
    "cpu": dict(backends=["numpy", "torch"], presets=["cpu"], targets=[2.0, 1.95, 1.89], repeats=2,
                eval_interval=100, eval_iters=100, log_interval=1),
    "modern": dict(backends=["torch", "numpy"], presets=["cpu", "modern-cpu"], eval_interval=250),
    "gpu": dict(presets=["shakespeare-char"], targets=[1.50, 1.47], variants=list(VARIANTS), device="cuda",
                threads=0),
}
DEFAULTS = dict(backends=["torch"], targets=[], repeats=1, variants=["default"], device="cpu",
                threads=os.cpu_count() or 1)
MODERN_TARGETS, BACKEND_GAP = (1.78, 1.74), 0.01  # the modern verdicts' val (target, stretch) and final-val gap
ABLATION_EVAL_ITERS, NO_GPU_EXIT = 20, 2


def names(text: str, allowed, what: str) -> list:
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--{what} {text!r}: unknown {unknown}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(chosen))


def parse_targets(text: str) -> list:
    """'1.50,1.47' -> [1.5, 1.47]: validation losses, highest (the first target) first."""
    try:
        targets = sorted({float(t) for t in text.split(",") if t.strip()}, reverse=True)
    except ValueError:
        targets = []
    if not targets or any(not 0 < t < 100 for t in targets):
        raise argparse.ArgumentTypeError(f"--targets {text!r}: expected comma-separated validation losses, e.g. "
                                         "1.50,1.47")
    return targets


def parse_args(argv=None):
    """The parser and the options, with the configuration's defaults where not given."""
    p = OneLineArgumentParser(prog="bench/time_to_loss.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("race", nargs="?", choices=CONFIGS, default="cpu", help="the configuration (default cpu)")
    p.add_argument("--backends", type=lambda t: names(t, SCRIPTS, "backends"), help="of torch,numpy")
    p.add_argument("--presets", type=lambda t: names(t, PRESETS, "presets"), help="of gptapp.settings' presets")
    p.add_argument("--variants", type=lambda t: names(t, VARIANTS, "variants"), help=f"of {','.join(VARIANTS)}")
    p.add_argument("--targets", type=parse_targets, help="validation losses to reach, comma-separated")
    counts = ("repeats", "max_iters", "eval_interval", "eval_iters", "log_interval", "threads")
    for flag in counts:
        p.add_argument(f"--{flag}", type=int, help="runs of each backend" if flag == "repeats" else
                       "threads of every run" if flag == "threads" else "for every run (default: the presets')")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", choices=("cpu", "cuda"), help="train_torch.py's --device")
    p.add_argument("--data", help="the training text (default: $NPGPT_DATA, else ../shared/data/tinyshakespeare/"
                   "input.txt)")
    p.add_argument("--extra", default="", help='more flags for every run, e.g. "--muon_lr 0.04"')
    p.add_argument("--ablation_iters", type=int, default=0,
                   help="run the variants other than default for exactly this many steps (0: to the targets)")
    p.add_argument("--budget_s", type=float, help="wall-clock budget; runs to the targets get what the others leave")
    p.add_argument("--ablation_reserve_s", type=float, default=50.0, help="with --budget_s: kept per fixed-step run")
    p.add_argument("--allow-no-gpu", dest="allow_no_gpu", action="store_true", help="no usable GPU: exit 0, not 2")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--png", metavar="PATH", help="the loss curves of all runs in one picture")
    p.add_argument("--log_dir", help="keep each run's full output here")
    p.add_argument("--verbose", action="store_true", help="echo every log line, not just evaluations")
    args = p.parse_args(argv)
    for flag in (f for f in counts if getattr(args, f) is not None and getattr(args, f) <= 0):
        p.error(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    for k, v in {**DEFAULTS, **CONFIGS[args.race]}.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    try:
        args.extra = shlex.split(args.extra)
    except ValueError as err:
        p.error(f"--extra {args.extra!r}: {err}")
    if args.ablation_iters < 0:
        p.error("--ablation_iters must be >= 0")
    args.data = os.path.abspath(args.data or os.environ.get("NPGPT_DATA") or common.DEFAULT_DATA)
    return p, args


# --- The runs: one command each, checked by the app's own parser before any run starts ---------------
def plan(args, tmp: str) -> list:
    """Every run in order: label, backend, preset, variant, fixed (a fixed number of steps), cmd, dir and
    the val it stops at (the lowest target)."""
    runs = []
    for r in range(args.repeats):
        for backend in args.backends if r % 2 == 0 else args.backends[::-1]:
            for preset, variant in [(p, v) for p in args.presets for v in args.variants]:
                label = " ".join([backend, preset] + [variant] * (variant != "default")
                                 + [f"run {r + 1}"] * (args.repeats > 1))
                fixed = variant != "default" and args.ablation_iters > 0
                run_dir = os.path.join(tmp, label.replace(" ", "-"))
                cmd = [sys.executable, SCRIPTS[backend], "--preset", preset, "--data", args.data, "--seed",
                       str(args.seed), "--max_new_tokens", "0", "--progress", "false", "--out_dir",
                       os.path.join(run_dir, "out")] + VARIANTS[variant]
                for flag in ("max_iters", "eval_interval", "eval_iters", "log_interval"):
                    cmd += [f"--{flag}", str(getattr(args, flag))] if getattr(args, flag) is not None else []
                n = str(args.ablation_iters)
                cmd += ["--max_iters", n, "--eval_interval", n, "--eval_iters", str(ABLATION_EVAL_ITERS)] * fixed
                cmd += args.extra + ["--device", args.device] * (backend == "torch")
                stop_below = float("-inf") if fixed or not args.targets else args.targets[-1]  # the lowest
                runs.append(dict(label=label, backend=backend, preset=preset, variant=variant, fixed=fixed, cmd=cmd,
                                 dir=run_dir, stop_below=stop_below))
    return runs


def check_flags(parser, args, runs: list) -> None:
    """Every run's flags through the training scripts' own parser and checks: a bad --extra fails here."""
    for run in runs:
        script = os.path.basename(run["cmd"][1])
        app = train_parser(f"{script} (from bench/time_to_loss.py --extra)", "",
                           torch_flags=run["backend"] == "torch", numpy_flags=run["backend"] == "numpy")
        try:
            train_config_from_args(app.parse_args(run["cmd"][2:]))
        except UsageError as err:
            parser.error(f"{script} --preset {run['preset']} {' '.join(args.extra)}: {err}")


def fresh_cache_env(root: str) -> dict:  # a run's environment: its own, empty compile caches
    os.makedirs(os.path.join(root, "triton"), exist_ok=True)
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=root, TRITON_CACHE_DIR=os.path.join(root, "triton"))


def run_result(run: dict, targets=(), fixed_steps: bool = False) -> dict:
    """One run's figures (see the module docstring) from common.run_script's answer."""
    evals, iters = run["evals"], run["iters"]
    logged_steps, train_s = sum(n for _, _, n, _, _ in iters), sum(ms * n for _, ms, n, _, _ in iters) / 1e3
    best = min(evals, key=lambda e: e[1]) if evals else (None, None, None)
    return {"returncode": run["returncode"], "ended": run["ended"], "crashed": run["crashed"], "evals": evals,
            "steps": evals[-1][0] if evals else None, "final_val": evals[-1][1] if evals else None,
            "best_val": best[1], "best_step": best[0], "wall_s": run["wall_s"], "train_s": train_s,
            "logged_steps": logged_steps, "steps_per_s": logged_steps / train_s if train_s > 0 else None,
            "fixed_steps": fixed_steps, **common.summary(run), "last_lines": run["tail"],
            "targets": {} if fixed_steps else {f"{t:.2f}": common.reach(run, t) for t in targets}}


# --- Table, verdicts and problems (pure: the runs' figures in, lines out) ----------------------------
def fmt(value, spec: str) -> str:  # "-" for None, in the spec's width
    return format(value, spec) if value is not None else format("-", f">{spec.split('.')[0].rstrip(',')}")


def table(results: dict, targets=()) -> list:
    """The runs' figures, then their speed, then each target reached or not."""
    w = max([24] + [len(label) for label in results])
    lines = [f"{'run':{w}s} {'final val':>9s} {'best val':>9s} {'wall s':>8s} {'train s':>8s} {'steps/s':>8s}"]
    for label, r in results.items():
        lines.append(f"{label:{w}s} {fmt(r['final_val'], '9.4f')} {fmt(r['best_val'], '9.4f')} {r['wall_s']:8.1f} "
                     f"{r['train_s']:8.1f} {fmt(r['steps_per_s'], '8.2f')}"
                     + f"   CRASHED (exit code {r['returncode']})" * r["crashed"])
    lines += ["", f"{'run':{w}s} {'step ms':>8s} {'tok/s':>11s} {'MFU %':>6s} {'exit':>5s}  ended"]
    lines += [f"{label:{w}s} {fmt(r['median_step_ms'], '8.1f')} {fmt(r['median_tokens_per_s'], '11,.0f')} "
              f"{fmt(r['median_mfu_percent'], '6.1f')} {r['returncode']:>5d}  {'CRASHED' * r['crashed'] or r['ended']}"
              for label, r in results.items()]
    if targets:
        lines += ["", f"{'run':{w}s} {'target':>6s} {'reached':>8s} {'steps':>6s} {'val':>7s} {'wall s':>8s} "
                      f"{'train s':>8s}"]
    for label, r in results.items():
        for t, h in r["targets"].items():
            best = "-" if h.get("best_val") is None else f"{h['best_val']:.4f} at step {h['best_step']}"
            lines.append(f"{label:{w}s} {t:>6s} " + (f"{'yes':>8s} {h['steps']:6d} {h['val']:7.4f} {h['wall_s']:8.1f} "
                         f"{h['train_s']:8.1f}" if h["reached"] else
                         f"{'no':>8s} best {best}, {h['train_s_total']:.1f} s of training"))
    return lines


def ratios(results: dict, targets) -> list:
    """Per target and preset run by both backends: numpy / torch training seconds of the fastest run of each."""
    out = []
    for t in (f"{t:.2f}" for t in targets):
        for preset in dict.fromkeys(r["preset"] for r in results.values()):
            hits = {b: [r["targets"][t] for r in results.values() if (r["backend"], r["preset"]) == (b, preset)
                        and not r["fixed_steps"]] for b in ("numpy", "torch")}
            what = f"val <= {t}, {preset}: numpy / torch, fastest run of each"
            if all(hits.values()) and all(h["reached"] for hs in hits.values() for h in hs):
                best = {b: min(h["train_s"] for h in hs) for b, hs in hits.items()}
                ratio = best["numpy"] / best["torch"] if best["torch"] > 0 else None  # None: reached at step 0
                out.append({"what": what, "ratio": ratio, "line": f"{what}: {fmt(ratio, '.2f')}"})
            elif all(hits.values()):
                out.append({"what": what, "line": f"{what}: not reached by every run, no ratio"})
    return out


def modern_verdicts(runs: dict) -> list:
    """The modern configuration's verdicts, one dict each: what, met (True, False, or None for n/a), line."""
    cpu, modern, numpy_modern = (runs.get(k) for k in ("torch cpu", "torch modern-cpu", "numpy modern-cpu"))
    out = []
    for name, target in zip(("target", "stretch"), MODERN_TARGETS):
        v = {"what": f"torch modern-cpu val <= {target} in no more wall time than torch cpu ({name})", "met": None}
        hit = next((e for e in modern["evals"] if e[1] <= target), None) if modern else None
        if not cpu or not modern or cpu["crashed"] or modern["crashed"]:
            v["line"] = "n/a (needs both torch runs, uncrashed)"
        elif hit is None:
            v.update(met=False, line=f"NOT met (never reached; best {fmt(modern['best_val'], '.4f')} at step "
                                     f"{modern['best_step']})")
        else:
            v.update(met=hit[2] <= cpu["wall_s"], step=hit[0], val=hit[1], wall_s=hit[2], cpu_wall_s=cpu["wall_s"],
                     line=f"{common.verdict(hit[2], cpu['wall_s'])} (val {hit[1]:.4f} at step {hit[0]}, "
                          f"{hit[2]:.1f} s; torch cpu took {cpu['wall_s']:.1f} s for {cpu['steps']} steps, final val "
                          f"{fmt(cpu['final_val'], '.4f')})")
        out.append(v)
    v = {"what": f"numpy modern-cpu final val within {BACKEND_GAP} of torch modern-cpu", "met": None,
         "line": "n/a (needs both modern-cpu runs, with evaluations)"}
    if modern and numpy_modern and modern["final_val"] is not None and numpy_modern["final_val"] is not None:
        gap = abs(numpy_modern["final_val"] - modern["final_val"])
        v.update(met=gap <= BACKEND_GAP, gap=gap, line=f"{common.verdict(gap, BACKEND_GAP)} (numpy "
                 f"{numpy_modern['final_val']:.4f}, torch {modern['final_val']:.4f}, gap {gap:.4f})")
    return [dict(v, line=f"{v['what']}: {v['line']}") for v in out + [v]]


def problems(results: dict, targets) -> list:
    """What fails the race, one line each: a crashed run (with its exit code), a run without a single
    logged step short of its target, a run to the targets short of the first one."""
    out = []
    for label, r in results.items():
        first = r["targets"].get(f"{targets[0]:.2f}", {"reached": True}) if targets else {"reached": True}
        if r["crashed"]:
            out.append(f"{label} crashed with exit code {r['returncode']}")
        elif not r["iter_lines"] and r["ended"] != "target":
            out.append(f"{label} logged no training step ({r['ended']}, exit code {r['returncode']})")
        elif not first["reached"]:
            out.append(f"{label} did not reach val <= {targets[0]:.2f} (best {first['best_val']} at step "
                       f"{first['best_step']}, {r['ended']})")
    return out


def plot(runs: dict, path: str, title: str) -> None:
    """Val loss against step (left) and against wall seconds since launch (right), every run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, r in ((label, r) for label, r in runs.items() if r["evals"]):
        steps, vals, walls = zip(*r["evals"])
        style = dict(color=colours.setdefault(r["preset"], f"C{len(colours)}"), marker=".", label=label,
                     linestyle="-" if r["backend"] == "torch" else "--")
        axes[0].plot(steps, vals, **style)
        axes[1].plot(walls, vals, **style)
    for ax, xlabel in zip(axes, ("step", "wall seconds since launch")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val loss")
    axes[0].legend()
    fig.suptitle("\n".join(textwrap.fill(line, 110) for line in title.splitlines()), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cuda":
        try:
            import torch
            why = common.why_no_cuda(torch.__version__, torch.version.cuda, torch.cuda.is_available())
        except ImportError as err:
            why = f"torch cannot be imported ({err})"
        if why:
            print(f"time_to_loss.py: no usable CUDA GPU: {why}. Run it on a machine with an NVIDIA GPU and a CUDA "
                  f"build of torch{'' if args.allow_no_gpu else ' (or pass --allow-no-gpu to accept this)'}.",
                  file=sys.stderr)
            return 0 if args.allow_no_gpu else NO_GPU_EXIT
    if not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file; pass --data PATH to Tiny Shakespeare's input.txt")
    how = common.limit_threads(args.threads) if args.threads else "default"
    results = {}
    with tempfile.TemporaryDirectory(prefix="npgpt-race-") as tmp:
        runs = plan(args, tmp)
        check_flags(parser, args, runs)
        info = common.machine_info(args.threads or os.cpu_count(), how, with_torch="torch" in args.backends)
        if args.device == "cuda":
            info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
        common.print_info(f"time_to_loss {args.race}: {','.join(args.backends)} x {','.join(args.presets)} x "
                          f"{','.join(args.variants)}, val <= {args.targets or '-'}", info)
        os.makedirs(args.log_dir or tmp, exist_ok=True)
        for i, run in enumerate(runs):  # with --budget_s, each later fixed-step run keeps its reserve
            reserve = sum(r["fixed"] for r in runs[i + 1:]) * args.ablation_reserve_s
            max_wall = args.budget_s and max(1.0, args.budget_s - (time.perf_counter() - t_start) - reserve)
            log = os.path.join(args.log_dir, os.path.basename(run["dir"]) + ".log") if args.log_dir else None
            out = common.run_script(run["cmd"], run["stop_below"], run["label"], args.verbose,
                                    fresh_cache_env(os.path.join(run["dir"], "cache")), max_wall, log)
            results[run["label"]] = {**{k: run[k] for k in ("backend", "preset", "variant")}, "command": run["cmd"],
                                     **run_result(out, args.targets, run["fixed"])}

    print(f"\n-- {args.race}: {info['cpu']}, {args.threads or 'default'} thread(s), seed {args.seed}, evaluation "
          f"every {args.eval_interval or 'preset'} steps{', extra ' + ' '.join(args.extra) if args.extra else ''}"
          + (f", ablations {args.ablation_iters} steps each" if args.ablation_iters else ""))
    lines = table(results, args.targets)
    checks = ratios(results, args.targets) + (modern_verdicts(results) if args.race == "modern" else [])
    failed = problems(results, args.targets)
    for line in lines + [""] + [v["line"] for v in checks]:
        print(("   " + line).rstrip())
    for label, r in ((label, r) for label, r in results.items() if r["crashed"]):
        print(f"   {label} CRASHED with exit code {r['returncode']}; its last lines:", *r["last_lines"], sep="\n      ")
    print("".join(f"FAILED: {line}\n" for line in failed), end="")
    settings = {k: v for k, v in vars(args).items() if k not in ("race", "json", "png", "log_dir", "verbose")}
    out = {"machine": info, "command": " ".join(sys.argv), "race": args.race, "settings": settings, "runs": results,
           "verdicts": checks, "crashed": [label for label, r in results.items() if r["crashed"]], "problems": failed,
           "table": lines, "wall_s": time.perf_counter() - t_start}
    if args.png:
        plot(results, args.png, f"val loss, {' vs '.join(args.presets)} (torch solid, numpy dashed)\n{info['cpu']}, "
                                f"{args.threads} thread(s){'; ' + ' '.join(args.extra) if args.extra else ''}")
        print(f"   picture: {args.png}")
    common.finish(out, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
