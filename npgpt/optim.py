"""AdamW, gradient clipping and the learning-rate schedule, as torch and nanoGPT define them."""
from __future__ import annotations

import math

import numpy as np


def decays(name: str, value: np.ndarray) -> bool:
    """nanoGPT's rule: weight decay for matrices (linears, embeddings), none for biases and gains."""
    return value.ndim >= 2


class AdamW:
    """torch.optim.AdamW's update, one parameter at a time.

    For every parameter p with gradient g, at step t (from 1):
        p <- p * (1 - lr * wd)                      decoupled weight decay (decay group only)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    Each parameter array is updated in place (p -= ...), so the model, which holds the same
    arrays, sees the new values; m and v are dicts keyed like params. npgpt.fast.AdamW does the
    same arithmetic over flat buffers. See docs/gradients.md#adamw.
    """

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.groups = parameter_groups(params)
        self.exp_avg = {n: np.zeros_like(p) for n, p in params.items()}  # m, keyed like params
        self.exp_avg_sq = {n: np.zeros_like(p) for n, p in params.items()}  # v
        self.step_count = 0

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """One update of every parameter in place; `lr` overrides the base rate (schedules)."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1.0 - b1 ** t
        bias_correction2_sqrt = math.sqrt(1.0 - b2 ** t)
        decayed = set(self.groups["decay"])
        for name, p in self.params.items():
            g = grads[name]
            if name in decayed and self.weight_decay:
                p *= 1.0 - lr * self.weight_decay
            m = b1 * self.exp_avg[name] + (1.0 - b1) * g
            v = b2 * self.exp_avg_sq[name] + (1.0 - b2) * (g * g)
            denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
            p -= (lr / bias_correction1) * (m / denom)
            self.exp_avg[name], self.exp_avg_sq[name] = m, v

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays only (no objects), so it saves to .npz and loads with allow_pickle=False:
        "step", and "exp_avg.<parameter name>", "exp_avg_sq.<parameter name>" for every parameter."""
        return moments_state(self.step_count, self.moments("exp_avg"), self.moments("exp_avg_sq"))

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """All or nothing: every buffer is checked before any is replaced. Takes this state_dict's
        layout and the older one of two flat vectors per group ("exp_avg.decay", ...)."""
        step, exp_avg, exp_avg_sq = moments_from_state(state, self.params, self.groups)
        self.exp_avg, self.exp_avg_sq, self.step_count = exp_avg, exp_avg_sq, step

    def moments(self, kind: str = "exp_avg") -> dict[str, np.ndarray]:
        """A moment buffer as a per-parameter dict, to compare with torch's state."""
        store = self.exp_avg if kind == "exp_avg" else self.exp_avg_sq
        return {n: store[n] for n in self.params}


# --------------------------------------------------------------------------------------------
# The optimizer state as flat arrays (shared with npgpt.fast.AdamW, so either loads the other's)
# --------------------------------------------------------------------------------------------

def parameter_groups(params: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """{"decay": names of the decayed parameters, "no_decay": the rest}, each in params order."""
    return {"decay": [n for n, p in params.items() if decays(n, p)],
            "no_decay": [n for n, p in params.items() if not decays(n, p)]}


def moments_state(step: int, exp_avg: dict, exp_avg_sq: dict) -> dict[str, np.ndarray]:
    """The state_dict layout: "step", "exp_avg.<name>" and "exp_avg_sq.<name>", copies."""
    state = {"step": np.array(step, dtype=np.int64)}
    for kind, store in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        for name, value in store.items():
            state[f"{kind}.{name}"] = np.array(value, copy=True)
    return state


def moments_from_state(state: dict, params: dict[str, np.ndarray], groups: dict[str, list[str]]):
    """(step, exp_avg, exp_avg_sq) from a state_dict, as fresh per-parameter arrays of the
    parameters' shapes and dtypes. Reads the per-parameter layout, or the older per-group one
    (one flat vector per group, its parameters back to back in params order). Raises ValueError
    naming the first missing or misshapen entry; nothing is returned half loaded."""
    if "step" not in state:
        raise ValueError("optimizer state lacks step: it was not saved by npgpt.optim.AdamW")
    per_group = any(f"exp_avg.{g}" in state for g in groups)
    loaded = {}
    for kind in ("exp_avg", "exp_avg_sq"):
        if per_group:
            loaded[kind] = _split_groups(state, kind, params, groups)
            continue
        loaded[kind] = {}
        for name, p in params.items():
            key = f"{kind}.{name}"
            if key not in state:
                raise ValueError(f"optimizer state lacks {key}: it was not saved by npgpt.optim.AdamW")
            value = np.asarray(state[key])
            if value.shape != p.shape:
                raise ValueError(f"optimizer state {key} has shape {value.shape}, "
                                 f"expected {p.shape}: it belongs to another model")
            loaded[kind][name] = value.astype(p.dtype, copy=True)
    return int(state["step"]), loaded["exp_avg"], loaded["exp_avg_sq"]


def _split_groups(state: dict, kind: str, params: dict, groups: dict) -> dict[str, np.ndarray]:
    """The per-group layout ("exp_avg.decay", "exp_avg.no_decay") cut into per-parameter arrays."""
    out = {}
    for group, names in groups.items():
        key = f"{kind}.{group}"
        size = sum(params[n].size for n in names)
        if key not in state:
            raise ValueError(f"optimizer state lacks {key}: it was not saved by npgpt.optim.AdamW")
        flat = np.asarray(state[key])
        if flat.shape != (size,):
            raise ValueError(f"optimizer state {key} has shape {flat.shape}, "
                             f"expected {(size,)}: it belongs to another model")
        offset = 0
        for n in names:
            p = params[n]
            out[n] = flat[offset:offset + p.size].reshape(p.shape).astype(p.dtype, copy=True)
            offset += p.size
    return {n: out[n] for n in params}


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most max_norm, as
    torch.nn.utils.clip_grad_norm_: coefficient min(1, max_norm / (norm + 1e-6)). Returns the
    norm before clipping. See docs/gradients.md#gradient-clipping."""
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coef)
    return total


def cosine_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int,
              min_lr: float) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr, then min_lr.

    See docs/gradients.md#cosine-schedule.
    """
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters or lr_decay_iters <= warmup_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


from .muon import Muon  # noqa: E402,F401  npgpt.optim.Muon
