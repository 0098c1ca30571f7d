"""Issue 18, hostile sizes and files: every setting and every checkpoint is checked before work.

    budget      absurd sizes (flags, or a checkpoint's config) refused in one line before anything is
                built; the presets pass
    headers     an .npz is read by its zip directory and .npy headers first: a header claiming a huge
                shape, a zip bomb, nested meta JSON refused before any array is read
    fields      every field of a checkpoint (ours and nanoGPT's) checked by type and range: iter_num,
                best_val_loss, RNG state, optimizer step and state shapes, the vocabulary
    kind        a file's kind told by its bytes, not its name; float64 weights refused in both formats
    data        a UTF-8 byte order mark at the start of the text is no vocabulary character

Hostile files are built small in tmp_path (a crafted .npy header, a zip that declares a huge size);
nothing here allocates more than a few MB. Runs are in-process; a subprocess only where the defect
is a hang or an out-of-memory kill (it gets a memory limit and a timeout) or to show one line.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import resource
import signal
import struct
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from train_helpers import (
    ROOT,
    SUBPROCESS_ENV,
    Result,
    assert_one_error_line,
    load_script,
    needs_data,
    run_main,
    tiny_args,
)

from gptapp.budget import BudgetError, check_training_budget, parameter_count, parameter_tensor_count
from gptapp.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_npz, save_npz
from gptapp.data import read_text_file
from gptapp.settings import PRESETS
from npgpt.config import GPTConfig
from npgpt.model import init_params, param_shapes

CFG = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False)
VOCAB = "\nabcd"


# --------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def time_limit(seconds: float):
    """TimeoutError if the block runs longer than `seconds` (a hang shows as a failure, not a stuck run)."""
    class Expired(Exception):
        pass

    def expired(signum, frame):
        raise Expired
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Expired:  # a fresh exception: the interrupted frames are of no interest (and may be odd)
        raise AssertionError(f"still running after {seconds} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def limited_run(backend: str, argv: list, cwd, timeout: float = 60, memory_gb: float | None = None) -> Result:
    """The script as a subprocess with an address-space limit (an allocation past it is a MemoryError,
    not the OOM killer) and a timeout (a hang is a failure)."""
    def limit():
        if memory_gb is not None:
            size = int(memory_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
    script = ROOT / ("train_np.py" if backend == "np" else "train_torch.py")
    try:
        p = subprocess.run([sys.executable, str(script), *map(str, argv)], cwd=cwd, env=SUBPROCESS_ENV,
                           capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired as exc:
        return Result(-9, str(exc.stdout or ""), f"timed out after {timeout} s\n{exc.stderr or ''}")
    return Result(p.returncode, p.stdout, p.stderr)


def tiny_checkpoint(config: GPTConfig = CFG, vocab: str = VOCAB, **fields) -> Checkpoint:
    return Checkpoint(backend="numpy", model="gpt", gpt_config=config, vocab=vocab,
                      params=init_params(config, seed=0), **fields)


def npz_members(path) -> dict:
    """{member name: bytes} of a zip archive, in order."""
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def write_zip(path, members: dict, compress: dict | None = None) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_header(shape: tuple, descr: str = "<f4") -> bytes:
    """A .npy file's header alone, claiming `shape` (the data after it may be anything)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz_with_meta(path, meta_changes: dict | None = None, meta_text: str | None = None, params=None, optim=None):
    """An .npz checkpoint of the tiny CFG model written member by member, its meta edited."""
    meta = {"format": "npgpt-checkpoint", "version": 1, "backend": "numpy", "model": "gpt",
            "gpt_config": CFG.to_dict(), "train_config": None, "vocab": VOCAB, "iter_num": 0,
            "best_val_loss": math.inf, "rng": None}
    meta.update(meta_changes or {})
    members = {"meta.npy": npy_bytes(np.array(meta_text if meta_text is not None else json.dumps(meta)))}
    for k, v in (params if params is not None else init_params(CFG, seed=0)).items():
        members[f"param/{k}.npy"] = npy_bytes(np.asarray(v))
    for k, v in (optim or {}).items():
        members[f"optim/{k}.npy"] = npy_bytes(np.asarray(v))
    write_zip(path, members)
    return path


def set_declared_size(path, member: str, size: int) -> None:
    """Rewrite the uncompressed size that the zip's local header and central directory declare for
    `member` (the bytes stay what they are)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for sig, size_at, name_len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        start = 0
        while (start := data.find(sig, start)) >= 0:
            n = struct.unpack_from("<H", data, start + name_len_at)[0]
            if data[start + name_at:start + name_at + n] == name:
                struct.pack_into("<I", data, start + size_at, size)
            start += 4
    path.write_bytes(bytes(data))


def nanogpt_file(path, **arg_changes):
    """A nanoGPT-style ckpt.pt of the tiny CFG model (GPT-2 names; its args edited)."""
    import torch
    args = {"n_layer": CFG.n_layer, "n_head": CFG.n_head, "n_embd": CFG.n_embd, "block_size": CFG.block_size,
            "bias": CFG.bias, "vocab_size": CFG.vocab_size, "dropout": 0.0}
    extra = {k: arg_changes.pop(k) for k in ("iter_num", "best_val_loss") if k in arg_changes}
    args.update(arg_changes)
    sd = {k: torch.from_numpy(v) for k, v in init_params(CFG, seed=0).items()}
    torch.save({"model": sd, "model_args": args, "iter_num": 0, "best_val_loss": torch.tensor(2.0), **extra}, path)
    return path


def torch_file(path, config: GPTConfig = CFG, **changes):
    import torch
    payload = {"format": "npgpt-checkpoint", "version": 1, "backend": "torch", "model": "gpt",
               "gpt_config": config.to_dict(), "train_config": {}, "vocab": VOCAB,
               "model_state": {k: torch.from_numpy(v) for k, v in init_params(CFG, seed=0).items()},
               "optimizer": {}, "iter_num": 0, "best_val_loss": 2.5, "rng": {}}
    payload.update(changes)
    torch.save(payload, path)
    return path


def read_pt(path):
    from gptapp.torch_checkpoint import load_torch_checkpoint
    return load_torch_checkpoint(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished two-step tiny run of each script, evaluated and saved at steps 1 and 2."""
    out = {}
    for backend in ("np", "torch"):
        d = tmp_path_factory.mktemp(f"run_{backend}")
        argv = [*map(str, tiny_args(d / "out", "--max_iters", 2, "--eval_interval", 1, "--max_new_tokens", 2))]
        argv += ["--device", "cpu"] if backend == "torch" else []
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = load_script(backend).main(argv)
        assert rc == 0, err.getvalue()
        out[backend] = d / "out"
    return out


# --------------------------------------------------------------------------- budget

ABSURD = [("--n_embd", 1_000_000), ("--mlp_hidden", 10 ** 12), ("--batch_size", 10 ** 20)]


@needs_data
@pytest.mark.parametrize("flag,value", ABSURD, ids=[f[2:] for f, _ in ABSURD])
@pytest.mark.parametrize("backend", ["np", "torch"])
def test_an_absurd_size_is_refused_before_work_in_one_line(backend, flag, value, tmp_path, capsys):
    argv = tiny_args(tmp_path / "out", flag, value) + (["--device", "cpu"] if backend == "torch" else [])
    res = run_main(backend, argv, capsys)
    line = assert_one_error_line(res, flag, "available", rc=2)
    assert f"lower {flag}" in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@needs_data
@pytest.mark.parametrize("backend,flag,value", [("np", "--batch_size", 10_000_000), ("np", "--n_layer", 1_000_000),
                                                ("torch", "--block_size", 100_000)],
                         ids=["np-batch_size", "np-n_layer", "torch-block_size"])
def test_sizes_that_exhaust_the_machine_are_refused_at_once(backend, flag, value, tmp_path):
    argv = tiny_args(tmp_path / "out", flag, value) + (["--device", "cpu"] if backend == "torch" else [])
    res = limited_run(backend, argv, tmp_path, timeout=60, memory_gb=8 if backend == "np" else None)
    line = assert_one_error_line(res, flag, "needs", "available", rc=2)
    assert f"lower {flag}" in line, line


def test_the_parameter_count_of_the_estimate_is_the_models():
    cases = [CFG, GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
             GPTConfig(vocab_size=65, block_size=64, n_layer=3, n_head=4, n_embd=128, bias=True, tie_weights=False),
             GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=16, norm="rmsnorm", pos_emb="rope",
                       qk_norm=True, activation="swiglu", mlp_hidden=40, bias=True)]
    for config in cases:
        shapes = param_shapes(config)
        assert parameter_count(config) == sum(math.prod(s) for s in shapes.values()), config
        assert parameter_tensor_count(config) == len(shapes), config


@pytest.mark.parametrize("preset", ["cpu", "nanogpt-cpu", "modern-cpu", "tiny", "bigram"])
def test_the_cpu_presets_fit_a_small_machine(preset):
    """Both backends, against 4 GB: the presets meant for a CPU must never be refused on a laptop."""
    for backend in ("numpy", "torch"):
        check_training_budget(PRESETS[preset], 65, backend=backend, device="cpu", available=4 * 10 ** 9)


@pytest.mark.parametrize("preset", ["shakespeare-char", "modern-gpu", "lecture"])
def test_the_gpu_presets_fit_a_16_gb_gpu_and_a_cpu(preset):
    check_training_budget(PRESETS[preset], 65, backend="torch", device="cuda", available=16 * 10 ** 9)
    check_training_budget(PRESETS[preset], 65, backend="numpy", device="cpu", available=16 * 10 ** 9)


def test_the_budget_names_the_flag_that_drives_the_estimate():
    tiny = PRESETS["tiny"]
    for field, value in (("batch_size", 10_000_000), ("n_layer", 1_000_000), ("n_embd", 1_000_000),
                         ("block_size", 100_000), ("mlp_hidden", 10 ** 12)):
        with pytest.raises(BudgetError, match=f"lower --{field}$"):
            check_training_budget(replace(tiny, **{field: value}), 65, backend="numpy", device="cpu",
                                  available=22 * 10 ** 9)


@pytest.mark.parametrize("kind", ["npz", "pt", "nanogpt"])
def test_a_checkpoint_config_with_absurd_sizes_is_refused_before_building_anything(kind, tmp_path):
    huge = {**CFG.to_dict(), "n_layer": 10 ** 8}
    if kind == "npz":
        path = npz_with_meta(tmp_path / "c.npz", {"gpt_config": huge})
    elif kind == "pt":
        path = torch_file(tmp_path / "c.pt", gpt_config=huge)
    else:
        path = nanogpt_file(tmp_path / "ckpt.pt", n_layer=10 ** 8)
    from gptapp.torch_checkpoint import load_torch_checkpoint
    with time_limit(10), pytest.raises(CheckpointError, match="n_layer"):
        load_checkpoint(path, torch_loader=load_torch_checkpoint)


# --------------------------------------------------------------------------- headers first

def test_an_npy_header_claiming_a_huge_shape_is_refused_before_reading(tmp_path):
    members = npz_members(npz_with_meta(tmp_path / "ok.npz"))
    members["param/transformer.wte.weight.npy"] = npy_header((10 ** 12,)) + b"\0" * 4096
    path = tmp_path / "huge.npz"
    write_zip(path, members)
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight.*1000000000000"):
        load_npz(path)


@needs_data
@pytest.mark.parametrize("command", ["sample", "init_from"])
def test_an_npy_header_claiming_a_huge_shape_is_one_line_in_sample_and_init_from(command, runs, tmp_path):
    members = npz_members(runs["np"] / "ckpt_last.npz")
    members["param/transformer.wte.weight.npy"] = npy_header((10 ** 12,)) + b"\0" * 4096
    path = tmp_path / "huge.npz"
    write_zip(path, members)
    argv = (["sample", "--ckpt", path, "--max_new_tokens", 2] if command == "sample"
            else tiny_args(tmp_path / "out", "--init_from", path, "--max_iters", 1))
    res = limited_run("np", argv, tmp_path, memory_gb=8)
    assert_one_error_line(res, str(path), "transformer.wte.weight", rc=2)


def test_a_zip_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    """A member that declares 3 GiB and holds a deflate stream of zeros: refused from the zip's
    directory, with none of the stream inflated."""
    members = npz_members(npz_with_meta(tmp_path / "ok.npz"))
    name = "param/transformer.wte.weight.npy"
    declared = 3 * 2 ** 30
    members[name] = npy_header((declared // 4,)) + bytes(32 * 2 ** 20)  # 32 MiB of zeros: ~32 KiB deflated
    path = tmp_path / "bomb.npz"
    write_zip(path, members, compress={name: zipfile.ZIP_DEFLATED})
    set_declared_size(path, name, len(npy_header((declared // 4,))) + declared)
    assert path.stat().st_size < 2 ** 20
    inflated = []
    real_read = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        data = real_read(self, n)
        if self.name == name:
            inflated.append(len(data))
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    with pytest.raises(CheckpointError, match="transformer.wte.weight"):
        load_npz(path)
    assert sum(inflated) < 2 ** 16, f"{sum(inflated)} bytes of {name} were inflated before the refusal"


def test_deeply_nested_meta_json_is_one_line(tmp_path):
    path = npz_with_meta(tmp_path / "deep.npz", meta_text="[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="nested"):
        try:
            load_npz(path)
        except RecursionError:
            raise AssertionError("load_npz raised RecursionError") from None


# --------------------------------------------------------------------------- fields

@pytest.mark.parametrize("field,value", [("best_val_loss", "abc"), ("iter_num", [1, 2]), ("iter_num", -3),
                                         ("best_val_loss", float("nan"))],
                         ids=["best_val_loss_text", "iter_num_list", "iter_num_negative", "best_val_loss_nan"])
def test_nanogpt_fields_are_checked(field, value, tmp_path):
    path = nanogpt_file(tmp_path / "ckpt.pt", **{field: value})
    with pytest.raises(CheckpointError, match=field):
        read_pt(path)


@pytest.mark.parametrize("field,value", [("iter_num", -1), ("iter_num", 2.5), ("iter_num", True),
                                         ("best_val_loss", "abc"), ("best_val_loss", -1.0)],
                         ids=["iter_negative", "iter_fraction", "iter_bool", "best_text", "best_negative"])
@pytest.mark.parametrize("kind", ["npz", "pt"])
def test_our_fields_are_checked(kind, field, value, tmp_path):
    if kind == "npz":
        path = npz_with_meta(tmp_path / "c.npz", {field: value})
    else:
        path = torch_file(tmp_path / "c.pt", **{field: value})
    with pytest.raises(CheckpointError, match=field):
        read_pt(path) if kind == "pt" else load_npz(path)


@needs_data
@pytest.mark.parametrize("what", ["rng_negative", "rng_huge", "step_negative"])
def test_numpy_resume_with_a_bad_rng_state_or_step_is_one_line(what, runs, tmp_path, capsys):
    members = npz_members(runs["np"] / "ckpt_last.npz")
    meta = json.loads(str(np.load(io.BytesIO(members["meta.npy"]))[()]))
    if what == "rng_negative":
        meta["rng"]["data"]["state"]["state"] = -5
    elif what == "rng_huge":
        meta["rng"]["dropout"]["state"]["inc"] = 2 ** 200
    else:
        members["optim/step.npy"] = npy_bytes(np.array(-3, dtype=np.int64))
    members["meta.npy"] = npy_bytes(np.array(json.dumps(meta)))
    out = tmp_path / "out"
    out.mkdir()
    write_zip(out / "ckpt_last.npz", members)
    res = run_main("np", tiny_args(out, "--resume", "--max_iters", 4), capsys)
    assert_one_error_line(res, "ckpt_last.npz", "rng" if what.startswith("rng") else "step", rc=2)


@needs_data
def test_numpy_resume_with_train_config_disagreeing_with_gpt_config_is_one_line(runs, tmp_path, capsys):
    members = npz_members(runs["np"] / "ckpt_last.npz")
    meta = json.loads(str(np.load(io.BytesIO(members["meta.npy"]))[()]))
    meta["train_config"]["n_layer"] = meta["gpt_config"]["n_layer"] + 1
    members["meta.npy"] = npy_bytes(np.array(json.dumps(meta)))
    out = tmp_path / "out"
    out.mkdir()
    write_zip(out / "ckpt_last.npz", members)
    res = run_main("np", tiny_args(out, "--resume", "--max_iters", 4), capsys)
    assert_one_error_line(res, "ckpt_last.npz", "n_layer", rc=2)


@needs_data
def test_torch_resume_with_an_optimizer_state_of_the_wrong_shape_is_one_line(runs, tmp_path, capsys):
    import torch
    payload = torch.load(runs["torch"] / "ckpt_last.pt", weights_only=True)
    first = next(iter(payload["optimizer"]["state"]))
    payload["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3)
    out = tmp_path / "out"
    out.mkdir()
    torch.save(payload, out / "ckpt_last.pt")
    res = run_main("torch", tiny_args(out, "--resume", "--max_iters", 4, "--device", "cpu"), capsys)
    assert_one_error_line(res, "ckpt_last.pt", "optimizer", "shape", rc=2)


@pytest.mark.parametrize("kind", ["npz", "pt"])
def test_a_vocabulary_with_a_lone_surrogate_is_refused(kind, tmp_path):
    vocab = "\nab\ud800d"
    if kind == "npz":
        save_npz(tmp_path / "c.npz", tiny_checkpoint(vocab=vocab))
        call = lambda: load_npz(tmp_path / "c.npz")  # noqa: E731
    else:
        torch_file(tmp_path / "c.pt", vocab=vocab)
        call = lambda: read_pt(tmp_path / "c.pt")  # noqa: E731
    with pytest.raises(CheckpointError, match="surrogate"):
        call()


def test_the_duplicate_character_check_is_linear():
    V = 10 ** 6
    codes = [c for c in range(0x100, 0x100 + V + 2048) if not 0xD800 <= c < 0xE000][:V - 1]
    vocab = "".join(map(chr, codes)) + chr(codes[0])  # one duplicate, at the end
    config = GPTConfig(vocab_size=V, block_size=2, n_layer=1, n_head=1, n_embd=2)
    ckpt = Checkpoint(backend="numpy", model="gpt", gpt_config=config, vocab=vocab,
                      params={k: np.zeros(s, np.float32) for k, s in param_shapes(config).items()})
    with time_limit(20), pytest.raises(CheckpointError, match="duplicate"):
        ckpt.check()


# --------------------------------------------------------------------------- kind by bytes

@needs_data
@pytest.mark.parametrize("backend", ["np", "torch"])
def test_resume_tells_a_checkpoint_by_its_bytes_not_its_name(backend, runs, tmp_path, capsys):
    """Each script's ckpt_last holding the other script's file: the line says what the file is."""
    other = "torch" if backend == "np" else "np"
    src = runs[other] / f"ckpt_last{'.pt' if other == 'torch' else '.npz'}"
    out = tmp_path / "out"
    out.mkdir()
    name = "ckpt_last.npz" if backend == "np" else "ckpt_last.pt"
    (out / name).write_bytes(src.read_bytes())
    argv = tiny_args(out, "--resume", "--max_iters", 4) + (["--device", "cpu"] if backend == "torch" else [])
    res = run_main(backend, argv, capsys)
    line = assert_one_error_line(res, name, rc=2)
    said = "pytorch" if other == "torch" else "numpy"
    assert said in line.lower() and "install torch" not in line and "corrupt" not in line, line


def test_float64_weights_are_refused_in_an_npz_as_in_a_pt(tmp_path):
    params = {k: v.astype(np.float64) for k, v in init_params(CFG, seed=0).items()}
    save_npz(tmp_path / "c.npz", Checkpoint(backend="numpy", model="gpt", gpt_config=CFG, vocab=VOCAB, params=params))
    with pytest.raises(CheckpointError, match="float64"):
        load_npz(tmp_path / "c.npz")


# --------------------------------------------------------------------------- data

def test_a_byte_order_mark_is_dropped_from_the_text_with_a_note(tmp_path, capsys):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    text = read_text_file(path)
    assert text == "hello\nworld\n"
    err = capsys.readouterr().err
    assert "byte order mark" in err and str(path) in err, err


@pytest.mark.parametrize("field,what", [("eval_iters", "one evaluation"), ("gradient_accumulation_steps", "one step")])
def test_a_step_or_evaluation_that_would_take_hours_is_refused(field, what):
    """Memory is no bound on the work of one step's micro-batches or one evaluation's batches; the
    time is: a stop waits for the step or evaluation under way."""

    with pytest.raises(BudgetError, match=f"makes {what} .* lower --{field}$"):
        check_training_budget(replace(PRESETS["tiny"], **{field: 10 ** 12}), 65, backend="numpy", device="cpu",
                              available=22 * 10 ** 9)
