"""bench/time_to_loss.py modern: preset cpu against modern-cpu in both backends, at tiny sizes only.

The plan of its four runs; one real run of the modern-cpu pair (2 training subprocesses, 10 steps of a
2-layer, 32-channel model on a small synthetic text); all four runs with a crash (stand-in training
scripts); the verdicts on canned runs; the one-line errors for bad options. The full benchmark (2000
steps x 4 runs) is not a test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import time_to_loss as modern  # noqa: E402  (the race driver; its configuration modern)

# The tiny preset's shape and evaluation on top of both presets, so each keeps its own block
# (modern-cpu: RMSNorm, RoPE, QK-norm, SwiGLU, Muon) at a size that trains in a second.
TINY = "--n_layer 2 --n_head 2 --n_embd 32 --block_size 16 --batch_size 8 --eval_iters 2 --log_interval 1"
LABELS = ["torch cpu", "torch modern-cpu", "numpy cpu", "numpy modern-cpu"]
RUN_FIELDS = {"backend", "preset", "command", "returncode", "ended", "crashed", "evals", "steps", "final_val",
              "best_val", "best_step", "wall_s", "train_s", "logged_steps", "steps_per_s", "median_step_ms"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """~40 kB of verse-like text: enough windows of 16 characters for both splits."""
    words = ["thou", "art", "the", "king", "of", "night", "and", "my", "lord", "shall", "speak", "here", "now"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5)).capitalize() + ","
             for i in range(1500)]
    path = tmp_path_factory.mktemp("modern") / "input.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_bench(*args, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(BENCH / "time_to_loss.py"), "modern", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_the_modern_configuration_plans_both_presets_in_both_backends(tmp_path, text_file, capsys):
    """The four runs' commands as main() builds them (what the other tests run is a part of this plan)."""
    parser, args = modern.parse_args(["modern", "--max_iters", "10", "--eval_interval", "5", "--threads", "1",
                                      "--data", str(text_file), "--extra", TINY])
    runs = modern.plan(args, str(tmp_path))
    modern.check_flags(parser, args, runs)  # the training scripts' own parser accepts every command
    assert [r["label"] for r in runs] == LABELS
    for r in runs:
        backend, preset = r["label"].split()
        cmd = r["cmd"]
        assert (r["backend"], r["preset"], r["fixed"], r["stop_below"]) == (backend, preset, False, float("-inf"))
        # same data, seed, steps and evaluations for every run; torch on the CPU; --extra last but --device
        assert cmd[0] == sys.executable and cmd[1].endswith("train_torch.py" if backend == "torch" else "train_np.py")
        assert cmd[cmd.index("--preset") + 1] == preset and cmd[cmd.index("--seed") + 1] == "1337"
        assert cmd[cmd.index("--data") + 1] == str(text_file)
        assert cmd[cmd.index("--max_iters") + 1] == "10" and cmd[cmd.index("--eval_interval") + 1] == "5"
        assert cmd[cmd.index("--out_dir") + 1].startswith(str(tmp_path))
        tail = cmd[len(cmd) - len(TINY.split()) - 2 * (backend == "torch"):]
        assert tail == TINY.split() + ["--device", "cpu"] * (backend == "torch")
    assert capsys.readouterr().out == ""  # nothing started


def test_a_tiny_run_gives_the_table_the_verdicts_the_json_and_the_picture(tmp_path, text_file, monkeypatch, capsys):
    """main() itself, running the real training scripts on the modern block (2 training processes): the
    backend gap is judged on what they logged; the torch cpu run the time verdicts need is not planned, so
    they say n/a (test_the_verdicts_... judges them on canned runs)."""
    for var in common.THREAD_VARS:  # main() sets them; monkeypatch puts the test's values back
        monkeypatch.setenv(var, "1")
    out_json, out_png, logs = tmp_path / "modern.json", tmp_path / "modern.png", tmp_path / "logs"
    rc = modern.main(["modern", "--presets", "modern-cpu", "--max_iters", "10", "--eval_interval", "5",
                      "--threads", "1", "--data", str(text_file), "--extra", TINY, "--json", str(out_json),
                      "--png", str(out_png), "--log_dir", str(logs)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    results = json.loads(out_json.read_text())
    runs = results["runs"]
    assert list(runs) == ["torch modern-cpu", "numpy modern-cpu"]
    for label, r in runs.items():
        assert RUN_FIELDS <= set(r), f"{label} lacks {RUN_FIELDS - set(r)}"
        backend, preset = label.split()
        assert (r["backend"], r["preset"], r["crashed"], r["returncode"], r["ended"]) == (
            backend, preset, False, 0, "exited")
        assert r["command"][1].endswith("train_torch.py" if backend == "torch" else "train_np.py")
        assert [e[0] for e in r["evals"]] == [0, 5, 10] and r["steps"] == 10
        vals, walls = [e[1] for e in r["evals"]], [e[2] for e in r["evals"]]
        assert r["final_val"] == vals[-1] and r["best_val"] == min(vals)
        assert r["best_step"] == r["evals"][vals.index(min(vals))][0]
        assert walls == sorted(walls) and 0 < walls[-1] <= r["wall_s"]
        assert r["logged_steps"] == 10 and 0 < r["train_s"] < r["wall_s"]  # --log_interval 1: every step
        assert r["steps_per_s"] == 10 / r["train_s"]  # bitwise: logged_steps / train_s, through JSON's repr
        assert 3.0 < r["final_val"] < 5.0  # a character model after 10 steps: near log(vocab)
        # the run built the modern block (its settings line, in the log --log_dir keeps)
        log = (logs / (label.replace(" ", "-") + ".log")).read_text()
        settings_line = next(line for line in log.splitlines() if line.startswith("settings: "))
        for word in ("norm='rmsnorm'", "pos_emb='rope'", "qk_norm=True", "activation='swiglu'", "optimizer='muon'",
                     "n_layer=2", "n_embd=32"):
            assert word in settings_line, (label, word, settings_line)
        assert [f"step {it}: " in log for it in (0, 5, 10)] == [True] * 3
    settings = results["settings"]
    assert (settings["threads"], settings["max_iters"], settings["eval_interval"]) == (1, 10, 5)
    assert settings["extra"] == TINY.split() and settings["presets"] == ["modern-cpu"] and results["crashed"] == []

    checks = {v["what"]: v for v in results["verdicts"]}
    assert len(checks) == 3
    target, stretch, gap = results["verdicts"]
    for v in (target, stretch):  # no torch cpu run to compare with
        assert v["met"] is None and v["line"] == f"{v['what']}: n/a (needs both torch runs, uncrashed)", v
    expected_gap = abs(runs["numpy modern-cpu"]["final_val"] - runs["torch modern-cpu"]["final_val"])
    assert gap["gap"] == expected_gap and gap["met"] == (expected_gap <= 0.01)  # bitwise: the same abs(a - b)
    assert gap["line"].startswith(gap["what"]) and ("NOT met" in gap["line"]) == (not gap["met"])

    header = next(line for line in out.splitlines() if line.strip().startswith("run "))
    assert header.split() == ["run", "final", "val", "best", "val", "wall", "s", "train", "s", "steps/s"]
    for label in runs:
        row = next(line for line in out.splitlines() if line.strip().startswith(label + " "))
        assert f"{runs[label]['final_val']:.4f}" in row
    assert results["table"][0] == header.strip() and all(v["line"] in out for v in results["verdicts"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000


FAKE_SCRIPT = """import sys
argv = sys.argv[1:]
steps = int(argv[argv.index("--max_iters") + 1])
print("fake: 0.01M parameters", flush=True)
for it in range(0, steps + 1, 5):
    print(f"step {it}: train loss 3.0, val loss {3.0 - it / 100:.4f}", flush=True)
    if it < steps:
        print(f"iter {it}: loss 3.0, lr 1.00e-03, time 10.0ms, tok/s 1,000", flush=True)
    if "modern-cpu" in argv and it == 5:
        print("boom: the modern run fell over", flush=True)
        sys.exit(3)
"""


def test_a_crashed_run_fails_the_benchmark_and_is_reported(tmp_path, text_file, monkeypatch, capsys):
    """Stand-in training scripts: the modern-cpu runs exit 3 after their second evaluation."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_SCRIPT)
    monkeypatch.setattr(modern, "SCRIPTS", {"torch": str(fake), "numpy": str(fake)})
    for var in common.THREAD_VARS:  # main() sets them; monkeypatch puts the test's values back
        monkeypatch.setenv(var, "1")
    out_json = tmp_path / "crash.json"
    rc = modern.main(["modern", "--max_iters", "10", "--eval_interval", "5", "--threads", "1", "--data", str(text_file),
                      "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 1, out
    results = json.loads(out_json.read_text())
    assert results["crashed"] == ["torch modern-cpu", "numpy modern-cpu"]
    for label in ("torch modern-cpu", "numpy modern-cpu"):
        r = results["runs"][label]
        assert (r["crashed"], r["returncode"]) == (True, 3)
        assert r["last_lines"][-1] == "boom: the modern run fell over"
        assert f"{label} CRASHED with exit code 3" in out
    ok = results["runs"]["torch cpu"]
    assert (ok["crashed"], ok["final_val"], ok["best_val"]) == (False, 2.9, 2.9)
    target, stretch, _ = results["verdicts"]
    assert target["met"] is None and "n/a" in target["line"] and stretch["met"] is None
    assert "CRASHED" in next(line for line in out.splitlines() if line.strip().startswith("torch modern-cpu "))


def canned(backend, preset, evals, wall_s, crashed=False):
    return {"backend": backend, "preset": preset, "evals": evals, "crashed": crashed, "wall_s": wall_s,
            "steps": evals[-1][0], "final_val": evals[-1][1], "best_val": min(e[1] for e in evals),
            "best_step": min(evals, key=lambda e: e[1])[0]}


def test_the_verdicts_compare_time_to_the_target_with_the_whole_cpu_run():
    cpu = canned("torch", "cpu", [(0, 4.2, 1.0), (2000, 1.86, 68.0)], 70.0)
    modern_torch = canned("torch", "modern-cpu", [(0, 4.2, 1.0), (1500, 1.775, 55.0), (2000, 1.75, 72.0)], 74.0)
    modern_np = canned("numpy", "modern-cpu", [(0, 4.2, 1.0), (2000, 1.7585, 95.0)], 96.0)
    runs = {"torch cpu": cpu, "torch modern-cpu": modern_torch, "numpy modern-cpu": modern_np}
    target, stretch, gap = modern.modern_verdicts(runs)
    # 1.78 first reached at 55 s, inside torch cpu's 70 s, although the whole modern run took longer
    assert target["met"] is True and (target["step"], target["wall_s"]) == (1500, 55.0)
    assert stretch["met"] is False and "never reached" in stretch["line"]  # best 1.75 > 1.74
    assert gap["met"] is True and gap["gap"] == abs(1.7585 - 1.75)  # bitwise: the same subtraction

    late = dict(modern_torch, evals=[(0, 4.2, 1.0), (2000, 1.73, 72.0)])
    target, stretch, _ = modern.modern_verdicts({**runs, "torch modern-cpu": late})
    assert target["met"] is False and stretch["met"] is False and "NOT met (val 1.7300 at step 2000, 72.0 s" in \
        target["line"]
    far = dict(modern_np, evals=[(0, 4.2, 1.0), (2000, 1.7615, 95.0)], final_val=1.7615)
    assert modern.modern_verdicts({**runs, "numpy modern-cpu": far})[2]["met"] is False  # 0.0115 apart
    assert [v["met"] for v in modern.modern_verdicts({"torch cpu": cpu})] == [None, None, None]


@pytest.mark.parametrize("args, words", [
    (["--backends", "torch,jax"], ["--backends", "jax", "torch,numpy"]),
    (["--presets", "cpu,turbo"], ["--presets", "turbo", "modern-cpu"]),
    (["--max_iters", "0"], ["--max_iters", "positive integer"]),
    (["--extra", "--n_layer two"], ["--n_layer", "two"]),
    (["--extra", "--learning_rate -1"], ["--learning_rate", "finite number >= 0"]),
    (["--extra", "--muon_lr 0.04 'unclosed"], ["--extra", "quotation"]),
    (["--data", "/nonexistent/input.txt"], ["--data", "/nonexistent/input.txt", "no such file"]),
])
def test_bad_options_are_one_line_errors_before_any_run(args, words, text_file):
    res = run_bench(*(["--data", text_file] if "--data" not in args else []), *args, timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "$ " not in res.stdout and "Traceback" not in res.stderr  # no training script was started
