"""Checkpoints: what a training run saves, written atomically and read back without pickle.

One in-memory form, `Checkpoint`, for every file either script can read:

    ckpt_*.npz   written by train_np.py; read with np.load(allow_pickle=False)
    ckpt_*.pt    written by train_torch.py; read with torch.load(weights_only=True) in gptapp.torch_checkpoint
    ckpt.pt      nanoGPT's (`model` state dict + `model_args`); read by gptapp.torch_checkpoint, for sampling
                 and --init_from
    a folder     Hugging Face GPT-2 (config.json, model.safetensors, vocab.json + merges.txt); read by
                 gptapp.hf, for sampling, --init_from and export

Parameters always come back as {name: float32 ndarray} under npgpt's names, so either model can take
them. The optimiser and RNG state stay in their backend's own form: only that backend resumes from them.

Layout of an .npz checkpoint (every entry a plain array, so no pickle is ever needed):
    meta            0-d unicode array holding JSON: format, version, backend, model, gpt_config,
                    train_config, vocab, iter_num, best_val_loss, rng (numpy bit_generator states), and
                    for a run with GPT-2's tokenizer only, tokenizer (see tokenizer_entry)
    param/<name>    one array per parameter
    optim/<key>     npgpt.optim.AdamW.state_dict() entries (step, exp_avg.<group>, exp_avg_sq.<group>)

Writes go to a temporary file in the same directory, are fsynced, then os.replace'd over the target:
a crash or kill mid-write leaves the previous checkpoint whole. This module never imports torch;
reading a .pt needs a loader passed in (the numpy backend imports gptapp.torch_checkpoint lazily).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from npgpt.bpe import BPETokenizer, TokenizerError
from npgpt.config import GPTConfig

from .budget import available_memory, check_checkpoint_config, format_bytes
from .errors import first_sentence
from .hf import HFError, load_pretrained

FORMAT = "npgpt-checkpoint"
VERSION = 1
NUMPY_EXT, TORCH_EXT = ".npz", ".pt"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, refused or does not fit; the message is one line."""


# --------------------------------------------------------------------------- the in-memory form

@dataclass
class Checkpoint:
    """Everything a run saves. `backend` is "numpy", "torch", "nanogpt" or "hf" (where it came from).
    The tokenizer is `vocab` (characters) or `tokenizer` (GPT-2's BPE), never both; nanoGPT files
    carry neither."""

    backend: str
    model: str                              # "gpt" or "bigram"
    gpt_config: GPTConfig | None            # None for the bigram model
    vocab: str | None                       # the tokenizer's characters; None for BPE and nanoGPT files
    params: dict[str, np.ndarray]           # npgpt names -> float32 arrays
    train_config: dict | None = None        # TrainConfig.to_dict() of the run; None for nanoGPT
    iter_num: int = 0                       # optimisation steps done
    best_val_loss: float = math.inf
    optimizer: dict | None = None           # the backend's own optimiser state
    rng: dict | None = None                 # the backend's own RNG state
    tokenizer: BPETokenizer | None = None   # GPT-2's tokenizer, for a BPE model; None for characters
    path: Path | None = field(default=None, compare=False)

    @property
    def vocab_size(self) -> int:
        if self.gpt_config is not None:
            return self.gpt_config.vocab_size
        return self.params["token_embedding_table.weight"].shape[0]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.model == "bigram":
            V = self.params.get("token_embedding_table.weight", np.zeros((0, 0))).shape[0]
            return {"token_embedding_table.weight": (V, V)}
        from npgpt.model import param_shapes
        return param_shapes(self.gpt_config)

    def check(self) -> "Checkpoint":
        """CheckpointError unless the parameters are exactly what the config describes."""
        where = self.path or "the checkpoint"
        if self.model not in ("gpt", "bigram"):
            raise CheckpointError(f"{where}: unknown model kind {self.model!r}; it was not written by "
                                  "train_np.py or train_torch.py")
        if self.model == "gpt" and self.gpt_config is None:
            raise CheckpointError(f"{where}: a gpt checkpoint without its model config; it is incomplete")
        table = self.params.get("token_embedding_table.weight")
        V = table.shape[0] if self.model == "bigram" and table is not None else 0
        problem = check_checkpoint_config(self.gpt_config if self.model == "gpt" else None, V, len(self.params), where)
        if problem:  # before the table of expected shapes is built: its size is the config's to say
            raise CheckpointError(f"{problem}; the file was edited or is not a checkpoint of this app")
        want = self.expected_shapes()
        missing = [k for k in want if k not in self.params]
        unexpected = [k for k in self.params if k not in want]
        wrong = [f"{k} has shape {tuple(self.params[k].shape)} but the model needs {want[k]}"
                 for k in want if k in self.params and tuple(self.params[k].shape) != want[k]]
        problems = []
        if wrong:
            problems.append("; ".join(wrong[:3]) + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""))
        if missing:
            problems.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        if problems:
            cfg = self.gpt_config.to_dict() if self.gpt_config else {"vocab_size": self.vocab_size}
            shape = ", ".join(f"{k}={cfg[k]}" for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                                         "n_embd") if k in cfg)
            raise CheckpointError(f"{where}: the parameters do not fit the model ({shape}): "
                                  f"{'; '.join(problems)}; the file was edited or mixes two models, "
                                  "use a checkpoint written by train_np.py, train_torch.py or nanoGPT")
        for k, v in self.params.items():
            check_weight_dtype(v.dtype, k, where)
        for k, v in self.params.items():
            if not np.isfinite(v).all():
                raise CheckpointError(f"{where}: parameter {k} holds values that are not finite (nan or inf): "
                                      "the run that wrote it diverged; use an earlier checkpoint")
        check_vocab(self.vocab, self.vocab_size, where)
        self._check_tokenizer(where)
        check_count(self.iter_num, "iter_num", where)
        check_loss(self.best_val_loss, "best_val_loss", where)
        self._check_train_config(where)
        if self.backend == "numpy":
            check_numpy_rng(self.rng, where)
            for key, value in (self.optimizer or {}).items():
                if key == "step" or key.endswith(".step"):
                    check_count(value, f"the optimizer's {key}", where)
        return self

    def _check_tokenizer(self, where) -> None:
        if self.tokenizer is None:
            return
        if self.vocab is not None:
            raise CheckpointError(f"{where}: it carries both a character vocabulary and a GPT-2 tokenizer; the file "
                                  "was edited or written by another program")
        if self.tokenizer.vocab_size > self.vocab_size:
            raise CheckpointError(f"{where}: its tokenizer has {self.tokenizer.vocab_size} tokens but the model has "
                                  f"vocab_size={self.vocab_size}; the file was edited or mixes two models")

    def _check_train_config(self, where) -> None:
        """Our formats save the run's settings beside the model's config: they must describe one model."""
        tc = self.train_config
        if self.backend not in ("numpy", "torch") or not tc:
            return
        if not isinstance(tc, dict):
            raise CheckpointError(f"{where}: its training settings are a {type(tc).__name__}, not a mapping; "
                                  "the file was edited or written by another program")
        if tc.get("model", self.model) != self.model:
            raise CheckpointError(f"{where}: its training settings say model={tc['model']!r} but it holds a "
                                  f"{self.model} model; the file was edited or mixes two runs")
        if self.gpt_config is None:
            return
        model = self.gpt_config.to_dict()
        model["mlp_hidden"] = model["mlp_hidden"] or 0  # the training settings write 4C as 0
        if model["mlp_hidden"] == 4 * self.gpt_config.n_embd and tc.get("mlp_hidden") == 0:
            model["mlp_hidden"] = 0
        for name in ("n_layer", "n_head", "n_embd", "block_size", "bias", "activation", "tie_weights", "norm",
                     "pos_emb", "rope_theta", "qk_norm", "mlp_hidden"):
            if name in tc and tc[name] != model[name]:
                raise CheckpointError(f"{where}: its training settings say {name}={tc[name]!r} but its model "
                                      f"config says {name}={model[name]!r}; the file was edited or mixes two runs: "
                                      "start a new run, or --init_from it for its weights")


# --------------------------------------------------------------------------- the fields of a checkpoint

def check_weight_dtype(dtype, name: str, where) -> None:
    """Weights are float32 (float16/bfloat16 are widened, exactly, by the readers); float64 is refused,
    in both formats: narrowing it would change the weights without a word."""
    if dtype == np.float64:
        raise CheckpointError(f"{where}: parameter {name} is float64; the models here hold float32 weights and "
                              "narrowing would change them silently; save the weights as float32 and load that")
    if dtype != np.float32:
        raise CheckpointError(f"{where}: parameter {name} has dtype {dtype}, not floating point (float32)")


def check_count(value, what: str, where) -> int:
    """A step count: an integer >= 0 (0-d integer arrays too), never a bool, a fraction or a list."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        value = int(value)
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: {what} is {_short(value)}, not an integer >= 0; the file was edited or "
                              "written by another program")
    return value


def check_loss(value, what: str, where) -> float:
    """A loss: a real number >= 0 or inf (nothing evaluated yet), never nan, text or a list."""
    if isinstance(value, (np.floating, np.integer)) or (isinstance(value, np.ndarray) and value.ndim == 0
                                                        and np.issubdtype(value.dtype, np.number)):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise CheckpointError(f"{where}: {what} is {_short(value)}, not a loss (a number >= 0); the file was "
                              "edited or written by another program")
    return float(value)


def check_vocab(vocab, vocab_size: int, where) -> None:
    """The vocabulary: a string of distinct characters, valid text (no lone surrogates), one per token.
    Linear in its length."""
    if vocab is None:
        return
    if not isinstance(vocab, str):
        raise CheckpointError(f"{where}: the vocabulary is of type {type(vocab).__name__}, not a string "
                              "of characters; the file was edited or written by another program")
    surrogate = re.search("[\ud800-\udfff]", vocab)
    if surrogate:
        raise CheckpointError(f"{where}: the vocabulary holds a lone surrogate (U+{ord(surrogate.group()):04X} at "
                              f"index {surrogate.start()}), which is no character of any text; the file was "
                              "edited or written by another program")
    if len(vocab) != len(set(vocab)):
        dupes = sorted(c for c, n in Counter(vocab).items() if n > 1)
        raise CheckpointError(f"{where}: the vocabulary has duplicate characters "
                              f"({', '.join(map(repr, dupes[:5]))}), so it cannot map ids to characters; the "
                              "file was edited or written by another program")
    if len(vocab) != vocab_size:
        raise CheckpointError(f"{where}: the vocabulary has {len(vocab)} characters but the model "
                              f"has vocab_size={vocab_size}; the file is inconsistent")


TOKENIZER_KIND = "gpt2-bpe"


def tokenizer_entry(tokenizer: BPETokenizer | None) -> dict | None:
    """GPT-2's tokenizer as a checkpoint stores it: the texts of its two files, {"kind": "gpt2-bpe",
    "vocab.json": ..., "merges.txt": ...}, so --resume and sample need nothing else; None without one."""
    if tokenizer is None:
        return None
    vocab_json, merges_txt = tokenizer.to_strings()
    return {"kind": TOKENIZER_KIND, "vocab.json": vocab_json, "merges.txt": merges_txt}


def tokenizer_from_entry(entry, where) -> BPETokenizer | None:
    """The tokenizer a checkpoint stores (tokenizer_entry), parsed and checked; CheckpointError naming
    the checkpoint when it is not one or does not parse."""
    if entry is None:
        return None
    files = ("vocab.json", "merges.txt")
    if not isinstance(entry, dict) or entry.get("kind") != TOKENIZER_KIND or not all(
            isinstance(entry.get(name), str) for name in files):
        shown = sorted(entry)[:4] if isinstance(entry, dict) else type(entry).__name__
        raise CheckpointError(f"{where}: its tokenizer entry ({shown}) is not a GPT-2 tokenizer (kind "
                              f"{TOKENIZER_KIND!r} and the texts of {' and '.join(files)}); the file was edited "
                              "or written by another program")
    try:
        return BPETokenizer.from_strings(entry["vocab.json"], entry["merges.txt"], source=f"{where}: its tokenizer")
    except TokenizerError as err:
        problem = " ".join(str(err).split()).rsplit("; ", 1)[0]  # the file's fix does not apply to a checkpoint
        raise CheckpointError(f"{problem}; the checkpoint was edited or damaged: use another checkpoint "
                              "(ckpt_best / ckpt_last) or train again") from None


# numpy's PCG64 state, as bit_generator.state gives it: 128-bit state and increment, a cached 32-bit half
_PCG64_BOUNDS = {"state": 2 ** 128, "inc": 2 ** 128}


def check_numpy_rng(rng, where) -> None:
    """train_np.py's RNG state: {"data": PCG64 state, "dropout": PCG64 state or None}, every number in
    the range numpy takes (a negative or oversized one is an OverflowError at --resume)."""
    if rng is None:
        return
    if not isinstance(rng, dict) or "data" not in rng:
        raise CheckpointError(f"{where}: its rng entry is {_short(rng)}, not train_np.py's RNG state; the file "
                              "was edited or written by another program")
    for name, state in rng.items():
        if state is None and name == "dropout":
            continue
        ok = (name in ("data", "dropout") and isinstance(state, dict) and state.get("bit_generator") == "PCG64"
              and isinstance(state.get("state"), dict)
              and all(_int_in(state["state"].get(k), 0, top) for k, top in _PCG64_BOUNDS.items())
              and state.get("has_uint32") in (0, 1) and _int_in(state.get("uinteger"), 0, 2 ** 32))
        if not ok:
            raise CheckpointError(f"{where}: its rng state {name!r} is not a valid PCG64 state (every number an "
                                  "integer in its range: state and inc in [0, 2**128), uinteger in [0, 2**32)); the "
                                  "file was edited or written by another program")


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checkpoint_paths(out_dir: str | os.PathLike, ext: str) -> dict[str, Path]:
    """{"best": out_dir/ckpt_best<ext>, "last": out_dir/ckpt_last<ext>}."""
    out_dir = Path(out_dir)
    return {"best": out_dir / f"ckpt_best{ext}", "last": out_dir / f"ckpt_last{ext}"}


# --------------------------------------------------------------------------- atomic writes

class WriteError(Exception):
    """A write of the app that failed: the file and the cause, one line (the caller adds the advice)."""

    def __init__(self, path, cause: str):
        super().__init__(f"cannot write {path} ({cause})")
        self.path, self.cause = Path(path), cause


def guarded_write(path: str | os.PathLike, write: Callable[[], object]):
    """Run `write` (which writes `path`) and return what it returns; any failure of the write is a
    WriteError naming the file and the cause: an OSError (a full disk, permissions, a directory of that
    name) or torch's serialisation RuntimeError ("[enforce fail at inline_container.cc] ...")."""
    try:
        return write()
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(path, err.strerror or first_sentence(err)) from None
    except RuntimeError as err:
        raise WriteError(path, _write_cause(err)) from None


def _write_cause(err: RuntimeError) -> str:
    """torch's writer errors without their "[enforce fail at file.cc:N] . " prefix."""
    text = " ".join(str(err).split())
    if text.startswith("[enforce fail"):
        text = text.split("]", 1)[-1].lstrip(" .")
    return first_sentence(text) or type(err).__name__


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, then os.replace it over `path`.

    If anything fails (or the process dies) before the rename, `path` keeps its old content; the
    temporary file is removed on any exception that reaches here.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _rename_into_place(tmp, path)


def _rename_into_place(tmp: str, path: Path) -> None:
    """os.replace the finished temporary file over `path` (removing it if that fails), then fsync
    the directory so the rename itself survives a crash."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless to skip where directories can't be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` hold what `src` holds, atomically, without writing the bytes again where it can.

    A hard link to `src` under a temporary name, renamed over `dst`: the checkpoint is written and
    fsynced once (ckpt_last), and ckpt_best becomes a second name for it. Safe because checkpoints
    are only ever replaced (atomic_write renames a new file over the old name), never rewritten in
    place: when ckpt_last is next written, ckpt_best keeps the file it named. Where the file
    system has no hard links, a copy through atomic_write.
    """
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # only its unique name is wanted: os.link makes the file
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FUSE file systems, FAT)
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: _copy(f, out))
        return
    _rename_into_place(tmp, dst)


def _copy(src: BinaryIO, dst: BinaryIO, chunk: int = 16 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)


def ensure_writable_dir(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` if needed and prove a file can be written there; CheckpointError if not."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # a run clearing leftovers there took it first
            os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CheckpointError(f"--out_dir {out_dir} is not writable ({reason}); choose a writable "
                              "directory with --out_dir") from exc
    return out_dir


# --------------------------------------------------------------------------- .npz (NumPy backend)

def save_npz(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write `ckpt` as an .npz archive of plain arrays (see the module docstring), atomically."""
    meta = {
        "format": FORMAT, "version": VERSION, "backend": ckpt.backend, "model": ckpt.model,
        "gpt_config": ckpt.gpt_config.to_dict() if ckpt.gpt_config else None,
        "train_config": ckpt.train_config, "vocab": ckpt.vocab, "iter_num": int(ckpt.iter_num),
        "best_val_loss": float(ckpt.best_val_loss), "rng": ckpt.rng,
    }
    if ckpt.tokenizer is not None:  # a character run's meta has no such key
        meta["tokenizer"] = tokenizer_entry(ckpt.tokenizer)
    arrays = {"meta": np.array(json.dumps(meta))}
    arrays.update({f"param/{k}": np.asarray(v) for k, v in ckpt.params.items()})
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in (ckpt.optimizer or {}).items()})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | os.PathLike) -> Checkpoint:
    """Read an .npz checkpoint with allow_pickle=False; CheckpointError for anything wrong with it.

    Headers first: the zip's directory (declared sizes), then the meta entry (bounded size and depth)
    and the config it states (checked in O(1) against the machine and the number of entries), then
    every array's .npy header (shape, dtype) against that config; only then is any array read.
    """
    path = Path(path)
    _check_exists(path)
    head = _head(path)
    refuse_what_is_no_checkpoint(path, head)
    if head[:4] == ZIP_MAGIC and checkpoint_kind(path) == "torch":
        raise CheckpointError(f"{path} is a PyTorch checkpoint (a zip archive holding data.pkl), not an .npz, "
                              "whatever its name says; use it with train_torch.py, or start from its weights with "
                              "--init_from")
    try:
        with zipfile.ZipFile(path) as z:
            entries = {_entry_name(info.filename): info for info in checked_zip_directory(path, z)}
            if "meta" not in entries:
                raise CheckpointError(f"{path} is an .npz archive but not an npgpt checkpoint (no 'meta' "
                                      "entry); pass a ckpt_*.npz written by train_np.py")
            meta = _read_meta(path, z, entries["meta"])
            ckpt = _checkpoint_from_meta(path, meta, params={}, optim={})
            params = {k[len("param/"):]: v for k, v in entries.items() if k.startswith("param/")}
            optim = {k[len("optim/"):]: v for k, v in entries.items() if k.startswith("optim/")}
            other = sorted(set(entries) - {"meta"} - {f"param/{k}" for k in params} - {f"optim/{k}" for k in optim})
            if other:
                raise CheckpointError(f"{path}: unexpected entries {other[:3]} in the archive; it was edited or "
                                      "written by another program")
            _check_headers(path, z, ckpt, params, optim)
    except CheckpointError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    try:
        with np.load(path, allow_pickle=False) as f:
            ckpt.params = {k: _widened(f[f"param/{k}"]) for k in sorted(params)}
            ckpt.optimizer = {k: f[f"optim/{k}"] for k in sorted(optim)}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise CheckpointError(f"refused to load {path}: it holds pickled Python objects, which could run "
                                  "code when loaded (np.load allow_pickle=False); use a checkpoint written by "
                                  "train_np.py") from exc
        raise _corrupt(path, exc) from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise _corrupt(path, exc) from exc
    return ckpt.check()


def _checkpoint_from_meta(path: Path, meta, params: dict, optim: dict) -> Checkpoint:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an npgpt checkpoint (its meta entry has no format "
                              f"{FORMAT!r}); pass a ckpt_*.npz written by train_np.py")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this code reads "
                              f"version {VERSION}")
    try:
        gpt_config = GPTConfig.from_dict(meta["gpt_config"]) if meta.get("gpt_config") else None
        return Checkpoint(backend=meta["backend"], model=meta["model"], gpt_config=gpt_config,
                          vocab=meta["vocab"], params=params, train_config=meta.get("train_config"),
                          iter_num=check_count(meta["iter_num"], "iter_num", path),
                          best_val_loss=check_loss(meta["best_val_loss"], "best_val_loss", path),
                          optimizer=optim, rng=meta.get("rng"),
                          tokenizer=tokenizer_from_entry(meta.get("tokenizer"), path), path=path)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the checkpoint's metadata is incomplete or invalid "
                              f"({_reason(exc)}); it was edited or written by another program") from exc


# --------------------------------------------------------------------------- .npz: headers before arrays

MAX_META_BYTES = 64 << 20  # the meta entry: JSON of the settings and the vocabulary (a 10**6-character one is
                           # ~12 MB, GPT-2's tokenizer ~7 MB)
MAX_JSON_DEPTH = 16        # our meta nests 4 deep (meta -> rng -> data -> state)
DEFLATE_MAX_RATIO = 1032   # deflate cannot expand one compressed byte into more than 1032 (RFC 1951's longest match)


def checked_zip_directory(path: Path, z: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's entries, refused (CheckpointError) where the sizes they declare cannot be true:
    stored entries declare their own size, deflated ones at most DEFLATE_MAX_RATIO times theirs, and
    all of them together fit the machine's memory. Nothing is inflated to find out."""
    infos = z.infolist()
    total = 0
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED:
            plausible = info.file_size == info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            plausible = info.file_size <= DEFLATE_MAX_RATIO * info.compress_size + 1024
        else:
            raise CheckpointError(f"{path}: entry {info.filename} is compressed with method {info.compress_type}; "
                                  "checkpoints are stored or deflated zip archives; use one written by "
                                  "train_np.py or train_torch.py")
        if not plausible:
            raise CheckpointError(f"{path}: entry {info.filename} declares {format_bytes(info.file_size)} from "
                                  f"{format_bytes(info.compress_size)} of data, more than its compression can give: a "
                                  "zip bomb or a damaged file; refused before inflating it")
        total += info.file_size
    available = available_memory()
    if available is not None and total > available:
        raise CheckpointError(f"{path}: its entries declare {format_bytes(total)} in all, more than the "
                              f"{format_bytes(available)} available; refused before reading them")
    return infos


def _entry_name(filename: str) -> str:
    return filename[:-len(".npy")] if filename.endswith(".npy") else filename


def _read_npy_header(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, bytes of the header) of one .npy entry, reading its header only."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read(f)
        return tuple(shape), dtype, f.tell()


def _read_meta(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo):
    """The meta entry's JSON, its size and nesting bounded."""
    if info.file_size > MAX_META_BYTES:
        raise CheckpointError(f"{path}: its meta entry declares {format_bytes(info.file_size)}, more than the "
                              f"{format_bytes(MAX_META_BYTES)} a checkpoint's settings and vocabulary take; it "
                              "was edited or written by another program")
    shape, dtype, _ = _read_npy_header(z, info)
    if dtype.hasobject:
        raise CheckpointError(f"refused to load {path}: it holds pickled Python objects, which could run "
                              "code when loaded (np.load allow_pickle=False); use a checkpoint written by "
                              "train_np.py")
    if shape != () or dtype.kind != "U":
        raise CheckpointError(f"{path}: its meta entry is a {dtype} array of shape {shape}, not a string of JSON; "
                              "it was edited or written by another program")
    with z.open(info) as f:
        text = str(np.lib.format.read_array(f, allow_pickle=False)[()])
    return parse_bounded_json(text, f"{path}: its meta entry")


def parse_bounded_json(text: str, what: str):
    """json.loads, refusing (CheckpointError) JSON nested deeper than MAX_JSON_DEPTH before parsing it."""
    outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).encode("utf-8", "replace")  # strings removed
    codes = np.frombuffer(outside, dtype=np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    closes = (codes == ord("]")) | (codes == ord("}"))
    depth = int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{what} is JSON nested {depth} deep, deeper than the {MAX_JSON_DEPTH} a "
                              "checkpoint's settings need; it was edited or written by another program")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{what} is not valid JSON ({_reason(exc)}); the file is truncated or was "
                              "edited") from None


def _check_headers(path: Path, z: zipfile.ZipFile, ckpt: Checkpoint, params: dict, optim: dict) -> None:
    """Every param/ and optim/ entry's .npy header against the config the meta states, before any
    array is read: the config's size and tensor count first (in O(1)), then each shape and dtype."""
    if ckpt.model not in ("gpt", "bigram"):
        return  # check() names it
    if ckpt.model == "bigram":
        table = params.get("token_embedding_table.weight")
        V = len(ckpt.vocab) if isinstance(ckpt.vocab, str) else 0
        want = {"token_embedding_table.weight": (V, V)} if table is not None else {}
        problem = check_checkpoint_config(None, V, len(params), path)
    else:
        if ckpt.gpt_config is None:
            return  # check() names it
        problem = check_checkpoint_config(ckpt.gpt_config, 0, len(params), path)
        want = None
    if problem:
        raise CheckpointError(f"{problem}; the file was edited or is not a checkpoint of this app")
    if want is None:
        want = ckpt.expected_shapes()  # bounded here: as many entries as the file has
    n_params = 0
    for name, info in params.items():
        shape, dtype, header = _read_npy_header(z, info)
        if name in want and shape != want[name]:
            raise CheckpointError(f"{path}: the parameters do not fit the model: {name} has shape {shape} but the "
                                  f"model needs {want[name]} (read from its .npy header); the file was edited or "
                                  "mixes two models, use a checkpoint written by train_np.py, train_torch.py or "
                                  "nanoGPT")
        if dtype != np.float16:  # float16 is widened, exactly
            check_weight_dtype(dtype, name, path)
        _check_entry_size(path, f"param/{name}", info, shape, dtype, header)
        n_params += math.prod(shape)
    for name, info in optim.items():
        shape, dtype, header = _read_npy_header(z, info)
        if dtype.hasobject or dtype.kind not in "fiu" or math.prod(shape) > max(n_params, 1):
            raise CheckpointError(f"{path}: optim/{name} is a {dtype} array of shape {shape} in its header, not "
                                  "a buffer the size of the parameters; the file was edited or written by another "
                                  "program")
        _check_entry_size(path, f"optim/{name}", info, shape, dtype, header)


def _check_entry_size(path: Path, name: str, info: zipfile.ZipInfo, shape: tuple, dtype: np.dtype,
                      header: int) -> None:
    if dtype.hasobject:
        raise CheckpointError(f"refused to load {path}: {name} holds pickled Python objects, which could run "
                              "code when loaded (np.load allow_pickle=False); use a checkpoint written by "
                              "train_np.py")
    if info.file_size != header + math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path}: {name} declares {format_bytes(info.file_size)} but its header says "
                              f"shape {shape} of {dtype}; the file is truncated or was edited")


def _widened(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float16 else array


# --------------------------------------------------------------------------- any checkpoint

def checkpoint_kind(path: str | os.PathLike) -> str:
    """"npz" or "torch", from the file's bytes, whatever its name: a pickle (torch's legacy format) is
    torch's; of the zip archives, torch's holds a data.pkl entry, an .npz .npy entries. Only a zip
    too damaged to list goes by its suffix (and that loader reports the damage)."""
    path = Path(path)
    _check_exists(path)
    head = _head(path)
    refuse_what_is_no_checkpoint(path, head)
    if head[:1] == PICKLE_MAGIC:
        return "torch"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return "torch" if path.suffix in TORCH_SUFFIXES else "npz"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    if any(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointError(f"{path} is a zip archive but no checkpoint: it holds neither .npy arrays (an .npz) nor "
                          f"a data.pkl (torch.save's format), only {names[:3]}; pass a ckpt_*.npz or ckpt_*.pt "
                          "written by train_np.py or train_torch.py, or a nanoGPT ckpt.pt")


def load_checkpoint(path: str | os.PathLike, torch_loader: Callable[[Path], Checkpoint] | None = None
                    ) -> Checkpoint:
    """Read any checkpoint: .npz here, a Hugging Face GPT-2 folder through gptapp.hf, .pt / nanoGPT
    through `torch_loader` (needs torch)."""
    path = Path(path)
    if path.is_dir():
        return load_hf_folder(path)
    if checkpoint_kind(path) == "npz":
        return load_npz(path)
    if torch_loader is None:
        raise CheckpointError(f"{path} is a PyTorch checkpoint (train_torch.py's or nanoGPT's), not an .npz, "
                              "whatever its name says; use it with train_torch.py, or start from its weights with "
                              "--init_from")
    return torch_loader(path)


def load_hf_folder(folder: Path) -> Checkpoint:
    """A Hugging Face GPT-2 folder as a Checkpoint (backend "hf", float32 weights, its tokenizer if it has
    the files); any fault of the folder (no config.json, a damaged safetensors, a tokenizer file that does
    not parse) is a CheckpointError, one line."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"checkpoint path is not a file: {folder}, nor a Hugging Face GPT-2 folder (it has no "
                              "config.json); pass a ckpt_*.npz or .pt file, or a folder as save_pretrained or the "
                              "hub lays it out (config.json, model.safetensors, vocab.json, merges.txt)")
    try:
        config, params, tokenizer = load_pretrained(folder, np.float32)
    except HFError as err:
        raise CheckpointError(" ".join(str(err).split())) from None
    return Checkpoint(backend="hf", model="gpt", gpt_config=config, vocab=None, params=params, tokenizer=tokenizer,
                      path=folder).check()


ZIP_MAGIC = b"PK\x03\x04"  # .npz and torch.save's format are zip archives
PICKLE_MAGIC = b"\x80"      # a pickle (protocol >= 2): torch's legacy format, or an .npz's object array


def _head(path: Path, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({_reason(exc)}); check its permissions") from exc


def refuse_what_is_no_checkpoint(path: Path, head: bytes) -> None:
    """CheckpointError saying what the file is, when its first bytes show it is no checkpoint at all
    (whatever its name claims): empty, a text file, a lone .npy array, or other bytes."""
    if head[:4] == ZIP_MAGIC or head[:1] == PICKLE_MAGIC:
        return  # the loaders tell a damaged or refused one apart
    fix = "pass a ckpt_*.npz or ckpt_*.pt written by train_np.py or train_torch.py, or a nanoGPT ckpt.pt"
    if not head:
        what = "is empty (0 bytes)"
    elif head.startswith(b"\x93NUMPY"):
        what = "is a single NumPy array (.npy), not a checkpoint"
    elif _looks_like_text(head):
        start = " ".join(head[:40].decode("utf-8", "ignore").split())
        what = f"is a text file (it begins {start!r}), not a checkpoint"
    else:
        what = (f"is not a checkpoint: neither a zip archive (.npz, .pt) nor a pickle (it begins with the bytes "
                f"{head[:8].hex(' ')})")
    raise CheckpointError(f"{path} {what}; {fix}")


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", "ignore")  # a character cut at the end of `head` is dropped
    return len(text) >= len(head) - 3 and all(c.isprintable() or c in "\n\r\t" for c in text)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; train first (it writes ckpt_last/ckpt_best in "
                              "--out_dir) or pass the path of an existing checkpoint")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}; pass the path of a ckpt_*.npz or .pt file")


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: it is truncated or corrupt ({_reason(exc)}); "
                           "use another checkpoint (ckpt_best / ckpt_last) or train again")


def _reason(exc: BaseException) -> str:
    return first_sentence(exc)
