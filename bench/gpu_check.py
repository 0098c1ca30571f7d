"""The first run on a GPU, in one command: does the CUDA path work, and how fast is it?

    make gpu-check DATA=data/input.txt            # what it runs: PYTHONPATH=. python3 bench/gpu_check.py ...
    python bench/gpu_check.py --data data/input.txt --out out/gpu-check
    python bench/gpu_check.py --dry-run           # every step's command line; runs nothing
    python bench/gpu_check.py --require-gpu       # no GPU is a failure (also GPU_CHECK_REQUIRE=1)

It runs the source tree with the interpreter it is started with, installing nothing; a GPU machine
has no network: bring Tiny Shakespeare inside the checkout (data/ is ignored by git). The steps
(docs/training.md, "First run on a GPU") run one after the other within --budget_s, each a subprocess
logged to <out>/logs/<step>.log; a failing or cut step makes it exit 1, later steps still run. Figures:
<out>/gpu_check.json and .md (a new run first removes the previous run's files there). Without a GPU
it exits 0, unless --require-gpu (exit 2); an NVIDIA GPU that torch cannot use is a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import common  # sets sys.path

BUDGET_S = 480  # at most 8 minutes on one GPU
BENCH_RESERVE_S = 300  # kept for gpu-bench while the earlier steps run
ABLATION_ITERS = 150  # steps of each ablation in gpu-bench (speed only, not to the targets)
REQUIRE_ENV = "GPU_CHECK_REQUIRE"
PARITY_REQUIRE_ENV = "NPGPT_REQUIRE_CUDA"  # parity_tests/test_cuda.py: no CUDA fails instead of skipping
MIN_VERSIONS = {"python": (3, 10), "torch": (2, 4)}
NEEDED_MODULES = ("torch", "numpy", "scipy", "pytest", "hypothesis", "tqdm", "matplotlib")
NO_GPU_REQUIRED_EXIT = 2


@dataclass
class Step:
    name: str
    cmd: list
    cap_s: float
    env: dict = field(default_factory=dict)  # added to the environment
    expect: tuple = ()  # lines the output must contain
    skip: str | None = None  # why it does not run (then it neither passes nor fails)
    bench: bool = False  # the gpu-bench step: gets the rest of the budget


# --- What is there: the probe (in a subprocess of the same interpreter) and the verdict on it -----
PROBE = r"""
import importlib, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "modules": {}}
for name in NEEDED:
    try:
        out["modules"][name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as err:
        out["modules"][name] = None
        out.setdefault("import_errors", {})[name] = f"{type(err).__name__}: {err}"
try:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out.update(cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(), device_count=n,
               devices=[torch.cuda.get_device_name(i) for i in range(n)],
               new_tf32_api=hasattr(torch.backends.cuda.matmul, "fp32_precision"))
    if n:
        out.update(capability=list(torch.cuda.get_device_capability(0)), bf16_supported=torch.cuda.is_bf16_supported(),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as err:
    out["torch_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def probe(python: str) -> dict:
    code = f"NEEDED = {list(NEEDED_MODULES)!r}\n" + PROBE
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=180, cwd=common.ROOT)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"probe_error": f"{type(err).__name__}: {err}"}
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"probe_error": f"exit {res.returncode}: {res.stderr.strip()[-500:]}"}


def nvidia_hardware() -> str | None:
    """A description of the NVIDIA GPU the OS sees (whatever torch says), or None."""
    gpus = "/proc/driver/nvidia/gpus"
    if os.path.isdir(gpus) and os.listdir(gpus) or os.path.exists("/dev/nvidia0"):
        return f"{len(os.listdir(gpus)) if os.path.isdir(gpus) else 1} NVIDIA GPU(s) ({gpus}, /dev/nvidia0)"
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in res.stdout.splitlines() if line.startswith("GPU")]
    return "; ".join(lines) if res.returncode == 0 and lines else None


def version_tuple(text: str | None) -> tuple:
    """'2.11.0a0+git1234' -> (2, 11, 0)."""
    return tuple(int(x) for x in re.findall(r"\d+", (text or "").split("+")[0])[:3])


def gpu_verdict(info: dict, hardware: str | None, require: bool):
    """(exit code or None to go on, message). None: CUDA is really there and the versions are fine."""
    mods = info.get("modules", {})
    torch_error = info.get("import_errors", {}).get("torch", "missing")
    why = (f"the interpreter could not be probed ({info['probe_error']})" if info.get("probe_error") else
           f"torch cannot be imported ({torch_error})" if not mods.get("torch") else common.why_no_cuda(
               mods["torch"], info.get("cuda_build"), info.get("cuda_available") and info.get("device_count")))
    if why is None:
        missing = [m for m in NEEDED_MODULES if not mods.get(m)]
        old = [f"{name} {'.'.join(map(str, have))} < {'.'.join(map(str, need))}"
               for name, need in MIN_VERSIONS.items()
               for have in [version_tuple(info.get("python") if name == "python" else mods.get(name))]
               if have < need]
        if missing or old:
            return 1, ("FAILED environment: " + "; ".join(
                ([f"missing modules {', '.join(missing)} (this check installs nothing: use a python that has "
                  f"them, PYTHON=...)"] if missing else []) + old))
        return None, (f"CUDA: torch {mods['torch']}, CUDA {info['cuda_build']}, {info['device_count']} device(s): "
                      f"{', '.join(info['devices'])}")
    if hardware:
        return 1, (f"FAILED: the OS sees an NVIDIA GPU ({hardware}) but {why}: this check cannot pass on it. Use a "
                   f"CUDA build of torch (PYTHON=/path/to/python)")
    if require:
        return NO_GPU_REQUIRED_EXIT, f"FAILED: no GPU: {why}, and a GPU is required (--require-gpu / {REQUIRE_ENV}=1)"
    return 0, f"gpu-check: no GPU here ({why}); nothing to check. On a CUDA machine: make gpu-check DATA=..."


# --- The plan -------------------------------------------------------------------------------------
def plan(python: str, data: str, out: str, device_count: int | None, budget_s: float,
         ablation_iters: int = ABLATION_ITERS) -> list:
    """The steps, in order. device_count None (dry run): the torchrun step is shown as it would run."""
    train = [python, "train_torch.py"]
    runs = os.path.join(out, "runs")
    tiny = ["--preset", "tiny", "--data", data, "--progress", "false"]
    steps = [Step("parity-cuda", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "parity_tests/test_cuda.py"],
                  150, env={PARITY_REQUIRE_ENV: "1"}, expect=(" passed",))]
    for compile_ in ("compile", "eager"):
        for dtype in ("bf16", "float32"):
            name = f"tiny-{compile_}-{dtype}"
            steps.append(Step(name, train + tiny + [
                "--device", "cuda", "--compile", "true" if compile_ == "compile" else "false",
                "--dtype", "bfloat16" if dtype == "bf16" else "float32", "--out_dir", os.path.join(runs, name)],
                120, expect=("done:",)))
    resume_dir = os.path.join(runs, "resume")
    steps += [
        Step("resume-save-cuda", train + tiny + ["--device", "cuda", "--compile", "false", "--max_iters", "40",
                                                 "--out_dir", resume_dir], 60, expect=("done:",)),
        Step("resume-on-cuda", train + tiny + ["--device", "cuda", "--compile", "false", "--resume",
                                               "--max_iters", "60", "--out_dir", resume_dir], 60,
             expect=("resuming from", "done:")),
        Step("resume-on-cpu", train + tiny + ["--device", "cpu", "--resume", "--max_iters", "80",
                                              "--out_dir", resume_dir], 60, expect=("resuming from", "done:")),
    ]
    torchrun = Step("torchrun-nccl", [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                      "train_torch.py"] + tiny + ["--device", "cuda", "--compile", "false",
                                                                  "--gradient_accumulation_steps", "2",
                                                                  "--out_dir", os.path.join(runs, "torchrun")],
                    120, expect=("world size 2", "done:"))
    if device_count is not None and device_count < 2:
        torchrun.skip = f"{device_count} GPU here; a 2-process NCCL run needs 2"
    steps.append(torchrun)
    steps.append(Step("gpu-bench", [python, "bench/time_to_loss.py", "gpu", "--targets", "1.50,1.47",
                                    "--ablation_iters", str(ablation_iters), "--data", data, "--json",
                                    os.path.join(out, "gpu.json"), "--log_dir", os.path.join(out, "logs"),
                                    "--budget_s", "{budget_s}"], budget_s, bench=True))
    return steps


def shown(step: Step) -> str:
    env = " ".join(f"{k}={v}" for k, v in step.env.items())
    cmd = shlex.join(step.cmd).replace("{budget_s}", "<seconds left>")
    return (env + " " if env else "") + cmd


# --- Running it -----------------------------------------------------------------------------------
def run_step(step: Step, timeout_s: float, log_path: str) -> dict:
    cmd = [c.replace("{budget_s}", f"{max(timeout_s - 15, 30):.0f}") for c in step.cmd]
    env = dict(os.environ, PYTHONPATH=common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **step.env)
    print(f"\n== {step.name} (at most {timeout_s:.0f} s)", flush=True)
    run = common.run_script(cmd, float("-inf"), step.name, env=env, max_wall_s=timeout_s, log_path=log_path)
    with open(log_path) as f:
        lines = f.read().splitlines()[1:]
    res = {"status": "pass", "command": shlex.join(cmd), "returncode": run["returncode"],
           "seconds": round(run["wall_s"], 1), "log": log_path, **step_figures(lines)}
    missing = [e for e in step.expect if not any(e in line for line in lines)]
    if run["ended"] == "time limit":
        res.update(status="FAIL", why=f"cut at {timeout_s:.0f} s (the budget)")
    elif run["returncode"] != 0:
        res.update(status="FAIL", why=f"exit code {run['returncode']}")
    elif missing:
        res.update(status="FAIL", why=f"output lacks {missing}")
    if res["status"] != "pass":
        res["last_lines"] = lines[-15:]
    print(f"   {res['status']} in {res['seconds']:.1f} s" + (f": {res['why']}" if res.get("why") else ""), flush=True)
    return res


def step_figures(lines: list) -> dict:
    """What a step's output says: the evaluations and step speed of a training run, pytest's tally."""
    reader = common.LogReader()
    for line in lines:
        reader.feed(line, now=0.0)
    figures = {}
    if reader.evals:
        figures["evals"] = [(it, val) for it, val, _ in reader.evals]
        figures["last_val"] = reader.evals[-1][1]
    if reader.iters:
        s = common.summary({"iters": reader.iters})
        figures.update({k: v for k, v in s.items() if v is not None})
    tally = [line for line in lines if any(w in line for w in (" passed", " failed", " skipped", " error"))
             and line.strip().startswith(("=", "1", "2", "3", "4", "5", "6", "7", "8", "9"))]
    if tally:
        figures["pytest"] = tally[-1].strip("= ")
    figures.update({"setup": line for line in lines if line.startswith("device ")})
    return figures


def markdown(report: dict) -> str:
    env = report["environment"]
    m = report["machine"]
    md = ["# gpu-check", "", f"- verdict: **{report['verdict']}**", f"- {report['gpu']}",
          f"- CPU {m['cpu']}, {m['cores']} cores, load average {m['load average (1 min) at start']:.1f} at start, "
          f"{report.get('load average (1 min) at end', float('nan')):.1f} at end",
          f"- python {env.get('python')} ({env.get('executable')}), modules: "
          + ", ".join(f"{k} {v}" for k, v in env.get("modules", {}).items()),
          f"- budget {report['budget_s']:.0f} s, used {report['seconds']:.0f} s", "",
          "| step | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in report["steps"].items():
        figs = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k in ("pytest", "last_val",
                "median_step_ms", "median_tokens_per_s", "why", "skipped") if (v := r.get(k)) is not None]
        md.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} | {'; '.join(figs)} |")
    bench = report.get("gpu_bench") or {}
    if bench:
        md += ["", "## gpu-bench (bench/time_to_loss.py gpu)", "", "```", *bench.get("table", []), "```"]
    md += [f"- FAILED: {p}" for p in bench.get("problems", [])]
    if report["failed"]:
        md += ["", "Failed steps: " + ", ".join(report["failed"])]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Tiny Shakespeare's text (bring it along as data/input.txt)")
    p.add_argument("--out", default=os.path.join("out", "gpu-check"), help="where the figures go")
    p.add_argument("--budget_s", type=float, default=BUDGET_S, help="wall-clock budget of the whole check")
    p.add_argument("--ablation_iters", type=int, default=ABLATION_ITERS)
    p.add_argument("--require-gpu", dest="require_gpu", action="store_true",
                   help=f"no GPU is a failure (exit {NO_GPU_REQUIRED_EXIT}); also {REQUIRE_ENV}=1")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print every step's command; run nothing")
    args = p.parse_args(argv)
    require = args.require_gpu or os.environ.get(REQUIRE_ENV, "") not in ("", "0")
    python = sys.executable
    data = args.data or common.DEFAULT_DATA
    out = os.path.abspath(args.out)

    if args.dry_run:
        print(f"gpu-check --dry-run: {python}, data {data}, out {out}, budget {args.budget_s:.0f} s")
        print("== environment\n$ (probe) " + shlex.join([python, "-c", "import torch; ..."]))
        for step in plan(python, data, out, None, args.budget_s, args.ablation_iters):
            note = " (only when 2 GPUs exist; else skipped and said so)" if step.name == "torchrun-nccl" else ""
            print(f"== {step.name} (at most {step.cap_s:.0f} s){note}\n$ {shown(step)}")
        return 0

    t_start = time.perf_counter()
    info = probe(python)
    code, message = gpu_verdict(info, nvidia_hardware(), require)
    print(message, flush=True)
    if code is not None:
        return code
    if not os.path.isfile(data):
        print(f"FAILED: --data {data}: no such file. A GPU machine has no shared data folder and no network: copy "
              f"Tiny Shakespeare into the checkout (e.g. data/input.txt, ignored by git) and pass DATA=data/input.txt",
              flush=True)
        return 1
    for old in ("runs", "logs", "gpu.json", "gpu_check.json", "gpu_check.md"):  # this check's own earlier output
        path = os.path.join(out, old)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    machine = {"cpu": common.lscpu().get("Model name", "unknown").strip(), "cores": os.cpu_count(),
               "load average (1 min) at start": os.getloadavg()[0]}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    report = {"gpu": message, "machine": machine, "environment": info, "data": os.path.abspath(data),
              "budget_s": args.budget_s, "steps": {}, "failed": []}
    for step in plan(python, os.path.abspath(data), out, info["device_count"], args.budget_s, args.ablation_iters):
        left = args.budget_s - (time.perf_counter() - t_start)
        if step.skip:
            print(f"\n== {step.name}: skipped: {step.skip}", flush=True)
            report["steps"][step.name] = {"status": "skipped", "skipped": step.skip, "command": shown(step)}
            continue
        timeout = left if step.bench else min(step.cap_s, left - BENCH_RESERVE_S)
        if timeout < 10:
            print(f"\n== {step.name}: NOT RUN: the budget is spent ({left:.0f} s left)", flush=True)
            report["steps"][step.name] = {"status": "FAIL", "why": "not run: budget spent", "command": shown(step)}
        else:
            report["steps"][step.name] = run_step(step, timeout, os.path.join(out, "logs", f"{step.name}.log"))
        if report["steps"][step.name]["status"] == "FAIL":
            report["failed"].append(step.name)
    if os.path.exists(os.path.join(out, "gpu.json")):
        with open(os.path.join(out, "gpu.json")) as f:
            report["gpu_bench"] = json.load(f)  # the race's own JSON, with its summary table
    report["seconds"] = time.perf_counter() - t_start
    report["verdict"] = "FAILED: " + ", ".join(report["failed"]) if report["failed"] else "passed"
    common.finish(report, os.path.join(out, "gpu_check.json"))
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(f"\n{markdown(report)}\nfigures: {os.path.join(out, 'gpu_check.json')}, {os.path.join(out, 'gpu_check.md')}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
