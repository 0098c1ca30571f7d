"""npgpt's fast path: drop-ins for npgpt.GPT and npgpt.optim.AdamW, tested equal to them.

    from npgpt import fast
    model = fast.GPT(config)              # same constructor, methods, params and checkpoints
    opt = fast.AdamW(model.params, ...)   # state_dict loadable by npgpt.optim.AdamW and back
    muon = fast.Muon(matrices, ...)       # npgpt.optim.Muon's update bit for bit, in place

npgpt/layers.py is the plain reference that docs/gradients.md derives; npgpt.fast.layers.FAST is
its layer set with some pairs replaced (numba kernels, NumPy rewrites: one 2-D matmul per linear,
in-place sums), and fast.GPT tunes the allocator itself. tests/test_fastpath.py compares every
replaced pair with the reference.
"""
from ..model import BigramLanguageModel  # nothing in it to speed up
from . import layers
from .layers import *  # noqa: F401,F403  the layer functions, as npgpt.layers names them
from .layers import __all__ as _layer_names
from .model import GPT, keep_freed_memory, pack_params
from .optim import AdamW, Muon, clip_grad_norm, cosine_lr

__all__ = ["GPT", "BigramLanguageModel", "AdamW", "Muon", "clip_grad_norm", "cosine_lr", "layers",
           "keep_freed_memory", "pack_params", *_layer_names]
