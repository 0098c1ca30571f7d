"""One model configuration, shared by npgpt (NumPy) and torchgpt (PyTorch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


@dataclass
class GPTConfig:
    """Hyperparameters of the character-level GPT.

    vocab_size: V, number of distinct tokens.
    block_size: the longest context the model attends over (length of `wpe`).
    n_layer, n_head, n_embd: depth, heads per attention layer, channels C (C % n_head == 0).
    dropout: probability of zeroing an activation during training, in [0, 1).
    bias: whether linears and layernorms carry a bias.
    activation: "relu" (the lecture's FeedForward), "gelu" (exact erf form, nn.GELU()) or
        "gelu_tanh" (GPT-2's tanh approximation).
    tie_weights: the output head reuses `transformer.wte.weight` instead of its own `lm_head.weight`.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose n_embd as a multiple of n_head"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation={self.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}"
            )
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from a plain dict (e.g. a checkpoint); unknown keys are an error, not ignored."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)
