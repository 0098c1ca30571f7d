""".pt checkpoints: train_torch.py's own and nanoGPT's ckpt.pt, read with torch.load(weights_only=True)
into the one in-memory Checkpoint (gptapp.checkpoint), and written atomically with torch.save.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch

from npgpt.config import GPTConfig
from torchgpt.convert import load_nanogpt_state_dict, state_dict_to_params

from .checkpoint import FORMAT, VERSION, Checkpoint, CheckpointError, atomic_write, checkpoint_kind

NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def save_torch_checkpoint(path, payload: dict) -> None:
    """torch.save `payload` (tensors and plain containers only) atomically."""
    atomic_write(path, lambda f: torch.save(payload, f))


def load_torch_checkpoint(path) -> Checkpoint:
    """Read our .pt or nanoGPT's ckpt.pt with torch.load(weights_only=True) into a Checkpoint.

    weights_only=True refuses any pickle that would build arbitrary Python objects (and so could
    run code); that refusal becomes a CheckpointError saying so.
    """
    path = Path(path)
    checkpoint_kind(path)  # CheckpointError if missing or unreadable
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported object"
        raise CheckpointError(f"refused to load {path}: it holds pickled Python objects that could run code "
                              f"when loaded (torch.load weights_only=True: {first[:160]}); use a checkpoint "
                              "written by train_torch.py or nanoGPT") from None
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, OSError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or corrupt "
                              f"({_first_line(err)}); use another checkpoint (ckpt_best / ckpt_last) or train "
                              "again") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = _ours(obj, path)
    elif isinstance(obj, dict) and "model" in obj and "model_args" in obj:
        ckpt = _nanogpt(obj, path)
    else:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is neither an npgpt nor a nanoGPT checkpoint (found {keys}); pass a "
                              "ckpt_*.pt from train_torch.py or a nanoGPT ckpt.pt")
    return ckpt.check()


def _ours(obj: dict, path: Path) -> Checkpoint:
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj.get('version')!r}; this code reads "
                              f"version {VERSION}")
    try:
        gpt_config = GPTConfig.from_dict(obj["gpt_config"]) if obj.get("gpt_config") else None
        return Checkpoint(backend=obj["backend"], model=obj["model"], gpt_config=gpt_config,
                          vocab=obj["vocab"], params=_to_numpy(obj["model_state"], path),
                          train_config=obj.get("train_config"), iter_num=int(obj["iter_num"]),
                          best_val_loss=float(obj["best_val_loss"]), optimizer=obj.get("optimizer"),
                          rng=obj.get("rng"), path=path)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the checkpoint is incomplete or invalid ({_first_line(err)}); it was "
                              "edited or written by another program") from None


def _nanogpt(obj: dict, path: Path) -> Checkpoint:
    """nanoGPT: GELU MLP, GPT-2 layout; the head is tied unless the file has its own lm_head."""
    args = obj["model_args"]
    missing = [k for k in NANOGPT_MODEL_ARGS if not isinstance(args, dict) or k not in args]
    if missing:
        raise CheckpointError(f"{path}: nanoGPT model_args lacks {missing}; the checkpoint is incomplete")
    sd = obj["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: nanoGPT 'model' entry is not a state dict")
    clean = load_nanogpt_state_dict(sd)
    try:
        config = GPTConfig(vocab_size=int(args["vocab_size"]), block_size=int(args["block_size"]),
                           n_layer=int(args["n_layer"]), n_head=int(args["n_head"]), n_embd=int(args["n_embd"]),
                           dropout=float(args["dropout"]), bias=bool(args["bias"]), activation="gelu",
                           tie_weights="lm_head.weight" not in clean)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: nanoGPT model_args are invalid ({_first_line(err)})") from None
    best = obj.get("best_val_loss", math.inf)
    return Checkpoint(backend="nanogpt", model="gpt", gpt_config=config, vocab=None,
                      params=_to_numpy(clean, path), iter_num=int(obj.get("iter_num", 0)),
                      best_val_loss=float(best), path=path)


def _to_numpy(sd: dict, path: Path) -> dict[str, np.ndarray]:
    """Tensors -> float32 ndarrays (bf16/fp16 widened); CheckpointError for anything else."""
    out = {}
    for name, t in sd.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise CheckpointError(f"{path}: entry {name!r} of the state dict is not a floating-point tensor")
        out.update(state_dict_to_params({name: t.float() if t.dtype != torch.float32 else t}))
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
