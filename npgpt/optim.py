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
    When a group's parameters already lie back to back in one buffer (npgpt.GPT lays its
    parameters out so: see model.pack_params), the flat vector is a view of that buffer and the
    gather and the write-back are skipped. The update runs in preallocated scratch memory, so a
    step allocates no large arrays (fresh memory costs page faults).
    See docs/gradients.md#adamw.
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
        # Reused every step: the gathered gradients, and scratch for the update's intermediates.
        self._grad_flat = {g: np.zeros(s, dtype=dtype) for g, s in sizes.items()}
        self._scratch = {g: np.zeros(s, dtype=dtype) for g, s in sizes.items()}
        self._param_views = {g: _flat_view([params[n] for n in ns]) for g, ns in self.groups.items()}

    def _flat(self, arrays: dict[str, np.ndarray], group: str, out: np.ndarray | None = None) -> np.ndarray:
        names = self.groups[group]
        return np.concatenate([arrays[n].ravel() for n in names], out=out) if names else np.zeros(0)

    def _params_flat(self, group: str) -> tuple[np.ndarray, bool]:
        """The group's parameters as one flat vector, and whether it is a copy to scatter back.

        The view found at construction is used only while the dict still holds those very
        arrays (an entry replaced by a new array, e.g. on loading, falls back to a gather).
        """
        view = self._param_views[group]
        if view is not None and all(self.params[n] is a for n, a in zip(self.groups[group], view[1])):
            return view[0], False
        return self._flat(self.params, group), True

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
            p, gathered = self._params_flat(group)
            g = self._flat(grads, group, out=self._grad_flat[group])
            m, v, s = self.exp_avg[group], self.exp_avg_sq[group], self._scratch[group]
            # The formulas of the docstring, each intermediate written into the scratch `s`:
            # the same operations in the same order as `m += (1 - b1) * g` and so on.
            if wd:
                p *= 1.0 - lr * wd
            m *= b1
            m += np.multiply(g, 1.0 - b1, out=s)
            v *= b2
            np.multiply(g, g, out=s)
            s *= 1.0 - b2
            v += s
            denom = np.sqrt(v, out=s)  # sqrt(v) / sqrt(1 - b2^t) + eps
            denom /= bias_correction2_sqrt
            denom += self.eps
            update = np.divide(m, denom, out=s)  # m / denom
            update *= lr / bias_correction1
            p -= update
            if gathered:
                self._scatter(p, group)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays only (no objects), so it saves to .npz and loads with allow_pickle=False."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for g in self.groups:
            state[f"exp_avg.{g}"] = self.exp_avg[g].copy()
            state[f"exp_avg_sq.{g}"] = self.exp_avg_sq[g].copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """All or nothing: every buffer is checked before any is replaced."""
        loaded = {}
        for g in self.groups:
            for kind, store in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                key = f"{kind}.{g}"
                if key not in state:
                    raise ValueError(f"optimizer state lacks {key}: it was not saved by npgpt.optim.AdamW")
                value = np.asarray(state[key])
                if value.shape != store[g].shape:
                    raise ValueError(f"optimizer state {key} has shape {value.shape}, "
                                     f"expected {store[g].shape}: it belongs to another model")
                loaded[kind, g] = value.astype(store[g].dtype, copy=True)
        for (kind, g), value in loaded.items():
            (self.exp_avg if kind == "exp_avg" else self.exp_avg_sq)[g] = value
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


def _flat_view(arrays: list[np.ndarray]):
    """(one flat view over `arrays`, the arrays) if they lie back to back, in order, in one
    C-contiguous buffer, as views made by model.pack_params do; None otherwise."""
    if not arrays:
        return None
    owner = arrays[0] if arrays[0].base is None else arrays[0].base
    if not isinstance(owner, np.ndarray) or not owner.flags.c_contiguous:
        return None
    address = arrays[0].__array_interface__["data"][0]
    start, rem = divmod(address - owner.__array_interface__["data"][0], owner.itemsize)
    total = sum(a.size for a in arrays)
    if rem or start < 0 or start + total > owner.size:
        return None
    for a in arrays:
        if (a.dtype != owner.dtype or not a.flags.c_contiguous
                or a.__array_interface__["data"][0] != address):
            return None
        address += a.nbytes
    return owner.reshape(-1)[start:start + total], list(arrays)


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


from .muon import Muon  # noqa: E402,F401  (issue 11: npgpt.optim.Muon)
