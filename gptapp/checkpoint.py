"""Checkpoints: what a training run saves, written atomically and read back without pickle.

One in-memory form, `Checkpoint`, for every file either script can read:

    ckpt_*.npz   written by train_np.py; read with np.load(allow_pickle=False)
    ckpt_*.pt    written by train_torch.py; read with torch.load(weights_only=True) in gptapp.torch_checkpoint
    ckpt.pt      nanoGPT's (`model` state dict + `model_args`); read by gptapp.torch_checkpoint, for sampling
                 and --init_from

Parameters always come back as {name: float32 ndarray} under npgpt's names, so either model can take
them. The optimiser and RNG state stay in their backend's own form: only that backend resumes from them.

Layout of an .npz checkpoint (every entry a plain array, so no pickle is ever needed):
    meta            0-d unicode array holding JSON: format, version, backend, model, gpt_config,
                    train_config, vocab, iter_num, best_val_loss, rng (numpy bit_generator states)
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
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from npgpt.config import GPTConfig

from .errors import first_sentence

FORMAT = "npgpt-checkpoint"
VERSION = 1
NUMPY_EXT, TORCH_EXT = ".npz", ".pt"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, refused or does not fit; the message is one line."""


# --------------------------------------------------------------------------- the in-memory form

@dataclass
class Checkpoint:
    """Everything a run saves. `backend` is "numpy", "torch" or "nanogpt" (where it came from)."""

    backend: str
    model: str                              # "gpt" or "bigram"
    gpt_config: GPTConfig | None            # None for the bigram model
    vocab: str | None                       # the tokenizer's characters; None for nanoGPT files
    params: dict[str, np.ndarray]           # npgpt names -> float32 arrays
    train_config: dict | None = None        # TrainConfig.to_dict() of the run; None for nanoGPT
    iter_num: int = 0                       # optimisation steps done
    best_val_loss: float = math.inf
    optimizer: dict | None = None           # the backend's own optimiser state
    rng: dict | None = None                 # the backend's own RNG state
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
            if not np.issubdtype(v.dtype, np.floating):
                raise CheckpointError(f"{where}: parameter {k} has dtype {v.dtype}, not floating point")
        for k, v in self.params.items():
            if not np.isfinite(v).all():
                raise CheckpointError(f"{where}: parameter {k} holds values that are not finite (nan or inf): "
                                      "the run that wrote it diverged; use an earlier checkpoint")
        if self.vocab is not None and not isinstance(self.vocab, str):
            raise CheckpointError(f"{where}: the vocabulary is of type {type(self.vocab).__name__}, not a string "
                                  "of characters; the file was edited or written by another program")
        dupes = sorted({c for c in self.vocab if self.vocab.count(c) > 1}) if self.vocab else []
        if dupes:
            raise CheckpointError(f"{where}: the vocabulary has duplicate characters "
                                  f"({', '.join(map(repr, dupes[:5]))}), so it cannot map ids to characters; the "
                                  "file was edited or written by another program")
        if self.vocab is not None and len(self.vocab) != self.vocab_size:
            raise CheckpointError(f"{where}: the vocabulary has {len(self.vocab)} characters but the model "
                                  f"has vocab_size={self.vocab_size}; the file is inconsistent")
        return self


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
    place: when ckpt_last is next written, ckpt_best keeps the file it names now. Where the file
    system has no hard links, a copy through atomic_write.
    """
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # only its unique name was wanted: os.link makes the file
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
    arrays = {"meta": np.array(json.dumps(meta))}
    arrays.update({f"param/{k}": np.asarray(v) for k, v in ckpt.params.items()})
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in (ckpt.optimizer or {}).items()})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | os.PathLike) -> Checkpoint:
    """Read an .npz checkpoint with allow_pickle=False; CheckpointError for anything wrong with it."""
    path = Path(path)
    _check_exists(path)
    refuse_what_is_no_checkpoint(path, _head(path))
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            if "meta" not in files:
                raise CheckpointError(f"{path} is an .npz archive but not an npgpt checkpoint (no 'meta' "
                                      "entry); pass a ckpt_*.npz written by train_np.py")
            meta = json.loads(str(f["meta"][()]))
            params = {k[len("param/"):]: f[k] for k in sorted(files) if k.startswith("param/")}
            optim = {k[len("optim/"):]: f[k] for k in sorted(files) if k.startswith("optim/")}
    except CheckpointError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise CheckpointError(f"refused to load {path}: it holds pickled Python objects, which could run "
                                  "code when loaded (np.load allow_pickle=False); use a checkpoint written by "
                                  "train_np.py") from exc
        raise _corrupt(path, exc) from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, exc) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an npgpt checkpoint (its meta entry has no format "
                              f"{FORMAT!r}); pass a ckpt_*.npz written by train_np.py")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this code reads "
                              f"version {VERSION}")
    try:
        gpt_config = GPTConfig.from_dict(meta["gpt_config"]) if meta.get("gpt_config") else None
        ckpt = Checkpoint(backend=meta["backend"], model=meta["model"], gpt_config=gpt_config,
                          vocab=meta["vocab"], params=params, train_config=meta.get("train_config"),
                          iter_num=int(meta["iter_num"]), best_val_loss=float(meta["best_val_loss"]),
                          optimizer=optim, rng=meta.get("rng"), path=path)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the checkpoint's metadata is incomplete or invalid "
                              f"({_reason(exc)}); it was edited or written by another program") from exc
    return ckpt.check()


# --------------------------------------------------------------------------- any checkpoint

def checkpoint_kind(path: str | os.PathLike) -> str:
    """"npz" or "torch", from the file's content (both are zip archives), else from its suffix."""
    path = Path(path)
    _check_exists(path)
    head = _head(path)
    refuse_what_is_no_checkpoint(path, head)
    if head[:4] == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (OSError, zipfile.BadZipFile):
            names = []  # truncated: the suffix decides, and that loader reports the damage
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if any(n.endswith(".npy") for n in names):
            return "npz"
    return "torch" if path.suffix in TORCH_SUFFIXES else "npz"


def load_checkpoint(path: str | os.PathLike, torch_loader: Callable[[Path], Checkpoint] | None = None
                    ) -> Checkpoint:
    """Read any checkpoint: .npz here, .pt / nanoGPT through `torch_loader` (needs torch)."""
    path = Path(path)
    if checkpoint_kind(path) == "npz":
        return load_npz(path)
    if torch_loader is None:
        raise CheckpointError(f"{path} is a PyTorch checkpoint and reading it needs torch; install torch")
    return torch_loader(path)


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
