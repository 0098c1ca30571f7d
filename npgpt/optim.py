"""AdamW, gradient clipping and the learning-rate schedule, as torch and nanoGPT define them."""
from __future__ import annotations

import math

import numpy as np


def decays(name: str, value: np.ndarray) -> bool:
    """nanoGPT's rule: weight decay for matrices (linears, embeddings), none for biases and gains."""
    return value.ndim >= 2


class AdamW:
    """torch.optim.AdamW's update, over one flat buffer per parameter group.

    For every parameter p with gradient g, at step t (from 1):
        p <- p * (1 - lr * wd)                      decoupled weight decay (decay groups only)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    The parameters of each group are gathered into one flat vector so the update is a handful of
    array operations, not a Python loop over tensors; the results are written back in place.
    """

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        names = list(params)
        self.groups = {  # group name -> parameter names, in params order
            "decay": [n for n in names if decays(n, params[n])],
            "no_decay": [n for n in names if not decays(n, params[n])],
        }
        dtype = next(iter(params.values())).dtype
        sizes = {g: sum(params[n].size for n in ns) for g, ns in self.groups.items()}
        self.exp_avg = {g: np.zeros(s, dtype=dtype) for g, s in sizes.items()}
        self.exp_avg_sq = {g: np.zeros(s, dtype=dtype) for g, s in sizes.items()}
        self.step_count = 0

    def _flat(self, arrays: dict[str, np.ndarray], group: str) -> np.ndarray:
        names = self.groups[group]
        return np.concatenate([arrays[n].ravel() for n in names]) if names else np.zeros(0)

    def _scatter(self, flat: np.ndarray, group: str) -> None:
        offset = 0
        for n in self.groups[group]:
            p = self.params[n]
            p[...] = flat[offset:offset + p.size].reshape(p.shape)
            offset += p.size

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """One update of every parameter in place; `lr` overrides the base rate (schedules)."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1.0 - b1 ** t
        bias_correction2_sqrt = math.sqrt(1.0 - b2 ** t)
        for group, wd in (("decay", self.weight_decay), ("no_decay", 0.0)):
            if not self.groups[group]:
                continue
            p, g = self._flat(self.params, group), self._flat(grads, group)
            m, v = self.exp_avg[group], self.exp_avg_sq[group]
            if wd:
                p *= 1.0 - lr * wd
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
            p -= (lr / bias_correction1) * (m / denom)
            self._scatter(p, group)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays only (no objects), so it saves to .npz and loads with allow_pickle=False."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for g in self.groups:
            state[f"exp_avg.{g}"] = self.exp_avg[g].copy()
            state[f"exp_avg_sq.{g}"] = self.exp_avg_sq[g].copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for g in self.groups:
            for kind, store in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                value = np.asarray(state[f"{kind}.{g}"])
                if value.shape != store[g].shape:
                    raise ValueError(f"optimizer state {kind}.{g} has shape {value.shape}, "
                                     f"expected {store[g].shape}: it belongs to another model")
                store[g] = value.astype(store[g].dtype, copy=True)
        self.step_count = int(state["step"])

    def moments(self, kind: str = "exp_avg") -> dict[str, np.ndarray]:
        """A moment buffer as a per-parameter dict (views), to compare with torch's state."""
        store = self.exp_avg if kind == "exp_avg" else self.exp_avg_sq
        out = {}
        for g, names in self.groups.items():
            offset = 0
            for n in names:
                size = self.params[n].size
                out[n] = store[g][offset:offset + size].reshape(self.params[n].shape)
                offset += size
        return {n: out[n] for n in self.params}


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most max_norm, as
    torch.nn.utils.clip_grad_norm_: coefficient min(1, max_norm / (norm + 1e-6)). Returns the
    norm before clipping."""
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coef)
    return total


def cosine_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int,
              min_lr: float) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters or lr_decay_iters <= warmup_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)
