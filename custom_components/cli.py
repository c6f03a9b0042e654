"""Shared pieces of the ``scripts/`` command lines (fire)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import fire

from custom_components.io import InputDataError

__all__ = ["run_commands", "parse_floats", "parse_ints", "parse_names"]


def run_commands(commands: Mapping[str, Callable] | Callable, argv: list[str] | None = None) -> int:
    """Run a fire CLI; bad input data ends with one ``error: ...`` line on stderr and exit status 2."""
    try:
        # serialize=lambda: None keeps fire from echoing return values
        fire.Fire(commands, command=argv, serialize=lambda _: None)
    except InputDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def parse_ints(value: int | str | Sequence[int]) -> tuple[int, ...]:
    """Accept ``48,48,20`` (or ``48x48x20``) as fire passes it: a tuple, an int or a string."""
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    elif isinstance(value, int):
        value = [value]
    return tuple(int(v) for v in value)


def parse_floats(value: float | str | Sequence[float] | None) -> tuple[float, ...] | None:
    """Accept ``0.9,0.9,6.5`` (or a tuple / one number, as fire passes it); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (int, float)):
        value = [value]
    return tuple(float(v) for v in value)


def parse_names(value: str | Sequence[str] | None) -> list[str] | None:
    """Accept ``a,b`` or a sequence of names; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]
