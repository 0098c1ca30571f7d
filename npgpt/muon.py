"""Muon: momentum, then the update replaced by its nearest orthogonal matrix, for 2-D weights.

torch.optim.Muon's update, parameter by parameter, with gradient g at every step:
    buf <- buf + (1 - mu) (g - buf)                  momentum (torch: buf.lerp_(g, 1 - mu))
    u   <- g + mu (buf - g)    if nesterov, else buf  (torch: g.lerp(buf, mu))
    O   <- newton_schulz(u)                          ~ U V^T of u's SVD U S V^T (see below)
    p   <- p (1 - lr wd)                             decoupled weight decay, unscaled lr
    p   <- p - adjusted_lr(lr, p.shape) O            "original": lr sqrt(max(1, rows / cols))
The one difference from torch: the Newton-Schulz iteration runs in the parameter's dtype, where
torch's runs in bfloat16 (NumPy has no bfloat16). See docs/gradients.md#muon.
"""
from __future__ import annotations

import math

import numpy as np

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (a, b, c) of the quintic
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def zeropower_via_newton_schulz(u: np.ndarray, coefficients=NS_COEFFICIENTS, steps: int = 5,
                                eps: float = 1e-7) -> np.ndarray:
    """The quintic Newton-Schulz iteration x <- a x + (b A + c A^2) x, A = x x^T, on u / ||u||_F.

    Each step maps every singular value s of x to a s + b s^3 + c s^5 and keeps the singular
    vectors, so the result is ~ U S' V^T with S' near 1 (not exactly 1: the coefficients trade
    convergence for speed). The iteration runs on the wide orientation (rows <= cols), so A is
    the smaller Gram matrix; the result is transposed back. In u's dtype.
    """
    a, b, c = coefficients
    transposed = u.shape[0] > u.shape[1]
    x = u.T if transposed else u  # (r, k), r <= k
    x = x / max(np.linalg.norm(x), eps)  # Frobenius norm >= spectral norm: every s is now <= 1
    for _ in range(steps):
        gram = x @ x.T  # (r, r)
        poly = b * gram + c * (gram @ gram)  # (r, r)
        x = a * x + poly @ x  # (r, k)
    return x.T if transposed else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple) -> float:
    """torch's per-shape scaling: "original" (None) sqrt(max(1, rows / cols)) keeps the update's
    RMS alike across shapes; "match_rms_adamw" 0.2 sqrt(max(rows, cols)) matches AdamW's RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


class Muon:
    """torch.optim.Muon over a dict of 2-D arrays, updated in place (see the module docstring).

    Muon is for the matrices inside the blocks; embeddings, the head and 1-D gains and biases
    belong to AdamW (the speedrun practice), as torch's own docs advise.
    """

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_coefficients=NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None):
        if not lr >= 0 or not momentum >= 0 or not weight_decay >= 0:
            raise ValueError(f"invalid Muon settings lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay}: each must be >= 0")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Muon adjust_lr_fn={adjust_lr_fn!r} is unknown; use None, 'original' "
                             "or 'match_rms_adamw'")
        if len(ns_coefficients) != 3:
            raise ValueError(f"Muon ns_coefficients must be 3 numbers (a, b, c), got {ns_coefficients!r}")
        if not 0 <= ns_steps < 100:
            raise ValueError(f"Muon ns_steps must lie in [0, 100), got {ns_steps!r}")
        not_2d = [f"{name} {value.shape}" for name, value in params.items() if value.ndim != 2]
        if not_2d:
            raise ValueError(f"Muon only takes 2-D matrices; give these to AdamW: {', '.join(not_2d)}")
        self.params = params
        self.lr, self.weight_decay, self.momentum, self.nesterov = lr, weight_decay, momentum, nesterov
        self.ns_coefficients, self.eps, self.ns_steps = tuple(ns_coefficients), eps, ns_steps
        self.adjust_lr_fn = adjust_lr_fn
        self.momentum_buffer = {name: np.zeros_like(value) for name, value in params.items()}
        self.step_count = 0

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """One update of every parameter in place; `lr` overrides the base rate (schedules)."""
        lr = self.lr if lr is None else lr
        mu = self.momentum
        self.step_count += 1
        for name, p in self.params.items():
            g = grads[name]
            buf = self.momentum_buffer[name]
            buf += (1.0 - mu) * (g - buf)  # mu buf + (1 - mu) g, in place: the state carries over
            update = g + mu * (buf - g) if self.nesterov else buf
            ortho = self.orthogonalize(update)  # zeropower_via_newton_schulz, with this optimizer's settings
            p *= 1.0 - lr * self.weight_decay
            p -= adjusted_lr(lr, self.adjust_lr_fn, p.shape) * ortho

    def orthogonalize(self, update: np.ndarray) -> np.ndarray:
        """The Newton-Schulz iteration of the module docstring (npgpt.fast.Muon runs it in place)."""
        return zeropower_via_newton_schulz(update, self.ns_coefficients, self.ns_steps, self.eps)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays only (no objects), so it saves to .npz and loads with allow_pickle=False."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for name, buf in self.momentum_buffer.items():
            state[f"momentum_buffer.{name}"] = buf.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """All or nothing: every buffer is checked before any is replaced."""
        loaded = {}
        for name, buf in self.momentum_buffer.items():
            key = f"momentum_buffer.{name}"
            if key not in state:
                raise ValueError(f"optimizer state lacks {key}: it was not saved by npgpt.optim.Muon "
                                 "over these parameters")
            value = np.asarray(state[key])
            if value.shape != buf.shape:
                raise ValueError(f"optimizer state {key} has shape {value.shape}, expected {buf.shape}: "
                                 "it belongs to another model")
            loaded[name] = value.astype(buf.dtype, copy=True)
        if "step" not in state:
            raise ValueError("optimizer state lacks step: it was not saved by npgpt.optim.Muon")
        self.momentum_buffer.update(loaded)
        self.step_count = int(state["step"])
