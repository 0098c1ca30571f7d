"""torch.optim.Muon with a choice of the dtype its Newton-Schulz iteration runs in (torch >= 2.9).

torch.optim.Muon (torch/optim/_muon.py) orthogonalises every update with five quintic
Newton-Schulz steps in bfloat16. On a GPU, and on a CPU whose oneDNN has bfloat16 matmul kernels
(AVX512-BF16, AMX), that is cheap. On a CPU without them (AVX2 only: AMD Zen 3, most laptops)
torch falls back to a generic bfloat16 gemm that converts element by element, and the iteration
costs many times its float32 equivalent (bench/RESULTS.md): the optimiser then dominates the step. `Muon` here is torch's class with one more setting, `ns_dtype`:
    torch.bfloat16  torch's own step, untouched (super().step)
    torch.float32   the same update, restated from torch's _single_tensor_muon line by line, with
                    the iteration in float32 (zeropower_via_newton_schulz below)
The dtype is an attribute of the optimizer, not of a param group, so the state_dict is torch's
(momentum_buffer per parameter, the same group keys): a checkpoint saved by either loads into the
other. `resolve_ns_dtype` turns the app's setting (auto, bfloat16, float32) into a dtype.
"""
from __future__ import annotations

import math

import torch

NS_DTYPES = ("auto", "bfloat16", "float32")


# --------------------------------------------------------------------------------------------
# Which dtype: bfloat16 where matmuls in it are native, float32 where they are emulated
# --------------------------------------------------------------------------------------------

def onednn_bf16_matmul() -> bool:
    """Whether torch's bfloat16 matmuls on this CPU run on oneDNN's bfloat16 kernels.

    torch sends a bfloat16 matmul to oneDNN when oneDNN is built in and enabled
    (torch.backends.mkldnn) and torch.ops.mkldnn._is_mkldnn_bf16_supported() holds; otherwise to
    its generic gemm, which emulates bfloat16. That predicate asks oneDNN for the instruction set it
    will use (AVX512 with BW/VL/DQ, AVX512-BF16, AMX on x86; the BF16 extension on Arm), so it sees
    ONEDNN_MAX_CPU_ISA as torch does: ONEDNN_MAX_CPU_ISA=AVX2 on an AVX512-BF16 machine makes it
    False, and bfloat16 matmuls slow. torch.backends.cpu.get_cpu_capability() is not this: it is
    ATen's vector width for elementwise kernels (ATEN_CPU_CAPABILITY=avx2 lowers it and leaves the
    matmuls on oneDNN, as fast as before). No timing: the answer is the same on a loaded machine.
    A torch without the predicate answers False: float32 where in doubt, since an emulated bfloat16
    iteration costs far more than a float32 one where bfloat16 is native.
    """
    mkldnn = torch.backends.mkldnn
    if not (mkldnn.is_available() and mkldnn.enabled):
        return False
    try:
        supported = torch.ops.mkldnn._is_mkldnn_bf16_supported
    except (AttributeError, RuntimeError):
        return False
    return bool(supported())


def resolve_ns_dtype(request: str, device_type: str, bf16_native: bool | None = None) -> torch.dtype:
    """The dtype of the Newton-Schulz iteration for the setting `request` (one of NS_DTYPES).

    "bfloat16" and "float32" are taken as given. "auto" keeps torch's bfloat16 on every device but
    the CPU (CUDA, MPS: torch.optim.Muon's choice); on the CPU it is bfloat16 where `bf16_native`
    (default: onednn_bf16_matmul()) and float32 where bfloat16 matmuls are emulated.
    """
    if request not in NS_DTYPES:
        raise ValueError(f"Muon's Newton-Schulz dtype {request!r} is unknown; use one of {', '.join(NS_DTYPES)}")
    if request != "auto":
        return getattr(torch, request)
    if device_type != "cpu":
        return torch.bfloat16
    native = onednn_bf16_matmul() if bf16_native is None else bf16_native
    return torch.bfloat16 if native else torch.float32


# --------------------------------------------------------------------------------------------
# The iteration and the optimizer
# --------------------------------------------------------------------------------------------

def zeropower_via_newton_schulz(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float,
                                dtype: torch.dtype) -> torch.Tensor:
    """torch's _zeropower_via_newtonschulz with `dtype` for its bfloat16: the same operations in the
    same order (x / ||x||_F on the wide orientation, then x <- a x + (b A + c A^2) x, A = x x^T)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if grad.dim() != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    x = grad.to(dtype, copy=True)  # a copy even in grad's dtype: div_ must not touch the momentum buffer
    if grad.size(0) > grad.size(1):
        x = x.T  # (r, k), r <= k
    x.div_(x.norm().clamp(min=eps))  # the Frobenius norm bounds the spectral one: every s <= 1
    for _ in range(ns_steps):
        gram = x @ x.T  # (r, r)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a x + (b A + c A^2) x, (r, k)
    return x.T if grad.size(0) > grad.size(1) else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch's _adjust_lr: "original" (None) lr sqrt(max(1, rows / cols)), "match_rms_adamw"
    0.2 lr sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iteration runs in `ns_dtype` (see the module docstring).

    torch.bfloat16 is torch's step itself; any other dtype runs _single_tensor_muon's update:
        buf.lerp_(g, 1 - momentum); u = g.lerp(buf, momentum) if nesterov else buf
        O = newton_schulz(u) in ns_dtype; p *= 1 - lr wd; p -= adjusted_lr(lr, p.shape) O
    """

    def __init__(self, params, *args, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        if not (isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
            raise ValueError(f"Muon's ns_dtype must be a floating-point torch.dtype, got {ns_dtype!r}")
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)  # torch's: checks, and zero buffers on first use
            lr, momentum, weight_decay = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                ortho = zeropower_via_newton_schulz(update, group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"], self.ns_dtype)
                p.mul_(1 - lr * weight_decay)
                p.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
