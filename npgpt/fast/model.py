"""npgpt.GPT on the fast layers, with its parameters in one buffer and the allocator tuned.

fast.GPT is a drop-in for npgpt.GPT: the same constructor, methods, params dict (names, shapes,
order) and checkpoints. It differs in three ways, none visible to a caller:
- it composes npgpt.fast.layers' layer set (FAST: the reference's pairs with some replaced)
  instead of npgpt.layers.REFERENCE;
- its parameter arrays are views into one contiguous buffer (pack_params), so fast.AdamW can
  update each parameter group as one flat vector with no gather or scatter;
- its constructor asks glibc's malloc to keep freed memory (keep_freed_memory), once per process;
- its backward holds less at once: the logits' gradient (B, T, V) lives only through the head's
  backward, and a tied head's two gradients of wte are summed into one of them.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..config import GPTConfig
from ..layers import block_backward, norm_backward
from ..model import GPT as ReferenceGPT
from ..optim import decays
from . import layers as fast_layers
from . import numba_kernels


def pack_params(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same parameters, as views into one contiguous buffer: first every parameter that
    AdamW decays (the matrices), then the rest, each group in dict order. Keys keep their order.

    Why: fast.AdamW updates each of its two groups as one flat vector. When the group already lies
    back to back in memory, that vector is a view, and a step needs no gather (np.concatenate)
    before the update and no scatter after it. Each value is still an ordinary ndarray of its
    own shape: reading it, or writing into it (params[k][...] = value, as loading does), works
    as before. Replacing an entry with a new array is allowed too; fast.AdamW then gathers again.
    """
    order = ([n for n, p in params.items() if decays(n, p)]
             + [n for n, p in params.items() if not decays(n, p)])
    dtype = np.result_type(*params.values()) if params else np.float32
    buffer = np.empty(sum(p.size for p in params.values()), dtype=dtype)
    views, offset = {}, 0
    for n in order:
        size = params[n].size
        views[n] = buffer[offset:offset + size].reshape(params[n].shape)
        views[n][...] = params[n]
        offset += size
    return {n: views[n] for n in params}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_kept_freed_memory = None  # the result of the first call: the setting is per process


def keep_freed_memory(trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20) -> bool:
    """Ask glibc's malloc to keep up to `trim_threshold` bytes of freed memory for reuse rather
    than return it to the OS, and to serve blocks below `mmap_threshold` from that pool.

    Why: a training step frees its activations and allocates the same sizes again in the next
    step. By default glibc gives large freed blocks back to the OS, and every page of the next
    step's arrays is then a page fault (bench/RESULTS.md has the cost). With this the process
    keeps its peak memory mapped and reuses it.
    It changes the allocator of the whole process (torch, if loaded, shares it). fast.GPT calls
    it; later calls return the first one's result and change nothing.
    Returns False where the C library has no mallopt (macOS); nothing changes there.
    """
    global _kept_freed_memory
    if _kept_freed_memory is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
        except (OSError, AttributeError):
            _kept_freed_memory = False
        else:
            _kept_freed_memory = (bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
                                  and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)))
    return _kept_freed_memory


class GPT(ReferenceGPT):
    """npgpt.GPT on npgpt.fast's layer set, parameters packed into one buffer (see the module doc)."""

    layers = fast_layers.FAST

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float32):
        super().__init__(config, seed, dtype)
        self.layers = fast_layers.layer_set(numba_kernels.ENABLED)  # equal to FAST unless ENABLED changed
        self.params = pack_params(self.params)  # the same values, as views of one buffer
        keep_freed_memory()

    def _head_backward(self, cache):
        """(dx (B, T, C), dhead (V, C)) of the loss through the head; dlogits (B, T, V) is freed on return."""
        (dlogits,) = self.layers.cross_entropy_backward(1.0, cache.loss)  # (B, T, V)
        dx, dhead, _ = self.layers.linear_backward(dlogits, cache.lm_head)
        return dx, dhead

    def backward(self) -> dict[str, np.ndarray]:
        """npgpt.GPT.backward's walk and result, with less alive at once (see the module doc):
        wte's gradient dwte + dhead is summed into dhead, the same sums in place."""
        cache = self._cache
        if cache is None or cache.loss is None:
            return super().backward()  # its error
        L, cfg = self.layers, self.config
        grads = {}
        dx, dhead = self._head_backward(cache)
        dx, grads["transformer.ln_f.weight"], db = norm_backward(dx, cache.ln_f, L)
        if db is not None:
            grads["transformer.ln_f.bias"] = db
        for i in reversed(range(cfg.n_layer)):
            dx, block_grads = block_backward(dx, cache.blocks[i])
            for name, g in block_grads.items():
                grads[f"transformer.h.{i}.{name}"] = g
        if cache.embedding_dropout is not None:
            (dx,) = L.dropout_backward(dx, cache.embedding_dropout)
        dwte, dwpe = L.embedding_backward(dx, cache.embedding)
        del dx
        if dwpe is not None:  # None with RoPE: no wpe
            grads["transformer.wpe.weight"] = dwpe
        if cfg.tie_weights:
            dhead += dwte  # one matrix used twice: the two gradients add (x + y == y + x, bit for bit)
            grads["transformer.wte.weight"] = dhead
        else:
            grads["transformer.wte.weight"] = dwte
            grads["lm_head.weight"] = dhead
        return {k: grads[k] for k in self.params}  # same keys, same order as params
