"""npgpt.optim.AdamW over flat buffers: the same update, a handful of array operations a step."""
from __future__ import annotations

import math

import numpy as np

from .. import muon as _muon
from .. import optim as _reference
from ..optim import cosine_lr, decays, moments_from_state, moments_state, parameter_groups
from . import numba_kernels as _kernels

__all__ = ["AdamW", "Muon", "clip_grad_norm", "cosine_lr", "decays", "zeropower_via_newton_schulz"]


# With numba, a parameter group larger than this (elements) is updated parameter by parameter
# (one kernel call each, on its slices of the flat buffers) instead of gathered into one flat
# copy of its gradients first: the copy would cost as much memory as the group itself. Smaller
# groups are gathered: one kernel call for the group beats many calls on small parameters.
GATHER_MAX = 1 << 20


class AdamW:
    """npgpt.optim.AdamW's update, over one flat buffer per parameter group.

    For every parameter p with gradient g, at step t (from 1):
        p <- p * (1 - lr * wd)                      decoupled weight decay (decay groups only)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    The parameters of each group are gathered into one flat vector so the update is a handful of
    array operations, not a Python loop over tensors; the results are written back in place.
    When a group's parameters already lie back to back in one buffer (npgpt.fast.GPT lays its
    parameters out so: see fast.model.pack_params), the flat vector is a view of that buffer and the
    gather and the write-back are skipped. The update runs in preallocated scratch memory, so a
    step allocates no large arrays (fresh memory costs page faults). The same operations in the
    same order as npgpt.optim.AdamW: bit for bit its result. With numba
    (npgpt.fast.numba_kernels.ENABLED) the update is one fused, threaded pass over each group
    instead, equal to the reference to rounding (FMAs). state_dict() has npgpt.optim.AdamW's
    layout, and either optimizer loads the other's state.
    """

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.groups = parameter_groups(params)  # group name -> parameter names, in params order
        dtype = next(iter(params.values())).dtype
        sizes = {g: sum(params[n].size for n in ns) for g, ns in self.groups.items()}
        self.exp_avg = {g: np.zeros(s, dtype=dtype) for g, s in sizes.items()}
        self.exp_avg_sq = {g: np.zeros(s, dtype=dtype) for g, s in sizes.items()}
        self.step_count = 0
        # Reused every step, made at the first step that needs them: the gathered gradients, and
        # scratch for the update's intermediates (group-sized, so a model's size again each).
        self._grad_flat, self._scratch = {}, {}
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
            m, v = self.exp_avg[group], self.exp_avg_sq[group]
            if _kernels.ENABLED and not gathered and p.size > GATHER_MAX:
                # one kernel call per parameter on its slices of the flat buffers: no gathered
                # copy of the gradients (a model's size of memory); the same update element by element
                offset = 0
                for n in self.groups[group]:
                    size = self.params[n].size
                    part = slice(offset, offset + size)
                    _kernels.adamw_update(p[part], np.ascontiguousarray(grads[n], dtype=p.dtype).reshape(-1),
                                          m[part], v[part], lr=lr, beta1=b1, beta2=b2, eps=self.eps,
                                          weight_decay=wd, step=t)
                    offset += size
                continue
            if group not in self._grad_flat:
                self._grad_flat[group] = np.zeros(p.size, dtype=p.dtype)
                self._scratch[group] = np.zeros(p.size, dtype=p.dtype)
            g = self._flat(grads, group, out=self._grad_flat[group])
            s = self._scratch[group]
            if _kernels.ENABLED:
                _kernels.adamw_update(p, g, m, v, lr=lr, beta1=b1, beta2=b2, eps=self.eps,
                                      weight_decay=wd, step=t)
                if gathered:
                    self._scatter(p, group)
                continue
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
        """npgpt.optim.AdamW's layout: "step", "exp_avg.<name>", "exp_avg_sq.<name>" (copies)."""
        return moments_state(self.step_count, self.moments("exp_avg"), self.moments("exp_avg_sq"))

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Either layout npgpt.optim.AdamW.load_state_dict takes; all or nothing."""
        step, exp_avg, exp_avg_sq = moments_from_state(state, self.params, self.groups)
        for g, names in self.groups.items():
            self.exp_avg[g] = self._flat(exp_avg, g)
            self.exp_avg_sq[g] = self._flat(exp_avg_sq, g)
        self.step_count = step

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
    """npgpt.optim.clip_grad_norm; with numba, the squares summed (in float64) and the gradients
    scaled by threaded kernels."""
    if not _kernels.ENABLED:
        return _reference.clip_grad_norm(grads, max_norm)
    total = math.sqrt(sum(_kernels.sum_of_squares(g) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            _kernels.scale_in_place(g, coef)
    return total


def _flat_view(arrays: list[np.ndarray]):
    """(one flat view over `arrays`, the arrays) if they lie back to back, in order, in one
    C-contiguous buffer, as views made by fast.model.pack_params do; None otherwise."""
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


def zeropower_via_newton_schulz(u: np.ndarray, coefficients=_muon.NS_COEFFICIENTS, steps: int = 5,
                                eps: float = 1e-7) -> np.ndarray:
    """npgpt.muon.zeropower_via_newton_schulz with each step's sums built in place: the same
    floating-point operations (a x + poly x as poly x + a x, b A + c A^2 as c A^2 + b A: sums
    commute exactly), so bit for bit its result, with three fresh arrays a step instead of six."""
    a, b, c = coefficients
    transposed = u.shape[0] > u.shape[1]
    x = u.T if transposed else u  # (r, k), r <= k
    x = x / max(np.linalg.norm(x), eps)  # a fresh array: the steps below may write into it
    for _ in range(steps):
        gram = x @ x.T  # (r, r)
        poly = gram @ gram
        poly *= c
        gram *= b
        poly += gram  # b A + c A^2
        y = poly @ x  # (r, k)
        x *= a
        y += x  # a x + (b A + c A^2) x
        x = y
    return x.T if transposed else x


class Muon(_muon.Muon):
    """npgpt.optim.Muon with the Newton-Schulz iteration in place (above): bit for bit its update,
    ~15% less time for the iteration; state_dict() loads into either."""

    def orthogonalize(self, update: np.ndarray) -> np.ndarray:
        return zeropower_via_newton_schulz(update, self.ns_coefficients, self.ns_steps, self.eps)
