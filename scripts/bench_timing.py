"""Timing pieces shared by the training-step benchmarks (``bench_medvit``, ``bench_ham``, ``bench_lvmmed_seg``).

* :func:`interleaved`: run step functions in turn after warm-up rounds, the starting one rotating
  (A B, B A, ... for two), so that a drift of the machine's speed hits every model alike.
* :func:`ms`, :func:`spread`: the table's time cells.
* :func:`report`: time a ``rows()`` call and print (with ``out`` also write, atomically) its Markdown
  table with the run's conditions (threads, wall time, load average).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from custom_components.io import atomic_write_text


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a step's time is its whole time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], float]], steps: int, warmup: int) -> dict[str, list[float]]:
    """``steps`` timed calls of each function (each returns its own time), interleaved, after ``warmup`` rounds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        for n in names[i % len(names) :] + names[: i % len(names)]:  # rotate the starting model
            times[n].append(fns[n]())
    return times


def ms(s: float) -> str:
    return f"{1000 * s:.1f} ms"


def spread(xs: list[float]) -> str:
    """Median (min–max) of step times."""
    return f"{ms(statistics.median(xs))} ({1000 * min(xs):.1f}–{1000 * max(xs):.1f})"


def report(make_rows: Callable[[], list[tuple[str, str]]], steps: int, warmup: int, device: str,
           out: str | None = None) -> str:  # fmt: skip
    """Run ``make_rows``, print its Markdown table with the run's conditions; write it to ``out`` if given."""
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    table_rows = make_rows()
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["| measurement | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in table_rows], "",
             f"Medians of {steps} interleaved training steps per model after {warmup} warm-up rounds; device {device}; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; Python {platform.python_version()}; "
             f"wall time {wall:.0f} s; 1-min load average {load0:.2f} before, {load1:.2f} after (above the "
             f"thread count = other processes competed for the cores)."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    if out:
        atomic_write_text(text, out)
    print(text)
    return out or ""
