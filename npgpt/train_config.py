"""Training settings, named presets and command-line flags shared by train_np.py and train_torch.py.

Flags use nanoGPT's names. A preset fills every setting; flags given on the command line override it.
No exec-based configuration: presets are plain dataclass instances.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace

from .config import ACTIVATIONS, GPTConfig


@dataclass(frozen=True)
class TrainConfig:
    model: str = "gpt"  # "gpt" or "bigram"
    # model shape
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    activation: str = "gelu"
    tie_weights: bool = True
    # optimisation
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation, logging, sampling
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 0  # 0 = no top-k filtering
    prompt: str = "\n"

    def validate(self) -> None:
        """Raise ValueError naming the flag and its bad value."""
        def bad(name, why):
            raise ValueError(f"--{name}={getattr(self, name)!r} is invalid: {why}")

        if self.model not in ("gpt", "bigram"):
            bad("model", "use gpt or bigram")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                     "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "max_new_tokens", "top_k"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.n_embd % self.n_head:
            bad("n_embd", f"must be divisible by --n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must lie in [0, 1)")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"use one of {', '.join(ACTIVATIONS)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "temperature"):
            value = getattr(self, name)
            if not value >= 0.0 or value != value or value == float("inf"):
                bad(name, "must be a finite number >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must lie in [0, 1)")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         activation=self.activation, tie_weights=self.tie_weights)

    def to_dict(self) -> dict:
        return asdict(self)


# nanoGPT's CPU recipe (README, "I only have a macbook"): the default without a GPU.
CPU = TrainConfig()

PRESETS: dict[str, TrainConfig] = {
    "cpu": CPU,
    # nanoGPT's config/train_shakespeare_char.py, the "baby GPT": the default with a GPU.
    "shakespeare-char": replace(
        CPU, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
        max_iters=5000, lr_decay_iters=5000, eval_iters=200),
    # The lecture's gpt.py: ReLU MLP, untied head, biases, constant lr 3e-4, torch's default AdamW.
    "lecture": replace(
        CPU, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=True,
        activation="relu", tie_weights=False, batch_size=64, max_iters=5000, learning_rate=3e-4,
        decay_lr=False, warmup_iters=0, beta2=0.999, weight_decay=0.01, grad_clip=0.0,
        eval_interval=500, eval_iters=200),
    # The lecture's bigram.py baseline.
    "bigram": replace(
        CPU, model="bigram", block_size=8, batch_size=32, max_iters=3000, learning_rate=1e-2,
        decay_lr=False, warmup_iters=0, beta2=0.999, weight_decay=0.0, grad_clip=0.0,
        eval_interval=300, eval_iters=200),
    # Seconds, for tests and smoke runs.
    "tiny": replace(
        CPU, n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, max_iters=40,
        lr_decay_iters=40, warmup_iters=5, eval_interval=20, eval_iters=2, log_interval=10,
        max_new_tokens=60),
}


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_train_flags(parser: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    """--preset plus one flag per TrainConfig field (default: take the preset's value)."""
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"named settings that the other flags override (default {default_preset})")
    for f in fields(TrainConfig):
        kind = {bool: _bool, "bool": _bool, int: int, "int": int, float: float, "float": float}.get(f.type, str)
        parser.add_argument(f"--{f.name}", type=kind, default=None,
                            help=f"(preset cpu: {getattr(CPU, f.name)!r})")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset with every flag the user gave applied on top; validated."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = replace(PRESETS[args.preset], **overrides)
    if "max_iters" in overrides and "lr_decay_iters" not in overrides:
        cfg = replace(cfg, lr_decay_iters=cfg.max_iters)  # decay over the run, as nanoGPT's recipes do
    cfg.validate()
    return cfg
