"""Torch runtime helpers for training: device and precision, DDP, batches drawn on the device, RNG
and optimiser state. The app (gptapp.backends.torch) drives them; nothing here knows about flags
or files.

The fast path on a GPU: bf16 autocast, TF32 matmuls, SDPA (flash) attention, fused AdamW,
torch.compile, and batches indexed on the device from a torch.Generator so a step never waits for
the host. Where the host waits for the GPU (each function's docstring says so too):
  sync_flags        one .item() (single process) or one all_reduce + .item() (DDP); the loop calls it
                    on eval steps, on the last step and on the step after each log step
  all_mean          an all_reduce; its caller's .item() is the sync (eval steps only)
  gather_rng_states reads the CUDA RNG state and all-gathers it (only when a checkpoint is written)
  DeviceBatches     one host-to-device copy of the tokens, at construction
Everything else queries device properties or sets flags and never waits on a kernel.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist



class DeviceError(ValueError):
    """A --device or --dtype this machine cannot give; the message is one line naming the fix."""


# Dense bf16 tensor-core peak FLOP/s (no sparsity), for model FLOPs utilisation (MFU). Each pattern
# must match the whole name torch.cuda.get_device_name gives, less a leading "NVIDIA ": a variant
# with another peak ("H100 PCIe", "L40" beside "L40S" and "L4") never borrows its sibling's figure,
# and a GPU not listed gets None (no MFU) rather than a guess.
PEAK_BF16_FLOPS = (
    (r"H100( SXM\d?)?( \d+GB)?( HBM3e?)?", 989e12),  # SXM5: "H100 80GB HBM3"
    (r"H100 PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H200( SXM\d?)?( \d+GB)?( HBM3e)?", 989e12),
    (r"H200 NVL", 835e12),
    (r"GH200( \d+GB?)?( HBM3e?)?", 989e12),
    (r"A100([- ](SXM\d?|PCIE|PCIe))?([- ]\d+GB)?( PCIe)?", 312e12),  # "A100-SXM4-80GB", "A100 80GB PCIe"
    (r"L40S", 362e12),
    (r"L40", 181e12),
    (r"L4", 121e12),
    (r"A10", 125e12),
    (r"(GeForce )?RTX 4090", 165e12),
)


# --------------------------------------------------------------------------- device and precision

def pick_device(request: str = "auto", local_rank: int | None = None, world_size: int | None = None) -> torch.device:
    """"auto" -> cuda, else mps, else cpu; DeviceError (one line) if the request can't be met.

    One process: "cuda" is cuda:0 and "cuda:N" is GPU N; the chosen GPU becomes the current CUDA
    device (torch.cuda.set_device), so kernels launched without a device, allocator caches and
    NCCL use it rather than GPU 0. Under torchrun (world_size > 1) every rank's GPU is
    cuda:LOCAL_RANK: "cuda" and "auto" map there, and an explicit "cuda:N" is refused, since every
    rank gets the same flags and would pile onto GPU N. local_rank and world_size default to
    torchrun's environment (dist_env()).
    """
    if local_rank is None or world_size is None:
        env = dist_env()
        local_rank = env.local_rank if local_rank is None else local_rank
        world_size = env.world_size if world_size is None else world_size
    if request == "auto":
        if torch.cuda.is_available():
            request = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            request = "mps"
        else:
            request = "cpu"
    try:
        device = torch.device(request)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {request!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {request}: CUDA is not available here; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if world_size > 1:
            if device.index is not None:
                raise DeviceError(f"--device {request} under torchrun ({world_size} processes): each rank uses "
                                 "its own GPU, cuda:LOCAL_RANK; pass --device cuda (or auto)")
            if local_rank >= count:
                raise DeviceError(f"torchrun started local rank {local_rank} but this machine has {count} CUDA "
                                 f"device(s); use --nproc_per_node {count} or fewer (one process per GPU)")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", 0)
        if device.index >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA device(s); "
                             f"pick one of cuda:0..cuda:{count - 1}")
        torch.cuda.set_device(device)
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {request}: MPS is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        raise DeviceError(f"--device {request}: unsupported device type {device.type}; use cpu, cuda or mps")
    return device


def has_native_bf16(device: torch.device) -> bool:
    """True on a CUDA GPU with bf16 tensor cores (compute capability 8.0 on: Ampere, Hopper, ...), or ROCm.

    This is torch.cuda.is_bf16_supported(including_emulation=False), asked of `device` itself:
    torch's function reads the *current* device, and by default also counts the bf16 that older
    GPUs emulate, which runs slower than float32.
    """
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def pick_dtype(request: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 autocast on a CUDA GPU with native bf16 (has_native_bf16), else float32.
    "bfloat16" on a CUDA GPU without it: DeviceError. On CPU and MPS, bf16 autocast is taken as asked."""
    if request == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if request == "bfloat16":
        if device.type == "cuda" and not has_native_bf16(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} ({device}, compute capability "
                             f"{major}.{minor}) has no native bfloat16 (it needs 8.0 or later); use --dtype float32")
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast (weights stay float32), or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls and cuDNN convolutions for float32 on CUDA, on or off (off for
    sampling, so it matches NumPy). Process-wide flags: harmless, and testable, without CUDA.

    Set through the legacy flags (matmul.allow_tf32, cudnn.allow_tf32): on every torch that also
    has the new per-backend fp32_precision API (2.9 on), their setters write both, so afterwards
    allow_tf32, torch.get_float32_matmul_precision() and fp32_precision all read the same. The new
    setters alone leave the legacy state behind, and then reading the legacy flags raises ("mix of
    the legacy and new APIs"), which breaks inductor versions and tests that read them. If a torch
    ever drops the legacy flags, the new API is set instead.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        # some torches warn that the legacy setters "will be deprecated"; they still set both APIs
        warnings.filterwarnings("ignore", message=".*TF32.*", category=UserWarning)
        try:
            matmul.allow_tf32 = enabled
            cudnn.allow_tf32 = enabled
            return
        except AttributeError:
            pass
    precision = "tf32" if enabled else "ieee"
    matmul.fp32_precision = precision
    cudnn.conv.fp32_precision = precision
    cudnn.rnn.fp32_precision = precision


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name), None if not listed."""
    short = name.strip().removeprefix("NVIDIA ").strip()
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.fullmatch(pattern, short, flags=re.IGNORECASE):
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, or None where unknown (CPU, MPS, unlisted GPUs): no MFU then."""
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))


# --------------------------------------------------------------------------- distributed data parallel

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # "nccl" or "gloo" once initialised

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistInfo:
    """Rank, local rank and world size from torchrun's environment (a single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=world)


def init_distributed(info: DistInfo, device: torch.device) -> DistInfo:
    """Join the process group (NCCL on CUDA, gloo otherwise); a no-op for one process."""
    if not info.enabled:
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        takes_device = "device_id" in inspect.signature(dist.init_process_group).parameters
        kw = dict(device_id=device) if device.type == "cuda" and takes_device else {}
        dist.init_process_group(backend=backend, **kw)
    return DistInfo(info.rank, info.local_rank, info.world_size, backend)


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel over the ranks (gradients averaged in backward); the model itself alone."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `t` over the ranks (in place). An all_reduce, queued like a kernel on NCCL; the
    host waits only where the caller reads the result (.item() on eval steps)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `t` over the ranks (in place); an all_reduce, like all_mean."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_flags(stop: bool, bad_step: torch.Tensor, info: DistInfo) -> tuple[bool, int]:
    """(any rank asked to stop, the first step any rank saw a non-finite loss or -1).

    A host sync: it waits for every queued kernel (one .item(); under DDP one all_reduce first).
    The loop calls it on eval steps, on the last step, and on the step after each log step (the
    log step's own .item() has just drained the queue, so that wait is short), and on a CPU
    every step, where reading a flag costs nothing.
    """
    if not info.enabled:
        return stop, int(bad_step.item())
    big = 2 ** 62
    first_bad = torch.where(bad_step >= 0, bad_step, torch.full_like(bad_step, big))
    flags = torch.stack([torch.tensor(int(stop), device=bad_step.device, dtype=torch.long), -first_bad])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop_any, first = bool(flags[0].item()), -int(flags[1].item())
    return stop_any, (-1 if first == big else first)


class LossWatch:
    """The training losses since the last check, kept on the device, for the non-finite-loss check.

    add() costs one kernel a step (a copy into a slot of a device buffer) and never waits for the
    host; first_bad_step() is read at the loop's checks (sync_flags, a host sync anyway) and names
    the first step whose loss was not finite, or -1, exactly, however many steps passed since the
    last check. The steps between two checks are consecutive.
    """

    def __init__(self, device: torch.device, capacity: int = 64):
        self.device = device
        self.losses = torch.empty(capacity, dtype=torch.float32, device=device)  # (capacity,)
        self.first_it, self.count = 0, 0

    def add(self, it: int, loss: torch.Tensor) -> None:
        if self.count == 0:
            self.first_it = it
        if self.count == self.losses.numel():  # more steps between checks than ever before: grow (rare)
            self.losses = torch.cat([self.losses, torch.empty_like(self.losses)])
        self.losses[self.count].copy_(loss)
        self.count += 1

    def first_bad_step(self) -> torch.Tensor:
        """A () long tensor on the device: the first step since the last call with a non-finite loss, or -1."""
        if self.count == 0:
            return torch.full((), -1, dtype=torch.long, device=self.device)
        bad = (~torch.isfinite(self.losses[:self.count])).to(torch.int32)  # (count,)
        first = torch.where(bad.any(), bad.argmax() + self.first_it,
                            torch.full((), -1, dtype=torch.long, device=self.device))
        self.count = 0
        return first.to(torch.long)


# --------------------------------------------------------------------------- batches on the device

class DeviceBatches:
    """Random (x, y) windows of token data that lives on the device, drawn by a torch.Generator.

    Every rank keeps the same generator state and draws world_size * B window starts per batch,
    then takes its own B: the ranks see different windows, the global batch is the same as one
    process drawing world_size * B, and rank 0's generator state is everyone's (rank 0 saves it).
    The tokens are copied to the device once, here; drawing a batch never waits for the host.
    """

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, device: torch.device,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.int64)).to(device)  # (N,)
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.offsets = torch.arange(block_size + 1, device=device)  # (T+1,)
        self.generator = self.new_generator(seed)

    def new_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def get(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator if generator is None else generator
        starts = torch.randint(len(self.data) - self.T, (self.world_size * self.B,), device=self.device,
                               generator=g)  # (world * B,)
        mine = starts[self.rank * self.B:(self.rank + 1) * self.B]  # (B,)
        windows = self.data[mine[:, None] + self.offsets]  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]  # x (B, T), y (B, T)

    def rank_share(self, generator: torch.Generator, n_batches: int):
        """This rank's share of `n_batches` batches of B windows (for evaluation): batches rank,
        rank + world_size, ... of one draw of n_batches * B starts, so the ranks split the batches
        between them, and together see exactly the batches one process would (whatever the world
        size, as the draw does not depend on it). Yields (x, y), each (B, T)."""
        starts = torch.randint(len(self.data) - self.T, (n_batches, self.B), device=self.device,
                               generator=generator)  # (n_batches, B)
        for mine in starts[self.rank::self.world_size]:  # (B,)
            windows = self.data[mine[:, None] + self.offsets]  # (B, T+1)
            yield windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------- RNG state

def rng_state(device: torch.device) -> dict:
    """This process's global RNG state (dropout draws from it): CPU, and CUDA on a CUDA device."""
    return {"torch_cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def gather_rng_states(device: torch.device, info: DistInfo) -> list[dict]:
    """Every rank's rng_state(), in rank order (a collective: all ranks must call it).

    A host sync (the CUDA RNG state is read back, and under NCCL copied to the GPU and back);
    called only when a checkpoint is written."""
    mine = rng_state(device)
    if not info.enabled:
        return [mine]
    out = [{} for _ in range(info.world_size)]
    for key, t in mine.items():
        if t is None:
            for d in out:
                d[key] = None
            continue
        comm = t.to(device) if info.backend == "nccl" else t
        bufs = [torch.empty_like(comm) for _ in range(info.world_size)]
        dist.all_gather(bufs, comm)
        for d, b in zip(out, bufs):
            d[key] = b.cpu()
    return out


# A torch.Generator's state depends on its device type: a CPU generator (Mersenne Twister) saves
# 5056 bytes, a CUDA one (Philox) 16, its seed and offset as two 64-bit integers, MPS another
# size again. None loads into another.
CUDA_GENERATOR_STATE_BYTES = 16


def generator_state_origin(state: torch.Tensor) -> str:
    """Which device type saves a generator state of this size: "cpu", "cuda", or "another device type"."""
    sizes = {torch.Generator().get_state().numel(): "cpu", CUDA_GENERATOR_STATE_BYTES: "cuda"}
    return sizes.get(state.numel(), "another device type")


def seed_from_state(state: torch.Tensor) -> int:
    """A 63-bit seed derived from a saved generator state: the same state always gives the same seed,
    and states saved at different steps (a CUDA state's offset moves with every draw) give different ones."""
    digest = hashlib.sha256(state.detach().cpu().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def restore_generator_state(generator: torch.Generator, state: torch.Tensor) -> str | None:
    """Load a saved generator state into `generator`; None when it loaded as it was.

    A state saved by a generator of another device type (a GPU run resumed on a CPU, or back) has
    another size and cannot be loaded: the generator is reseeded from seed_from_state(state)
    instead, so the resumed run is reproducible (the same checkpoint resumes to the same draws),
    though its batches differ from those the saving run would have drawn. The one-line note
    returned says so, for the log. Not a 1-D uint8 tensor, or empty: ValueError; a damaged state
    of the right size: torch's RuntimeError.
    """
    if not torch.is_tensor(state) or state.dtype != torch.uint8 or state.dim() != 1 or state.numel() == 0:
        what = f"{state.dtype} tensor of shape {tuple(state.shape)}" if torch.is_tensor(state) else type(state).__name__
        raise ValueError(f"a generator state is a non-empty 1-D uint8 tensor, not a {what}")
    if state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return None
    seed = seed_from_state(state)
    generator.manual_seed(seed)
    return (f"the data generator state ({state.numel()} bytes) was saved on {generator_state_origin(state)}, "
            f"this run draws on {generator.device.type}: reseeded it with {seed}, derived from that state, so "
            "resuming this checkpoint again draws the same batches")


def set_rng_state(states: list, device: torch.device, info: DistInfo) -> bool:
    """Restore this rank's saved RNG state; False (nothing changed) if the world size differs."""
    if not isinstance(states, list) or len(states) != info.world_size:
        return False
    mine = states[info.rank]
    torch.set_rng_state(mine["torch_cpu"])
    if device.type == "cuda" and mine.get("cuda") is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)
    return True


# --------------------------------------------------------------------------- optimiser state

def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """load_state_dict, keeping this optimiser's own implementation flags (fused/foreach/capturable),
    so a run saved on a GPU resumes on a CPU and the other way round."""
    flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        if group.get("fused") or group.get("capturable"):
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
