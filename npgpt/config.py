"""One model configuration, shared by npgpt (NumPy) and torchgpt (PyTorch).

Each field is declared and validated here once. A field with a `help` in its metadata is a setting
of the training scripts too: gptapp makes it a flag (--name), prints it and saves it with the run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# The lecture's activations.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
# The modern block's: relu(x)**2, and the gated silu(gate) * up.
MODERN_ACTIVATIONS = ("relu2", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POS_EMBS = ("learned", "rope")


class ConfigError(ValueError):
    """A GPTConfig field with a bad value: `name`, `value` and `why` (the message says all three)."""

    def __init__(self, message: str, name: str, value, why: str):
        super().__init__(message)
        self.name, self.value, self.why = name, value, why


def _setting(help: str, **kwargs):
    """A field that is also a flag of the training scripts, with its --help text."""
    return field(metadata={"help": help}, **kwargs)


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

    The modern block (each a switch; the defaults are the lecture's model exactly):
    activation also takes "relu2" (relu(x)**2) and "swiglu" (silu(gate) * up: c_fc is (2H, C),
        rows [0, H) the gate, rows [H, 2H) the up projection).
    mlp_hidden: the MLP's hidden width H; None means 4 * n_embd.
    norm: "layernorm" or "rmsnorm" (x / sqrt(mean(x**2) + eps) * w, no bias whatever `bias` says).
    norm_eps: the eps of every norm (ln_1, ln_2, ln_f, and q_norm/k_norm).
    pos_emb: "learned" (`transformer.wpe.weight`) or "rope" (rotary embeddings of q and k in the
        rotate-half convention, no wpe; needs an even head size).
    rope_theta: RoPE's base: inv_freq[i] = rope_theta ** (-2i / hs).
    qk_norm: RMSNorm over hs of q and of k of every head, after the split and before RoPE.
    """

    vocab_size: int  # from the text (or the checkpoint): no flag
    block_size: int = _setting("context length in characters")
    n_layer: int = _setting("transformer blocks")
    n_head: int = _setting("attention heads per block (n_embd must be a multiple)")
    n_embd: int = _setting("channels of the residual stream")
    dropout: float = _setting("dropout probability in training, in [0, 1)", default=0.0)
    bias: bool = _setting("linears and layer norms carry a bias", default=True)
    activation: str = _setting("the MLP's nonlinearity: relu, gelu (exact), gelu_tanh, relu2 or swiglu",
                               default="gelu")
    tie_weights: bool = _setting("the output head reuses the token embedding", default=True)
    norm: str = _setting("the blocks' normalisation: layernorm or rmsnorm", default="layernorm")
    norm_eps: float = 1e-5  # no flag
    pos_emb: str = _setting("positions: learned (a position embedding table) or rope (rotary, in attention)",
                            default="learned")
    rope_theta: float = _setting("RoPE's base frequency (with --pos_emb rope)", default=10000.0)
    qk_norm: bool = _setting("normalise queries and keys before attention", default=False)
    mlp_hidden: int | None = _setting("the MLP's hidden width (0: 4 * n_embd)", default=None)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self._bad(name, "must be a positive integer", f"GPTConfig.{name} must be a positive integer, "
                                                              f"got {value!r}")
        if self.n_embd % self.n_head != 0:
            self._bad("n_embd", f"must be divisible by --n_head={self.n_head}",
                      f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                      "choose n_embd as a multiple of n_head")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            self._bad("dropout", "must lie in [0, 1)", f"GPTConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        for name, allowed in (("activation", ACTIVATIONS + MODERN_ACTIVATIONS), ("norm", NORMS),
                              ("pos_emb", POS_EMBS)):
            value = getattr(self, name)
            if value not in allowed:
                self._bad(name, f"use one of {', '.join(allowed)}",
                          f"GPTConfig.{name}={value!r} is unknown; use one of {', '.join(allowed)}")
        for name in ("bias", "tie_weights", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                self._bad(name, "must be True or False",
                          f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                self._bad(name, "must be a finite number > 0",
                          f"GPTConfig.{name} must be a positive number, got {value!r}")
        hidden = self.mlp_hidden
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            self._bad("mlp_hidden", "must be >= 0", f"GPTConfig.mlp_hidden must be a positive integer or None "
                                                    f"(4 * n_embd), got {hidden!r}")
        if self.pos_emb == "rope" and self.head_size % 2 != 0:
            self._bad("pos_emb", f"rope needs an even head size, and n_embd / n_head = {self.head_size}; "
                                 "choose --n_embd and --n_head so that it is even",
                      f"GPTConfig.pos_emb='rope' needs an even head size, got n_embd // n_head = "
                      f"{self.n_embd} // {self.n_head} = {self.head_size}; choose n_embd / n_head even")

    def _bad(self, name: str, why: str, message: str):
        raise ConfigError(message, name, getattr(self, name), why)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden_size(self) -> int:
        """H, the MLP's hidden width: mlp_hidden, or 4 * n_embd when it is None."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from a plain dict (e.g. a checkpoint); unknown keys are an error, not ignored.

        Missing keys take their defaults (gptapp.checkpoint relies on this to read checkpoints
        written before the modern block's fields existed: layernorm, learned positions, 4C MLP).
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)
