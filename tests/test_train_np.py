"""train_np.py end to end: a `tiny` run as a subprocess (log lines, checkpoints, metrics.jsonl,
loss.png, the sample), the `sample` command, the bigram preset, and --resume giving bit-identical
parameters. CPU only, a few seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import (
    DATA,
    EVAL_LINE,
    ITER_LINE,
    check_run_dir,
    load_script,
    needs_data,
    run_main,
    run_subprocess,
    tiny_args,
)

from gptapp.checkpoint import load_npz
from gptapp.cli import train_config_from_args, train_parser

# --------------------------------------------------------------------------- the helpers' premises


def test_data_file_is_found():
    """The other tests need Tiny Shakespeare (NPGPT_DATA, set by `make test`, or ../shared/data)."""
    if not DATA.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {DATA}")
    assert DATA.stat().st_size > 1_000_000


def test_scripts_have_main():
    assert callable(load_script("np").main)

# --------------------------------------------------------------------------- train_np.py


@needs_data
def test_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    res = run_subprocess("np", tiny_args(out), cwd=tmp_path)
    assert res.rc == 0, res.err
    assert "Traceback" not in res.err
    assert res.out.startswith("npgpt: 0.03M parameters, vocab 65, 1,003,854 train / 111,540 val tokens")
    assert [int(m) for m in EVAL_LINE.findall(res.out)] == [0, 20, 40]
    assert [int(m) for m in ITER_LINE.findall(res.out)] == [0, 10, 20, 30]
    assert "done: 40 steps in" in res.out
    check_run_dir(out, ".npz", 40)
    ckpt = load_npz(out / "ckpt_last.npz")
    assert ckpt.iter_num == 40 and ckpt.backend == "numpy" and len(ckpt.vocab) == 65
    assert ckpt.train_config["n_layer"] == 2 and ckpt.optimizer["step"] == 40
    sample = res.out.split("val tokens", 1)[1].rsplit("best val loss", 1)[1].split("\n", 1)[1]
    assert len(sample.rstrip("\n")) >= 15, f"no sample printed after training: {res.out!r}"

    # autocomplete from the checkpoint: the prompt, then its continuation; the same seed, the same text
    argv = ["sample", "--ckpt", out / "ckpt_best.npz", "--prompt", "ROMEO:", "--max_new_tokens", 40,
            "--temperature", 0.8, "--top_k", 40, "--seed", 1]
    first = run_subprocess("np", argv, cwd=tmp_path)
    assert first.rc == 0 and first.err == "", first.err
    assert first.out.startswith("ROMEO:") and len(first.out) == len("ROMEO:") + 40 + 1
    assert run_main("np", argv, capsys).out == first.out  # in-process: a second subprocess costs seconds


@needs_data
def test_sample_seeds_and_greedy(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main("np", tiny_args(out, "--max_iters", 10), capsys).rc == 0
    base = ["sample", "--ckpt", out / "ckpt_last.npz", "--prompt", "KING", "--max_new_tokens", 30]
    a = run_main("np", base + ["--seed", 1], capsys).out
    b = run_main("np", base + ["--seed", 2], capsys).out
    assert a != b, "different seeds gave the same text"
    g1 = run_main("np", base + ["--temperature", 0, "--seed", 1], capsys).out
    g2 = run_main("np", base + ["--temperature", 0, "--seed", 2], capsys).out
    assert g1 == g2, "greedy decoding depends on the seed"


@needs_data
def test_bigram_preset(tmp_path, capsys):
    out = tmp_path / "out"
    res = run_main("np", ["--preset", "bigram", "--data", DATA, "--out_dir", out, "--max_iters", 30,
                          "--eval_interval", 15, "--eval_iters", 2, "--max_new_tokens", 10], capsys)
    assert res.rc == 0, res.err
    assert [int(m) for m in EVAL_LINE.findall(res.out)] == [0, 15, 30]
    ckpt = load_npz(out / "ckpt_last.npz")
    assert ckpt.model == "bigram" and ckpt.gpt_config is None
    assert list(ckpt.params) == ["token_embedding_table.weight"]
    res = run_main("np", ["sample", "--ckpt", out / "ckpt_last.npz", "--prompt", "A", "--max_new_tokens", 5], capsys)
    assert res.rc == 0 and len(res.out) == 1 + 5 + 1


def npz_arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@needs_data
def test_resume_is_bit_identical(tmp_path, capsys):
    """40 steps in one go == 20 steps, --resume, 20 more: parameters, AdamW moments, RNG, bit for bit.
    Dropout is on, so the dropout stream (GPT.rng) must be carried over too."""
    common = ["--dropout", 0.1, "--max_new_tokens", 0]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main("np", tiny_args(straight, "--max_iters", 40, *common), capsys).rc == 0
    assert run_main("np", tiny_args(split, "--max_iters", 20, "--lr_decay_iters", 40, *common), capsys).rc == 0
    assert load_npz(split / "ckpt_last.npz").iter_num == 20
    res = run_main("np", ["--resume", "--data", DATA, "--out_dir", split, "--max_iters", 40], capsys)
    assert res.rc == 0, res.err
    assert "resuming from" in res.out and "step 20" in res.out

    a, b = npz_arrays(straight / "ckpt_last.npz"), npz_arrays(split / "ckpt_last.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        if k != "meta":
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{k} differs after resume"
    meta_a, meta_b = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
    assert meta_a["rng"] == meta_b["rng"] and meta_a["iter_num"] == meta_b["iter_num"] == 40
    # metrics.jsonl of the resumed run holds each step once
    iters = [json.loads(line)["iter"] for line in (split / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "iter"]
    assert iters == [0, 10, 20, 30]


@needs_data
def test_resume_with_the_same_preset_and_a_new_learning_rate(tmp_path, capsys):
    """The same command line plus --resume continues the run; settings other than the shape may change."""
    out = tmp_path / "out"
    assert run_main("np", tiny_args(out, "--max_iters", 20), capsys).rc == 0
    res = run_main("np", tiny_args(out, "--max_iters", 30, "--learning_rate", 5e-4, "--resume"), capsys)
    assert res.rc == 0, res.err
    ckpt = load_npz(out / "ckpt_last.npz")
    assert ckpt.iter_num == 30 and ckpt.train_config["learning_rate"] == 5e-4


def test_default_preset_is_cpu():
    args = train_parser("train_np.py", "", "cpu").parse_args([])
    cfg = train_config_from_args(args, load_script("np").DEFAULT_PRESET)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.max_iters) == (4, 4, 128, 64, 2000)
    assert args.out_dir == "out"
