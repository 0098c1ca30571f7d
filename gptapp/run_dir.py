"""The output directory of a run: a fresh run never destroys an earlier one, and nothing is left
behind by an interrupted save.

A directory "holds a run" when it has any of RUN_FILES (either script's checkpoints, metrics.jsonl,
loss.png). A fresh run there is refused unless the user says what to do with the earlier run:
    --resume       continue it (nothing is moved or deleted)
    --overwrite    delete its files, then start
    --move_aside   move its files into <out_dir>/run-<date>-<time>/, then start (`make train` does this)
The check comes before any work; the move or the deletion after every input has been validated,
just before the first step.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from .errors import UsageError

RUN_FILES = ("ckpt_best.npz", "ckpt_last.npz", "ckpt_best.pt", "ckpt_last.pt", "metrics.jsonl", "loss.png")
# What checkpoint.atomic_write and ensure_writable_dir leave when killed mid-write: ".<name>.<random>.tmp".
LEFTOVER_PATTERNS = tuple(f".{name}.*.tmp" for name in RUN_FILES) + (".write-test.*.tmp",)


def check_out_dir_flags(args) -> None:
    """The flags about --out_dir that exclude each other or make no sense (UsageError)."""
    if str(args.out_dir).strip() == "":
        raise UsageError("--out_dir is empty; pass the directory for checkpoints and logs, e.g. --out_dir out")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run in --out_dir, "
                         "--overwrite deletes it and starts a new one; pick one")


def earlier_run(out_dir) -> list[Path]:
    """The files of a run that `out_dir` already holds (empty: none)."""
    out_dir = Path(out_dir)
    return [out_dir / name for name in RUN_FILES if (out_dir / name).is_file()]


def refuse_used_out_dir(args) -> None:
    """UsageError when a fresh run would replace the run in --out_dir and no flag says to."""
    if args.resume or args.overwrite or args.move_aside:
        return
    files = earlier_run(args.out_dir)
    if files:
        raise UsageError(f"--out_dir {args.out_dir} holds a run ({', '.join(p.name for p in files)}); continue it "
                         "with --resume, delete it and start again with --overwrite, keep it in a subfolder with "
                         "--move_aside, or pick another --out_dir")


def make_room(args) -> str | None:
    """Just before a fresh run's first step: delete (--overwrite) or move aside (--move_aside) the
    earlier run in --out_dir, and remove leftovers of an interrupted save. Returns a note for the user."""
    out_dir = Path(args.out_dir)
    remove_leftovers(out_dir)
    files = [] if args.resume else earlier_run(out_dir)
    if not files:
        return None
    if args.overwrite:
        for p in files:
            p.unlink()
        return f"--overwrite: deleted the earlier run in {out_dir} ({', '.join(p.name for p in files)})"
    target = aside_dir(out_dir)
    target.mkdir()
    for p in files:
        p.rename(target / p.name)
    return f"moved the earlier run in {out_dir} to {target} ({', '.join(p.name for p in files)})"


def aside_dir(out_dir: Path) -> Path:
    """<out_dir>/run-<date>-<time>, with a counter if one with that name exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out_dir / f"run-{stamp}", 1
    while target.exists():
        n += 1
        target = out_dir / f"run-{stamp}-{n}"
    return target


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Delete the temporary files of interrupted saves (never a finished file); the ones removed."""
    gone = []
    for pattern in LEFTOVER_PATTERNS:
        for p in Path(out_dir).glob(pattern):
            with contextlib.suppress(OSError):
                p.unlink()
                gone.append(p)
    return gone
