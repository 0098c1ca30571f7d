"""npgpt: a character-level GPT in NumPy with every backward written by hand.

npgpt.layers, npgpt.model and npgpt.optim are the plain reference; npgpt.fast holds drop-ins
(fast.GPT, fast.AdamW) that compute the same thing faster. The reference never imports fast.
"""
from .config import GPTConfig
from .model import GPT, BigramLanguageModel
from . import layers, optim

__all__ = ["GPTConfig", "GPT", "BigramLanguageModel", "layers", "optim"]
