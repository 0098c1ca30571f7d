"""Hugging Face GPT-2 folders in and out, without torch.

    from gptapp.hf import load_pretrained
    cfg, params, tokenizer = load_pretrained("path/to/gpt2", dtype=np.float32)

A folder as the hub and `save_pretrained` lay it out: config.json (a GPT2Config), model.safetensors
(or shards listed in model.safetensors.index.json), and the tokenizer files vocab.json + merges.txt.
HF's GPT-2 is our block exactly: learned positions, layernorm with bias, GELU (tanh form), a head
tied to wte by default. Two differences of form: HF's Conv1D layers store their weight as
(in, out), ours as nn.Linear's (out, in), so those four weights a block are transposed on the way
in and out; and HF's keys may lack the `transformer.` prefix (a bare GPT2Model's).

Loading copies each tensor once, straight from the file's memory map into its final dtype and
layout (gptapp.safetensors_np.widen): the params own their memory, and the peak is the params'
size plus one bfloat16 tensor's float32 bits when float64 is asked of a bfloat16 file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from npgpt.bpe import BPETokenizer, TokenizerError
from npgpt.config import ConfigError, GPTConfig
from npgpt.model import param_shapes

from .safetensors_np import FLOAT_DTYPES, SafetensorsError, read_safetensors, widen, write_safetensors


class HFError(ValueError):
    """A folder or file that is not a GPT-2 we can load or write; the message is one line."""


CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
VOCAB, MERGES = "vocab.json", "merges.txt"

# HF's Conv1D layers (weight (in, out)); every other weight is already in our layout.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers older transformers saved with the weights: not parameters.
BUFFERS = (".attn.bias", ".attn.masked_bias")

# GPT2Config's defaults (transformers' configuration_gpt2.py) for the fields we read: a config.json
# that omits one means this value, as from_pretrained reads it.
GPT2_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# HF's activation_function -> GPTConfig.activation. gelu_new and gelu_pytorch_tanh are both
# x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written in Python or in torch's kernel.
ACTIVATIONS_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
ACTIVATIONS_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

def is_conv1d(name: str) -> bool:
    """Whether a parameter (our name, or an HF key) is one of HF's Conv1D weights, stored (in, out)."""
    parts = hf_to_ours(name).split(".", 3)  # transformer, h, i, local name
    return parts[:2] == ["transformer", "h"] and len(parts) == 4 and parts[3] in CONV1D


def hf_to_ours(name: str) -> str:
    """An HF GPT-2 key (with or without `transformer.`) -> our name: `transformer.` in front of
    everything but lm_head.weight."""
    if name == "lm_head.weight" or name.startswith("transformer."):
        return name
    return "transformer." + name


def ours_to_hf(params: dict) -> dict[str, np.ndarray]:
    """Our params -> HF GPT2LMHeadModel's state dict: the same names (`transformer.` prefix,
    lm_head.weight when untied), Conv1D weights transposed to (in, out), all C-contiguous."""
    return {name: np.ascontiguousarray(np.asarray(v).T if is_conv1d(name) else v) for name, v in params.items()}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, source: str = CONFIG) -> GPTConfig:
    """A GPT2Config dict -> GPTConfig, or an HFError naming the field we cannot represent."""
    def bad(field, why):
        raise HFError(f"{source}: {field}={hf.get(field)!r} {why}")

    model_type = hf.get("model_type")
    if model_type != "gpt2":
        bad("model_type", "is not gpt2; only GPT-2 folders (GPT2LMHeadModel) can be loaded")
    c = {k: hf.get(k, v) for k, v in GPT2_DEFAULTS.items()}
    if c["scale_attn_by_inverse_layer_idx"] is not False:
        bad("scale_attn_by_inverse_layer_idx", "scales each layer's attention by 1/(layer+1), which our "
                                               "attention does not; only the standard GPT-2 block can be loaded")
    if c["add_cross_attention"] is not False:
        bad("add_cross_attention", "adds an encoder-decoder attention our decoder-only GPT does not have")
    if c["scale_attn_weights"] is not True:
        bad("scale_attn_weights", "turns off attention's 1/sqrt(head size), which our attention always applies")
    # reorder_and_upcast_attn is accepted: it computes q k^T and the softmax in float32 with the scale
    # folded into the product (for fp16 training), the same function up to rounding.
    if c["reorder_and_upcast_attn"] not in (True, False):
        bad("reorder_and_upcast_attn", "must be true or false")
    activation = c["activation_function"]
    if activation not in ACTIVATIONS_IN:
        bad("activation_function", f"is not one we implement; use one of {', '.join(ACTIVATIONS_IN)}")
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        v = c[field]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            bad(field, "must be a positive integer")
    if c["n_embd"] % c["n_head"]:
        bad("n_embd", f"is not divisible by n_head={c['n_head']}; the folder is not a valid GPT-2")
    inner = c["n_inner"]
    if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner <= 0):
        bad("n_inner", "must be a positive integer or null (4 * n_embd)")
    eps = c["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        bad("layer_norm_epsilon", "must be a positive number")
    if not isinstance(c["tie_word_embeddings"], bool):
        bad("tie_word_embeddings", "must be true or false")
    try:
        return GPTConfig(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"],
                         n_head=c["n_head"], n_embd=c["n_embd"], dropout=0.0, bias=True,
                         activation=ACTIVATIONS_IN[activation], tie_weights=c["tie_word_embeddings"],
                         norm="layernorm", norm_eps=float(eps), pos_emb="learned", qk_norm=False,
                         mlp_hidden=inner)
    except ConfigError as err:  # the checks above cover every field; this keeps any other as one line
        raise HFError(f"{source}: {err}") from None


def gpt2_shaped(config: GPTConfig) -> str | None:
    """None when GPT2Config can express `config`, else why not (one clause naming the field)."""
    if config.norm != "layernorm":
        return f"norm={config.norm!r}: GPT-2 has layernorm only"
    if config.pos_emb != "learned":
        return f"pos_emb={config.pos_emb!r}: GPT-2 has learned positions only"
    if config.qk_norm:
        return "qk_norm=True: GPT-2 has no QK-norm"
    if config.activation not in ACTIVATIONS_OUT:
        return f"activation={config.activation!r}: GPT-2 offers {', '.join(ACTIVATIONS_OUT)}"
    if not config.bias:
        return "bias=False: GPT-2's linears and layernorms always carry a bias"
    return None


def config_to_hf(config: GPTConfig, dtype, eot_id: int | None = None) -> dict:
    """A GPT2Config-compatible dict for a GPT-2-shaped config (see gpt2_shaped)."""
    return {
        "activation_function": ACTIVATIONS_OUT[config.activation],
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": config.dropout,
        "bos_token_id": eot_id,
        "dtype": np.dtype(dtype).name,
        "embd_pdrop": config.dropout,
        "eos_token_id": eot_id,
        "initializer_range": 0.02,
        "layer_norm_epsilon": config.norm_eps,
        "model_type": "gpt2",
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        "n_layer": config.n_layer,
        "n_positions": config.block_size,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": config.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_weights,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise HFError(f"{index}: not a valid shard index ({type(err).__name__}: {' '.join(str(err).split())}); "
                          "it needs {\"weight_map\": {tensor: file}}") from None
        for name in files:
            if not isinstance(name, str) or os.path.basename(name) != name or not (folder / name).is_file():
                raise HFError(f"{index} lists the shard {name!r}, which is not a file in {folder}; "
                              "download the missing shard")
        return [folder / name for name in files]
    if (folder / "pytorch_model.bin").exists():
        raise HFError(f"{folder} has pytorch_model.bin but no {WEIGHTS}; only safetensors are read (a .bin is "
                      "a pickle), convert it once with transformers: GPT2LMHeadModel.from_pretrained(FOLDER)"
                      ".save_pretrained(NEW_FOLDER)")
    raise HFError(f"{folder} has no {WEIGHTS}; give a folder as save_pretrained or the hub lays it out")


def _read_tensors(files: list[Path]) -> dict:
    """{HF key: safetensors_np.Tensor} over every file, keys unique."""
    tensors = {}
    for path in files:
        try:
            part, _ = read_safetensors(path)
        except SafetensorsError as err:
            raise HFError(str(err)) from None
        except OSError as err:
            raise HFError(f"{path}: cannot read it ({err.strerror or err})") from None
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise HFError(f"{path}: tensors {twice} appear in more than one shard; the folder is damaged")
        tensors.update(part)
    return tensors


def _load_tokenizer(folder: Path):
    vocab, merges = folder / VOCAB, folder / MERGES
    if not vocab.exists() and not merges.exists():
        return None
    if not (vocab.is_file() and merges.is_file()):
        have, lack = (VOCAB, MERGES) if vocab.is_file() else (MERGES, VOCAB)
        raise HFError(f"{folder} has {have} but not {lack}; the GPT-2 tokenizer needs both (copy {lack} "
                      "from the model's hub folder, or remove the other for a model-only folder)")
    try:
        return BPETokenizer.from_files(vocab, merges)
    except (TokenizerError, OSError, UnicodeDecodeError) as err:
        raise HFError(" ".join(str(err).split())) from None


def load_pretrained(path, dtype=np.float32):
    """(GPTConfig, params under our names, BPETokenizer or None when the folder has no tokenizer files).

    params are fresh C-contiguous arrays of `dtype` (float32 or float64), in param_shapes order;
    float16 and bfloat16 files are widened exactly. Any fault of the folder raises HFError.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise HFError(f"load_pretrained: dtype must be float32 or float64, got {dtype}")
    folder = Path(path)
    if not folder.exists():
        raise HFError(f"{folder} does not exist; give the folder that holds {CONFIG} and {WEIGHTS}")
    if not folder.is_dir():
        raise HFError(f"{folder} is a file; give the folder that holds {CONFIG} and {WEIGHTS}")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise HFError(f"{folder} has no {CONFIG}; give a Hugging Face GPT-2 folder (save_pretrained's layout)")
    try:
        hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFError(f"{cfg_path} is not valid JSON ({' '.join(str(err).split())}); "
                      "download or write it again") from None
    if not isinstance(hf_config, dict):
        raise HFError(f"{cfg_path} holds a JSON {type(hf_config).__name__}, not an object; download it again")
    config = config_from_hf(hf_config, str(cfg_path))
    files = _weight_files(folder)
    tokenizer = _load_tokenizer(folder)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise HFError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                      f"{config.vocab_size}; the tokenizer files belong to another model")
    tensors = _read_tensors(files)
    params = _params_from_tensors(config, tensors, dtype, files[0] if len(files) == 1 else folder)
    return config, params, tokenizer


def _params_from_tensors(config: GPTConfig, tensors: dict, dtype, where) -> dict[str, np.ndarray]:
    expected = param_shapes(config)  # our names and (out, in) shapes
    ours = {}  # our name -> (HF key, Tensor)
    for key, tensor in tensors.items():
        if key.endswith(BUFFERS):
            continue
        name = hf_to_ours(key)
        if name in ours:
            raise HFError(f"{where} holds both {ours[name][0]!r} and {key!r}; keep one of them")
        ours[name] = (key, tensor)
    head = ours.pop("lm_head.weight", None) if config.tie_weights else None
    missing = [n for n in expected if n not in ours]
    unexpected = [ours[n][0] for n in ours if n not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise HFError(f"{where} does not fit {CONFIG} (n_layer={config.n_layer}, tie_word_embeddings="
                      f"{str(config.tie_weights).lower()}): {'; '.join(parts)}")
    for name, shape in expected.items():
        key, tensor = ours[name]
        want = shape[::-1] if is_conv1d(name) else shape  # HF's Conv1D stores (in, out)
        if tensor.shape != want:
            raise HFError(f"{where}: tensor {key!r} has shape {list(tensor.shape)}, but {CONFIG} implies "
                          f"{list(want)}; the weights belong to another config")
        if tensor.dtype not in FLOAT_DTYPES:
            raise HFError(f"{where}: tensor {key!r} has dtype {tensor.dtype}, not a float; the file is damaged")
    if head is not None and not _same_values(head[1], ours["transformer.wte.weight"][1]):
        raise HFError(f"{where}: {head[0]!r} differs from transformer.wte.weight, but {CONFIG} ties them "
                      "(tie_word_embeddings true); set it false to load an untied head")
    return {name: widen(ours[name][1], dtype, transpose=is_conv1d(name)) for name in expected}


def _same_values(a, b, rows: int = 1024) -> bool:
    """Whether two float tensors of a file hold the same values, compared in the map a block of
    rows at a time (a tied head beside wte: no copy of either)."""
    if a.shape != b.shape or a.dtype not in FLOAT_DTYPES:
        return False
    if a.dtype != b.dtype:
        return bool(np.array_equal(widen(a, np.float64), widen(b, np.float64)))
    return all(np.array_equal(a.array[i:i + rows], b.array[i:i + rows]) for i in range(0, a.shape[0], rows))


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def export_pretrained(config: GPTConfig, params: dict, tokenizer, folder) -> None:
    """Write a GPT-2-shaped model as an HF folder: config.json, model.safetensors, tokenizer files if any.

    The weights keep the params' dtype (float32 or float64, one for all). The tokenizer's files are
    written when it is a BPETokenizer (a character tokenizer has no GPT-2 form: none). Everything is
    checked before anything is written; the files go to a temporary folder beside `folder`, renamed
    into place at the end, so a failure leaves nothing behind. An existing non-empty folder is refused.
    """
    why = gpt2_shaped(config)
    if why is not None:
        raise HFError(f"cannot export as GPT-2: {why}; only a GPT-2-shaped model (layernorm, learned positions, "
                      "bias, no QK-norm, gelu/gelu_tanh/relu) has a Hugging Face GPT-2 form")
    expected = param_shapes(config)
    missing = [n for n in expected if n not in params]
    unexpected = [n for n in params if n not in expected]
    if missing or unexpected:
        raise HFError(f"cannot export: params do not fit the config: missing {_few(missing) or 'none'}, "
                      f"unexpected {_few(unexpected) or 'none'}")
    dtypes = {np.asarray(params[n]).dtype for n in expected}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise HFError(f"cannot export: params must be all float32 or all float64, got {sorted(map(str, dtypes))}")
    for name, shape in expected.items():
        if np.shape(params[name]) != shape:
            raise HFError(f"cannot export: {name} has shape {list(np.shape(params[name]))}, the config implies "
                          f"{list(shape)}")
    dtype = dtypes.pop()
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise HFError(f"{folder} already exists and is not an empty folder; choose another --to or remove it")
    bpe = tokenizer if isinstance(tokenizer, BPETokenizer) else None
    hf_config = config_to_hf(config, dtype, bpe.eot_id if bpe is not None else None)

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as err:
        raise HFError(f"cannot write {folder}: {err.strerror or err}; choose another --to") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the folder's
        (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_safetensors(tmp / WEIGHTS, ours_to_hf({k: params[k] for k in expected}), {"format": "pt"})
        if bpe is not None:
            bpe.save(tmp)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HFError(f"cannot write {folder}: {err.strerror or err}; nothing was written, free space or "
                      "choose another --to") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
