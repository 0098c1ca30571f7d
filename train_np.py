"""Train the NumPy GPT (npgpt) on Tiny Shakespeare, save checkpoints, autocomplete prompts.

    python train_np.py                                   # nanoGPT's CPU recipe, untied head (preset "cpu"), then a sample
    python train_np.py --preset tiny --data input.txt    # seconds
    python train_np.py --resume                          # continue the run in --out_dir (ckpt_last.npz)
    python train_np.py --init_from out/ckpt_best.pt      # start from train_torch.py's or nanoGPT's weights
    python train_np.py --reference                       # the plain reference layers instead of npgpt.fast
    python train_np.py sample --ckpt out/ckpt_best.npz --prompt "ROMEO:" --seed 1
    python train_np.py --init_from gpt2 --data input.txt --block_size 256   # fine-tune a Hugging Face GPT-2 folder
    python train_np.py sample --init_from gpt2 --prompt "Hello" --top_p 0.9
    python train_np.py export --ckpt out/ckpt_best.npz --to gpt2-tuned     # as a Hugging Face folder

Checkpoints (ckpt_best.npz, ckpt_last.npz), metrics.jsonl and loss.png go to --out_dir (default out/).
The training application lives in gptapp/ (one loop for both scripts); this file picks the NumPy
backend. Reading a .pt checkpoint imports torch; nothing else here does.
"""
from __future__ import annotations

import sys

from gptapp.backends.numpy import NumpyBackend, read_any_checkpoint, sample_model
from gptapp.cli import export_parser, run_cli, sample_parser, train_parser
from gptapp.export import run_export
from gptapp.loop import run_sample, run_training

PROG = "train_np.py"
DEFAULT_PRESET = NumpyBackend.default_preset


def train_command(argv: list[str]) -> int:
    args = train_parser(PROG, __doc__, DEFAULT_PRESET, numpy_flags=True).parse_args(argv)
    return run_training(args, lambda: NumpyBackend(reference=args.reference))


def sample_command(argv: list[str]) -> int:
    args = sample_parser(PROG, "Autocomplete a prompt from a checkpoint (.npz, .pt or nanoGPT's ckpt.pt).",
                         numpy_flags=True).parse_args(argv)
    return run_sample(args, read_any_checkpoint, lambda ckpt: sample_model(ckpt, args.reference))


def export_command(argv: list[str]) -> int:
    return run_export(export_parser(PROG).parse_args(argv), read_any_checkpoint)


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, train_command, sample_command, export_command)


if __name__ == "__main__":
    sys.exit(main())
