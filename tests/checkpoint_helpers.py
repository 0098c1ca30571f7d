"""Checkpoints to test with: a small config and vocabulary, a filled numpy Checkpoint, a .pt payload,
and an object whose unpickling runs a command. Imported by tests/test_checkpoint.py,
tests/test_cli_errors.py and tests/test_torch_runtime.py."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from gptapp.checkpoint import Checkpoint
from npgpt.config import GPTConfig
from npgpt.model import init_params

CFG = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8)
VOCAB = "\nab\u00e9\u4e2d"  # five characters, two of them outside ASCII


def make_checkpoint(iter_num: int = 3) -> Checkpoint:
    rng = np.random.default_rng(1)
    rng.random(7)
    return Checkpoint(backend="numpy", model="gpt", gpt_config=CFG, vocab=VOCAB, params=init_params(CFG, seed=0),
                      train_config={"n_layer": 1}, iter_num=iter_num, best_val_loss=math.inf,
                      optimizer={"step": np.array(iter_num), "exp_avg.decay": np.arange(4.0)},
                      rng={"data": rng.bit_generator.state, "dropout": None})


def torch_payload(params: dict, config: GPTConfig = CFG) -> dict:
    return {"format": "npgpt-checkpoint", "version": 1, "backend": "torch", "model": "gpt",
            "gpt_config": config.to_dict(), "train_config": {}, "vocab": VOCAB,
            "model_state": {k: torch.from_numpy(np.array(v)) for k, v in params.items()},
            "optimizer": {}, "iter_num": 0, "best_val_loss": 2.5, "rng": {}}


class Evil:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
