"""What is wrong with a wrong gradient, in a sentence (interface; the implementation lands with its tests)."""
from __future__ import annotations

from typing import NamedTuple


class Run(NamedTuple):
    """One case of a check: what the student's backward got and what the reference gives."""

    label: str                  # the case, e.g. "B=2 T=1 (one time step)"
    dout: object                # the upstream gradient handed to both backwards
    cache: tuple                # the reference forward's cache for the case's inputs
    want: tuple                 # the reference backward's gradients, in its return order
    got: tuple                  # the student's gradients: same count, shapes and dtypes (checked before)
    grad_names: tuple           # names of the gradients, e.g. ("dx", "dw", "db")


def explain(exercise: str, grad_name: str, runs: list) -> str | None:
    """One sentence about what is wrong with gradient `grad_name` over `runs`, or None if unsure."""
    return None


def name_mistake(exercise: str, runs: list):
    """The catalogue's Mistake that the student's gradients match on every run, or None."""
    return None
