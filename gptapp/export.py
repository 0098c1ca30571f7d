"""The `export` command: a GPT-2-shaped checkpoint as a Hugging Face GPT-2 folder.

    python train_np.py export --ckpt out/ckpt_best.npz --to gpt2-finetuned
    GPT2LMHeadModel.from_pretrained("gpt2-finetuned")   # the same logits as our model

Either script's checkpoint (.npz, .pt) or nanoGPT's ckpt.pt; gptapp.hf.export_pretrained writes
config.json, model.safetensors, and vocab.json + merges.txt when the model has GPT-2's tokenizer. A
model GPT-2 cannot express (bigram, rmsnorm, RoPE, QK-norm, swiglu, no biases) is refused in one line,
and so is a --to that holds anything; in both cases before anything is written.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .checkpoint import Checkpoint
from .errors import TrainingError, UsageError
from .hf import CONFIG, MERGES, VOCAB, WEIGHTS, HFError, export_pretrained, gpt2_shaped

GPT2_FORM = "only a model with layernorm, learned positions, biases, no QK-norm and a gelu, gelu_tanh or relu MLP"


def run_export(args, read_checkpoint: Callable[[str], Checkpoint]) -> int:
    """`read_checkpoint(path)` -> Checkpoint (the script's reader: .npz, .pt, nanoGPT's ckpt.pt)."""
    to = Path(args.to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise UsageError(f"--to {to} already exists and is not an empty folder; choose another --to or remove it")
    ckpt = read_checkpoint(args.ckpt)
    if ckpt.model != "gpt":
        raise UsageError(f"{ckpt.path} holds a {ckpt.model} model (a token embedding table), not GPT-2; {GPT2_FORM} "
                         "has a Hugging Face GPT-2 form")
    why = gpt2_shaped(ckpt.gpt_config)
    if why is not None:
        raise UsageError(f"{ckpt.path} is not GPT-2-shaped: {why}; {GPT2_FORM} has a Hugging Face GPT-2 form")
    try:
        export_pretrained(ckpt.gpt_config, ckpt.params, ckpt.tokenizer, to)
    except HFError as err:
        message = " ".join(str(err).split())
        raise (TrainingError if message.startswith("cannot write") else UsageError)(message) from None
    files = [CONFIG, WEIGHTS] + ([VOCAB, MERGES] if ckpt.tokenizer is not None else [])
    print(f"exported {ckpt.path} to {to}: {', '.join(files)}")
    if ckpt.vocab is not None:
        print(f"note: {ckpt.path} has a character vocabulary, which has no GPT-2 tokenizer form; {to} holds the "
              "model only, its ids the characters' positions in the checkpoint's vocabulary", file=sys.stderr)
    return 0
