"""torchgpt's runtime helpers on a CPU: TF32 flags readable through both torch APIs, a generator
state saved on another device type, and the device/dtype/peak-FLOPS rules, with torch.cuda's
queries monkeypatched to stand in for GPUs that are not here."""
from __future__ import annotations

import struct
import warnings

import pytest
import torch

from torchgpt.runtime import (
    CUDA_GENERATOR_STATE_BYTES,
    DeviceError,
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
