"""The lecture's block against the modern one: preset `cpu` against `modern-cpu`, both backends, one run.

    python bench/modern.py                                   # 4 runs x 2000 steps (~10+ minutes on 2 cores)
    nohup python bench/modern.py --json out/modern.json --png docs/figures/modern_vs_cpu.png > /tmp/modern.log 2>&1 &
    python bench/modern.py --backends torch --presets modern-cpu --extra "--muon_lr 0.04"    # one point of a sweep
    python bench/modern.py --max_iters 20 --eval_interval 10 --extra "--n_layer 1"          # seconds: a smoke run

Each run is `train_torch.py --device cpu` or `train_np.py`, unchanged, as a subprocess, one after the
other (never two at once), in the order backends x presets as given (default: torch cpu, torch
modern-cpu, numpy cpu, numpy modern-cpu). Every run gets the same data (--data), the same seed
(--seed, default the presets' 1337), the same thread count (--threads: OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS in its environment; torch takes its thread count from
OMP_NUM_THREADS), an evaluation every --eval_interval steps (default 250) on the presets' --eval_iters
batches unless given (the same batches in both backends: gptapp.loop.eval_seed), --max_new_tokens 0
(no sample at the end) and a temporary --out_dir. --extra "flags" go to every run, after the above.
The evaluation lines (`step N: train loss X, val loss Y`) are read with bench/common.py's parser.

Per run: final val (the last evaluation), best val, wall s (launch to exit: imports, data,
evaluations, checkpoints included: what a user waits for), train s (the sum of the logged step
times; evaluations are excluded, and so are the few steps between the last iter line and an
evaluation, 9 of every 250 at --log_interval 10) and steps/s (logged steps / train s).

Verdicts (issue 11, "Done when"), printed and in the JSON:
    torch modern-cpu reaches val <= 1.78 (stretch 1.74) at an evaluation no later, in wall seconds
    since launch, than the whole torch cpu run takes;
    numpy modern-cpu's final val lies within 0.01 of torch modern-cpu's.
Each needs its runs; without them it says "n/a". The issue's figures are for 2000 steps. The picture
(--png): val loss against step and against wall seconds, every run in one figure (matplotlib Agg).
Exit status: 0, or 1 when a run crashed (a non-zero exit), or 2 for bad options (before any run).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import textwrap

import common  # bench/common.py; it limits no threads on import, main() does before numpy loads

SCRIPTS = {"torch": os.path.join(common.ROOT, "train_torch.py"), "numpy": os.path.join(common.ROOT, "train_np.py")}
DEFAULT_BACKENDS = ("torch", "numpy")
DEFAULT_PRESETS = ("cpu", "modern-cpu")
TARGET_VAL, STRETCH_VAL = 1.78, 1.74  # torch modern-cpu, in no more wall time than torch cpu
BACKEND_GAP = 0.01  # numpy modern-cpu's final val against torch modern-cpu's
EXIT_CRASHED, EXIT_USAGE = 1, 2


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line on stderr, "error: ...; see bench/modern.py --help", exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}; see bench/modern.py --help\n")


def names(text: str, allowed, what: str) -> list:
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--{what} {text!r}: unknown {unknown}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(chosen))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parse_args(argv):
    """The options, checked; imports neither numpy nor torch (the thread limits come after)."""
    p = OneLineParser(prog="bench/modern.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", type=lambda t: names(t, SCRIPTS, "backends"), default=list(DEFAULT_BACKENDS),
                   help="comma-separated, of torch,numpy (default both)")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help="comma-separated preset names of gptapp.settings (default cpu,modern-cpu)")
    p.add_argument("--max_iters", type=positive_int, default=None, help="steps of every run (default: the presets')")
    p.add_argument("--eval_interval", type=positive_int, default=250)
    p.add_argument("--eval_iters", type=positive_int, default=None, help="batches per evaluation (default: the presets')")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="BLAS/OpenMP threads of every run (default: all cores)")
    p.add_argument("--data", default=None, help="the training text (default: $NPGPT_DATA, else "
                   "../shared/data/tinyshakespeare/input.txt)")
    p.add_argument("--extra", default="", help='more flags for every run, e.g. "--muon_lr 0.04"')
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--png", default=None, metavar="PATH", help="the loss curves of all runs in one picture")
    p.add_argument("--verbose", action="store_true", help="echo every log line, not just evaluations")
    args = p.parse_args(argv)
    try:
        args.extra = shlex.split(args.extra)
    except ValueError as err:
        p.error(f"--extra {args.extra!r}: {err}")
    args.data = os.path.abspath(args.data or os.environ.get("NPGPT_DATA") or common.DEFAULT_DATA)
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file; pass --data PATH to Tiny Shakespeare's input.txt")
    return p, args


# --------------------------------------------------------------------------------------------
# The runs: one command per backend and preset, checked by the app's own parser before any runs
# --------------------------------------------------------------------------------------------

def run_label(backend: str, preset: str) -> str:
    return f"{backend} {preset}"


def run_flags(args, preset: str, out_dir: str) -> list:
    """The flags of one run (shared by both backends; torch's --device comes on top)."""
    flags = ["--preset", preset, "--data", args.data, "--seed", str(args.seed), "--eval_interval",
             str(args.eval_interval), "--max_new_tokens", "0", "--progress", "false", "--out_dir", out_dir]
    if args.max_iters is not None:
        flags += ["--max_iters", str(args.max_iters)]
    if args.eval_iters is not None:
        flags += ["--eval_iters", str(args.eval_iters)]
    return flags + args.extra


def run_command(args, backend: str, preset: str, out_dir: str) -> list:
    cmd = [sys.executable, SCRIPTS[backend]] + run_flags(args, preset, out_dir)
    return cmd + ["--device", "cpu"] if backend == "torch" else cmd


def check_flags(parser, args) -> None:
    """The preset names, and every run's flags through the training scripts' own parser and settings
    check: a bad --extra is one line here, before any run starts, not a crash minutes later."""
    from gptapp.cli import UsageError, train_config_from_args, train_parser
    try:
        args.presets = names(args.presets, sorted(common.presets()), "presets")
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    for backend in args.backends:
        script = os.path.basename(SCRIPTS[backend])
        app = train_parser(f"{script} (from bench/modern.py --extra)", "", torch_flags=backend == "torch",
                           numpy_flags=backend == "numpy")
        for preset in args.presets:
            flags = run_flags(args, preset, "out")
            flags += ["--device", "cpu"] if backend == "torch" else []
            try:
                train_config_from_args(app.parse_args(flags))
            except UsageError as err:
                parser.error(f"{script} --preset {preset} {' '.join(args.extra)}: {err}")


def thread_env(threads: int) -> dict:
    return dict(os.environ, **{var: str(threads) for var in common.THREAD_VARS})


def run_result(backend: str, preset: str, cmd: list, run: dict) -> dict:
    """One run's figures (see the module docstring) from common.run_script's answer."""
    evals = run["evals"]
    logged_steps = sum(n for _, _, n, _, _ in run["iters"])
    train_s = sum(ms * n for _, ms, n, _, _ in run["iters"]) / 1e3
    best = min(evals, key=lambda e: e[1]) if evals else (None, None, None)
    res = {"backend": backend, "preset": preset, "command": cmd, "returncode": run["returncode"],
           "ended": run["ended"], "crashed": run["crashed"], "evals": evals,
           "steps": evals[-1][0] if evals else None, "final_val": evals[-1][1] if evals else None,
           "best_val": best[1], "best_step": best[0], "wall_s": run["wall_s"], "train_s": train_s,
           "logged_steps": logged_steps, "steps_per_s": logged_steps / train_s if train_s > 0 else None,
           "median_step_ms": common.summary(run)["median_step_ms"] if run["iters"] else None}
    if run.get("tail"):
        res["last_lines"] = run["tail"]
    return res


# --------------------------------------------------------------------------------------------
# Table and verdicts (pure: the JSON's runs in, lines out)
# --------------------------------------------------------------------------------------------

def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(runs: dict) -> list:
    lines = [f"{'run':24s} {'final val':>9s} {'best val':>9s} {'wall s':>8s} {'train s':>8s} {'steps/s':>8s}"]
    for label, r in runs.items():
        note = f"   CRASHED (exit code {r['returncode']})" if r["crashed"] else ""
        lines.append(f"{label:24s} {fmt(r['final_val'], '9.4f')} {fmt(r['best_val'], '9.4f')} "
                     f"{fmt(r['wall_s'], '8.1f')} {fmt(r['train_s'], '8.1f')} {fmt(r['steps_per_s'], '8.2f')}{note}")
    return lines


def first_reach(r: dict, target: float):
    """(step, val, wall s) of the first evaluation at or below target, else None."""
    return next((e for e in r["evals"] if e[1] <= target), None)


def verdicts(runs: dict) -> list:
    """Issue 11's Done-when, one dict each: what, met (True, False, or None for n/a), and the line."""
    out = []
    cpu, modern = runs.get(run_label("torch", "cpu")), runs.get(run_label("torch", "modern-cpu"))
    for name, target in (("target", TARGET_VAL), ("stretch", STRETCH_VAL)):
        what = f"torch modern-cpu val <= {target} in no more wall time than torch cpu ({name})"
        if not cpu or not modern or cpu["crashed"] or modern["crashed"]:
            out.append({"what": what, "met": None, "line": f"{what}: n/a (needs both torch runs, uncrashed)"})
            continue
        hit = first_reach(modern, target)
        if hit is None:
            best = f"best {fmt(modern['best_val'], '.4f')} at step {modern['best_step']}"
            out.append({"what": what, "met": False, "line": f"{what}: NOT met (never reached; {best})"})
            continue
        met = hit[2] <= cpu["wall_s"]
        out.append({"what": what, "met": met, "step": hit[0], "val": hit[1], "wall_s": hit[2],
                    "cpu_wall_s": cpu["wall_s"],
                    "line": f"{what}: {'met' if met else 'NOT met'} (val {hit[1]:.4f} at step {hit[0]}, "
                            f"{hit[2]:.1f} s; torch cpu took {cpu['wall_s']:.1f} s for {cpu['steps']} steps, "
                            f"final val {fmt(cpu['final_val'], '.4f')})"})
    what = f"numpy modern-cpu final val within {BACKEND_GAP} of torch modern-cpu"
    numpy_modern = runs.get(run_label("numpy", "modern-cpu"))
    if not modern or not numpy_modern or modern["final_val"] is None or numpy_modern["final_val"] is None:
        out.append({"what": what, "met": None, "line": f"{what}: n/a (needs both modern-cpu runs, with evaluations)"})
    else:
        gap = abs(numpy_modern["final_val"] - modern["final_val"])
        met = gap <= BACKEND_GAP
        out.append({"what": what, "met": met, "gap": gap,
                    "line": f"{what}: {'met' if met else 'NOT met'} (numpy {numpy_modern['final_val']:.4f}, "
                            f"torch {modern['final_val']:.4f}, gap {gap:.4f})"})
    return out


# --------------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------------

def plot(runs: dict, path: str, title: str) -> None:
    """Val loss against step (left) and against wall seconds since launch (right), every run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {}
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, r in runs.items():
        if not r["evals"]:
            continue
        steps, vals, walls = zip(*r["evals"])
        colour = colours.setdefault(r["preset"], f"C{len(colours)}")
        style = "-" if r["backend"] == "torch" else "--"
        by_step.plot(steps, vals, style, color=colour, marker=".", label=label)
        by_time.plot(walls, vals, style, color=colour, marker=".", label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall seconds since launch")
    by_step.set_ylabel("val loss")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle("\n".join(textwrap.fill(line, 110) for line in title.splitlines()), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser, args = parse_args(argv)
    how = common.limit_threads(args.threads)  # before this process imports numpy (check_flags does)
    check_flags(parser, args)
    info = common.machine_info(args.threads, how, with_torch="torch" in args.backends)
    common.print_info(f"modern: presets {','.join(args.presets)} x backends {','.join(args.backends)}", info)
    env = thread_env(args.threads)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="npgpt-modern-") as tmp:
        for backend in args.backends:
            for preset in args.presets:
                label = run_label(backend, preset)
                cmd = run_command(args, backend, preset, os.path.join(tmp, label.replace(" ", "-")))
                run = common.run_script(cmd, float("-inf"), label, args.verbose, env=env)
                runs[label] = run_result(backend, preset, cmd, run)

    print(f"\n-- {info['cpu']}, {args.threads} thread(s), seed {args.seed}, evaluation every {args.eval_interval} "
          f"steps{', extra ' + ' '.join(args.extra) if args.extra else ''}")
    for line in table(runs):
        print("   " + line)
    checks = verdicts(runs)
    print()
    for v in checks:
        print("   " + v["line"])
    crashed = [label for label, r in runs.items() if r["crashed"]]
    for label in crashed:
        print(f"   {label} CRASHED with exit code {runs[label]['returncode']}; its last lines:")
        for line in runs[label].get("last_lines", []):
            print(f"      {line}")
    results = {"machine": info, "command": " ".join(sys.argv), "settings": {
        "backends": args.backends, "presets": args.presets, "max_iters": args.max_iters,
        "eval_interval": args.eval_interval, "eval_iters": args.eval_iters, "seed": args.seed,
        "threads": args.threads, "extra": args.extra, "data": args.data},
        "runs": runs, "verdicts": checks, "crashed": crashed}
    if args.png:
        plot(runs, args.png, f"val loss, {' vs '.join(args.presets)} (torch solid, numpy dashed)\n{info['cpu']}, "
                             f"{args.threads} thread(s){'; ' + ' '.join(args.extra) if args.extra else ''}")
        print(f"   picture: {args.png}")
    common.finish(results, args.json)
    return EXIT_CRASHED if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
