"""What the training loop (gptapp.loop) asks of a backend, and the rules both backends share.

A backend (gptapp.backends.numpy, gptapp.backends.torch) owns the model, the optimiser and the
random streams. What differs between the two only in value (names, suffixes, the checkpoint writer)
is a BackendInfo. Backends import nothing from the loop and never see the command line: they get the
resolved TrainConfig and their own few options.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, NamedTuple, Protocol

from .checkpoint import Checkpoint, CheckpointError
from .data import Tokenizer
from .errors import UsageError, one_line
from .settings import TrainConfig


@dataclass(frozen=True)
class BackendInfo:
    name: str                                   # the checkpoint's `backend` field: "numpy" or "torch"
    label: str                                  # the first word of the first log line: "npgpt" or "torchgpt"
    prog: str                                   # the script: "train_np.py"
    ext: str                                    # its checkpoint suffix: ".npz"
    other_prog: str                             # the other script and its suffix, for the hint when
    other_ext: str                              # --resume finds no checkpoint
    write: Callable[[Path, Checkpoint], None]   # an atomic save of a checkpoint in this backend's format


class Built(NamedTuple):
    """What `Backend.build` reports for the log."""

    num_params: int
    banner: tuple[str, ...] = ()     # log lines after the first
    compile_s: float | None = None   # seconds spent compiling before the first step; None: nothing compiled
    peak_step_s: float | None = None  # a step's seconds at the device's peak FLOP/s (MFU = this / dt); None: no MFU


class TrainingState(NamedTuple):
    """The parts of a checkpoint that only the backend knows (the loop adds the settings and the step)."""

    params: dict       # parameter name -> array (NumPy) or tensor (torch)
    optimizer: dict    # the backend's own optimiser state
    rng: dict          # the backend's own RNG states


class Backend(Protocol):
    """What the loop needs of a backend. Every rank of a DDP run calls every method."""

    info: BackendInfo
    is_main: bool        # rank 0: prints, logs and writes files
    world_size: int
    default_preset: str  # the preset when none is given
    device: object       # where it trains, for the budget check ("cpu", a torch.device)
    attention: str       # the attention the budget check counts: "explicit" or "sdpa"

    def read_checkpoint(self, path, any_kind: bool) -> Checkpoint: ...
    # any_kind: any checkpoint's weights (--init_from); else its own kind only (--resume)
    def session(self) -> ContextManager: ...  # around everything after the settings (torch: the DDP group)
    def build(self, cfg: TrainConfig, tokenizer: Tokenizer, train_data, val_data, ckpt: Checkpoint | None,
              resume: bool) -> Built: ...
    # model, optimiser and streams; the weights from ckpt, and with resume its optimiser and RNG state;
    # the vocabulary's size from model_vocab_size
    def evaluate(self, it: int, stop: Callable[[], bool] | None = None) -> dict | None: ...
    # {"train": loss, "val": loss}; None when stop() turned true between two batches
    def step(self, it: int, lr: float, log: bool) -> float | None: ...
    # one update (gradient_accumulation_steps micro-batches); their mean loss when log, else None.
    # A non-finite loss skips the update and shows in the next poll.
    def poll(self, stop_requested: bool, force: bool) -> tuple[bool, int]: ...
    # (stop now, the first step with a non-finite loss or -1), the same on every rank; where reading
    # the device is a sync, only when force
    def state(self) -> TrainingState | None: ...  # None on ranks other than 0
    def generator(self) -> Callable: ...  # generate(ids, max_new_tokens, **sampling) of the trained model


# --------------------------------------------------------------------------- rules both backends share

def model_vocab_size(tokenizer: Tokenizer, ckpt: Checkpoint | None) -> int:
    """The model's vocab_size: the checkpoint's when there is one (a GPT-2 may pad its vocabulary past its
    tokenizer's), else the tokenizer's (a fresh run's characters)."""
    return ckpt.vocab_size if ckpt is not None else tokenizer.vocab_size


def eval_seed(seed: int, it: int, split_index: int) -> int:
    """The seed of the evaluation batches of one split (0 train, 1 val) at step `it`, for both backends.

    Each split gets a fresh generator seeded with this at every evaluation, never the training
    stream: evaluating does not shift the training batches, a resumed run evaluates on the same
    batches as an uninterrupted one, and train and val are drawn independently.
    """
    return (seed * 1_000_003 + it) * 2 + split_index


def local_accumulation_steps(global_steps: int, world_size: int) -> int:
    """This process's micro-batches per step: --gradient_accumulation_steps counts those of the global
    batch, shared among the processes of torchrun (nanoGPT's rule), so the tokens of a step and the
    learning rate's meaning stay those of the recipe however many GPUs run it. UsageError if they
    do not share evenly."""
    if global_steps % world_size:
        raise UsageError(f"--gradient_accumulation_steps {global_steps} does not divide among the {world_size} "
                         "processes of torchrun: it counts the micro-batches of the whole step, shared among "
                         f"them (nanoGPT's rule); pass a multiple of {world_size}, e.g. "
                         f"--gradient_accumulation_steps {world_size * max(1, -(-global_steps // world_size))}")
    return global_steps // world_size


def restore_or_refuse(ckpt: Checkpoint, restore: Callable[[], None]) -> None:
    """Run `restore` (load a resumed run's optimiser and RNG state); a state that does not fit is a
    CheckpointError."""
    try:
        restore()
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{ckpt.path}: its optimiser or RNG state is unusable ({one_line(err)}); "
                              "start a new run, or --init_from it for its weights only") from None
