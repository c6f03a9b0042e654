"""What training prints per iteration: nothing by default, the progress bar shows the iteration."""

from __future__ import annotations

from collections.abc import Callable

from ignite.engine import Engine

__all__ = ["iteration_log"]


def iteration_log(every: int = 0) -> bool | Callable[[Engine, int], bool]:
    """``iteration_log`` of MONAI's ``StatsHandler``: ``False`` for ``every <= 0``, else every ``every``-th iteration.

    A log line per iteration scrolls the progress bar away (about 31k lines for one BraTS
    training); epoch summaries are logged either way.
    """
    every = int(every)
    if every <= 0:
        return False

    def every_nth(engine: Engine, event: int) -> bool:
        return event % every == 0

    return every_nth
