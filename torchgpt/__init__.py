"""The character-level GPT in PyTorch, the reference that npgpt is checked against."""
from npgpt.config import GPTConfig
from torchgpt.convert import (
    load_nanogpt_state_dict,
    load_params,
    params_to_state_dict,
    state_dict_to_params,
)
from torchgpt.model import GPT, BigramLanguageModel, KVCache

__all__ = [
    "GPT",
    "BigramLanguageModel",
    "GPTConfig",
    "KVCache",
    "load_nanogpt_state_dict",
    "load_params",
    "params_to_state_dict",
    "state_dict_to_params",
]
