"""One clear line for bad input data instead of a deep traceback.

MONAI's bundle runner wraps exceptions raised while evaluating or instantiating config items in
``RuntimeError("Failed to evaluate ...")`` chains. :func:`install` adds a ``sys.excepthook`` that,
when the uncaught exception's chain contains an :class:`~custom_components.io.InputDataError`,
prints ``error: <file>: <problem>`` and exits with status 2. Any other exception keeps the normal
traceback, and ``CC_FULL_TRACEBACK=1`` restores it for input errors too. Bundles call
:func:`install` first in their ``initialize`` list.
"""

from __future__ import annotations

import os
import sys

from custom_components.io import InputDataError

__all__ = ["install", "find_input_error"]


def find_input_error(exc: BaseException | None) -> InputDataError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputDataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install() -> None:
    """Install the hook once per process (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "_custom_components", False):
        return

    def hook(exc_type, exc, tb):
        err = find_input_error(exc)
        if err is None or os.environ.get("CC_FULL_TRACEBACK"):
            previous(exc_type, exc, tb)
            return
        print(f"error: {err}", file=sys.stderr)
        print("(set CC_FULL_TRACEBACK=1 to see the full traceback)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # no further output from atexit handlers of half-started workers

    hook._custom_components = True
    sys.excepthook = hook
