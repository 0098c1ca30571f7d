"""Training settings, named presets and the command line shared by train_np.py and train_torch.py.

Flags use nanoGPT's names. A preset fills every setting; flags given on the command line override it.
No exec-based configuration: presets are plain dataclass instances.

Both scripts take the same two commands:
    python train_X.py [train] [--preset NAME] [--flag value ...]      train (the default command)
    python train_X.py sample --ckpt PATH [--prompt TEXT ...]           autocomplete a prompt
Every mistake a user can make ends in one line on stderr, "error: <problem>; <fix>", and exit status
2 (EXIT_USAGE); a fault during training (non-finite loss, a failed write) exits 1; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .checkpoint import CheckpointError
from .config import ACTIVATIONS, GPTConfig
from .data import CharTokenizer, DataError, train_val_split

EXIT_FAULT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_OUT_DIR = "out"


class UsageError(Exception):
    """A bad flag, prompt or combination of flags; the message is one line naming the fix."""


class TrainingError(Exception):
    """A fault during training (e.g. the loss stopped being finite); the message is one line."""


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

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a checkpoint's dict; unknown keys are an error (ValueError), missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**d)


# nanoGPT's CPU recipe (README, "I only have a macbook"), exactly: tied head, no biases, GELU.
NANOGPT_CPU = TrainConfig()
# The default without a GPU: nanoGPT's CPU recipe with an untied output head (lm_head.weight, +8k
# parameters, as the lecture's gpt.py). Tied, this recipe ends at val 1.905-1.926 on this data
# (five runs, both backends); untied it reaches 1.876 in the same 2000 steps (bench/RESULTS.md).
CPU = replace(NANOGPT_CPU, tie_weights=False)

PRESETS: dict[str, TrainConfig] = {
    "cpu": CPU,
    "nanogpt-cpu": NANOGPT_CPU,
    # nanoGPT's config/train_shakespeare_char.py, the "baby GPT": the default with a GPU.
    "shakespeare-char": replace(
        NANOGPT_CPU, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
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


# --------------------------------------------------------------------------- flags


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr ("error: ...; see --help"), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def add_train_flags(parser: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    """--preset plus one flag per TrainConfig field (default: take the preset's value)."""
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help=f"named settings that the other flags override (default {default_preset})")
    for f in fields(TrainConfig):
        kind = {bool: _bool, "bool": _bool, int: int, "int": int, float: float, "float": float}.get(f.type, str)
        parser.add_argument(f"--{f.name}", type=kind, default=None,
                            help=f"(preset cpu: {getattr(CPU, f.name)!r})")


def train_parser(prog: str, description: str, default_preset: str = "cpu", torch_flags: bool = False
                 ) -> OneLineArgumentParser:
    """The `train` command's flags: data, output, resume, and every TrainConfig field."""
    p = OneLineArgumentParser(prog=prog, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="path to the training text (default: NPGPT_DATA, "
                   "the cache, or a download of Tiny Shakespeare)")
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR,
                   help=f"where checkpoints, metrics.jsonl and loss.png go (default {DEFAULT_OUT_DIR})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out_dir (its ckpt_last); its settings come from the "
                        "checkpoint, flags other than the model shape override them")
    p.add_argument("--init_from", default=None, metavar="PATH",
                   help="start from the weights of any checkpoint (.npz, .pt, nanoGPT ckpt.pt) with a "
                        "fresh optimiser; the model shape comes from the checkpoint")
    p.add_argument("--vocab", default=None, metavar="PATH",
                   help="with --init_from a nanoGPT ckpt.pt: the text whose characters are its vocabulary "
                        "(default: the training text)")
    p.add_argument("--progress", type=_bool, default=None,
                   help="show a progress bar (default: only when stderr is a terminal)")
    if torch_flags:
        _add_torch_flags(p, training=True)
    add_train_flags(p, default_preset)
    return p


def sample_parser(prog: str, description: str, torch_flags: bool = False) -> OneLineArgumentParser:
    """The `sample` command: autocomplete a prompt from a checkpoint."""
    p = OneLineArgumentParser(prog=f"{prog} sample", description=description)
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="checkpoint to sample from: ckpt_*.npz, ckpt_*.pt or a nanoGPT ckpt.pt")
    p.add_argument("--prompt", default="\n", help="text to continue (default a newline)")
    p.add_argument("--max_new_tokens", type=_nonneg_int, default=500)
    p.add_argument("--temperature", type=_nonneg_float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top_k", type=_nonneg_int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--vocab", default=None, metavar="PATH",
                   help="for a nanoGPT ckpt.pt: the text whose characters are its vocabulary "
                        "(default: Tiny Shakespeare from --data / NPGPT_DATA / the cache)")
    p.add_argument("--data", default=None, help="where to find Tiny Shakespeare for --vocab's default")
    if torch_flags:
        _add_torch_flags(p, training=False)
    return p


def _add_torch_flags(p: argparse.ArgumentParser, training: bool) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    if training:
        p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="auto: bfloat16 autocast on a GPU that supports it, else float32")
        p.add_argument("--compile", type=_bool, default=None,
                       help="torch.compile the model (default: on for CUDA)")
        p.add_argument("--attention", default="sdpa", choices=("sdpa", "explicit"),
                       help="sdpa: F.scaled_dot_product_attention (flash on GPU); explicit: written out")


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """("sample", rest) for `sample ...`; ("train", rest) otherwise (the word `train` is optional)."""
    if argv and argv[0] in ("sample", "train"):
        return argv[0], argv[1:]
    return "train", list(argv)


# --------------------------------------------------------------------------- settings of a run

SHAPE_FIELDS = ("model", "n_layer", "n_head", "n_embd", "block_size", "bias", "activation", "tie_weights")


def explicit_flags(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def _validated(cfg: TrainConfig) -> TrainConfig:
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    return cfg


def train_config_from_args(args: argparse.Namespace, default_preset: str = "cpu") -> TrainConfig:
    """The preset with every flag the user gave applied on top; validated (UsageError)."""
    overrides = explicit_flags(args)
    cfg = replace(PRESETS[getattr(args, "preset", None) or default_preset], **overrides)
    if "max_iters" in overrides and "lr_decay_iters" not in overrides:
        cfg = replace(cfg, lr_decay_iters=cfg.max_iters)  # decay over the run, as nanoGPT's recipes do
    return _validated(cfg)


def resumed_train_config(saved: dict, args: argparse.Namespace, where) -> TrainConfig:
    """The settings of a resumed run; the model shape must stay that of the checkpoint.

    Without --preset: the checkpoint's settings with the flags given on top (--max_iters alone then
    keeps the saved lr_decay_iters, so the schedule goes on as it was). With --preset: the preset and
    flags as for a fresh run (the same command line plus --resume continues the same run).
    """
    try:
        base = TrainConfig.from_dict(saved or {})
    except (TypeError, ValueError) as err:
        from .checkpoint import CheckpointError
        raise CheckpointError(f"{where}: its training settings are unreadable ({err}); "
                              "start a new run instead of --resume") from None
    fix = "--resume keeps the model of the run: drop the flag, or start a new run in another --out_dir"
    if getattr(args, "preset", None):
        cfg = train_config_from_args(args)
        _refuse_shape_change(base, {k: getattr(cfg, k) for k in SHAPE_FIELDS}, fix,
                             f"--preset {args.preset} gives ")
        return cfg
    overrides = explicit_flags(args)
    _refuse_shape_change(base, overrides, fix)
    return _validated(replace(base, **overrides))


def init_from_train_config(args: argparse.Namespace, model: str, gpt_config: GPTConfig | None,
                           default_preset: str = "cpu") -> TrainConfig:
    """Preset + flags, but the model's shape from the checkpoint that --init_from names."""
    cfg = train_config_from_args(args, default_preset)
    if model == "bigram":
        shape = {"model": "bigram"}
    else:
        shape = {k: getattr(gpt_config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias",
                                                      "activation", "tie_weights")}
        shape["model"] = "gpt"
    _refuse_shape_change(TrainConfig(**{**cfg.to_dict(), **shape}), explicit_flags(args),
                         "--init_from takes the model shape from the checkpoint: drop the flag")
    return _validated(replace(cfg, **shape))


def _refuse_shape_change(base: TrainConfig, overrides: dict, fix: str, source: str = "--") -> None:
    for name in SHAPE_FIELDS:
        if name in overrides and overrides[name] != getattr(base, name):
            raise UsageError(f"{source}{name}={overrides[name]!r} but the checkpoint has "
                             f"{name}={getattr(base, name)!r}; {fix}")


# --------------------------------------------------------------------------- data and prompts

def training_splits(text: str, tokenizer: CharTokenizer, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode `text` and split it 90/10; DataError unless both splits hold a (block_size + 1) window."""
    try:
        data = tokenizer.encode(text)
    except ValueError as err:
        raise DataError(f"the training text does not fit the checkpoint's vocabulary: {err}") from None
    train_data, val_data = train_val_split(data)
    for name, split in (("train", train_data), ("val", val_data)):
        if len(split) < block_size + 1:
            raise DataError(f"the text has {len(text)} characters, so the {name} split has {len(split)} tokens, "
                            f"fewer than block_size + 1 = {block_size + 1}; use a longer text or a smaller "
                            "--block_size")
    return train_data, val_data


def encode_prompt(tokenizer: CharTokenizer, prompt: str, block_size: int | None) -> np.ndarray:
    """The prompt as (1, T) ids; an empty prompt starts from token 0. UsageError for unknown characters.

    A prompt longer than block_size is kept whole (it is printed back), but the model only sees its
    last block_size tokens; that is said once on stderr.
    """
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as err:
        raise UsageError(f"--prompt has {err}; change the prompt") from None
    if len(ids) == 0:
        ids = np.zeros(1, dtype=np.int64)
    if block_size is not None and len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} characters but block_size is {block_size}; the model sees "
              f"only its last {block_size}", file=sys.stderr)
    return ids[None, :]


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def checkpoint_tokenizer(ckpt, vocab_path: str | None, default_text) -> CharTokenizer:
    """The tokenizer of a checkpoint: its own vocabulary, or (nanoGPT files carry none) the sorted
    characters of the text at `vocab_path`, else of `default_text()`. DataError/UsageError if they
    do not match the model's vocab_size."""
    if ckpt.vocab is not None:
        return CharTokenizer(ckpt.vocab)
    if vocab_path is not None:
        from pathlib import Path

        from .data import read_text_file
        path = Path(vocab_path).expanduser()
        if not path.is_file():
            raise DataError(f"--vocab file not found: {path}; pass the text the model was trained on")
        text, source = read_text_file(path), f"--vocab {path}"
    else:
        text, source = default_text(), "Tiny Shakespeare (the default vocabulary)"
    if not text:
        raise DataError(f"{source} is empty; pass the text the model was trained on with --vocab")
    tokenizer = CharTokenizer.from_text(text)
    if tokenizer.vocab_size != ckpt.vocab_size:
        raise UsageError(f"{ckpt.path} has vocab_size={ckpt.vocab_size} but {source} has "
                         f"{tokenizer.vocab_size} distinct characters; pass the model's training text with --vocab")
    return tokenizer


def autocomplete(generate, tokenizer: CharTokenizer, prompt: str, block_size: int | None,
                 max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    """prompt + its continuation. `generate(idx, n, temperature=, top_k=, rng=)` is either model's
    generate (returning ids as anything np.asarray takes); the sampler draws from default_rng(seed),
    so both backends give the same text for the same weights and seed."""
    ids = encode_prompt(tokenizer, prompt, block_size)
    out = np.asarray(generate(ids, max_new_tokens, temperature=temperature, top_k=top_k or None,
                              rng=np.random.default_rng(seed)))
    return prompt + tokenizer.decode(out[0, ids.shape[1]:])


def run_cli(argv, train_command, sample_command) -> int:
    """Both scripts' entry point: `[train] FLAGS` or `sample FLAGS`, every failure one line on stderr.

    Exit status: 2 for bad input (flags, data, checkpoints), 1 for a fault during training,
    130 for Ctrl-C; never a traceback.
    """
    command, rest = split_command(sys.argv[1:] if argv is None else list(argv))
    try:
        return sample_command(rest) if command == "sample" else train_command(rest)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`... | head`): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAULT
