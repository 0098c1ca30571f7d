"""The command line of train_np.py and train_torch.py: flags, settings of a run, and run_cli.

Flags use nanoGPT's names; each TrainConfig field (gptapp.settings) is a flag. Both scripts take
the same three commands:
    python train_X.py [train] [--preset NAME] [--flag value ...]      train (the default command)
    python train_X.py sample --ckpt PATH [--prompt TEXT ...]           autocomplete a prompt
    python train_X.py export --ckpt PATH --to DIR                      a GPT-2-shaped model as a Hugging Face folder
Every mistake a user can make ends in one line on stderr, "error: <problem>; <fix>", and exit status
2 (EXIT_USAGE); a fault during training (non-finite loss, a failed write) exits 1; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from dataclasses import fields, replace

from npgpt.config import GPTConfig
from npgpt.data import DataError

from .checkpoint import CheckpointError, WriteError
from .errors import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_USAGE, TrainingError, UsageError, one_line
from .settings import (
    FIELD_HELP,
    GPT_ONLY_FIELDS,
    MAX_SEED,
    MIN_TEMPERATURE,
    PRESET_HELP,
    PRESETS,
    SHAPE_FIELDS,
    TORCH_ONLY_FIELDS,
    SettingError,
    TrainConfig,
    model_settings,
)

DEFAULT_OUT_DIR = "out"

__all__ = ["DEFAULT_OUT_DIR", "TrainingError", "UsageError", "one_line", "run_cli", "sample_parser", "export_parser",
           "train_parser", "train_config_from_args", "resumed_train_config", "init_from_train_config"]


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SEED}], got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _temperature(text: str) -> float:
    value = _nonneg_float(text)
    if 0.0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"expected 0 (greedy) or a number >= {MIN_TEMPERATURE:.3g}, got {text!r}: "
                                         "the logits divided by a smaller one overflow")
    return value


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (1: no top-p filtering), got {text!r}")
    return value


def _path(text: str) -> str:
    """A path flag: `~` and `~user` expanded, as a shell would (also in --flag=~/x, which shells leave)."""
    return os.path.expanduser(text)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr ("error: ...; see --help"), exit status 2; and no
    prefix abbreviations (--over is an unknown flag, not --overwrite)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def preset_values(name: str) -> str:
    """Every preset's value of one setting, presets with the same value together: "cpu/tiny 0.001; ..."."""
    groups: dict[str, list[str]] = {}
    for preset, cfg in PRESETS.items():
        groups.setdefault(repr(getattr(cfg, name)), []).append(preset)
    return "; ".join(f"{'/'.join(names)} {value}" for value, names in groups.items())


def add_train_flags(parser: argparse.ArgumentParser, default_preset: str = "cpu", numpy_flags: bool = False) -> None:
    """--preset plus one flag per TrainConfig field (default: take the preset's value); train_np.py's
    (`numpy_flags`) without the torch-only ones (TORCH_ONLY_FIELDS)."""
    presets = "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items())
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), metavar="NAME",
                        help=_escape(f"named settings that the other flags override (default {default_preset}). "
                                     f"{presets}"))
    for f in fields(TrainConfig):
        if numpy_flags and f.name in TORCH_ONLY_FIELDS:
            continue
        kind, metavar = {"bool": (_bool, "{true,false}"), "int": (int, "N"), "float": (float, "X")
                         }.get(f.type, (str, "TEXT"))
        parser.add_argument(f"--{f.name}", type=kind, default=None, metavar=metavar,
                            help=_escape(f"{FIELD_HELP.get(f.name, f.name)} (default: the preset's; "
                                         f"{preset_values(f.name)})"))


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def train_parser(prog: str, description: str, default_preset: str = "cpu", torch_flags: bool = False,
                 numpy_flags: bool = False) -> OneLineArgumentParser:
    """The `train` command's flags: data, output, resume, and every TrainConfig field."""
    p = OneLineArgumentParser(prog=prog, description=description, usage=usage_lines(prog),
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=f"The sample command's flags: {prog} sample --help; the export command's: "
                                     f"{prog} export --help")
    p.add_argument("--data", type=_path, default=None, metavar="PATH", help="path to the training text (default: "
                   "NPGPT_DATA, the cache, or a download of Tiny Shakespeare)")
    p.add_argument("--out_dir", type=_path, default=DEFAULT_OUT_DIR, metavar="DIR",
                   help=f"where checkpoints, metrics.jsonl and loss.png go (default {DEFAULT_OUT_DIR}); a "
                        "fresh run refuses a directory that holds a run, unless --overwrite or --move_aside")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out_dir (its ckpt_last); its settings come from the "
                        "checkpoint, flags other than the model shape override them (default off)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out_dir that holds one, deleting that run's checkpoints, "
                        "metrics.jsonl and loss.png first (default off: refuse)")
    p.add_argument("--move_aside", action="store_true",
                   help="start a new run in an --out_dir that holds one after moving that run into "
                        "<out_dir>/run-<date>-<time>/ (default off: refuse; `make train` turns it on)")
    p.add_argument("--init_from", type=_path, default=None, metavar="PATH",
                   help="start from the weights of any checkpoint (.npz, .pt, nanoGPT ckpt.pt, or a Hugging Face "
                        "GPT-2 folder: fine-tune it with its BPE tokenizer) with a fresh optimiser; the model shape "
                        "comes from the checkpoint, a GPT-2 folder's block_size may be lowered (default: random "
                        "weights)")
    p.add_argument("--vocab", type=_path, default=None, metavar="PATH",
                   help="with --init_from a nanoGPT ckpt.pt (it carries no vocabulary): the text whose "
                        "characters are its vocabulary (default: the training text)")
    p.add_argument("--progress", type=_bool, default=None, metavar="{true,false}",
                   help="show a progress bar (default: only when stderr is a terminal)")
    if torch_flags:
        _add_torch_flags(p, training=True)
    if numpy_flags:
        _add_numpy_flags(p)
    add_train_flags(p, default_preset, numpy_flags)
    return p


def sample_parser(prog: str, description: str, torch_flags: bool = False, numpy_flags: bool = False
                  ) -> OneLineArgumentParser:
    """The `sample` command: autocomplete a prompt from a checkpoint."""
    p = OneLineArgumentParser(prog=f"{prog} sample", description=description)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=_path, default=None, metavar="PATH",
                        help="checkpoint to sample from: ckpt_*.npz, ckpt_*.pt, a nanoGPT ckpt.pt or a Hugging Face "
                             "GPT-2 folder (this or --init_from is required)")
    source.add_argument("--init_from", type=_path, default=None, metavar="PATH",
                        help="the same as --ckpt, named as the train command names it (this or --ckpt is required)")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="text to continue (default a newline)")
    p.add_argument("--prompt_file", type=_path, default=None, metavar="PATH",
                   help="read the text to continue from this UTF-8 file instead (default: use --prompt)")
    p.add_argument("--num_samples", type=_positive_int, default=1, metavar="N",
                   help="how many continuations: the i-th (from 0) uses seed + i, a line of dashes between "
                        "them (default 1)")
    p.add_argument("--max_new_tokens", type=_nonneg_int, default=500, metavar="N",
                   help="tokens to add to the prompt: characters, or GPT-2's BPE tokens (default 500)")
    p.add_argument("--temperature", type=_temperature, default=0.8, metavar="X",
                   help="divide the logits by this; 0 means greedy decoding (default 0.8)")
    p.add_argument("--top_k", type=_nonneg_int, default=0, metavar="N",
                   help="sample from the k most likely tokens only; 0: all of them (default 0)")
    p.add_argument("--top_p", type=_top_p, default=1.0, metavar="X",
                   help="nucleus sampling: sample from the smallest set of most likely tokens whose probability "
                        "reaches X, after --top_k; 1: all of them (default 1)")
    p.add_argument("--seed", type=_seed, default=1337, metavar="N",
                   help=f"seed of the sampler, in [0, {MAX_SEED}]: the same seed, the same text in either "
                        "script (default 1337)")
    p.add_argument("--vocab", type=_path, default=None, metavar="PATH",
                   help="for a nanoGPT ckpt.pt: the text whose characters are its vocabulary "
                        "(default: Tiny Shakespeare from --data / NPGPT_DATA / the cache)")
    p.add_argument("--data", type=_path, default=None, metavar="PATH",
                   help="where to find Tiny Shakespeare for --vocab's default (default: NPGPT_DATA, the cache, "
                        "or a download)")
    if torch_flags:
        _add_torch_flags(p, training=False)
    if numpy_flags:
        _add_numpy_flags(p)
    return p


def _add_numpy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", action="store_true",
                   help="run the plain reference layers (npgpt.GPT, npgpt.optim.AdamW) instead of the fast "
                        "path npgpt.fast: the same numbers in float64, slower (default off)")


def _add_torch_flags(p: argparse.ArgumentParser, training: bool) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default auto)")
    if training:
        p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="auto: bfloat16 autocast on a GPU that supports it, else float32 (default auto)")
        p.add_argument("--compile", type=_bool, default=None, metavar="{true,false}",
                       help="torch.compile the model (default: on for CUDA, off elsewhere)")
        p.add_argument("--attention", default="sdpa", choices=("sdpa", "explicit"),
                       help="sdpa: F.scaled_dot_product_attention (flash on GPU); explicit: written out "
                            "(default sdpa)")


def usage_lines(prog: str) -> str:
    """The usage of both commands (argparse puts "usage: " in front)."""
    return (f"{prog} [train] [--preset NAME] [--resume | --overwrite | --move_aside] [--FLAG VALUE ...]\n"
            f"       {prog} sample --ckpt PATH [--prompt TEXT | --prompt_file PATH] [--FLAG VALUE ...]\n"
            f"       {prog} export --ckpt PATH --to DIR")


def export_parser(prog: str) -> OneLineArgumentParser:
    """The `export` command: a GPT-2-shaped checkpoint -> a Hugging Face GPT-2 folder."""
    p = OneLineArgumentParser(prog=f"{prog} export", description=(
        "Write a GPT-2-shaped checkpoint (.npz, .pt or nanoGPT's ckpt.pt) as a Hugging Face GPT-2 folder: "
        "config.json, model.safetensors, and vocab.json + merges.txt for a model with GPT-2's tokenizer. "
        "GPT2LMHeadModel.from_pretrained(DIR) loads it."))
    p.add_argument("--ckpt", type=_path, required=True, metavar="PATH",
                   help="the checkpoint: ckpt_*.npz, ckpt_*.pt or a nanoGPT ckpt.pt of a GPT-2-shaped model "
                        "(layernorm, learned positions, biases, no QK-norm, gelu, gelu_tanh or relu) (required)")
    p.add_argument("--to", type=_path, required=True, metavar="DIR",
                   help="the folder to write; it must not exist or be empty (required)")
    return p


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """("sample", rest) for `sample ...`, ("export", rest) for `export ...`; ("train", rest) otherwise (the
    word `train` is optional)."""
    if argv and argv[0] in ("sample", "train", "export"):
        return argv[0], argv[1:]
    return "train", list(argv)


# --------------------------------------------------------------------------- settings of a run

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
    if cfg.model == "bigram":
        _refuse_gpt_only_flags(overrides, "the bigram model")
    return _validated(cfg)


def _refuse_gpt_only_flags(overrides: dict, what: str) -> None:
    """A flag of the GPT's shape means nothing to a bigram model: say so rather than ignore it."""
    given = [name for name in GPT_ONLY_FIELDS if name in overrides]
    if given:
        raise UsageError(f"--{given[0]} does not apply to {what} (a token embedding table, no layers); drop "
                         f"the flag, or train a GPT with --model gpt")


def resumed_train_config(saved: dict, args: argparse.Namespace, where) -> TrainConfig:
    """The settings of a resumed run; the model shape must stay that of the checkpoint.

    Without --preset: the checkpoint's settings with the flags given on top (--max_iters alone then
    keeps the saved lr_decay_iters, so the schedule goes on unchanged). With --preset: the preset and
    flags as for a fresh run (the same command line plus --resume continues the same run).
    """
    try:
        base = TrainConfig.from_dict(saved or {})
    except (TypeError, ValueError) as err:
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
    cfg = replace(base, **overrides)
    try:
        cfg.validate()
    except SettingError as err:
        if err.name in overrides:
            raise UsageError(str(err)) from None
        raise CheckpointError(f"{where}: the checkpoint's setting {err.name}={getattr(cfg, err.name)!r} is invalid "
                              f"({err.why}); the file was edited or written by another program: give that setting "
                              "on the command line to override it, or start a new run instead of --resume") from None
    return cfg


def init_from_train_config(args: argparse.Namespace, model: str, gpt_config: GPTConfig | None,
                           default_preset: str = "cpu") -> TrainConfig:
    """Preset + flags, but the model's shape from the checkpoint that --init_from names."""
    if model == "bigram":
        _refuse_gpt_only_flags(explicit_flags(args), f"--init_from {args.init_from}, a bigram model")
    cfg = train_config_from_args(args, default_preset)
    shape = {"model": "bigram"} if model == "bigram" else model_settings(gpt_config)
    _refuse_shape_change(TrainConfig(**{**cfg.to_dict(), **shape}), explicit_flags(args),
                         "--init_from takes the model shape from the checkpoint: drop the flag")
    return _validated(replace(cfg, **shape))


def _refuse_shape_change(base: TrainConfig, overrides: dict, fix: str, source: str = "--") -> None:
    for name in SHAPE_FIELDS:
        if name in overrides and overrides[name] != getattr(base, name):
            raise UsageError(f"{source}{name}={overrides[name]!r} but the checkpoint has "
                             f"{name}={getattr(base, name)!r}; {fix}")


def run_cli(argv, train_command, sample_command, export_command=None) -> int:
    """Both scripts' entry point: `[train] FLAGS`, `sample FLAGS` or `export FLAGS`, every failure one line
    on stderr.

    Exit status: 2 for bad input (flags, data, checkpoints), 1 for a fault during training,
    130 for Ctrl-C; never a traceback.
    """
    command, rest = split_command(sys.argv[1:] if argv is None else list(argv))
    try:
        if command == "export":
            if export_command is None:
                raise UsageError("this program has no export command; use train_np.py export or train_torch.py export")
            return export_command(rest)
        return sample_command(rest) if command == "sample" else train_command(rest)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingError, WriteError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt as err:  # Ctrl-C, or a stop signal that ends the command at once (run_log.Interrupted)
        signum = getattr(err, "signum", signal.SIGINT)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        detail = getattr(err, "detail", "")
        print(f"error: interrupted ({name}){'; ' + detail if detail else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum
    except BrokenPipeError:  # the reader went away (`... | head`): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAULT
