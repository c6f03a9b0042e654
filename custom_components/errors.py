"""One clear line for bad input data instead of a deep traceback.

MONAI's bundle runner wraps exceptions raised while evaluating or instantiating config items in
``RuntimeError("Failed to evaluate ...")`` chains. :func:`install` adds a ``sys.excepthook`` that,
when the uncaught exception's chain contains an :class:`~custom_components.io.InputDataError`,
prints ``error: <file>: <problem>`` and exits with status 2. Any other exception keeps the normal
traceback, and ``CC_FULL_TRACEBACK=1`` restores it for input errors too. Bundles call
:func:`install` first in their ``initialize`` list (through :func:`custom_components.runs.start_run`).

Ignite handlers log an exception with its traceback before re-raising it (MONAI's
``StatsHandler.exception_raised``), which would print the traceback wall before the clear line;
:func:`install` also adds a logging filter that drops such records for input errors.
"""

from __future__ import annotations

import logging
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


class _InputErrorRecordFilter(logging.Filter):
    """Drop log records that carry an input error's traceback (the hook prints its one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not os.environ.get("CC_FULL_TRACEBACK"):
            return find_input_error(record.exc_info[1]) is None
        return True


_RECORD_FILTER = _InputErrorRecordFilter()


def _filter_log_handlers() -> None:
    """Filter the handlers of existing loggers, and every logger created from now on.

    Loggers made later (MONAI's ``StatsHandler`` makes its own, with its own stdout handler,
    when a workflow is instantiated) are of a logger class that applies the same filter.
    """
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if _RECORD_FILTER not in handler.filters:
                handler.addFilter(_RECORD_FILTER)
    base = logging.getLoggerClass()
    if not getattr(base, "_drops_input_error_tracebacks", False):

        class QuietInputErrorLogger(base):
            _drops_input_error_tracebacks = True

            def handle(self, record: logging.LogRecord) -> None:
                if _RECORD_FILTER.filter(record):
                    super().handle(record)

        logging.setLoggerClass(QuietInputErrorLogger)


def install() -> None:
    """Install the hook once per process (idempotent) and filter the handlers configured so far."""
    _filter_log_handlers()
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
