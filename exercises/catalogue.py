"""Known wrong backwards, one list per exercise (interface; the entries land with their tests)."""
from __future__ import annotations

from typing import Callable, NamedTuple


class Mistake(NamedTuple):
    key: str           # a short id, e.g. "layernorm-no-mean-path"
    title: str         # names the mistake in a sentence
    doc: str           # where docs/gradients.md explains it: "docs/gradients.md#anchor"
    backward: Callable  # the wrong backward: same signature and returns as the reference's


MISTAKES: dict[str, tuple] = {}
