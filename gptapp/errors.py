"""The app's exceptions and exit statuses: every mistake a user can make ends in one line on
stderr, "error: <problem>; <fix>"; run_cli (gptapp.cli) maps each kind to its exit status."""
from __future__ import annotations

import importlib.util

EXIT_FAULT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


# The fix for "this needs torch" (train_np.py's install, `make train`, has no torch).
INSTALL_TORCH = 'install it with pip install -e ".[torch]" or make train-torch'


def torch_installed() -> bool:
    """Whether `import torch` can find torch, without importing it."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


class UsageError(Exception):
    """A bad flag, prompt or combination of flags; the message is one line naming the fix."""


class TrainingError(Exception):
    """A fault during training (e.g. the loss stopped being finite); the message is one line."""


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def first_sentence(err: BaseException | str, limit: int = 240) -> str:
    """A library's error message made short without cutting it mid-sentence: the whole message on one
    line if it fits in `limit` characters, else its first sentence, whole."""
    text = " ".join(str(err).split()) or (type(err).__name__ if isinstance(err, BaseException) else "")
    if len(text) <= limit:
        return text
    end = text.find(". ")
    return text if end < 0 else text[:end]
