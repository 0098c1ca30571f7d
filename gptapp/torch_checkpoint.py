""".pt checkpoints: train_torch.py's own and nanoGPT's ckpt.pt, read with torch.load(weights_only=True)
into the one in-memory Checkpoint (gptapp.checkpoint), and written atomically with torch.save.
"""
from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from npgpt.config import GPTConfig
from torchgpt.convert import load_nanogpt_state_dict, state_dict_to_params

from .checkpoint import (
    FORMAT,
    VERSION,
    ZIP_MAGIC,
    Checkpoint,
    CheckpointError,
    atomic_write,
    check_count,
    check_loss,
    checked_zip_directory,
    checkpoint_kind,
    tokenizer_entry,
    tokenizer_from_entry,
)
from .errors import first_sentence

NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def save_torch_checkpoint(path, payload: dict) -> None:
    """torch.save `payload` (tensors and plain containers only) atomically."""
    atomic_write(path, lambda f: torch.save(payload, f))


def save_run_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write a run's Checkpoint as our .pt: plain containers, the weights (tensors) as model_state, and
    for a run with GPT-2's tokenizer its files' texts as tokenizer (a character run has no such key)."""
    payload = {
        "format": FORMAT, "version": VERSION, "backend": ckpt.backend, "model": ckpt.model,
        "gpt_config": ckpt.gpt_config.to_dict() if ckpt.gpt_config is not None else None,
        "train_config": ckpt.train_config, "vocab": ckpt.vocab, "model_state": ckpt.params,
        "optimizer": ckpt.optimizer, "iter_num": ckpt.iter_num, "best_val_loss": float(ckpt.best_val_loss),
        "rng": ckpt.rng,
    }
    if ckpt.tokenizer is not None:
        payload["tokenizer"] = tokenizer_entry(ckpt.tokenizer)
    save_torch_checkpoint(path, payload)


def load_torch_checkpoint(path) -> Checkpoint:
    """Read our .pt or nanoGPT's ckpt.pt with torch.load(weights_only=True) into a Checkpoint.

    weights_only=True refuses any pickle that would build arbitrary Python objects (and so could
    run code); that refusal becomes a CheckpointError saying so.
    """
    path = Path(path)
    if checkpoint_kind(path) == "npz":  # CheckpointError if missing or unreadable
        raise CheckpointError(f"{path} is a NumPy .npz checkpoint (train_np.py's), not a .pt, whatever its name "
                              "says; use it with train_np.py, or start from its weights with --init_from")
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
    if is_zip:  # torch.save's format: the sizes its entries declare are checked before torch reads any
        try:
            with zipfile.ZipFile(path) as z:
                checked_zip_directory(path, z)
        except (OSError, zipfile.BadZipFile):
            pass  # too damaged to list: torch.load below reports it
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = first_sentence(err) or "unsupported object"
        raise CheckpointError(f"refused to load {path}: it holds pickled Python objects that could run code "
                              f"when loaded (torch.load weights_only=True: {first}); use a checkpoint "
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
        iter_num = check_count(obj["iter_num"], "iter_num", path)
        best_val_loss = check_loss(obj["best_val_loss"], "best_val_loss", path)
        _check_torch_state(obj.get("optimizer"), obj.get("rng"), path)
        return Checkpoint(backend=obj["backend"], model=obj["model"], gpt_config=gpt_config,
                          vocab=obj["vocab"], params=_to_numpy(obj["model_state"], path),
                          train_config=obj.get("train_config"), iter_num=iter_num,
                          best_val_loss=best_val_loss, optimizer=obj.get("optimizer"),
                          rng=obj.get("rng"), tokenizer=tokenizer_from_entry(obj.get("tokenizer"), path), path=path)
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
    iter_num = check_count(_plain(obj.get("iter_num", 0)), "nanoGPT's iter_num", path)
    best = check_loss(_plain(obj.get("best_val_loss", math.inf)), "nanoGPT's best_val_loss", path)
    return Checkpoint(backend="nanogpt", model="gpt", gpt_config=config, vocab=None,
                      params=_to_numpy(clean, path), iter_num=iter_num, best_val_loss=best, path=path)


def _plain(value):
    """A 0-d tensor (nanoGPT saves best_val_loss as one) as its Python number; anything else as it is."""
    return value.item() if torch.is_tensor(value) and value.dim() == 0 else value


def _check_torch_state(optimizer, rng, path: Path) -> None:
    """train_torch.py's optimizer and RNG entries, by type and range (their shapes are checked
    against the model's when a run resumes from them: check_optimizer_state)."""
    def bad(what: str):
        raise CheckpointError(f"{path}: {what}; the file was edited or written by another program")

    if optimizer not in (None, {}):
        saved_optimizers = optimizer_state_dicts(optimizer)
        if saved_optimizers is None:
            bad("its optimizer entry is not a torch optimizer state_dict (state, param_groups)")
        for saved in saved_optimizers.values():
            for key, st in saved["state"].items():
                if not isinstance(st, dict):
                    bad(f"the optimizer state of parameter {key!r} is not a mapping")
                if "step" in st:
                    step = _plain(st["step"])  # torch keeps it as a float tensor
                    if isinstance(step, float) and step.is_integer():
                        step = int(step)
                    check_count(step, f"the optimizer's step of parameter {key!r}", path)
    if rng not in (None, {}):
        if not isinstance(rng, dict):
            bad("its rng entry is not a mapping")
        states = {"data": rng.get("data")}  # the batches' generator; per rank, torch's CPU and CUDA ones
        per_rank = rng.get("per_rank")
        if not isinstance(per_rank, list) or not all(isinstance(r, dict) for r in per_rank):
            bad("its rng per_rank entry is not a list of per-process states")
        for i, r in enumerate(per_rank):
            states[f"per_rank[{i}].torch_cpu"] = r.get("torch_cpu")
            if r.get("cuda") is not None:
                states[f"per_rank[{i}].cuda"] = r["cuda"]
        for name, state in states.items():
            if not (torch.is_tensor(state) and state.dtype == torch.uint8 and state.dim() == 1 and state.numel()):
                bad(f"its rng state {name} is not a generator state (a non-empty 1-D uint8 tensor)")


def _is_state_dict(state) -> bool:
    return isinstance(state, dict) and isinstance(state.get("state"), dict) and isinstance(state.get("param_groups"), list)


def optimizer_state_dicts(state) -> dict | None:
    """A saved optimizer entry as {name: torch state_dict}: {"": sd} for one optimizer, and the
    entry itself for --optimizer muon's {"adamw": sd, "muon": sd}; None when it is neither."""
    if _is_state_dict(state):
        return {"": state}
    if isinstance(state, dict) and state and all(_is_state_dict(v) for v in state.values()):
        return state
    return None


def check_optimizer_state(optimizer, state: dict, path) -> None:
    """CheckpointError unless a saved optimizer state fits `optimizer`'s parameters (a torch optimizer,
    or MuonAdamW's pair): the same optimizers and groups, as many parameters in each, and every
    per-parameter buffer of its parameter's shape. torch's load_state_dict checks only the group
    sizes; a buffer of another shape fails in the first step."""
    def bad(what: str):
        raise CheckpointError(f"{path}: its optimizer state does not fit the model ({what}); the file was edited "
                              "or mixes two runs: start a new run, or --init_from it for its weights only")

    own_optimizers = getattr(optimizer, "optimizers", {"": optimizer})
    saved_optimizers = optimizer_state_dicts(state)
    if saved_optimizers is None:
        bad("not a torch optimizer state_dict")
    if sorted(saved_optimizers) != sorted(own_optimizers):
        bad(f"optimizers {sorted(saved_optimizers)}, this run has {sorted(own_optimizers)}")
    for name, own_optimizer in own_optimizers.items():
        saved_state = saved_optimizers[name]
        if len(saved_state["param_groups"]) != len(own_optimizer.param_groups):
            bad(f"{len(saved_state['param_groups'])} parameter groups, the optimizer has "
                f"{len(own_optimizer.param_groups)}")
        for saved, own in zip(saved_state["param_groups"], own_optimizer.param_groups):
            ids = saved.get("params") if isinstance(saved, dict) else None
            if not isinstance(ids, list) or len(ids) != len(own["params"]):
                bad("a parameter group of another size")
            for pid, p in zip(ids, own["params"]):
                for key, value in saved_state["state"].get(pid, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                        bad(f"{key} of parameter {pid} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")


def _to_numpy(sd: dict, path: Path) -> dict[str, np.ndarray]:
    """Tensors -> float32 ndarrays: float32 as it is, bfloat16/float16 widened (exactly).

    float64 is refused (CheckpointError), not narrowed: both backends hold float32 weights, and
    rounding a float64 state dict to float32 here would change the weights without a word. Neither
    train_torch.py nor nanoGPT writes float64; anything else that is not a floating-point tensor:
    CheckpointError too.
    """
    out = {}
    for name, t in sd.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise CheckpointError(f"{path}: entry {name!r} of the state dict is not a floating-point tensor")
        if t.dtype == torch.float64:
            raise CheckpointError(f"{path}: entry {name!r} is float64; the models here hold float32 weights and "
                                  "narrowing would change them silently; save the state dict as float32 "
                                  "({k: v.float() ...}) and load that")
        out.update(state_dict_to_params({name: t.float() if t.dtype != torch.float32 else t}))
    return out


def _first_line(err: BaseException) -> str:
    return first_sentence(err)
