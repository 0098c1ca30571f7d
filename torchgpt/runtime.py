"""Torch runtime helpers for training: device and precision, DDP, batches drawn on the device, RNG
and optimiser state. The app (gptapp.backends.torch) drives them; nothing here knows about flags
or files.

The fast path on a GPU: bf16 autocast, TF32 matmuls, SDPA (flash) attention, fused AdamW,
torch.compile, and batches indexed on the device from a torch.Generator so a step never waits for
the host. Nothing here calls .item() except where a caller asks for a number.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist



class DeviceError(ValueError):
    """A --device or --dtype this machine cannot give; the message is one line naming the fix."""


# Dense bf16 tensor-core peak FLOP/s by GPU name, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12))


# --------------------------------------------------------------------------- device and precision

def pick_device(request: str = "auto", local_rank: int | None = None) -> torch.device:
    """"auto" -> cuda (cuda:LOCAL_RANK under torchrun), else mps, else cpu. DeviceError if unavailable."""
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
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "pick one of them")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {request}: MPS is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        raise DeviceError(f"--device {request}: unsupported device type {device.type}; use cpu, cuda or mps")
    return device


def pick_dtype(request: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 autocast on a CUDA GPU that supports it, else float32."""
    if request == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if request == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; "
                             "use --dtype float32")
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast (weights stay float32), or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls for float32 on CUDA (off for sampling, so it matches NumPy)."""
    if not torch.cuda.is_available():
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, or None where unknown (CPU, MPS, unlisted GPUs): no MFU then."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


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
    """The mean of `t` over the ranks (in place)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def sync_flags(stop: bool, bad_step: torch.Tensor, info: DistInfo) -> tuple[bool, int]:
    """(any rank asked to stop, the first step any rank saw a non-finite loss or -1); one sync."""
    if not info.enabled:
        return stop, int(bad_step.item())
    big = 2 ** 62
    first_bad = torch.where(bad_step >= 0, bad_step, torch.full_like(bad_step, big))
    flags = torch.stack([torch.tensor(int(stop), device=bad_step.device, dtype=torch.long), -first_bad])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop_any, first = bool(flags[0].item()), -int(flags[1].item())
    return stop_any, (-1 if first == big else first)


# --------------------------------------------------------------------------- batches on the device

class DeviceBatches:
    """Random (x, y) windows of token data that lives on the device, drawn by a torch.Generator.

    Every rank keeps the same generator state and draws world_size * B window starts per batch,
    then takes its own B: the ranks see different windows, the global batch is the same as one
    process drawing world_size * B, and rank 0's generator state is everyone's (rank 0 saves it).
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


# --------------------------------------------------------------------------- RNG state

def rng_state(device: torch.device) -> dict:
    """This process's global RNG state (dropout draws from it): CPU, and CUDA on a CUDA device."""
    return {"torch_cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def gather_rng_states(device: torch.device, info: DistInfo) -> list[dict]:
    """Every rank's rng_state(), in rank order (a collective: all ranks must call it)."""
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
