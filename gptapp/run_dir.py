"""The output directory of a run: a fresh run never destroys an earlier one, and nothing is left
behind by an interrupted save.

A directory "holds a run" when it has any of RUN_FILES (either script's checkpoints, metrics.jsonl,
loss.png). A fresh run there is refused unless the user says what to do with the earlier run:
    --resume       continue it (nothing is moved or deleted)
    --overwrite    delete its files, then start
    --move_aside   move its files into <out_dir>/run-<date>-<time>/, then start (`make train` does this)
The check comes before any work; the move or the deletion after every input has been validated,
just before the first step. A directory with a run's log but no checkpoint (--max_iters 0, a run
stopped before its first save) has nothing to resume: only --overwrite or --move_aside start there.

One writer per directory: a training run holds <out_dir>/train.lock for its whole length (rank 0
under torchrun), taken before it reads or writes anything there. The lock is an flock on a file
that names its owner (pid, host, start time); a second run on a locked directory is refused, naming
that pid. The kernel releases an flock when its process dies, so a lock file left by a killed run
is recognised as stale and taken over with a note. `sample` only reads, and never needs the lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from .checkpoint import CheckpointError, WriteError, ensure_writable_dir, guarded_write
from .errors import TrainingError, UsageError

RUN_FILES = ("ckpt_best.npz", "ckpt_last.npz", "ckpt_best.pt", "ckpt_last.pt", "metrics.jsonl", "loss.png")
LOCK_NAME = "train.lock"
# What checkpoint.atomic_write, ensure_writable_dir and the lock leave when killed mid-write:
# ".<name>.<random>.tmp".
LEFTOVER_PATTERNS = tuple(f".{name}.*.tmp" for name in (*RUN_FILES, LOCK_NAME)) + (".write-test.*.tmp",)


def check_out_dir_flags(args) -> None:
    """The flags about --out_dir that exclude each other or make no sense (UsageError)."""
    if str(args.out_dir).strip() == "":
        raise UsageError("--out_dir is empty; pass the directory for checkpoints and logs, e.g. --out_dir out")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run in --out_dir, "
                         "--overwrite deletes it and starts a new one; pick one")
    if args.resume and args.move_aside:
        raise UsageError("--resume and --move_aside exclude each other: --resume continues the run in --out_dir, "
                         "--move_aside moves it into a subfolder and starts a new one; pick one")
    if args.overwrite and args.move_aside:
        raise UsageError("--overwrite and --move_aside exclude each other: --overwrite deletes the run in "
                         "--out_dir, --move_aside keeps it in a subfolder; pick one")


def earlier_run(out_dir) -> list[Path]:
    """The files of a run that `out_dir` already holds (empty: none)."""
    out_dir = Path(out_dir)
    return [out_dir / name for name in RUN_FILES if (out_dir / name).is_file()]


def refuse_used_out_dir(args) -> None:
    """UsageError when a fresh run would replace the run in --out_dir and no flag says to."""
    if args.resume or args.overwrite or args.move_aside:
        return
    files = earlier_run(args.out_dir)
    if files and not any(p.name.startswith("ckpt_") for p in files):
        raise UsageError(f"--out_dir {args.out_dir} holds the log of a run that saved no checkpoint "
                         f"({', '.join(p.name for p in files)}); start a new run there with --overwrite (deletes "
                         "them) or --move_aside (keeps them in a subfolder), or pick another --out_dir")
    if files:
        raise UsageError(f"--out_dir {args.out_dir} holds a run ({', '.join(p.name for p in files)}); continue it "
                         "with --resume, delete it and start again with --overwrite, keep it in a subfolder with "
                         "--move_aside, or pick another --out_dir")


def only_a_log(out_dir) -> list[Path]:
    """The files of a run that saved no checkpoint (metrics.jsonl, loss.png); empty if it has one."""
    files = earlier_run(out_dir)
    return [] if any(p.name.startswith("ckpt_") for p in files) else files


def refuse_what_is_no_file(out_dir, names) -> None:
    """UsageError, before step 0, when a name the run will write in `out_dir` is taken by something
    that is not a file (a directory): the write would fail only after the work."""
    for name in names:
        path = Path(out_dir) / name
        if path.exists() and not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file"
            raise UsageError(f"--out_dir {out_dir}: {name} is {what}, and the run writes a file of that name; "
                             "move or rename it, or pick another --out_dir")


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
            _guarded(p, p.unlink, f"delete {p}", "the earlier run's other files are as they were")
        return f"--overwrite: deleted the earlier run in {out_dir} ({', '.join(p.name for p in files)})"
    target = aside_dir(out_dir)
    _guarded(target, target.mkdir, f"create {target}", "nothing was moved")
    for p in files:
        _guarded(target / p.name, lambda: p.rename(target / p.name), f"move {p} into {target}",
                 f"the files moved so far are in {target}, the others still in {out_dir}")
    return f"moved the earlier run in {out_dir} to {target} ({', '.join(p.name for p in files)})"


def _guarded(path: Path, action, what: str, kept: str) -> None:
    """Run one step of make_room through the app's guarded write; a failure is one line (TrainingError)."""
    try:
        guarded_write(path, action)
    except WriteError as err:
        raise TrainingError(f"cannot {what} ({err.cause}); {kept}; fix the cause (permissions, disk space) "
                            "and run again") from None


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


# --------------------------------------------------------------------------- one writer per run directory

class OutDirLock:
    """The lock of one run directory, held from acquire() to release() (see the module docstring).

    The lock file appears whole: its content is written to a temporary file, which is flocked and
    then hard-linked to the lock's name (os.link fails if the name exists), so no reader ever sees
    an empty lock. A lock file nobody holds an flock on is stale: the taker flocks it, checks that
    the name still leads to it, and renames its own flocked file over it.
    """

    def __init__(self, out_dir, created: Path | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.created = created  # the topmost directory that taking the lock created, or None
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (UsageError if a live run holds it); a note if it takes over a stale lock."""
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
        for _ in range(100):  # each round ends in the lock, a refusal, or a race lost to a taker: then again
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{LOCK_NAME}.", suffix=".tmp")
            try:
                os.write(fd, owner.encode())
                os.fsync(fd)
                _flock(fd)
                try:
                    held = _link(tmp, self.path, fd, owner)
                    if held is None:
                        continue
                    self.fd, fd = held, (None if held == fd else fd)
                    return None
                except FileExistsError:
                    note = self._take_over_stale(tmp)
                    if note is not False:
                        self.fd, fd = fd, None
                        return note
                except FileNotFoundError:  # another run's cleanup removed our temporary name: again
                    continue
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if fd is not None:
                    os.close(fd)
            time.sleep(0.01)
        raise UsageError(f"--out_dir {self.out_dir}: could not take its lock {self.path}, other runs keep taking "
                         "it; run one training per --out_dir")

    def _take_over_stale(self, tmp: str) -> str | None | bool:
        """With the lock name taken: UsageError if its owner lives; a note after taking over a stale one;
        False if the name changed meanwhile (try again)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            owner = _read_owner(fd)
            try:
                _flock(fd)
            except BlockingIOError:
                if _same_file(fd, self.path):
                    raise UsageError(f"--out_dir {self.out_dir} is locked by another run ({_describe(owner)}; its "
                                     f"lock file {self.path}); wait for that run to end or stop it, or pick another "
                                     "--out_dir") from None
                return False
            if not _same_file(fd, self.path):
                return False
            try:
                os.rename(tmp, self.path)  # ours (flocked) replaces the stale one in one step
            except FileNotFoundError:  # another run's cleanup removed our temporary name: again
                return False
            return (f"note: {self.path}: took over the stale lock of {_describe(owner)}, a run that ended without "
                    "releasing it")
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and let go; remove the directories that taking the
        lock created if the run left nothing in them."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None
        _remove_created(self.out_dir, self.created)

    def __enter__(self) -> "OutDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_out_dir(out_dir) -> OutDirLock:
    """Create --out_dir if needed, prove it writable, and take its lock (UsageError if a live run holds
    it; CheckpointError if it is not writable). A note goes to stderr when a stale lock is taken over."""
    out_dir = Path(out_dir)
    created = None
    for d in (out_dir, *out_dir.parents):
        if d.exists():
            break
        created = d
    ensure_writable_dir(out_dir)
    lock = OutDirLock(out_dir, created)
    try:
        note = lock.acquire()
    except OSError as err:
        _remove_created(out_dir, created)
        raise CheckpointError(f"--out_dir {out_dir}: cannot take its lock {lock.path} ({err.strerror or err}); "
                              "choose a directory on a local, writable file system with --out_dir") from None
    except BaseException:
        _remove_created(out_dir, created)
        raise
    if note:
        print(note, file=sys.stderr)
    return lock


def _remove_created(out_dir: Path, created: Path | None) -> None:
    """Remove out_dir and its parents up to `created` (the topmost one a run created), where empty.
    Nothing inside is deleted: a run refused here leaves no file of its own, and any file there (the
    probe or lock file of a run starting at the same moment) is another run's."""
    if created is None:
        return
    d = out_dir
    with contextlib.suppress(OSError):
        while True:
            d.rmdir()  # only if empty
            if d == created:
                break
            d = d.parent


def _link(tmp: str, path: Path, fd: int, owner: str) -> int | None:
    """Give the finished, flocked lock file `tmp` (open as fd) the lock's name: the fd that holds the
    lock; FileExistsError if the name is taken. Where the file system has no hard links, the name is
    created with O_EXCL, flocked, then filled (a reader may see it empty for a moment and name "an
    unknown process"); None if a taker won that moment (try again)."""
    try:
        os.link(tmp, path)
        return fd
    except (FileExistsError, FileNotFoundError):
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
    new = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _flock(new)
        if _same_file(new, path):
            os.write(new, owner.encode())
            return new
    except BlockingIOError:
        pass
    os.close(new)
    return None


def _flock(fd: int) -> None:
    """An exclusive flock, without waiting (BlockingIOError if held). Where the file system has no
    locks (ENOLCK, EOPNOTSUPP), the lock file alone marks the directory: a live owner then shows as
    a process of this host that still runs."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(err.errno, err.strerror) from None
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if _owner_lives(_read_owner(fd)):
            raise BlockingIOError(errno.EWOULDBLOCK, "locked") from None


def _owner_lives(owner: dict) -> bool:
    if owner.get("pid") == os.getpid() or not owner:
        return False
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: assume it runs
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):
        return True
    return True


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "an unknown process"
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
            + (f", started {owner['started']}" if owner.get("started") else ""))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
