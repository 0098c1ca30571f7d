"""Moving weights between npgpt's parameter dict and torchgpt's modules.

Both sides use the same names (`transformer.h.0.attn.c_attn.weight`, ...) and the same nn.Linear
(out, in) layout, so conversion is a copy with no transposes. With tied weights neither side has
`lm_head.weight`: the head is `transformer.wte.weight`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

COMPILE_PREFIX = "_orig_mod."  # what torch.compile puts in front of every state_dict key


def params_to_state_dict(params: dict) -> dict:
    """npgpt params {name: ndarray} -> {name: torch.Tensor}, same dtype and bits, own memory."""
    return {name: torch.from_numpy(np.array(value, copy=True)) for name, value in params.items()}


def state_dict_to_params(model_or_state_dict) -> dict:
    """A module (its named_parameters) or a state dict -> {name: ndarray}, same dtype and bits."""
    if isinstance(model_or_state_dict, nn.Module):
        items = model_or_state_dict.named_parameters()
    else:
        items = model_or_state_dict.items()
    params = {}
    for name, t in items:
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            raise ValueError(f"{name} is bfloat16, which NumPy has no type for; convert with .float() first")
        params[name] = t.numpy().copy()
    return params


def load_params(model: nn.Module, params: dict) -> None:
    """Copy an npgpt-style dict into `model`'s parameters (cast to the model's dtype).

    Strict: the key sets must be equal and every shape must match; otherwise a ValueError lists
    the missing keys, the unexpected keys and the shape mismatches.
    """
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(params))
    unexpected = sorted(set(params) - set(own))
    mismatched = [f"{name}: got {tuple(np.shape(params[name]))}, model has {tuple(own[name].shape)}"
                  for name in own if name in params and tuple(np.shape(params[name])) != tuple(own[name].shape)]
    if missing or unexpected or mismatched:
        lines = ["params do not fit the model:"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if unexpected:
            hint = ""
            if "lm_head.weight" in unexpected and "lm_head.weight" not in own:
                hint = " (the model ties its head to transformer.wte.weight: tie_weights=True)"
            lines.append(f"  unexpected keys: {unexpected}{hint}")
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched))
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        for name, p in own.items():
            value = params[name]
            if not torch.is_tensor(value):
                value = torch.from_numpy(np.ascontiguousarray(value))
            p.copy_(value)


def load_nanogpt_state_dict(sd: dict, model: nn.Module | None = None) -> dict:
    """Clean a nanoGPT checkpoint's state dict into torchgpt's parameter names.

    Strips torch.compile's `_orig_mod.` prefix, drops the causal-mask buffers (`attn.bias`,
    `attn.masked_bias`) and drops `lm_head.weight` when it is the same tensor as (or equal to)
    `transformer.wte.weight`. Returns the cleaned dict; with `model`, also loads it (strictly).
    """
    clean = {}
    for name, t in sd.items():
        if name.startswith(COMPILE_PREFIX):
            name = name[len(COMPILE_PREFIX):]
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue  # a buffer (the causal mask), not a parameter
        clean[name] = t
    head, wte = clean.get("lm_head.weight"), clean.get("transformer.wte.weight")
    if head is not None and wte is not None and head.shape == wte.shape:
        same_storage = head.data_ptr() == wte.data_ptr()
        if same_storage or torch.equal(head, wte):
            del clean["lm_head.weight"]
    if model is not None:
        load_params(model, clean)
    return clean
