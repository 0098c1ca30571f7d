"""What a training run reports: log lines, a progress bar, metrics.jsonl and loss.png.

Shared by train_np.py and train_torch.py so that their logs can be compared line by line:
    step {it}: train loss {:.4f}, val loss {:.4f}
    iter {it}: loss {:.4f}, lr {:.2e}, time {:.1f}ms, tok/s {:,.0f}[, mfu {:.1f}%]
Log lines go to stdout (through tqdm.write, so they never break the bar); the bar goes to stderr and
only shows when stderr is a terminal (or --progress true). tqdm for the bar, matplotlib for the plot.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .checkpoint import atomic_write, guarded_write

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def format_eval_line(it: int, train_loss: float, val_loss: float) -> str:
    return f"step {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"


def format_iter_line(it: int, loss: float, lr: float, dt_ms: float, tokens_per_s: float,
                     mfu: float | None = None) -> str:
    line = f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, time {dt_ms:.1f}ms, tok/s {tokens_per_s:,.0f}"
    if mfu is not None:
        line += f", mfu {100 * mfu:.1f}%"
    return line


class RunLog:
    """The log of one run in `out_dir`. `enabled=False` (DDP ranks other than 0) makes it silent.

    With `resume_from=k`, metrics.jsonl keeps the records of the steps before k and the evaluation
    at k (those that the checkpoint at step k already reflects); later records, from a run that
    went on past its last checkpoint, are dropped.
    """

    def __init__(self, out_dir: Path, max_iters: int, start_iter: int = 0, enabled: bool = True,
                 progress: bool | None = None, resume_from: int | None = None):
        self.enabled = enabled
        self.metrics_path = Path(out_dir) / METRICS_NAME
        self.plot_path = Path(out_dir) / PLOT_NAME
        self.t_start = time.time()
        self._file = None
        if not enabled:
            self.bar = tqdm(disable=True)
            return
        path = self.metrics_path
        if resume_from is not None:
            keep = [r for r in read_metrics(path)
                    if r["iter"] < resume_from or (r["iter"] == resume_from and r["kind"] == "eval")]
            guarded_write(path, lambda: atomic_write(path, lambda f: f.write(
                "".join(json.dumps(r) + "\n" for r in keep).encode())))
            self._file = guarded_write(path, lambda: open(path, "a", encoding="utf-8"))
        else:
            self._file = guarded_write(path, lambda: open(path, "w", encoding="utf-8"))
        disable = None if progress is None else not progress  # None: tqdm shows it only on a terminal
        self.bar = tqdm(total=max_iters, initial=start_iter, disable=disable, dynamic_ncols=True,
                        unit="it", leave=False, file=sys.stderr)

    def info(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def record(self, **fields) -> None:
        if self._file is not None:
            fields["time_s"] = round(time.time() - self.t_start, 3)
            line = json.dumps(fields) + "\n"
            guarded_write(self.metrics_path, lambda: (self._file.write(line), self._file.flush()))

    def log_iter(self, it: int, loss: float, lr: float, dt_ms: float, tokens_per_s: float,
                 mfu: float | None = None) -> None:
        self.info(format_iter_line(it, loss, lr, dt_ms, tokens_per_s, mfu))
        self.record(kind="iter", iter=it, loss=loss, lr=lr, dt_ms=dt_ms, tokens_per_s=tokens_per_s, mfu=mfu)
        if self.enabled:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s", refresh=False)

    def log_eval(self, it: int, train_loss: float, val_loss: float) -> None:
        self.info(format_eval_line(it, train_loss, val_loss))
        self.record(kind="eval", iter=it, train_loss=train_loss, val_loss=val_loss)

    def step(self) -> None:
        self.bar.update(1)

    def close(self, plot: bool = True) -> None:
        """Close metrics.jsonl and draw loss.png (WriteError if either fails; the file is closed anyway)."""
        self.bar.close()
        if self._file is not None:
            f, self._file = self._file, None
            try:
                guarded_write(self.metrics_path, f.close)
            except Exception:
                with contextlib.suppress(OSError):
                    f.close()  # a failed flush leaves the file open
                raise
            if plot:
                plot_losses(self.metrics_path, self.plot_path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "iter" in r and "kind" in r:
            records.append(r)
    return records


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Train/val loss curves from metrics.jsonl into a PNG (matplotlib Agg: no display). False if no data."""
    records = read_metrics(metrics_path)
    iters = [r for r in records if r["kind"] == "iter" and _finite(r.get("loss"))]
    evals = [r for r in records if r["kind"] == "eval" and _finite(r.get("val_loss"))]
    if not iters and not evals:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if iters:
        ax.plot([r["iter"] for r in iters], [r["loss"] for r in iters], color="tab:blue", alpha=0.35,
                linewidth=1, label="train (batch)")
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", color="tab:blue",
                markersize=3, label="train")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                markersize=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        guarded_write(png_path, lambda: atomic_write(png_path, lambda f: fig.savefig(f, format="png")))
    finally:
        plt.close(fig)
    return True


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class Interrupted(KeyboardInterrupt):
    """A stop signal that ends the command at once: a second one while training, or any during `sample`.
    gptapp.cli.run_cli prints "error: interrupted (<signal>)[; detail]" and exits 128 + signum."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum)
        self.signum, self.detail = signum, detail


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM while training: remember it, so the loop can save and stop at the
    next step boundary (never halfway through an update), or between the batches of an evaluation.
    A second one (either signal) raises Interrupted at once: nothing is half-written, since every
    save is atomic. Use as a context manager around the loop; the old handlers come back on exit.

    forwarded=True (a rank under torchrun): the terminal's Ctrl-C reaches every rank, and torchrun
    passes it on once more, so a repeated signal is the same request, not a second Ctrl-C; and once
    a stop is requested, the signals stay ignored after the loop (the rank is on its way out), so the
    forwarded copy cannot interrupt the save, the barrier or the exit.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, forwarded: bool = False):
        self.signum: int | None = None
        self.forwarded = forwarded
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 2)  # 130 for SIGINT, 143 for SIGTERM

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "?"

    def _handle(self, signum, frame):
        if self.signum is not None:
            if not self.forwarded:  # a second signal: stop at once, without saving
                raise Interrupted(signum, "a second stop signal ends the run at once, without saving (every "
                                          "checkpoint written so far is whole)")
            return
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, signal.SIG_IGN if self.forwarded and self.requested else old)
        self._old.clear()


@contextlib.contextmanager
def stop_at_once():
    """Around work with nothing to save (sampling): SIGINT and SIGTERM raise Interrupted at once, so the
    command ends with one line (run_cli) between two generated tokens, whichever signal it is."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
