"""bench/gpt2.py at a tiny shape (--quick): one real run of all three modes (this process's generate, then
one worker per backend for step and memory) gives the table's rows, the JSON's figures and the verdicts,
and transformers our logits through gptapp.hf's weight mapping; bad options are one-line errors. GPT-2
small's own run (minutes) is not a test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npgpt.bounds import parity
from npgpt.compare import PARITY_FORWARD_DEPTH

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run_bench(*args, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(BENCH / "gpt2.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def row(out: str, name: str, section: str) -> list[str]:
    """The cells of the first row starting with `name` after the line starting with `section`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(section))
    return next(line for line in lines[start:] if line.strip().startswith(name + " ")).split()


def test_a_quick_run_gives_every_row_and_verdict(tmp_path):
    out_json = tmp_path / "gpt2.json"
    res = run_bench("--quick", "--threads", "1", "--json", out_json)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out, results = res.stdout, json.loads(out_json.read_text())
    assert "cpu: " in out and results["machine"]["cpu"] and results["quick"] is True
    assert "2 layers, 32 channels, 2 heads, 64 positions, vocabulary 101, gelu_tanh" in out

    gen = results["generate"]
    for backend in ("npgpt.fast", "torchgpt", "transformers"):
        r = gen[backend]
        assert r["new_tokens"] == 8 and r["tokens_per_s"] > 0, (backend, r)
        assert r["same_tokens_as_npgpt.fast"] is True, backend  # greedy on the same weights: the same work
        cells = row(out, backend, "generate:")
        assert cells[1] == f"{r['tokens_per_s']:.1f}" and cells[-1] == "True"
    assert gen["ratio"] == gen["npgpt.fast"]["seconds"] / gen["torchgpt"]["seconds"]  # bitwise: the same division
    # the weights' mapping (same names, Conv1D weights transposed, tied head): transformers' logits are ours
    assert gen["hf_logits_error"] <= parity(np.float32, 4 * 32, PARITY_FORWARD_DEPTH), gen["hf_logits_error"]

    step = results["step"]
    for backend in ("npgpt.fast", "torch"):
        r = step[backend]
        assert r["steps"] == 2 and r["q1_ms"] <= r["step_ms"] <= r["q3_ms"], (backend, r)
        assert row(out, backend, "step:")[1] == f"{r['step_ms']:.0f}"
    assert step["ratio"] == step["npgpt.fast"]["step_ms"] / step["torch"]["step_ms"]  # bitwise: the same division

    mem = results["memory"]
    for backend in ("npgpt.fast", "torch"):
        r = mem[backend]
        assert r["total_mb"] > 0 and r["total_mb"] >= r["state_mb"] and r["step_peak_mb"] >= 0, (backend, r)
        assert row(out, backend, "memory:")[1] == f"{r['total_mb']:.0f}"
    # --repeats 1: the step workers measured memory first, and no other worker started
    assert "median of 1 fresh workers each (the first of each: the step workers', before their timed steps)" in out
    assert mem["ratio"] == mem["npgpt.fast"]["total_mb"] / mem["torch"]["total_mb"]  # bitwise: the same division

    summary = out[out.index("summary"):].splitlines()[1:4]
    for line, mode in zip(summary, ("generate", "step", "memory")):
        assert line.split()[0] == mode and f"{results[mode]['ratio']:.2f}" in line
        assert line.rstrip().endswith("met")


@pytest.mark.parametrize("args, words", [
    (["--tokens", "0"], ["--tokens", "positive"]),
    (["--quick", "--prompt", "60", "--tokens", "10"], ["--prompt 60", "--tokens 10", "64 positions"]),
])
def test_bad_options_are_one_line_errors(args, words):
    res = run_bench(*args, timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert res.stdout == ""  # nothing measured
