"""Hugging Face GPT-2 folders in and out (interface; the implementation lands with its tests).

    from gptapp.hf import load_pretrained
    cfg, params, tokenizer = load_pretrained("path/to/gpt2", dtype=np.float32)
"""
from __future__ import annotations

import numpy as np


class HFError(ValueError):
    """A folder or file that is not a GPT-2 we can load or write; the message is one line."""


def load_pretrained(path, dtype=np.float32):
    """(GPTConfig, params under our names, BPETokenizer or None when the folder has no tokenizer files)."""
    raise NotImplementedError


def export_pretrained(config, params: dict, tokenizer, folder) -> None:
    """Write a GPT-2-shaped model as an HF folder: config.json, model.safetensors, tokenizer files if any."""
    raise NotImplementedError
