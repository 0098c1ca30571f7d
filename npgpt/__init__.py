"""npgpt: a character-level GPT in NumPy with every backward written by hand."""
from .config import GPTConfig
from .model import GPT, BigramLanguageModel
from . import layers, optim

__all__ = ["GPTConfig", "GPT", "BigramLanguageModel", "layers", "optim"]
