"""torchgpt's runtime helpers on a CPU: TF32 flags readable through both torch APIs, a generator
state saved on another device type, and the device/dtype/peak-FLOPS rules, with torch.cuda's
queries monkeypatched to stand in for GPUs that are not here; and the CUDA-path rules of the loop
and the torch backend that a CPU can reach: one kernel a step for the non-finite watch, one
checkpoint write per evaluation, the compile warm-up and MFU from step 5, a GPU run resumed on a CPU."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from checkpoint_helpers import CFG, torch_payload
from train_helpers import DATA, needs_data, run_main, tiny_args

import gptapp.backends.numpy
import gptapp.backends.torch
from gptapp.backends.torch import TorchBackend, TorchOptions
from gptapp.checkpoint import CheckpointError, atomic_write, link_or_copy, load_checkpoint
from gptapp.settings import PRESETS
from gptapp.torch_checkpoint import load_torch_checkpoint, save_torch_checkpoint
from npgpt.data import CharTokenizer, train_val_split
from npgpt.model import init_params

from torchgpt.runtime import (
    CUDA_GENERATOR_STATE_BYTES,
    DeviceError,
    LossWatch,
    gpu_peak_flops,
    has_native_bf16,
    peak_flops,
    pick_device,
    pick_dtype,
    restore_generator_state,
    seed_from_state,
    set_tf32,
)

# --------------------------------------------------------------------------- TF32 flags

MATMUL, CUDNN = torch.backends.cuda.matmul, torch.backends.cudnn


def has_new_api() -> bool:
    """torch 2.9 on: per-backend fp32_precision beside the legacy allow_tf32 flags."""
    try:
        return isinstance(MATMUL.fp32_precision, str) and hasattr(CUDNN, "conv")
    except AttributeError:
        return False


HAS_NEW_API = has_new_api()


@pytest.fixture
def tf32_flags():
    """Leave the process's TF32 flags as they were (other tests in this process read them)."""
    saved = (MATMUL.allow_tf32, CUDNN.allow_tf32)
    yield
    MATMUL.allow_tf32, CUDNN.allow_tf32 = saved


def tf32_readings() -> dict:
    """Every TF32 flag through both APIs; a reading that raises is the failure under test."""
    out = {"allow_tf32": MATMUL.allow_tf32, "matmul_precision": torch.get_float32_matmul_precision(),
           "cudnn.allow_tf32": CUDNN.allow_tf32}
    if HAS_NEW_API:
        out.update({"matmul.fp32_precision": MATMUL.fp32_precision, "conv": CUDNN.conv.fp32_precision,
                    "rnn": CUDNN.rnn.fp32_precision})
    return out


def poison_with_new_api() -> None:
    """What the old set_tf32 left behind: TF32 set through the new API only."""
    MATMUL.fp32_precision = "tf32"
    CUDNN.conv.fp32_precision = "ieee"
    CUDNN.rnn.fp32_precision = "tf32"


@pytest.mark.parametrize("start", ["fresh", "new api set alone"])
def test_set_tf32_leaves_both_apis_readable_and_agreeing(tf32_flags, start):
    if start == "new api set alone":
        if not HAS_NEW_API:
            pytest.skip("this torch has no fp32_precision API to mix with")
        poison_with_new_api()
        with pytest.raises(RuntimeError, match="legacy and new"):  # the failure set_tf32 must repair
            tf32_readings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a warning from set_tf32 itself
        for enabled in (True, False, True, False):
            set_tf32(enabled)
            got = tf32_readings()
            assert got["allow_tf32"] is enabled and got["cudnn.allow_tf32"] is enabled, got
            assert got["matmul_precision"] == ("high" if enabled else "highest"), got
            if HAS_NEW_API:
                assert got["matmul.fp32_precision"] == ("tf32" if enabled else "ieee"), got
                assert (got["conv"] == "tf32") is enabled and (got["rnn"] == "tf32") is enabled, got


def test_set_tf32_uses_the_new_api_where_the_legacy_flags_are_gone(monkeypatch):
    class NewOnly:
        """A backend with fp32_precision and no allow_tf32, as a future torch may have."""
        def __init__(self, **children):
            self.__dict__.update(children, fp32_precision="none")

        def __setattr__(self, name, value):
            if name == "allow_tf32":
                raise AttributeError(name)
            self.__dict__[name] = value

    matmul, cudnn = NewOnly(), NewOnly(conv=NewOnly(), rnn=NewOnly())
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    set_tf32(True)
    assert (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("tf32",) * 3
    set_tf32(False)
    assert (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("ieee",) * 3


# --------------------------------------------------------------------------- generator state across devices

def cuda_generator_state(seed: int, offset: int) -> torch.Tensor:
    """The 16 bytes a CUDA torch.Generator's get_state() returns: its seed and Philox offset."""
    raw = struct.pack("<Qq", seed, offset)
    assert len(raw) == CUDA_GENERATOR_STATE_BYTES
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def draws(g: torch.Generator) -> torch.Tensor:
    return torch.randint(1_000_000, (16,), generator=g)


def test_a_state_of_the_same_device_type_restores_exactly():
    g = torch.Generator().manual_seed(3)
    draws(g)
    saved = g.get_state()
    expected = draws(g)
    fresh = torch.Generator().manual_seed(99)
    assert restore_generator_state(fresh, saved) is None
    assert torch.equal(draws(fresh), expected)


def test_a_cuda_state_resumes_on_cpu_reseeded_reproducibly():
    saved = cuda_generator_state(seed=1337, offset=4096)
    first, second = torch.Generator(), torch.Generator().manual_seed(5)
    note = restore_generator_state(first, saved)
    assert restore_generator_state(second, saved) == note
    assert torch.equal(first.get_state(), torch.Generator().manual_seed(seed_from_state(saved)).get_state())
    assert torch.equal(draws(first), draws(second)), "the same checkpoint must resume to the same batches"
    assert "\n" not in note and "saved on cuda" in note and "draws on cpu" in note
    assert str(seed_from_state(saved)) in note

    later = torch.Generator()
    restore_generator_state(later, cuda_generator_state(seed=1337, offset=8192))
    assert not torch.equal(draws(later), draws(torch.Generator().manual_seed(seed_from_state(saved)))), \
        "a state saved at a later step must not resume to the earlier step's stream"


class CudaLikeGenerator:
    """A CUDA generator's interface (16-byte state) for the CPU-state-on-GPU direction."""
    device = torch.device("cuda", 0)

    def __init__(self):
        self.seeded_with = None

    def get_state(self):
        return cuda_generator_state(0, 0)

    def set_state(self, state):
        raise RuntimeError("RNG state is wrong size")

    def manual_seed(self, seed):
        self.seeded_with = seed
        return self


def test_a_cpu_state_resumes_on_a_gpu_reseeded():
    cpu_state = torch.Generator().manual_seed(7).get_state()
    g = CudaLikeGenerator()
    note = restore_generator_state(g, cpu_state)
    assert g.seeded_with == seed_from_state(cpu_state)
    assert "saved on cpu" in note and "draws on cuda" in note


@pytest.mark.parametrize("bad", [torch.zeros(16), torch.zeros(2, 8, dtype=torch.uint8),
                                 torch.zeros(0, dtype=torch.uint8), b"\x00" * 16])
def test_a_state_that_is_no_generator_state_is_refused(bad):
    with pytest.raises(ValueError, match="1-D uint8"):
        restore_generator_state(torch.Generator(), bad)


# --------------------------------------------------------------------------- GPUs stood in for

class FakeGPUs:
    """torch.cuda's queries for a machine with the given GPUs: (name, compute capability) by index."""

    def __init__(self, monkeypatch, gpus):
        self.gpus, self.current = gpus, []
        index = lambda d: torch.device(d).index if not isinstance(d, int) else d  # noqa: E731
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: gpus[index(d)][0])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: gpus[index(d)][1])
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.current.append(index(d)))
        # torch's own check reads the *current* device (index 0 here, a bf16 GPU): it must not be asked
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.version, "hip", None)
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(var, raising=False)


H100_AND_V100 = [("NVIDIA H100 80GB HBM3", (9, 0)), ("Tesla V100-SXM2-16GB", (7, 0))]


def test_one_process_uses_the_gpu_asked_for_and_makes_it_current(monkeypatch):
    gpus = FakeGPUs(monkeypatch, H100_AND_V100)
    assert pick_device("cuda:1") == torch.device("cuda", 1) and gpus.current == [1]
    assert pick_device("cuda") == torch.device("cuda", 0) and gpus.current == [1, 0]
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu") and gpus.current == [1, 0, 0]
    with pytest.raises(DeviceError, match=r"has 2 CUDA device\(s\); pick one of cuda:0..cuda:1"):
        pick_device("cuda:2")


def test_under_torchrun_each_rank_takes_cuda_local_rank(monkeypatch):
    gpus = FakeGPUs(monkeypatch, H100_AND_V100)
    assert pick_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert pick_device("auto", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert gpus.current == [1, 1]
    for explicit in ("cuda:0", "cuda:1"):
        with pytest.raises(DeviceError, match="under torchrun .*cuda:LOCAL_RANK; pass --device cuda"):
            pick_device(explicit, local_rank=1, world_size=2)
    with pytest.raises(DeviceError, match="local rank 2 .* --nproc_per_node 2"):
        pick_device("cuda", local_rank=2, world_size=3)
    # torchrun's environment, as train_torch.py passes only the local rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="under torchrun"):
        pick_device("cuda:0", 1)


def test_one_process_with_world_size_one_may_name_its_gpu(monkeypatch):
    FakeGPUs(monkeypatch, H100_AND_V100)
    assert pick_device("cuda:1", local_rank=0, world_size=1) == torch.device("cuda", 1)


def test_bf16_is_judged_on_the_chosen_gpu_not_the_current_one(monkeypatch):
    FakeGPUs(monkeypatch, H100_AND_V100)
    h100, v100 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert has_native_bf16(h100) and not has_native_bf16(v100)
    assert pick_dtype("auto", h100) == torch.bfloat16
    assert pick_dtype("auto", v100) == torch.float32
    assert pick_dtype("bfloat16", h100) == torch.bfloat16
    assert pick_dtype("float32", h100) == torch.float32
    with pytest.raises(DeviceError, match=r"Tesla V100-SXM2-16GB \(cuda:1, compute capability 7.0\) has no native "
                                         r"bfloat16 .*; use --dtype float32"):
        pick_dtype("bfloat16", v100)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: bf16 on every GPU it supports, as torch says
    assert pick_dtype("auto", v100) == torch.bfloat16


def test_bf16_off_cuda(monkeypatch):
    cpu = torch.device("cpu")
    assert not has_native_bf16(cpu)
    assert pick_dtype("auto", cpu) == torch.float32 and pick_dtype("bfloat16", cpu) == torch.bfloat16


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 SXM5 80GB", 989e12), ("NVIDIA H100", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12), ("NVIDIA GeForce RTX 4090", 165e12),
    # not listed, or a sibling with another peak: no figure rather than a borrowed one
    ("NVIDIA A10G", None), ("NVIDIA A100X", None), ("Tesla V100-SXM2-16GB", None), ("NVIDIA B200", None),
    ("NVIDIA GeForce RTX 4080", None), ("NVIDIA H800", None), ("NVIDIA L40G", None), ("", None),
])
def test_peak_flops_table_matches_whole_names(name, flops):
    assert gpu_peak_flops(name) == flops


def test_peak_flops_asks_the_chosen_gpu(monkeypatch):
    FakeGPUs(monkeypatch, [("NVIDIA L4", (8, 9)), ("NVIDIA H100 PCIe", (9, 0))])
    assert peak_flops(torch.device("cuda", 1)) == 756e12
    assert peak_flops(torch.device("cuda", 0)) == 121e12
    assert peak_flops(torch.device("cpu")) is None


# --------------------------------------------------------------------------- the non-finite-loss watch

VIEW_OPS = {"aten::select", "aten::as_strided", "aten::slice", "aten::view", "aten::alias"}


def ops_of(fn) -> list[str]:
    """The aten operators `fn` runs, views (no kernel, no memory traffic) left out."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS]


def test_the_loss_watch_costs_one_kernel_a_step():
    watch = LossWatch(torch.device("cpu"), capacity=4)
    loss = torch.tensor(2.5)
    watch.add(0, loss)
    assert ops_of(lambda: watch.add(1, loss)) == ["aten::copy_"]


def test_the_loss_watch_names_the_first_non_finite_step_however_many_steps_passed():
    watch = LossWatch(torch.device("cpu"), capacity=2)  # grows past its capacity
    for it, value in zip(range(10, 16), [1.0, 2.0, float("nan"), float("inf"), 3.0, float("nan")]):
        watch.add(it, torch.tensor(value))
    first = watch.first_bad_step()
    assert first.dtype == torch.long and first.shape == () and int(first) == 12
    assert int(watch.first_bad_step()) == -1, "a check starts the next window afresh"
    for it in (16, 17):
        watch.add(it, torch.tensor(1.0))
    assert int(watch.first_bad_step()) == -1
    watch.add(18, torch.tensor(float("-inf")))
    assert int(watch.first_bad_step()) == 18


# --------------------------------------------------------------------------- the loop with the torch backend

def torch_backend(**settings):
    """A TorchBackend set up on the CPU on a synthetic text, as the loop sets it up."""
    text = "".join(np.random.default_rng(0).choice(list("abcdefgh \n"), size=4000))
    tokenizer = CharTokenizer.from_text(text)
    train_data, val_data = train_val_split(tokenizer.encode(text))
    backend = TorchBackend(TorchOptions(device="cpu", dtype="float32", compile=False, attention="sdpa"))
    backend.build(replace(PRESETS["tiny"], **settings), tokenizer, train_data, val_data, None, resume=False)
    return backend


def test_warm_up_leaves_the_run_as_it_was():
    """The compile warm-up runs the step's forward and backward and an evaluation forward, then puts
    back the data stream, the dropout RNG and the gradients: the run goes on bit for bit as without it."""
    plain = torch_backend(dropout=0.2, gradient_accumulation_steps=2)
    warmed = torch_backend(dropout=0.2, gradient_accumulation_steps=2)
    assert warmed._warm_up() is None, "nothing to compile: no warm-up"
    warmed.use_compile = True  # the eager model stands in for the compiled one
    rng, data = torch.get_rng_state(), warmed.batches["train"].generator.get_state()
    seconds = warmed._warm_up()
    assert seconds is not None and seconds >= 0
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(warmed.batches["train"].generator.get_state(), data)
    assert all(p.grad is None for p in warmed.raw.parameters()) and warmed.raw.training
    torch.set_rng_state(rng)
    a = [plain.step(it, 1e-3, log=True) for it in range(3)]
    torch.set_rng_state(rng)
    b = [warmed.step(it, 1e-3, log=True) for it in range(3)]
    assert [float(x) for x in a] == [float(x) for x in b]
    for (name, p), q in zip(plain.raw.named_parameters(), warmed.raw.parameters()):
        assert torch.equal(p, q), name


@needs_data
@pytest.mark.parametrize("backend", ["np", "torch"])
def test_one_checkpoint_write_per_evaluation_best_is_a_link(tmp_path, capsys, monkeypatch, backend):
    """An improving evaluation writes ckpt_last once and makes ckpt_best a second name for it; the
    next write of ckpt_last leaves ckpt_best as it was."""
    cls = gptapp.backends.numpy.NumpyBackend if backend == "np" else gptapp.backends.torch.TorchBackend
    writes, real = [], cls.info.write
    monkeypatch.setattr(cls, "info", replace(cls.info, write=lambda path, ckpt: writes.append(os.path.basename(path))
                                             or real(path, ckpt)))
    out = tmp_path / "out"
    extra = ["--device", "cpu"] if backend == "torch" else []
    res = run_main(backend, tiny_args(out, "--max_iters", 60, "--max_new_tokens", 0, *extra), capsys)
    assert res.rc == 0, res.err
    ext = ".npz" if backend == "np" else ".pt"
    assert writes == [f"ckpt_last{ext}"] * 3, "one write per evaluation after step 0"
    evals = [(int(m[0]), float(m[1])) for m in
             re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", res.out)]
    assert [it for it, _ in evals] == [0, 20, 40, 60]
    read = load_checkpoint if backend == "np" else load_torch_checkpoint
    best, last = read(out / f"ckpt_best{ext}"), read(out / f"ckpt_last{ext}")
    assert last.iter_num == 60
    best_step = min(evals[1:], key=lambda e: e[1])[0]
    assert best.iter_num == best_step and best.best_val_loss == last.best_val_loss
    assert os.path.samefile(out / f"ckpt_best{ext}", out / f"ckpt_last{ext}") == (best_step == 60)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_link_or_copy_survives_the_next_write_and_copies_without_hard_links(tmp_path, monkeypatch):
    src, dst = tmp_path / "ckpt_last.pt", tmp_path / "ckpt_best.pt"
    atomic_write(src, lambda f: f.write(b"step 20"))
    dst.write_bytes(b"older best")
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"step 20" and os.path.samefile(src, dst)
    atomic_write(src, lambda f: f.write(b"step 40"))
    assert dst.read_bytes() == b"step 20" and src.read_bytes() == b"step 40"

    def no_links(*a):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"step 40" and not os.path.samefile(src, dst)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_best.pt", "ckpt_last.pt"]


@needs_data
def test_compile_time_is_its_own_line_and_mfu_starts_at_step_5(tmp_path, capsys, monkeypatch):
    class Quarter(float):  # a step's seconds at peak that makes every step's MFU 25%
        def __truediv__(self, dt):
            return 0.25

    build = TorchBackend.build
    monkeypatch.setattr(TorchBackend, "_warm_up", lambda self: 12.5)
    monkeypatch.setattr(TorchBackend, "build", lambda self, *a, **kw: build(self, *a, **kw)._replace(
        peak_step_s=Quarter(1.0)))
    out = tmp_path / "out"
    res = run_main("torch", tiny_args(out, "--max_iters", 8, "--log_interval", 1, "--eval_interval", 8,
                                      "--max_new_tokens", 0, "--device", "cpu"), capsys)
    assert res.rc == 0, res.err
    assert "compile: 12.5s before step 0 (training and evaluation graphs; not in the step times" in res.out
    iters = [line for line in res.out.splitlines() if line.startswith("iter ")]
    assert len(iters) == 8
    assert all("mfu" not in line for line in iters[:5]) and all(line.endswith("mfu 25.0%") for line in iters[5:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "compile", "iter": 0, "seconds": 12.5} == {k: records[0][k] for k in ("kind", "iter", "seconds")}


@needs_data
def test_a_gpu_run_resumes_on_cpu_with_a_note_and_reproducibly(tmp_path, capsys):
    """A checkpoint whose data generator state is a CUDA one (16 bytes) resumes on a CPU: one note
    line, a reseed from that state, and the same result every time it is resumed."""
    first = tmp_path / "gpu"
    assert run_main("torch", tiny_args(first, "--max_iters", 20, "--lr_decay_iters", 40, "--max_new_tokens", 0,
                                       "--device", "cpu"), capsys).rc == 0
    raw = torch.load(first / "ckpt_last.pt", weights_only=True)
    raw["rng"]["data"] = cuda_generator_state(seed=1337, offset=20 * 8 * 4)
    raw["rng"]["per_rank"][0]["cuda"] = cuda_generator_state(seed=1338, offset=96)
    torch.save(raw, first / "ckpt_last.pt")
    again = tmp_path / "again"
    shutil.copytree(first, again)
    results = []
    for out in (first, again):
        res = run_main("torch", ["--resume", "--data", DATA, "--out_dir", out, "--max_iters", 40,
                                 "--device", "cpu"], capsys)
        assert res.rc == 0, res.err
        notes = [line for line in res.err.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and "was saved on cuda, this run draws on cpu: reseeded it with" in notes[0], res.err
        results.append(torch.load(out / "ckpt_last.pt", weights_only=True))
    a, b = results
    assert a["iter_num"] == b["iter_num"] == 40
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), f"{k}: resuming twice gave two runs"


# --------------------------------------------------------------------------- .pt weights: widen, never narrow

def test_a_float64_state_dict_is_refused_and_bf16_widened_exactly(tmp_path):
    params = init_params(CFG, seed=0)
    payload = torch_payload(params)
    payload["model_state"] = {k: v.to(torch.bfloat16) for k, v in payload["model_state"].items()}
    save_torch_checkpoint(tmp_path / "bf16.pt", payload)
    widened = load_torch_checkpoint(tmp_path / "bf16.pt").params
    for k, v in payload["model_state"].items():
        assert widened[k].dtype == np.float32 and np.array_equal(widened[k], v.float().numpy()), k

    payload["model_state"] = {k: v.double() for k, v in payload["model_state"].items()}
    save_torch_checkpoint(tmp_path / "f64.pt", payload)
    with pytest.raises(CheckpointError, match=r"f64.pt: entry '.+' is float64; .* narrowing would change them "
                                              r"silently; save the state dict as float32"):
        load_torch_checkpoint(tmp_path / "f64.pt")
