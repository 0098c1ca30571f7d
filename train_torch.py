"""Train the PyTorch GPT (torchgpt) on Tiny Shakespeare, save checkpoints, autocomplete prompts.

    python train_torch.py                                  # preset shakespeare-char on a GPU, cpu otherwise
    python train_torch.py --preset tiny --device cpu       # seconds
    python train_torch.py --resume                         # continue the run in --out_dir (ckpt_last.pt)
    python train_torch.py --init_from out/ckpt_best.npz    # start from train_np.py's or nanoGPT's weights
    torchrun --standalone --nproc_per_node 8 train_torch.py --gradient_accumulation_steps 8   # DDP, 8 GPUs
    python train_torch.py sample --ckpt out/ckpt_best.pt --prompt "ROMEO:" --seed 1
    python train_torch.py --init_from gpt2 --data input.txt --block_size 256   # fine-tune a Hugging Face GPT-2 folder
    python train_torch.py export --ckpt out/ckpt_best.pt --to gpt2-tuned      # as a Hugging Face folder

Same flags, presets and log lines as train_np.py, plus --device, --dtype, --compile, --attention.
On a GPU: bf16 autocast, TF32, SDPA (flash) attention, fused AdamW, torch.compile, batches drawn
on the device; the host reads a number back only on log and eval steps. The training application
lives in gptapp/ (one loop for both scripts); this file picks the PyTorch backend.
"""
from __future__ import annotations

import sys

from gptapp.backends.torch import TorchBackend, TorchOptions, device_from_flag, read_any_checkpoint, sample_model
from gptapp.cli import export_parser, run_cli, sample_parser, train_parser
from gptapp.export import run_export
from gptapp.loop import run_sample, run_training

PROG = "train_torch.py"


def train_command(argv: list[str]) -> int:
    args = train_parser(PROG, __doc__, "cpu, or shakespeare-char with CUDA", torch_flags=True).parse_args(argv)
    options = TorchOptions(device=args.device, dtype=args.dtype, compile=args.compile, attention=args.attention)
    return run_training(args, lambda: TorchBackend(options))


def sample_command(argv: list[str]) -> int:
    args = sample_parser(PROG, "Autocomplete a prompt from a checkpoint (.pt, .npz or nanoGPT's ckpt.pt).",
                         torch_flags=True).parse_args(argv)
    device = device_from_flag(args.device)
    return run_sample(args, read_any_checkpoint, lambda ckpt: sample_model(ckpt, device))


def export_command(argv: list[str]) -> int:
    return run_export(export_parser(PROG).parse_args(argv), read_any_checkpoint)


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, train_command, sample_command, export_command)


if __name__ == "__main__":
    sys.exit(main())
