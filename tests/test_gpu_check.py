"""make gpu-check and bench/time_to_loss.py gpu on a machine without a GPU: what they say, what they would run,
and their verdicts on canned train_torch.py output (no GPU, no training)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import time_to_loss as gpu  # noqa: E402  (the race driver; its configuration gpu)
import gpu_check  # noqa: E402

STEPS = ["parity-cuda", "tiny-compile-bf16", "tiny-compile-float32", "tiny-eager-bf16", "tiny-eager-float32",
         "resume-save-cuda", "resume-on-cuda", "resume-on-cpu", "torchrun-nccl", "gpu-bench"]
HAS_GPU = torch.cuda.is_available() or gpu_check.nvidia_hardware() is not None
no_gpu_here = pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-GPU answers cannot be reached")


def run(args, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_REQUIRE", "NPGPT_REQUIRE_CUDA")}
    full_env.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=full_env,
                          timeout=120)


# --------------------------------------------------------------------------------------------
# gpu_check.py end to end (fast paths only)
# --------------------------------------------------------------------------------------------

@no_gpu_here
def test_no_gpu_says_so_and_exits_0(tmp_path):
    res = run(["bench/gpu_check.py", "--out", str(tmp_path / "out")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no GPU here" in res.stdout and "CPU-only build" in res.stdout
    assert not (tmp_path / "out").exists()  # nothing was run


@pytest.fixture(scope="module")
def this_machine():
    """The probe of this machine's interpreter, run once (it imports torch and friends)."""
    return gpu_check.probe(sys.executable)


@no_gpu_here
@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_gpu_is_a_failure_when_required(how, tmp_path, this_machine, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "probe", lambda python: this_machine)
    monkeypatch.delenv("GPU_CHECK_REQUIRE", raising=False)
    args = ["--out", str(tmp_path)]
    if how == "flag":
        args.append("--require-gpu")
    else:
        monkeypatch.setenv("GPU_CHECK_REQUIRE", "1")
    assert gpu_check.main(args) == gpu_check.NO_GPU_REQUIRED_EXIT != 0
    out = capsys.readouterr().out
    assert "FAILED: no GPU" in out and "required" in out
    monkeypatch.setenv("GPU_CHECK_REQUIRE", "0")
    assert gpu_check.main(["--out", str(tmp_path)]) == 0  # 0 means not required


def test_dry_run_lists_every_step_in_order():
    res = run(["bench/gpu_check.py", "--dry-run", "--data", "data/input.txt"])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    headers = [line.split()[1] for line in out.splitlines() if line.startswith("== ")]
    assert headers == ["environment"] + STEPS
    commands = {h: line for h, line in zip(headers, [ln for ln in out.splitlines() if ln.startswith("$ ")])}
    assert "NPGPT_REQUIRE_CUDA=1" in commands["parity-cuda"] and "parity_tests/test_cuda.py" in commands["parity-cuda"]
    assert "--compile true --dtype bfloat16" in commands["tiny-compile-bf16"]
    assert "--compile true --dtype float32" in commands["tiny-compile-float32"]
    assert "--compile false --dtype bfloat16" in commands["tiny-eager-bf16"]
    assert "--compile false --dtype float32" in commands["tiny-eager-float32"]
    assert "--device cuda" in commands["resume-on-cuda"] and "--resume" in commands["resume-on-cuda"]
    assert "--device cpu --resume" in commands["resume-on-cpu"]
    assert "torch.distributed.run" in commands["torchrun-nccl"] and "--nproc_per_node 2" in commands["torchrun-nccl"]
    assert "only when 2 GPUs exist" in out
    assert "bench/time_to_loss.py gpu --targets 1.50,1.47" in commands["gpu-bench"]
    assert "--ablation_iters" in commands["gpu-bench"]
    assert all("--data data/input.txt" in commands[s] for s in STEPS if s.startswith(("tiny", "resume")))


def test_plan_skips_torchrun_with_one_gpu_only():
    one = {s.name: s for s in gpu_check.plan("python3", "d.txt", "/o", 1, 480)}
    two = {s.name: s for s in gpu_check.plan("python3", "d.txt", "/o", 2, 480)}
    assert list(one) == STEPS
    assert one["torchrun-nccl"].skip and "needs 2" in one["torchrun-nccl"].skip
    assert two["torchrun-nccl"].skip is None
    assert all(s.skip is None for n, s in one.items() if n != "torchrun-nccl")


# --------------------------------------------------------------------------------------------
# gpu_check.gpu_verdict: what the probe found -> go on, pass as "no GPU", or fail
# --------------------------------------------------------------------------------------------

GOOD = {"python": "3.12.3", "modules": {m: "2.11.0" if m == "torch" else "1.0" for m in gpu_check.NEEDED_MODULES},
        "cuda_build": "13.0", "cuda_available": True, "device_count": 1, "devices": ["NVIDIA H200"]}


def probe_with(**changes):
    info = {**GOOD, "modules": dict(GOOD["modules"])}
    for k, v in changes.items():
        if k in gpu_check.NEEDED_MODULES:
            info["modules"][k] = v
        else:
            info[k] = v
    return info


def test_verdict_goes_on_only_when_cuda_is_really_there():
    code, msg = gpu_check.gpu_verdict(GOOD, "1 NVIDIA GPU(s)", require=False)
    assert code is None and "NVIDIA H200" in msg and "2.11.0" in msg and "13.0" in msg


@pytest.mark.parametrize("require, expected", [(False, 0), (True, gpu_check.NO_GPU_REQUIRED_EXIT)])
def test_verdict_without_a_gpu(require, expected):
    code, msg = gpu_check.gpu_verdict(probe_with(cuda_build=None, cuda_available=False, device_count=0), None,
                                      require)
    assert code == expected and "CPU-only build" in msg


def test_verdict_cpu_only_torch_on_a_gpu_machine_fails_even_unrequired():
    code, msg = gpu_check.gpu_verdict(probe_with(cuda_build=None, cuda_available=False, device_count=0),
                                      "GPU 0: NVIDIA H200", require=False)
    assert code == 1 and "FAILED" in msg and "CPU-only build" in msg


@pytest.mark.parametrize("changes, words", [
    ({"pytest": None}, "missing modules pytest"),
    ({"torch": "2.3.1+cu121"}, "torch 2.3.1 < 2.4"),
    ({"python": "3.9.18"}, "python 3.9.18 < 3.10"),
])
def test_verdict_checks_versions_at_start(changes, words):
    code, msg = gpu_check.gpu_verdict(probe_with(**changes), "GPU 0", require=False)
    assert code == 1 and words in msg


def test_version_tuple():
    assert gpu_check.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert gpu_check.version_tuple("2.11.0a0+git1234") == (2, 11, 0)
    assert gpu_check.version_tuple(None) == ()


# --------------------------------------------------------------------------------------------
# bench/time_to_loss.py gpu: targets, the log parser, the verdict (canned train_torch.py output)
# --------------------------------------------------------------------------------------------

def canned_log(vals, mfu_first=0.1, mfu_later=41.0, every=250):
    """train_torch.py's lines: an evaluation every `every` steps, an iter line every 10 steps; the
    first 5 iter lines carry compilation (tiny MFU, long steps)."""
    lines = ["torchgpt: 10.65M parameters, vocab 65, 1,003,854 train / 111,540 val tokens",
             "device cuda, dtype bfloat16, compile on, attention sdpa, world size 1"]
    n = 0
    for k, val in enumerate(vals):
        lines.append(f"step {k * every}: train loss {val - 0.05:.4f}, val loss {val:.4f}")
        if k == len(vals) - 1:
            break
        for it in range(k * every, (k + 1) * every, 10):
            first = n < 5
            ms, mfu = (900.0, mfu_first) if first else (20.0, mfu_later)
            lines.append(f"iter {it}: loss {val:.4f}, lr 1.00e-03, time {ms:.1f}ms, tok/s {16384000 / ms:,.0f}, "
                         f"mfu {mfu:.1f}%")
            n += 1
    return lines


def fake_run(lines, returncode=0, ended="exited"):
    reader = common.LogReader(t0=0.0)
    for i, line in enumerate(lines):
        reader.feed(line, now=float(i))
    return {"iters": reader.iters, "evals": reader.evals, "returncode": returncode, "ended": ended,
            "crashed": returncode != 0 and ended == "exited", "wall_s": float(len(lines)), "tail": lines[-3:]}


def test_parse_targets():
    assert gpu.parse_targets("1.50,1.47") == [1.5, 1.47]
    assert gpu.parse_targets("1.47,1.50") == [1.5, 1.47]  # the target first, then the stretch
    assert list(gpu.CONFIGS["gpu"]["targets"]) == [1.50, 1.47]
    for bad in ("", "x", "1.5,-1"):
        with pytest.raises(Exception, match="--targets"):
            gpu.parse_targets(bad)
    with pytest.raises(Exception, match="unknown"):
        gpu.names("default,no_flash", gpu.VARIANTS, "variants")


def test_log_reader_reads_train_torch_lines():
    run = fake_run(canned_log([4.2, 2.0, 1.6]))
    assert [(it, val) for it, val, _ in run["evals"]] == [(0, 4.2), (250, 2.0), (500, 1.6)]
    assert len(run["iters"]) == 50 and run["iters"][0][0] == 0 and run["iters"][-1][0] == 490
    assert run["iters"][-1][3] == 16384000 / 20.0 and run["iters"][-1][4] == 41.0


def test_mfu_and_tokens_skip_the_first_five_iter_lines():
    s = common.summary(fake_run(canned_log([4.2, 2.0, 1.6])))
    assert s["median_mfu_percent"] == 41.0 and s["median_step_ms"] == 20.0
    assert s["iter_lines_skipped"] == 5


def test_both_targets_reported():
    r = gpu.run_result(fake_run(canned_log([4.2, 1.8, 1.52, 1.49, 1.46]), ended="target"), [1.50, 1.47], False)
    assert r["targets"]["1.50"]["reached"] and r["targets"]["1.50"]["steps"] == 750
    assert r["targets"]["1.47"]["reached"] and r["targets"]["1.47"]["steps"] == 1000
    assert r["targets"]["1.50"]["wall_s"] < r["targets"]["1.47"]["wall_s"]
    assert gpu.problems({"default": r}, [1.50, 1.47]) == []


def test_stretch_target_missed_is_reported_not_failed():
    r = gpu.run_result(fake_run(canned_log([4.2, 1.8, 1.49, 1.48])), [1.50, 1.47], False)
    assert r["targets"]["1.50"]["reached"] and not r["targets"]["1.47"]["reached"]
    assert r["targets"]["1.47"]["best_val"] == 1.48
    assert gpu.problems({"default": r}, [1.50, 1.47]) == []
    assert any("1.47" in line and "no" in line for line in gpu.table({"default": r}, [1.50, 1.47]))


def test_default_short_of_the_target_fails():
    r = gpu.run_result(fake_run(canned_log([4.2, 1.8, 1.6]), ended="time limit"), [1.50, 1.47], False)
    problems = gpu.problems({"default": r}, [1.50, 1.47])
    assert len(problems) == 1 and "did not reach val <= 1.50" in problems[0] and "time limit" in problems[0]


def test_crashed_variant_fails_with_its_exit_code():
    ok = gpu.run_result(fake_run(canned_log([4.2, 1.49, 1.46]), ended="target"), [1.50, 1.47], False)
    crashed = gpu.run_result(fake_run(canned_log([4.2])[:3] + ["Traceback (most recent call last):"],
                                          returncode=1), [1.50, 1.47], True)
    stopped = gpu.run_result(fake_run(canned_log([4.2, 3.0]), returncode=130, ended="time limit"),
                                 [1.50, 1.47], True)
    problems = gpu.problems({"default": ok, "no_sdpa": crashed, "no_bf16": stopped}, [1.50, 1.47])
    assert problems == ["no_sdpa crashed with exit code 1"]
    assert crashed["last_lines"][-1].startswith("Traceback")
    assert any("CRASHED" in line for line in gpu.table({"no_sdpa": crashed}, [1.50, 1.47]))


def test_variant_commands():
    runs = {r["variant"]: r["cmd"] for r in gpu.plan(gpu.parse_args(["gpu", "--data", "data/input.txt",
                                                                     "--ablation_iters", "150"])[1], "/o")}
    d, a = runs["default"], runs["no_bf16"]
    assert "--max_iters" not in d and d[d.index("--preset") + 1] == "shakespeare-char"
    assert a[a.index("--dtype") + 1] == "float32" and a[a.index("--max_iters") + 1] == "150"
    assert a[a.index("--eval_interval") + 1] == "150"
    env1, env2 = gpu.fresh_cache_env("/tmp/a"), gpu.fresh_cache_env("/tmp/b")
    assert env1["TORCHINDUCTOR_CACHE_DIR"] != env2["TORCHINDUCTOR_CACHE_DIR"]
    assert env1["TRITON_CACHE_DIR"].startswith("/tmp/a")


@no_gpu_here
def test_gpu_py_without_cuda_exits_nonzero_unless_allowed(capsys):
    assert gpu.main(["gpu"]) == gpu.NO_GPU_EXIT != 0
    assert "no usable CUDA GPU" in capsys.readouterr().err
    assert gpu.main(["gpu", "--allow-no-gpu"]) == 0
    assert "no usable CUDA GPU" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# parity_tests/test_cuda.py: required CUDA fails; TF32 read through the API in use
# --------------------------------------------------------------------------------------------

@no_gpu_here
def test_cuda_parity_without_cuda_fails_when_required():
    """(Without the variable the suite itself shows them skipped.)"""
    res = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "parity_tests/test_cuda.py"],
              NPGPT_REQUIRE_CUDA="1")
    assert res.returncode != 0 and "NPGPT_REQUIRE_CUDA=1 but torch" in res.stdout and "passed" not in res.stdout


def test_tf32_settings_readable_and_restored_after_set_tf32():
    """After torchgpt's set_tf32, the parity fixture's helpers read TF32 through the API this torch
    has, switch it off and restore it through set_tf32 (so the legacy flags stay readable: the new
    setters alone would make them raise), and the legacy flags read the same. In a fresh
    interpreter: the TF32 state is process-wide."""
    code = """
import torch
from torchgpt.runtime import set_tf32
from parity_tests.tf32 import full_precision_settings, set_tf32_settings, tf32_is_off, tf32_settings
set_tf32(True)
saved = tf32_settings()
assert saved[0] == ("new" if hasattr(torch.backends.cuda.matmul, "fp32_precision") else "legacy"), saved
assert not tf32_is_off()
set_tf32_settings(full_precision_settings())
assert tf32_is_off(), tf32_settings()
assert torch.backends.cuda.matmul.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
set_tf32_settings(saved)
assert tf32_settings() == saved
assert torch.backends.cuda.matmul.allow_tf32 is True
print("ok", saved)
"""
    res = run(["-c", code])
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr


# --------------------------------------------------------------------------------------------
# bench/ in one shape: scripts share common.py and import no other script, no private name
# --------------------------------------------------------------------------------------------

def test_bench_scripts_import_only_common_and_public_names():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert "common" in scripts and "_common" not in scripts
    for path in BENCH.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [(a.name, a.name.split(".")[-1]) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [(mod, a.name) for a in node.names] + [(mod, mod.split(".")[-1])]
            else:
                continue
            for mod, name in names:
                assert not name.startswith("_") or name == "__future__", f"{path.name} imports private {mod}.{name}"
                top = mod.split(".")[0]
                assert top not in scripts - {"common"}, f"{path.name} imports the script {mod}"
                assert name != "keep_freed_memory" or top != "npgpt", f"{path.name} tunes npgpt's allocator"


def test_step_figures_and_the_summary():
    figs = gpu_check.step_figures(canned_log([4.2, 2.0, 1.6]) + ["done: 500 steps in 12.0s, best val loss 1.6000"])
    assert figs["last_val"] == 1.6 and figs["median_step_ms"] == 20.0 and figs["setup"].startswith("device cuda")
    assert gpu_check.step_figures(["....", "97 passed, 1 failed in 30.2s"])["pytest"] == "97 passed, 1 failed in 30.2s"
    report = {"verdict": "FAILED: gpu-bench", "gpu": "CUDA: torch 2.11.0, CUDA 13.0, 1 device(s): NVIDIA H200",
              "machine": {"cpu": "Xeon", "cores": 16, "load average (1 min) at start": 0.5},
              "environment": {"python": "3.12.3", "modules": {"torch": "2.11.0"}}, "budget_s": 480, "seconds": 470,
              "steps": {"parity-cuda": {"status": "pass", "seconds": 31.0, "pytest": "98 passed in 30s"},
                        "torchrun-nccl": {"status": "skipped", "skipped": "1 GPU here"},
                        "gpu-bench": {"status": "FAIL", "seconds": 300.0, "why": "exit code 1"}},
              "failed": ["gpu-bench"],
              "gpu_bench": {"table": ["variant ...", "default 1.50 yes"], "problems": ["variant no_sdpa crashed"]}}
    md = gpu_check.markdown(report)
    assert "**FAILED: gpu-bench**" in md and "NVIDIA H200" in md and "| torchrun-nccl | skipped |" in md
    assert "default 1.50 yes" in md and "- FAILED: variant no_sdpa crashed" in md
