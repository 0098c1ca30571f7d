"""Issue 10, "nothing lost, nothing wasted": one test per numbered problem, run as a user runs the
scripts (the command line through the script's main() in the test's own process and working
directory; `make`, and Ctrl-C under torchrun, in real processes), asserting the fixed behaviour;
and, for problem 6, one test per guard that fails when the guard is removed.

    1  a fresh run never destroys an earlier one; a NaN stop's advice resumes the run that stopped
    2  a run that will fail at its end (the prompt, the seed) fails at its start
    3  no input gives a traceback (seeds, damaged vocabularies, Ctrl-C under torchrun)
    4  the words: what a file is, whole sentences, --max_iters 0, make DATA=, ignored flags
    5  no litter from an interrupted save
    6  the guards of the schedule, the sampler, the checkpoint reader, the text reader, the fsyncs
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import (
    DATA,
    ROOT,
    SUBPROCESS_ENV,
    Result,
    assert_one_error_line,
    load_script,
    needs_data,
    tiny_args,
    tiny_runs,  # noqa: F401  (a session fixture)
    working_directory,
)

# The training application moves out of npgpt into gptapp (issue 9): take each name from where it is.
try:
    from gptapp.checkpoint import Checkpoint, CheckpointError, atomic_write, load_npz, save_npz
except ImportError:
    from npgpt.checkpoint import Checkpoint, CheckpointError, atomic_write, load_npz, save_npz
try:
    from gptapp.data import read_text_file
except ImportError:
    from npgpt.data import read_text_file
from npgpt.config import GPTConfig
from npgpt.model import init_params
from npgpt.optim import cosine_lr
from npgpt.sampling import sample_next

BACKENDS = ["np", "torch"]
EXT = {"np": ".npz", "torch": ".pt"}
SCRIPT = {"np": "train_np.py", "torch": "train_torch.py"}


def cpu(backend: str) -> list:
    return ["--device", "cpu"] if backend == "torch" else []


def torch_io():
    """(load_torch_checkpoint, save_torch_checkpoint) from wherever they live."""
    try:
        from gptapp.torch_checkpoint import load_torch_checkpoint, save_torch_checkpoint
    except ImportError:
        from torchgpt.train_utils import load_torch_checkpoint, save_torch_checkpoint
    return load_torch_checkpoint, save_torch_checkpoint


def read_any(path):
    if str(path).endswith(".pt"):
        return torch_io()[0](path)
    return load_npz(path)


def run(backend: str, argv: list, cwd) -> Result:
    """The command `train_np.py ARGV` (or train_torch.py) in the working directory cwd: main(argv) in
    this process, its stdout, stderr and exit status (argparse's SystemExit counts as one). A
    traceback would be an exception here, and fail the test; tests/test_cli_errors.py runs the real
    process too."""
    out, err = io.StringIO(), io.StringIO()
    with working_directory(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = load_script(backend).main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(rc, out.getvalue(), err.getvalue())


def files_of_a_run(directory) -> dict:
    """{name: bytes} of what a run leaves: checkpoints, metrics.jsonl, loss.png."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and (p.name.startswith("ckpt_") or p.name in ("metrics.jsonl", "loss.png"))}


def all_file_bytes(directory) -> set:
    return {p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_no_training(res: Result, out_dir) -> None:
    """The command failed before any training step: no step logged, nothing saved."""
    assert "iter 0:" not in res.out and "step 0:" not in res.out, f"training started:\n{res.out}"
    assert not (out_dir.exists() and list(out_dir.glob("ckpt_*"))), "a checkpoint was written"


@pytest.fixture
def runs(tiny_runs):
    """A finished 20-step `tiny` run of each script (seed 1337): {"np": out_dir, "torch": out_dir},
    read-only (tests that change a run copy it first)."""
    return tiny_runs


# --------------------------------------------------------------------------- 1. work destroyed

@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fresh_run_in_a_used_out_dir_is_refused_and_keeps_the_earlier_run(backend, runs, tmp_path):
    """The README's next command after Ctrl-C (the same command again) must not replace the checkpoint."""
    out = copy_run(runs[backend], tmp_path / "out")
    before = files_of_a_run(out)
    res = run(backend, tiny_args(out, "--max_iters", 2, *cpu(backend)), cwd=tmp_path)
    assert_one_error_line(res, "--resume", "--overwrite", "--out_dir", str(out), rc=2)
    assert "iter 0:" not in res.out
    assert files_of_a_run(out) == before, "the earlier run's files changed"


@needs_data
def test_overwrite_starts_a_new_run_in_a_used_out_dir(runs, tmp_path):
    out = copy_run(runs["np"], tmp_path / "out")
    res = run("np", tiny_args(out, "--max_iters", 4, "--eval_interval", 2, "--overwrite"), cwd=tmp_path)
    assert res.rc == 0, res.err
    assert load_npz(out / "ckpt_last.npz").iter_num == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [0, 2, 4], "the old run's history is mixed in"


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_advice_after_a_nan_stop_resumes_the_run_that_stopped(backend, runs, tmp_path):
    """out_dir holds run A (seed 1337, 20 steps); run B (seed 7) replaces it and blows up at step 0,
    before saving anything. Following the advice must never continue A, nor mix their histories."""
    out = copy_run(runs[backend], tmp_path / "out")
    res = run(backend, tiny_args(out, "--overwrite", "--seed", 7, "--learning_rate", 1e30, "--decay_lr", "false",
                                 *cpu(backend)), cwd=tmp_path)
    line = assert_one_error_line(res, "not finite", "at step", rc=1)
    again = run(backend, tiny_args(out, "--resume", "--learning_rate", 1e-3, "--max_iters", 30, *cpu(backend)),
                cwd=tmp_path)
    assert "resuming from" not in again.out or "at step 20" not in again.out, "--resume continued the older run A"
    if "--resume" in line:  # the advice says resume: then there is a checkpoint of B to resume
        assert again.rc == 0, again.err
        assert read_any(out / f"ckpt_last{EXT[backend]}").train_config["seed"] == 7
    else:
        assert_one_error_line(again, "--resume", rc=2)
    assert "no checkpoint" in line.lower(), line
    if (out / "metrics.jsonl").exists():
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert not [r for r in records if r["iter"] == 20], "run A's history is still in metrics.jsonl"


def make_env() -> dict:
    """The environment for a `make` inside the tests: not the jobserver of the `make test` around us."""
    return {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES")}


def make(*args, timeout: float = 300) -> Result:
    """`make ARGS` in the repository with this interpreter, never (re)installing the virtual environment."""
    cmd = ["make", "--no-print-directory", f"PY={sys.executable}", "BASE_STAMP=", "TRAIN_STAMP=", "STAMP=", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=make_env(), capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_data
@needs_make
def test_make_train_twice_in_a_row_just_works_and_keeps_the_first_run(tmp_path):
    out = tmp_path / "out"
    args = f"ARGS=--out_dir {out} --preset tiny --max_iters 2 --eval_interval 2 --max_new_tokens 5"
    dry = make("-n", "train", f"DATA={DATA}", args)
    assert str(out) in dry.out, f"make train does not pass ARGS on (it would run the default training):\n{dry.out}"
    first = make("train", f"DATA={DATA}", args)
    assert first.rc == 0, first.err
    kept = (out / "ckpt_last.npz").read_bytes()
    second = make("train", f"DATA={DATA}", args)
    assert second.rc == 0, second.err
    assert "Traceback" not in second.err
    assert (out / "ckpt_last.npz").is_file()
    assert kept in all_file_bytes(tmp_path), "the first run's checkpoint is gone"


@needs_make
@pytest.mark.parametrize("target", ["train", "train-torch"])
def test_make_train_passes_args_through(target):
    dry = make("-n", target, "ARGS=--resume --max_iters 3000")
    assert dry.rc == 0, dry.err
    command = [line for line in dry.out.splitlines() if "train_np.py" in line or "train_torch.py" in line]
    assert command and "--resume --max_iters 3000" in command[-1], dry.out


# --------------------------------------------------------------------------- 2. work thrown away

@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prompt_outside_the_vocabulary_fails_before_training(backend, tmp_path):
    out = tmp_path / "out"
    res = run(backend, tiny_args(out, "--prompt", "\u00e9", *cpu(backend)), cwd=tmp_path)
    assert_one_error_line(res, "--prompt", "'\u00e9'", rc=2)
    assert_no_training(res, out)


@needs_data
def test_the_default_prompt_and_a_text_without_newlines_fail_before_training(tmp_path):
    text = tmp_path / "one_line.txt"
    text.write_text(DATA.read_text(encoding="utf-8")[:20000].replace("\n", " "), encoding="utf-8")
    out = tmp_path / "out"
    res = run("np", ["--preset", "tiny", "--data", text, "--out_dir", out], cwd=tmp_path)
    assert_one_error_line(res, "--prompt", "'\\n'", rc=2)
    assert_no_training(res, out)


# --------------------------------------------------------------------------- 3. tracebacks

BIG = "100000000000000000000000"  # 1e23 written out: an integer, but not a seed any generator takes


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", ["-1", BIG])
def test_a_seed_out_of_range_is_one_line_before_training(backend, seed, tmp_path):
    out = tmp_path / "out"
    res = run(backend, tiny_args(out, "--seed", seed, *cpu(backend)), cwd=tmp_path)
    assert_one_error_line(res, "--seed", rc=2)
    assert_no_training(res, out)


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", ["-1", BIG])
def test_a_seed_out_of_range_in_sample_is_one_line(backend, seed, runs, tmp_path):
    res = run(backend, ["sample", "--ckpt", runs[backend] / f"ckpt_last{EXT[backend]}", "--seed", seed,
                        "--max_new_tokens", 5, *cpu(backend)], cwd=tmp_path)
    assert_one_error_line(res, "--seed", rc=2)


def npz_with_vocab(path, vocab):
    cfg = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8)
    save_npz(path, Checkpoint(backend="numpy", model="gpt", gpt_config=cfg, vocab=vocab,
                              params=init_params(cfg, seed=0)))
    return path


def pt_with(path, **changes):
    """A valid train_torch.py-style .pt of a tiny GPT, with some payload entries replaced."""
    import torch
    cfg = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8)
    payload = {"format": "npgpt-checkpoint", "version": 1, "backend": "torch", "model": "gpt",
               "gpt_config": cfg.to_dict(), "train_config": {}, "vocab": "abcde",
               "model_state": {k: torch.from_numpy(np.array(v)) for k, v in init_params(cfg, seed=0).items()},
               "optimizer": {}, "iter_num": 0, "best_val_loss": 2.5, "rng": {}}
    payload.update(changes)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("vocab,words", [("abcda", ["vocabulary", "duplicate"]), (12345, ["vocabulary", "string"])],
                         ids=["duplicates", "not_a_string"])
@pytest.mark.parametrize("kind", [".npz", ".pt"])
def test_a_checkpoint_with_a_bad_vocabulary_is_one_line(kind, vocab, words, tmp_path):
    path = (npz_with_vocab(tmp_path / "bad.npz", vocab) if kind == ".npz"
            else pt_with(tmp_path / "bad.pt", vocab=vocab))
    backend = "np" if kind == ".npz" else "torch"
    res = run(backend, ["sample", "--ckpt", path, "--max_new_tokens", 5, *cpu(backend)], cwd=tmp_path)
    assert_one_error_line(res, str(path), *words, rc=2)


@needs_data
def test_ctrl_c_under_torchrun_every_rank_saves_once_and_exits_130(tmp_path):
    """The two ranks as torchrun starts them, in one process group. Ctrl-C in a terminal reaches every
    process of the group, and torchrun forwards it to each rank once more a moment later: that second
    SIGINT is the same request, not a second Ctrl-C. Rank 0 says so in one line, rank 1 says nothing."""
    from ddp_helpers import ddp_env, free_port
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train_torch.py"),
           *map(str, tiny_args(out, "--max_iters", 100000, "--eval_interval", 100000, "--device", "cpu",
                               "--gradient_accumulation_steps", 2))]  # one micro-batch per rank
    port = free_port()
    env = {r: ddp_env(port, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", TORCHELASTIC_RUN_ID="test")
           for r in (0, 1)}
    rank0 = subprocess.Popen(cmd, cwd=tmp_path, env=env[0], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, process_group=0)
    rank1 = subprocess.Popen(cmd, cwd=tmp_path, env=env[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, process_group=rank0.pid)
    try:
        for line in rank0.stdout:
            if line.startswith("iter 10:"):
                break
        os.killpg(rank0.pid, signal.SIGINT)  # the terminal
        time.sleep(0.05)
        os.killpg(rank0.pid, signal.SIGINT)  # torchrun passing it on
        err0 = rank0.communicate(timeout=120)[1]
        err1 = rank1.communicate(timeout=120)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rank0.pid, signal.SIGKILL)
    assert "Traceback" not in err0 + err1, err0 + err1
    assert (rank0.returncode, rank1.returncode) == (130, 130), err0 + err1
    lines = [x for x in err0.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted (SIGINT) at step "), err0
    assert "--resume" in lines[0]
    assert not [x for x in err1.splitlines() if x.strip()], f"rank 1 printed:\n{err1}"
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert read_any(out / "ckpt_last.pt").iter_num == step >= 11


# --------------------------------------------------------------------------- 4. wrong or missing words

def test_a_text_file_named_npz_is_called_what_it_is(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    res = run("np", ["sample", "--ckpt", path], cwd=tmp_path)
    line = assert_one_error_line(res, str(path), "text", rc=2)
    assert "pickle" not in line.lower(), line


def test_the_truncated_pt_message_is_never_cut_mid_sentence(runs, tmp_path):
    import torch
    whole = (runs["torch"] / "ckpt_last.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(Exception) as raised:
        torch.load(path, weights_only=True)
    torch_says = " ".join(str(raised.value).split())
    res = run("torch", ["sample", "--ckpt", path, "--device", "cpu"], cwd=tmp_path)
    line = assert_one_error_line(res, str(path), "truncated or corrupt", rc=2)
    assert line.endswith("train again"), line
    quoted = re.search(r"truncated or corrupt \((.*)\); ", line)
    if quoted and quoted.group(1) in torch_says:  # quoting torch's words: whole sentences of them
        rest = torch_says[torch_says.index(quoted.group(1)) + len(quoted.group(1)):]
        assert rest == "" or rest[0] == "." or quoted.group(1).endswith("."), f"cut mid-sentence: {line}"


@needs_data
@pytest.mark.parametrize("kind", [".npz", ".pt"])
def test_a_checkpoint_with_nan_parameters_is_refused(kind, tmp_path):
    cfg = GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = init_params(cfg, seed=0)
    params["lm_head.weight" if "lm_head.weight" in params else "transformer.wte.weight"][3, 2] = np.nan
    vocab = "".join(sorted(set(DATA.read_text(encoding="utf-8"))))
    if kind == ".npz":
        path = tmp_path / "nan.npz"
        save_npz(path, Checkpoint(backend="numpy", model="gpt", gpt_config=cfg, vocab=vocab, params=params))
    else:
        import torch
        path = pt_with(tmp_path / "nan.pt", gpt_config=cfg.to_dict(), vocab=vocab,
                       model_state={k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    res = run("np", ["sample", "--ckpt", path, "--max_new_tokens", 20], cwd=tmp_path)
    assert_one_error_line(res, str(path), "not finite", rc=2)
    out = tmp_path / "out"
    res = run("np", tiny_args(out, "--init_from", path), cwd=tmp_path)
    assert_one_error_line(res, str(path), "not finite", rc=2)
    assert_no_training(res, out)


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_iters_0_says_what_it_saved(backend, tmp_path):
    out = tmp_path / "out"
    res = run(backend, tiny_args(out, "--max_iters", 0, *cpu(backend)), cwd=tmp_path)
    assert res.rc == 0, res.err
    saved = sorted(p.name for p in out.glob("ckpt_*"))
    assert ("checkpoints in" in res.out) == bool(saved), f"saved {saved}, but the output says:\n{res.out}"
    if not saved:
        assert re.search(r"nothing was saved|no checkpoint", res.out, re.I), res.out


@needs_make
def test_make_train_refuses_a_data_path_that_does_not_exist(tmp_path):
    typo = tmp_path / "typo" / "input.txt"
    dry = make("-n", "train", f"DATA={typo}")
    assert str(typo) in dry.out + dry.err, f"make train drops DATA= (it would train on something else):\n{dry.out}"
    res = make("train", f"DATA={typo}", f"ARGS=--out_dir {tmp_path / 'out'} --preset tiny --max_iters 2")
    assert res.rc != 0
    assert str(typo) in res.out + res.err and "iter 0:" not in res.out
    assert not (tmp_path / "out").exists()


@needs_data
def test_vocab_without_init_from_is_refused(tmp_path):
    out = tmp_path / "out"
    res = run("np", tiny_args(out, "--vocab", DATA), cwd=tmp_path)
    assert_one_error_line(res, "--vocab", "--init_from", rc=2)
    assert_no_training(res, out)


@needs_data
def test_a_shape_flag_with_a_bigram_init_from_is_refused(tmp_path):
    bigram = tmp_path / "bigram"
    res = run("np", ["--preset", "bigram", "--data", DATA, "--out_dir", bigram, "--max_iters", 2, "--eval_iters", 1,
                     "--max_new_tokens", 5], cwd=tmp_path)
    assert res.rc == 0, res.err
    out = tmp_path / "out"
    res = run("np", tiny_args(out, "--init_from", bigram / "ckpt_last.npz", "--n_layer", 3), cwd=tmp_path)
    assert_one_error_line(res, "--n_layer", "bigram", rc=2)
    assert_no_training(res, out)


@needs_data
def test_an_empty_out_dir_is_refused(tmp_path):
    res = run("np", tiny_args("", "--max_iters", 2), cwd=tmp_path)
    assert_one_error_line(res, "--out_dir", rc=2)
    assert not list(tmp_path.iterdir()), "files were written into the working directory"


@needs_data
def test_move_aside_keeps_the_earlier_run_in_a_subfolder_and_says_where(runs, tmp_path):
    out = copy_run(runs["np"], tmp_path / "out")
    before = files_of_a_run(out)
    res = run("np", tiny_args(out, "--max_iters", 2, "--eval_interval", 2, "--move_aside"), cwd=tmp_path)
    assert res.rc == 0, res.err
    aside = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert len(aside) == 1 and files_of_a_run(aside[0]) == before
    assert f"moved the earlier run in {out} to {aside[0]}" in res.out
    assert load_npz(out / "ckpt_last.npz").iter_num == 2


def help_entries(text: str) -> dict:
    """{"--flag": its help text} from argparse's --help output."""
    entries, name = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)(?:,\s+(--[\w-]+))?", line)
        if m:
            name = m.group(2) or m.group(1)
            entries[name] = line[m.end():]
        elif name and line.startswith("    "):
            entries[name] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items() if k not in ("-h", "--help")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_train_flag_says_what_it_does_and_its_default(backend, tmp_path):
    res = run(backend, ["--help"], cwd=tmp_path)
    assert res.rc == 0, res.err
    assert f"{SCRIPT[backend]} sample --ckpt PATH" in res.out.split("options:")[0], "the usage hides `sample`"
    entries = help_entries(res.out)
    assert {"--data", "--out_dir", "--resume", "--overwrite", "--move_aside", "--init_from", "--seed",
            "--learning_rate", "--preset"} <= set(entries)
    for name, text in entries.items():
        assert "default" in text, f"{name}: no default in its help: {text!r}"
        assert len(text.split("default")[0].split()) >= 2, f"{name}: its help does not say what it does: {text!r}"
    for name in ("--learning_rate", "--n_layer", "--max_iters", "--seed"):
        assert "the preset's" in entries[name] and "tiny" in entries[name] and "cpu" in entries[name], entries[name]
    assert re.search(r"lecture: .*2-core CPU", entries["--preset"]), "the lecture preset's CPU cost is not stated"


def test_every_setting_and_preset_has_a_help_text():
    """A new TrainConfig field or preset needs its line in FIELD_HELP / PRESET_HELP (gptapp.settings)."""
    from dataclasses import fields

    from gptapp.settings import FIELD_HELP, PRESET_HELP, PRESETS, TrainConfig
    assert {f.name for f in fields(TrainConfig)} == set(FIELD_HELP)
    assert set(PRESETS) == set(PRESET_HELP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_flag_says_what_it_does_and_its_default(backend, tmp_path):
    res = run(backend, ["sample", "--help"], cwd=tmp_path)
    assert res.rc == 0, res.err
    entries = help_entries(res.out)
    assert {"--ckpt", "--prompt", "--prompt_file", "--num_samples", "--max_new_tokens", "--temperature",
            "--top_k", "--seed"} <= set(entries)
    for name, text in entries.items():
        assert "default" in text or "required" in text, f"{name}: no default in its help: {text!r}"


@needs_data
def test_the_resolved_settings_are_printed_once_at_the_start(tmp_path):
    res = run("np", tiny_args(tmp_path / "out", "--max_iters", 0, "--learning_rate", 0.002), cwd=tmp_path)
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    settings = [i for i, x in enumerate(lines) if x.startswith("settings: ")]
    assert len(settings) == 1 and settings[0] < 3, res.out
    shown = lines[settings[0]]
    assert "learning_rate=0.002" in shown and "n_layer=2" in shown and "lr_decay_iters=0" in shown, shown


@needs_data
def test_sample_takes_num_samples_and_a_prompt_file(runs, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\nWhat say", encoding="utf-8")
    ckpt = runs["np"] / "ckpt_last.npz"
    base = ["sample", "--ckpt", ckpt, "--max_new_tokens", 12]
    three = run("np", [*base, "--prompt_file", prompt, "--num_samples", 3, "--seed", 5], cwd=tmp_path)
    assert three.rc == 0 and three.err == "", three.err
    samples = three.out.split("---------------\n")
    assert len(samples) == 3 and all(x.startswith("ROMEO:\nWhat say") for x in samples), three.out
    assert len(set(samples)) == 3, "the samples are all the same"
    one = run("np", [*base, "--prompt", "ROMEO:\nWhat say", "--seed", 6], cwd=tmp_path)
    assert one.out == samples[1], "the second sample is not the one of seed + 1"
    both = run("np", [*base, "--prompt", "x", "--prompt_file", prompt], cwd=tmp_path)
    assert_one_error_line(both, "--prompt", "--prompt_file", rc=2)


# --------------------------------------------------------------------------- 5. litter

@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_leftovers_of_an_interrupted_save_are_removed(backend, runs, tmp_path):
    out = copy_run(runs[backend], tmp_path / "out")
    ext = EXT[backend]
    leftovers = [out / f".ckpt_last{ext}.k3j4h_9x.tmp", out / f".ckpt_best{ext}.0a1b2c3d.tmp"]
    for p in leftovers:
        p.write_bytes(b"PK\x03\x04 half a checkpoint")
    theirs = out / "notes.tmp"  # not ours: stays
    theirs.write_text("the user's own file")
    res = run(backend, ["--resume", "--data", DATA, "--out_dir", out, "--max_iters", 22, "--max_new_tokens", 5,
                        *cpu(backend)], cwd=tmp_path)
    assert res.rc == 0, res.err
    assert not [p for p in leftovers if p.exists()], "the leftover temporary checkpoints are still there"
    assert theirs.read_text() == "the user's own file"
    assert read_any(out / f"ckpt_last{ext}").iter_num == 22


# --------------------------------------------------------------------------- 6. guards no test held

def test_cosine_lr_with_lr_decay_iters_not_after_warmup():
    """Without the `lr_decay_iters <= warmup_iters` guard, step 2 divides 0 by 0."""
    lrs = [cosine_lr(it, 1e-3, warmup_iters=2, lr_decay_iters=2, min_lr=1e-4) for it in range(5)]
    assert lrs == [1e-3 * 1 / 3, 1e-3 * 2 / 3, 1e-4, 1e-4, 1e-4]
    # bitwise: the warmup's own expression, learning_rate * (it + 1) / (warmup_iters + 1)
    assert cosine_lr(3, 1e-3, warmup_iters=5, lr_decay_iters=2, min_lr=1e-4) == 1e-3 * 4 / 6
    assert cosine_lr(7, 1e-3, warmup_iters=5, lr_decay_iters=2, min_lr=1e-4) == 1e-4


@needs_data
def test_train_np_with_lr_decay_iters_equal_to_warmup_iters(tmp_path):
    res = run("np", tiny_args(tmp_path / "out", "--warmup_iters", 2, "--lr_decay_iters", 2, "--max_iters", 4,
                              "--log_interval", 1, "--max_new_tokens", 5), cwd=tmp_path)
    assert res.rc == 0 and "Traceback" not in res.err, res.err
    lrs = {int(m[0]): m[1] for m in re.findall(r"^iter (\d+): loss [\d.]+, lr ([\d.e+-]+),", res.out, re.M)}
    assert lrs == {0: "3.33e-04", 1: "6.67e-04", 2: "1.00e-04", 3: "1.00e-04"}, res.out


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, -0.5])
def test_sample_next_refuses_a_temperature_that_is_not_finite_and_positive(bad):
    with pytest.raises(ValueError, match="temperature"):
        sample_next(np.zeros((1, 5)), temperature=bad, rng=np.random.default_rng(0))


@pytest.mark.parametrize("bad", [True, False, 0, -2, 2.0])
def test_sample_next_refuses_a_top_k_that_is_not_a_positive_integer(bad):
    with pytest.raises(ValueError, match="top_k"):
        sample_next(np.zeros((1, 5)), temperature=1.0, top_k=bad, rng=np.random.default_rng(0))


def small_checkpoint(**changes) -> Checkpoint:
    cfg = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8)
    fields = dict(backend="numpy", model="gpt", gpt_config=cfg, vocab="abcde", params=init_params(cfg, seed=0))
    return Checkpoint(**{**fields, **changes})


def rewrite_npz_meta(path, **changes) -> None:
    """Edit the JSON `meta` entry of an .npz checkpoint in place (what a newer program would write)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"][()]))
    meta.update(changes)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


@pytest.mark.parametrize("kind", [".npz", ".pt"])
def test_a_checkpoint_of_another_format_version_is_refused(kind, tmp_path):
    path = tmp_path / f"v2{kind}"
    if kind == ".npz":
        save_npz(path, small_checkpoint())
        rewrite_npz_meta(path, version=2)
    else:
        pt_with(path, version=2)
    with pytest.raises(CheckpointError, match="version 2"):
        read_any(path)


@pytest.mark.parametrize("kind", [".npz", ".pt"])
def test_a_checkpoint_with_integer_parameters_is_refused(kind, tmp_path):
    params = {k: np.zeros(v.shape, np.int32) for k, v in small_checkpoint().params.items()}
    path = tmp_path / f"int{kind}"
    if kind == ".npz":
        save_npz(path, small_checkpoint(params=params))
    else:
        import torch
        pt_with(path, model_state={k: torch.from_numpy(v) for k, v in params.items()})
    with pytest.raises(CheckpointError, match="floating"):
        read_any(path)


@pytest.mark.parametrize("kind", [".npz", ".pt"])
def test_a_checkpoint_whose_vocabulary_is_shorter_than_vocab_size_is_refused(kind, tmp_path):
    path = tmp_path / f"short{kind}"
    if kind == ".npz":
        save_npz(path, small_checkpoint(vocab="abcd"))
    else:
        pt_with(path, vocab="abcd")
    with pytest.raises(CheckpointError, match="4 characters"):
        read_any(path)


@pytest.mark.parametrize("raw", [b"a\r\nb", b"a\rb\r\n\r", b"\r\n"])
def test_read_text_file_translates_no_newlines(raw, tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(raw)
    assert read_text_file(path) == raw.decode("ascii")


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append("rename")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "ckpt_last.npz"
    atomic_write(target, lambda f: f.write(b"new"))
    assert events == ["fsync file", "rename", "fsync dir"]
    assert target.read_bytes() == b"new"
