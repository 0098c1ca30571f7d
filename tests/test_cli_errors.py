"""Bad input and faults, in both scripts: each ends in one line on stderr ("error: ..." naming the
problem and the fix), a non-zero exit status and no traceback, and loses nothing: the checkpoints on
disk stay as they were (or, for Ctrl-C, a fresh one is saved first).

Most cases call main(argv) in this process (fast); those about a real process (a traceback reaching
the terminal, SIGINT) run the script as a subprocess.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoint_helpers import CFG, Evil, make_checkpoint, torch_payload
from train_helpers import (
    DATA,
    ROOT,
    SCRIPTS,
    SUBPROCESS_ENV,
    assert_one_error_line,
    run_main,
    run_subprocess,
    tiny_args,
    tiny_runs,  # noqa: F401  (a session fixture)
)

from gptapp.checkpoint import load_checkpoint, save_npz
from gptapp.errors import UsageError
from npgpt.model import init_params
from gptapp.torch_checkpoint import load_torch_checkpoint, save_torch_checkpoint

BACKENDS = ["np", "torch"]
EXT = {"np": ".npz", "torch": ".pt"}


def cpu(backend: str) -> list:
    return ["--device", "cpu"] if backend == "torch" else []


@pytest.fixture
def runs(tiny_runs):
    """A finished 20-step `tiny` run of each script: {"np": out_dir, "torch": out_dir} (read-only)."""
    return tiny_runs


def copy_run(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name.startswith("ckpt_")}


# --------------------------------------------------------------------------- the training text

@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_data_file(backend, tmp_path, capsys):
    res = run_main(backend, ["--preset", "tiny", "--data", tmp_path / "nope.txt", "--out_dir", tmp_path / "o",
                             *cpu(backend)], capsys)
    assert_one_error_line(res, "not found", "nope.txt", "--data")


def test_missing_data_file_in_a_real_process(tmp_path):
    """The same, end to end: what reaches the terminal is the one line, nothing else."""
    res = run_subprocess("np", ["--preset", "tiny", "--data", tmp_path / "nope.txt", "--out_dir", tmp_path / "o"],
                         cwd=tmp_path)
    assert_one_error_line(res, "not found", "--data", rc=2)
    assert res.out == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_data_path(backend, tmp_path, capsys):
    res = run_main(backend, ["--preset", "tiny", "--data", tmp_path, "--out_dir", tmp_path / "o", *cpu(backend)],
                   capsys)
    assert_one_error_line(res, "not a file", "--data")


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_file_without_read_permission(backend, tmp_path, capsys, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("x" * 1000)
    f.chmod(0)
    if os.geteuid() == 0:  # root reads any file whatever its mode: make the read fail as it would
        real_read_bytes = type(f).read_bytes

        def read_bytes(path):
            if path == f:
                raise PermissionError(13, "Permission denied", str(path))
            return real_read_bytes(path)

        monkeypatch.setattr(type(f), "read_bytes", read_bytes)
    res = run_main(backend, ["--preset", "tiny", "--data", f, "--out_dir", tmp_path / "o", *cpu(backend)], capsys)
    assert_one_error_line(res, "cannot read", "permission")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("text,words", [("hello world", ["11 characters", "block_size=16", "17"]),
                                        ("abcdefghij" * 10, ["val split", "block_size + 1 = 17"])],
                         ids=["shorter_than_block", "val_split_too_short"])
def test_text_too_short(backend, text, words, tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text(text)
    res = run_main(backend, ["--preset", "tiny", "--data", f, "--out_dir", tmp_path / "o", *cpu(backend)], capsys)
    assert_one_error_line(res, *words, "--block_size")


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_not_utf8(backend, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Ni\u00f1o y ni\u00f1a. ".encode("latin-1") * 50)
    res = run_main(backend, ["--preset", "tiny", "--data", f, "--out_dir", tmp_path / "o", *cpu(backend)], capsys)
    assert_one_error_line(res, "not UTF-8", "0xf1", "iconv")


# --------------------------------------------------------------------------- flags

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags,words", [
    (["--n_layer", "0"], ["--n_layer=0", "positive"]),
    (["--learning_rate", "nan"], ["--learning_rate", "finite"]),
    (["--dropout", "1.5"], ["--dropout", "[0, 1)"]),
    (["--n_embd", "33"], ["--n_embd", "divisible", "--n_head"]),
    (["--max_iters", "abc"], ["--max_iters", "invalid int value"]),
    (["--bias", "maybe"], ["--bias", "true or false"]),
    (["--preset", "gigantic"], ["--preset", "invalid choice", "tiny"]),
    (["--no_such_flag", "1"], ["unrecognized arguments", "--no_such_flag"]),
    (["--resume", "--init_from", "x.npz"], ["--resume", "--init_from", "pick one"]),
    (["--top_p", "nan"], ["--top_p", "(0, 1]"]),
], ids=["n_layer", "learning_rate", "dropout", "n_embd", "max_iters", "bias", "preset", "unknown", "resume_init",
        "top_p"])
def test_invalid_flags(backend, flags, words, tmp_path, capsys):
    res = run_main(backend, ["--data", DATA, "--out_dir", tmp_path / "o", *cpu(backend), "--preset", "tiny", *flags]
                   if "--preset" not in flags else ["--data", DATA, "--out_dir", tmp_path / "o", *flags], capsys)
    assert_one_error_line(res, *words, rc=2)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("flags,words", [
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device", "cuda"]),
    (["--device", "tpu"], ["--device", "not a device"]),
    (["--dtype", "float16"], ["--dtype", "invalid choice"]),
])
def test_invalid_torch_flags(flags, words, tmp_path, capsys):
    res = run_main("torch", ["--preset", "tiny", "--data", DATA, "--out_dir", tmp_path / "o", *flags], capsys)
    assert_one_error_line(res, *words, rc=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags,words", [
    (["--temperature", "-1"], ["--temperature", ">= 0"]),
    (["--top_k", "-3"], ["--top_k", ">= 0"]),
    (["--top_p", "0"], ["--top_p", "(0, 1]"]),
    (["--top_p", "1.5"], ["--top_p", "(0, 1]"]),
    (["--top_p", "nan"], ["--top_p", "(0, 1]"]),
    (["--max_new_tokens", "many"], ["--max_new_tokens", "integer"]),
    ([], ["--ckpt", "required"]),
])
def test_invalid_sample_flags(backend, flags, words, runs, capsys):
    ckpt = [] if not flags else ["--ckpt", runs[backend] / f"ckpt_last{EXT[backend]}"]
    res = run_main(backend, ["sample", *ckpt, *flags], capsys)
    assert_one_error_line(res, *words, rc=2)


# --------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_with_characters_outside_the_vocabulary(backend, runs, capsys):
    res = run_main(backend, ["sample", "--ckpt", runs[backend] / f"ckpt_last{EXT[backend]}", "--prompt",
                             "Caf\u00e9 \u00fcber \u00e9", *cpu(backend)], capsys)
    line = assert_one_error_line(res, "--prompt", "2 character(s) not in the vocabulary", "change the prompt", rc=2)
    assert "'\u00e9'" in line and "'\u00fc'" in line


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_longer_than_block_size_is_cropped(backend, runs, capsys):
    prompt = "ROMEO: " * 5  # 35 characters, block_size 16
    res = run_main(backend, ["sample", "--ckpt", runs[backend] / f"ckpt_last{EXT[backend]}", "--prompt", prompt,
                             "--max_new_tokens", 10, *cpu(backend)], capsys)
    assert res.rc == 0 and "Traceback" not in res.err
    assert res.err_lines == ["note: the prompt has 35 characters but block_size is 16; the model sees only its last 16"]
    assert res.out.startswith(prompt) and len(res.out) == len(prompt) + 10 + 1


class WordTokenizer:
    """A stand-in for a tokenizer other than characters (GPT-2's BPE): one token per word."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def test_prompt_longer_than_the_context_of_a_non_character_tokenizer_is_refused():
    from gptapp.autocomplete import check_prompt
    check_prompt(WordTokenizer(), "one two three four", block_size=4)  # fits exactly
    with pytest.raises(UsageError, match=r"encodes to 5 tokens but the model's context \(block_size\) is 4; "
                                         r"shorten the prompt to at most 4 tokens"):
        check_prompt(WordTokenizer(), "one two three four five", block_size=4)
    check_prompt(WordTokenizer(), "one two three four five", block_size=None)  # a bigram model: no context


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_missing(backend, tmp_path, capsys):
    res = run_main(backend, ["sample", "--ckpt", tmp_path / "nope.pt", *cpu(backend)], capsys)
    assert_one_error_line(res, "checkpoint not found", "nope.pt", rc=2)
    res = run_main(backend, ["--resume", "--data", DATA, "--out_dir", tmp_path, *cpu(backend)], capsys)
    assert_one_error_line(res, "--resume", "no checkpoint", "without --resume", rc=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_the_other_backends_run(backend, runs, capsys):
    other = "torch" if backend == "np" else "np"
    res = run_main(backend, ["--resume", "--data", DATA, "--out_dir", runs[other], *cpu(backend)], capsys)
    assert_one_error_line(res, "--resume", "--init_from", rc=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", BACKENDS)
def test_checkpoint_truncated(backend, source, runs, tmp_path, capsys):
    data = (runs[source] / f"ckpt_last{EXT[source]}").read_bytes()
    path = tmp_path / f"cut{EXT[source]}"
    path.write_bytes(data[: len(data) * 2 // 3])
    res = run_main(backend, ["sample", "--ckpt", path, *cpu(backend)], capsys)
    assert_one_error_line(res, "truncated or corrupt", str(path), rc=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_of_the_other_format_with_a_mismatched_shape(backend, tmp_path, capsys):
    """A .pt read by train_np.py and an .npz read by train_torch.py whose wpe does not fit block_size."""
    params = init_params(CFG, seed=0)
    params["transformer.wpe.weight"] = np.zeros((4, CFG.n_embd), np.float32)
    if backend == "np":
        path = tmp_path / "bad.pt"
        save_torch_checkpoint(path, torch_payload(params))
    else:
        path = tmp_path / "bad.npz"
        ckpt = make_checkpoint()
        ckpt.params = params
        save_npz(path, ckpt)
    res = run_main(backend, ["sample", "--ckpt", path, *cpu(backend)], capsys)
    assert_one_error_line(res, "transformer.wpe.weight has shape (4, 8) but the model needs (8, 8)", rc=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_from_with_a_conflicting_shape_flag(backend, runs, tmp_path, capsys):
    other = "torch" if backend == "np" else "np"
    res = run_main(backend, tiny_args(tmp_path / "o", "--init_from", runs[other] / f"ckpt_last{EXT[other]}",
                                      "--n_layer", 3, *cpu(backend)), capsys)
    assert_one_error_line(res, "--n_layer=3", "n_layer=2", "drop the flag", rc=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [".pt", ".npz"])
def test_pickle_that_would_run_code_is_refused(backend, kind, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{kind}"
    if kind == ".pt":
        torch.save({"model": {"w": Evil(marker)}, "model_args": {}}, path)
    else:
        np.savez(path, meta=np.array([Evil(marker)], dtype=object))
    res = run_main(backend, ["sample", "--ckpt", path, *cpu(backend)], capsys)
    assert_one_error_line(res, "refused", "pickled", "run code", rc=2)
    assert not marker.exists(), "the pickle's code ran"


# --------------------------------------------------------------------------- faults during a run

@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dir_not_writable(backend, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = run_main(backend, tiny_args(blocker / "out", *cpu(backend)), capsys)
    assert_one_error_line(res, "--out_dir", "not writable", rc=2)
    assert "parameters" not in res.out, "training started before the check"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(backend, runs, tmp_path, capsys):
    out = copy_run(runs[backend], tmp_path / "run")
    before = snapshot(out)
    res = run_main(backend, ["--resume", "--data", DATA, "--out_dir", out, "--max_iters", 60,
                             "--learning_rate", 1e30, "--decay_lr", "false", *cpu(backend)], capsys)
    assert_one_error_line(res, "not finite", "at step", "last good checkpoint", f"ckpt_last{EXT[backend]} (step 20)",
                          "--learning_rate", rc=1)
    assert snapshot(out) == before, "a checkpoint changed after the loss blew up"


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_checkpoint_write_keeps_the_previous_one(backend, runs, tmp_path, capsys, monkeypatch):
    """The writer dies halfway (disk full) during a save in training: exit 1, old checkpoint intact."""
    out = copy_run(runs[backend], tmp_path / "run")
    before = snapshot(out)

    def half_then_disk_full(*args, **kwargs):
        f = args[1] if backend == "torch" else args[0]
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    if backend == "torch":
        monkeypatch.setattr(torch, "save", half_then_disk_full)
    else:
        monkeypatch.setattr(np, "savez", half_then_disk_full)
    res = run_main(backend, ["--resume", "--data", DATA, "--out_dir", out, "--max_iters", 40, *cpu(backend)], capsys)
    assert_one_error_line(res, "cannot write checkpoint", "No space left", "unchanged", rc=1)
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_saves_a_checkpoint_and_exits_130(backend, tmp_path, capsys):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / f"{SCRIPTS[backend]}.py"),
           *map(str, tiny_args(out, "--max_iters", 100000, "--eval_interval", 100000, *cpu(backend)))]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        for line in p.stdout:
            if line.startswith("iter 10:"):
                break
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted (SIGINT) at step "), err
    assert "--resume" in lines[0]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    loader = load_torch_checkpoint if backend == "torch" else None
    ckpt = load_checkpoint(out / f"ckpt_last{EXT[backend]}", torch_loader=loader)
    assert ckpt.iter_num == step >= 11
    # ... and the run goes on from there
    res = run_main(backend, ["--resume", "--data", DATA, "--out_dir", out, "--max_iters", step + 2,
                             "--max_new_tokens", 5, *cpu(backend)], capsys)
    assert res.rc == 0, res.err
    assert f"resuming from {out / ('ckpt_last' + EXT[backend])} at step {step}" in res.out
