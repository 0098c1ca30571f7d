"""The app's exceptions and exit statuses: every mistake a user can make ends in one line on
stderr, "error: <problem>; <fix>"; run_cli (gptapp.cli) maps each kind to its exit status."""
from __future__ import annotations

EXIT_FAULT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A bad flag, prompt or combination of flags; the message is one line naming the fix."""


class TrainingError(Exception):
    """A fault during training (e.g. the loss stopped being finite); the message is one line."""


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text
