"""Nothing lost under concurrency and faults: the run directory, the flags, the writes, resuming, stops.

    1  one writer per --out_dir: a lock held for the whole run; a second run is one line naming the pid
    2  flags: no prefix abbreviations, contradictions refused, the last of a repeated flag, ~ everywhere
    3  every write guarded: a name that is a directory is refused before step 0, a full disk is one
       line naming the file with true advice, an out_dir with metrics but no checkpoint is no dead end
    4  --resume applies the flags it is given, the optimizer's hyperparameters included
    5  stops are prompt: between evaluation batches, during sampling; a second signal ends at once
    6  minor: a temperature too small to divide by, a text without a newline, a checkpoint's bad setting

Runs are tiny (one layer of 16 channels, two steps, a 9 KB text) and call main() in this process
wherever a real process is not the point (the lock between processes, a signal from outside).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_helpers import ROOT, SUBPROCESS_ENV, Result, assert_one_error_line, load_script, run_main

BACKENDS = ["np", "torch"]
EXT = {"np": ".npz", "torch": ".pt"}
SCRIPT = {"np": "train_np.py", "torch": "train_torch.py"}

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 60
TINY = ["--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 8, "--batch_size", 4, "--max_iters", 2,
        "--eval_interval", 2, "--eval_iters", 1, "--log_interval", 1, "--warmup_iters", 0, "--max_new_tokens", 5]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def backend_flags(backend: str) -> list:
    """The fastest way through each backend: the plain NumPy layers (no compilation), torch on the CPU."""
    return ["--device", "cpu"] if backend == "torch" else ["--reference"]


def train(backend: str, text: Path, out: Path, *extra, capsys) -> Result:
    return run_main(backend, ["--data", text, "--out_dir", out, *TINY, *backend_flags(backend), *extra], capsys)


def sample(backend: str, ckpt: Path, *extra, capsys) -> Result:
    return run_main(backend, ["sample", "--ckpt", ckpt, "--max_new_tokens", 5, *extra], capsys)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text) -> dict:
    """A finished two-step run of each script: {"np": out_dir, "torch": out_dir} (copy before changing)."""
    dirs = {}
    for backend in BACKENDS:
        out = tmp_path_factory.mktemp(f"finished_{backend}") / "out"
        argv = ["--data", text, "--out_dir", out, *TINY, *backend_flags(backend)]
        rc = load_script(backend).main([str(a) for a in argv])
        assert rc == 0
        dirs[backend] = out
    return dirs


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def not_trained(res: Result) -> None:
    assert "step 0:" not in res.out and "iter 0:" not in res.out, f"training started:\n{res.out}"


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- 1. one writer per run directory

# Starts `waves` rounds of `per_wave` train_np.py runs on one --out_dir, each round at one instant:
# one interpreter imports everything, then forks the runs, which wait for the same clock tick and
# call main() (stdout and stderr of each into files). Prints [{"wave", "pid", "rc"}, ...] as JSON.
FORK_DRIVER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import train_np, npgpt, npgpt.optim, gptapp.backends.numpy, matplotlib.pyplot
argv, waves, per_wave, logs = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
results = []
for wave in range(waves):
    t0 = time.time() + 0.3
    children = {}
    for i in range(per_wave):
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(f"{logs}/{wave}-{os.getpid()}.{name}", os.O_WRONLY | os.O_CREAT, 0o644), fd)
            while time.time() < t0:
                time.sleep(0.0005)
            try:
                rc = train_np.main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback; traceback.print_exc(); rc = 99
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
        children[pid] = wave
    for pid, w in children.items():
        _, status = os.waitpid(pid, 0)
        results.append({"wave": w, "pid": pid, "rc": os.waitstatus_to_exitcode(status)})
print(json.dumps(results))
"""


def start_together(text: Path, out: Path, logs: Path, waves: int, per_wave: int, *extra) -> list[dict]:
    logs.mkdir()
    argv = [str(a) for a in ["--data", text, "--out_dir", out, *TINY, "--reference", *extra]]
    p = subprocess.run([sys.executable, "-c", FORK_DRIVER, str(ROOT), json.dumps(argv), str(waves), str(per_wave),
                        str(logs)], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout.splitlines()[-1])
    for r in results:
        r["out"] = (logs / f"{r['wave']}-{r['pid']}.out").read_text()
        r["err"] = (logs / f"{r['wave']}-{r['pid']}.err").read_text()
    return results


def check_one_trains_per_wave(results: list[dict]) -> list[int]:
    """Per wave: exactly one run trains (exit 0), every other exits 2 with one line naming its pid."""
    winners = []
    for wave in sorted({r["wave"] for r in results}):
        runs = [r for r in results if r["wave"] == wave]
        won = [r for r in runs if r["rc"] == 0]
        assert len(won) == 1, f"wave {wave}: {len(won)} runs trained: " + "\n".join(
            f"{r['pid']} rc {r['rc']}: {r['err']}" for r in runs)
        winners.append(won[0]["pid"])
        for r in runs:
            if r is not won[0]:
                res = Result(r["rc"], r["out"], r["err"])
                assert_one_error_line(res, "locked", f"pid {won[0]['pid']}", rc=2)
                not_trained(res)
    return winners


def test_two_runs_started_at_the_same_instant_exactly_one_trains(text, tmp_path):
    out = tmp_path / "out"
    results = start_together(text, out, tmp_path / "logs", 1, 2)
    check_one_trains_per_wave(results)
    assert (out / "ckpt_last.npz").is_file()


def test_twenty_starts_never_lose_a_checkpoint(text, tmp_path):
    """Four rounds of five runs at one instant, each with --move_aside (as `make train`): each round's
    one trained run leaves its checkpoints, in out/ or moved aside into out/run-*/."""
    out = tmp_path / "out"
    results = start_together(text, out, tmp_path / "logs", 4, 5, "--move_aside")
    winners = check_one_trains_per_wave(results)
    runs = [out, *sorted(out.glob("run-*"))]
    assert len(runs) == len(winners), f"{len(winners)} runs trained, {len(runs)} runs are in {out}"
    for d in runs:
        for name in ("ckpt_last.npz", "ckpt_best.npz", "metrics.jsonl", "loss.png"):
            assert (d / name).is_file(), f"{d / name} is lost"
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.lock")), sorted(p.name for p in out.iterdir())


def start_long_run(text: Path, out: Path) -> subprocess.Popen:
    """A train_np.py run that goes on until stopped, once its first checkpoint is written."""
    argv = ["--data", text, "--out_dir", out, *TINY, "--reference", "--max_iters", 10 ** 7, "--eval_interval", 100]
    p = subprocess.Popen([sys.executable, str(ROOT / "train_np.py"), *map(str, argv)], env=SUBPROCESS_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 100:"):  # the evaluation's line; its checkpoint is written just after
            deadline = time.monotonic() + 60
            while not (out / "ckpt_last.npz").is_file() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if (out / "ckpt_last.npz").is_file():
                return p
            break
    p.kill()
    raise AssertionError(f"the long run ended: {p.communicate()[1]}")


def test_a_live_run_locks_its_out_dir_against_every_other_run_but_not_sample(text, tmp_path, capsys):
    out = tmp_path / "out"
    live = start_long_run(text, out)
    try:
        for flags in ([], ["--resume", "--max_iters", 10 ** 8], ["--overwrite"], ["--move_aside"]):
            res = train("np", text, out, *flags, capsys=capsys)
            assert_one_error_line(res, str(out), "locked", f"pid {live.pid}", rc=2)
            not_trained(res)
            assert (out / "ckpt_last.npz").is_file() and (out / "metrics.jsonl").is_file()
            assert not list(out.glob("run-*")), "a locked run was moved aside"
        res = sample("np", out / "ckpt_last.npz", capsys=capsys)  # reading needs no lock
        assert res.rc == 0, res.err
    finally:
        live.send_signal(signal.SIGTERM)
        rest, err = live.communicate(timeout=60)
    assert live.returncode == 128 + signal.SIGTERM, err
    assert not list(out.glob("*.lock")), "the lock outlived its run"
    step = int(err.split(" at step ")[1].split(";")[0])
    res = train("np", text, out, "--resume", "--max_iters", step + 2, capsys=capsys)
    assert res.rc == 0, res.err  # the directory is free again


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(text, tmp_path, capsys):
    from gptapp.run_dir import LOCK_NAME
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}) + "\n")
    res = train("np", text, out, capsys=capsys)
    assert res.rc == 0, res.err
    notes = [line for line in res.err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note:") and "stale" in notes[0] and f"pid {pid}" in notes[0], res.err
    assert not (out / LOCK_NAME).exists()


def test_a_refused_run_leaves_no_directory_and_no_lock_behind(text, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    res = train("np", text, out, "--n_head", 3, capsys=capsys)  # 16 channels do not split in 3 heads
    assert_one_error_line(res, "--n_embd", rc=2)
    assert not (tmp_path / "new").exists(), "the refused run left its --out_dir (and lock) behind"


@pytest.mark.parametrize("hard_links", [True, False])
def test_the_lock_refuses_a_second_holder_until_released(hard_links, tmp_path, monkeypatch, capsys):
    """In one process too (an flock belongs to an open file, not to a process); with and without hard
    links (some network and FUSE file systems have none)."""
    from gptapp.errors import UsageError
    from gptapp.run_dir import LOCK_NAME, lock_out_dir
    if not hard_links:
        import errno

        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    first = lock_out_dir(out)
    owner = json.loads((out / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(UsageError, match=f"locked by another run \\(pid {os.getpid()} on "):
        lock_out_dir(out)
    first.release()
    assert not (out / LOCK_NAME).exists() and not out.exists(), "the directory the lock created stays"
    second = lock_out_dir(out)
    (out / "metrics.jsonl").write_text("")
    second.release()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- 2. flags


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prefix_of_a_flag_is_an_error_not_the_flag(backend, finished, text, tmp_path, capsys):
    out = copy_run(finished[backend], tmp_path / "out")
    before = (out / f"ckpt_last{EXT[backend]}").read_bytes()
    res = train(backend, text, out, "--over", capsys=capsys)
    assert_one_error_line(res, "--over", rc=2)
    assert (out / f"ckpt_last{EXT[backend]}").read_bytes() == before
    res = run_main(backend, ["sample", "--ckpt", out / f"ckpt_last{EXT[backend]}", "--max_new", 3], capsys)
    assert_one_error_line(res, "unrecognized arguments: --max_new 3", rc=2)


@pytest.mark.parametrize("flags", [
    ("--overwrite", "--move_aside"),
    ("--resume", "--move_aside"),
    ("--resume", "--overwrite"),
    ("--resume", "--init_from"),
])
def test_contradictory_flags_are_refused_in_one_line(flags, finished, text, tmp_path, capsys):
    out = copy_run(finished["np"], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = [f if f != "--init_from" else f"--init_from={out / 'ckpt_best.npz'}" for f in flags]
    res = train("np", text, out, *argv, "--max_iters", 4, capsys=capsys)
    assert_one_error_line(res, *(f.split("=")[0] for f in flags), rc=2)
    not_trained(res)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("args,move_aside", [("--resume --max_iters 30", False), ("--overwrite", False),
                                             ("--max_iters 30", True), ("--move_aside", False)])
def test_make_train_passes_move_aside_only_where_it_agrees_with_args(args, move_aside, text):
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES")}
    for target in ("train", "train-torch"):
        p = subprocess.run(["make", "-n", "--no-print-directory", f"PY={sys.executable}", "BASE_STAMP=", "TRAIN_STAMP=",
                            "STAMP=", f"DATA={text}", target, f"ARGS={args}"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        command = [line for line in p.stdout.splitlines() if ".py" in line][-1]
        assert command.split().count("--move_aside") == (1 if move_aside or args == "--move_aside" else 0), command
        assert command.endswith(args), command


def test_a_flag_given_twice_keeps_the_last_value_and_the_settings_line_says_so(text, tmp_path, capsys):
    res = train("np", text, tmp_path / "out", "--max_iters", 3, "--max_iters", 2, "--move_aside", "--move_aside",
                capsys=capsys)
    assert res.rc == 0, res.err
    settings = [line for line in res.out.splitlines() if line.startswith("settings:")]
    assert len(settings) == 1 and " max_iters=2 " in settings[0] and " lr_decay_iters=2 " in settings[0], res.out
    assert "done: 2 steps" in res.out


def test_tilde_is_expanded_in_every_path_flag(text, tmp_path, capsys, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    shutil.copy(text, home / "input.txt")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    res = run_main("np", ["--data", "~/input.txt", "--out_dir", "~/out", *TINY, "--reference"], capsys)
    assert res.rc == 0, res.err
    assert (home / "out" / "ckpt_last.npz").is_file() and not (cwd / "~").exists()
    res = run_main("np", ["--data", "~/input.txt", "--out_dir", "~/out2", "--init_from", "~/out/ckpt_best.npz",
                          *TINY, "--reference"], capsys)
    assert res.rc == 0, res.err
    assert (home / "out2" / "ckpt_last.npz").is_file()
    res = run_main("np", ["sample", "--ckpt", "~/out2/ckpt_last.npz", "--max_new_tokens", 3], capsys)
    assert res.rc == 0, res.err
    assert not (cwd / "~").exists()


# --------------------------------------------------------------------------- 3. every write guarded


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss.png", "ckpt_last.npz", "ckpt_best.npz"])
def test_a_run_file_name_that_is_a_directory_is_refused_before_step_0(name, text, tmp_path, capsys):
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    res = train("np", text, out, capsys=capsys)
    assert_one_error_line(res, name, "directory", rc=2)
    not_trained(res)
    assert (out / name).is_dir()


def with_file_size_limit(limit: int, call):
    """call() with RLIMIT_FSIZE at `limit` bytes: a write past it fails with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        return call()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_at_the_first_save_is_one_line_with_true_advice(backend, text, tmp_path, capsys):
    out = tmp_path / "out"
    res = with_file_size_limit(16 << 10, lambda: train(backend, text, out, capsys=capsys))
    line = assert_one_error_line(res, "cannot write", f"ckpt_last{EXT[backend]}", rc=1)
    assert "unchanged" not in line and "--resume" not in line and "no checkpoint" in line, line
    assert "--overwrite" in line or "--move_aside" in line, line
    assert not list(out.glob(".*.tmp")) and not list(out.glob("ckpt_*"))


def test_torchs_serialisation_error_is_one_line_naming_the_checkpoint(text, tmp_path, capsys, monkeypatch):
    """torch.save reports a failed write of its zip container as a RuntimeError, not an OSError."""
    load_script("torch")
    import torch

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 6464 vs 6352")
    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "out"
    res = train("torch", text, out, capsys=capsys)
    line = assert_one_error_line(res, "cannot write checkpoint", "ckpt_last.pt", "unexpected pos 6464", rc=1)
    assert "enforce fail" not in line and "no checkpoint" in line, line
    assert not list(out.glob(".*.tmp")) and not list(out.glob("ckpt_*"))


def test_a_full_disk_while_logging_is_one_line_naming_metrics(text, tmp_path, capsys):
    out = tmp_path / "out"
    res = with_file_size_limit(400, lambda: train("np", text, out, "--max_iters", 20, "--eval_interval", 100,
                                                  capsys=capsys))
    line = assert_one_error_line(res, "cannot write", "metrics.jsonl", rc=1)
    assert "no checkpoint" in line, line


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_out_dir_holding_only_metrics_is_no_dead_end(backend, text, tmp_path, capsys):
    out = tmp_path / "out"
    res = train(backend, text, out, "--max_iters", 0, capsys=capsys)
    assert res.rc == 0 and not list(out.glob("ckpt_*")) and (out / "metrics.jsonl").is_file(), res.err
    fresh = train(backend, text, out, capsys=capsys)
    line = assert_one_error_line(fresh, "no checkpoint", "--overwrite", "--move_aside", rc=2)
    assert "--resume" not in line, line
    resumed = train(backend, text, out, "--resume", capsys=capsys)
    assert_one_error_line(resumed, "no checkpoint", "--overwrite", rc=2)
    moved = train(backend, text, out, "--move_aside", capsys=capsys)
    assert moved.rc == 0, moved.err


# --------------------------------------------------------------------------- 4. resume keeps what the user says

def saved_optimizer_groups(path: Path) -> list[dict]:
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)["optimizer"]
    parts = [state] if "param_groups" in state else list(state.values())
    return [{k: v for k, v in g.items() if k != "params"} for part in parts for g in part["param_groups"]]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torch_resume_applies_the_optimizer_flags_it_is_given(optimizer, text, tmp_path, capsys):
    out = tmp_path / "out"
    assert train("torch", text, out, "--optimizer", optimizer, capsys=capsys).rc == 0
    res = train("torch", text, out, "--resume", "--max_iters", 4, "--weight_decay", 0.25, "--beta1", 0.5,
                "--beta2", 0.75, "--muon_lr", 0.004, "--learning_rate", 0.002, capsys=capsys)
    assert res.rc == 0, res.err
    settings = next(line for line in res.out.splitlines() if line.startswith("settings:"))
    for shown in ("weight_decay=0.25", "beta1=0.5", "beta2=0.75", "muon_lr=0.004", "learning_rate=0.002"):
        assert f" {shown} " in settings, settings
    groups = saved_optimizer_groups(out / "ckpt_last.pt")
    adamw = [g for g in groups if "betas" in g]
    assert {g["weight_decay"] for g in adamw} == {0.25, 0.0} and {tuple(g["betas"]) for g in adamw} == {(0.5, 0.75)}
    muon = [g for g in groups if "betas" not in g]
    if optimizer == "muon":
        assert [g["weight_decay"] for g in muon] == [0.25], muon
        assert [g["lr_scale"] for g in muon] == [pytest.approx(0.004 / 0.002, rel=1e-15)], muon


def test_numpy_resume_applies_the_optimizer_flags_it_is_given(text, tmp_path, capsys):
    """The same resume with two weight decays ends in two different sets of weights."""
    base = tmp_path / "base"
    assert train("np", text, base, capsys=capsys).rc == 0
    weights = []
    for wd in (0.0, 0.9):
        out = copy_run(base, tmp_path / f"wd{wd}")
        res = train("np", text, out, "--resume", "--max_iters", 4, "--weight_decay", wd, capsys=capsys)
        assert res.rc == 0, res.err
        with np.load(out / "ckpt_last.npz") as f:
            weights.append(f["param/lm_head.weight"].copy())
    assert not np.array_equal(*weights)


# --------------------------------------------------------------------------- 5. stops are prompt

def signal_during(monkeypatch, owner, name: str, after: int, signals=(signal.SIGTERM,), limit: int = 50) -> dict:
    """Wrap owner.name (a function giving batches, or a generator method) so that its `after`-th call
    (or item) sends `signals` to this process; more than `limit` later ones fail the test at once."""
    seen = {"calls": 0, "after_signal": 0}
    original = getattr(owner, name)

    def count():
        seen["calls"] += 1
        if seen["calls"] == after:
            for sig in signals:
                os.kill(os.getpid(), sig)
        elif seen["calls"] > after:
            seen["after_signal"] += 1
            if seen["after_signal"] > limit:
                raise AssertionError(f"{limit} batches after the stop signal")

    if name == "rank_share":
        def wrapped(self, *args, **kwargs):
            for item in original(self, *args, **kwargs):
                count()
                yield item
    else:
        def wrapped(*args, **kwargs):
            count()
            return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapped)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stop_during_evaluation_takes_effect_between_batches(backend, text, tmp_path, capsys, monkeypatch):
    load_script(backend)
    if backend == "np":
        import gptapp.backends.numpy as owner
        seen = signal_during(monkeypatch, owner, "get_batch", after=3)
    else:
        from torchgpt.runtime import DeviceBatches as owner
        seen = signal_during(monkeypatch, owner, "rank_share", after=3)
    out = tmp_path / "out"
    res = train(backend, text, out, "--eval_iters", 100_000, capsys=capsys)
    assert seen["after_signal"] <= 2, seen
    assert_one_error_line(res, "interrupted", "SIGTERM", "step 0", rc=128 + signal.SIGTERM)
    assert (out / f"ckpt_last{EXT[backend]}").is_file()


def test_a_second_stop_signal_ends_at_once():
    from gptapp.cli import run_cli
    from gptapp.run_log import StopRequest

    def train_command(argv):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # a handler runs between bytecodes
            raise AssertionError("the second SIGTERM did not end the run")

    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_cli([], train_command, None)
    assert rc == 128 + signal.SIGTERM, err.getvalue()
    assert_one_error_line(Result(rc, "", err.getvalue()), "interrupted", "SIGTERM", rc=128 + signal.SIGTERM)


def test_a_stop_during_sampling_is_prompt_and_one_line(finished, tmp_path):
    cmd = [sys.executable, str(ROOT / "train_np.py"), "sample", "--ckpt", str(finished["np"] / "ckpt_last.npz"),
           "--num_samples", "1000000", "--max_new_tokens", "20"]
    p = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("-----"):  # sampling has begun
                break
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert time.monotonic() - t0 < 5
    assert_one_error_line(Result(p.returncode, "", err), "interrupted", "SIGTERM", rc=128 + signal.SIGTERM)


# --------------------------------------------------------------------------- 6. minor


@pytest.mark.parametrize("value", ["1e-320", "1e-280"])
def test_a_temperature_too_small_to_divide_by_is_refused(value, finished, text, tmp_path, capsys):
    res = sample("np", finished["np"] / "ckpt_last.npz", "--temperature", value, capsys=capsys)
    assert_one_error_line(res, "--temperature", value, rc=2)
    res = train("np", text, tmp_path / "out", "--temperature", value, capsys=capsys)
    assert_one_error_line(res, "--temperature", rc=2)
    not_trained(res)
    assert sample("np", finished["np"] / "ckpt_last.npz", "--temperature", "1e-3", capsys=capsys).rc == 0


def test_a_text_without_a_newline_is_refused_for_what_the_text_lacks(tmp_path, capsys):
    text = tmp_path / "one_line.txt"
    text.write_text(TEXT.replace("\n", " "), encoding="utf-8")
    res = train("np", text, tmp_path / "out", capsys=capsys)
    line = assert_one_error_line(res, "newline", str(text), "--prompt", rc=2)
    assert "change the prompt" not in line, line
    not_trained(res)


def rewrite_train_config(path: Path, **changes) -> None:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"][()]))
    meta["train_config"].update(changes)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def test_a_bad_setting_in_a_checkpoint_is_reported_as_the_checkpoints(finished, text, tmp_path, capsys):
    out = copy_run(finished["np"], tmp_path / "out")
    rewrite_train_config(out / "ckpt_last.npz", learning_rate=-1.0)
    res = train("np", text, out, "--resume", "--max_iters", 4, capsys=capsys)
    line = assert_one_error_line(res, str(out / "ckpt_last.npz"), "learning_rate", rc=2)
    assert "--learning_rate" not in line, line
    not_trained(res)
