"""The pieces that the comparison scripts share (``scripts/compare_methods.py``, ``scripts/compare_init.py``).

A comparison trains and evaluates one bundle several times (methods or initialisations, over seeds),
each run's workflows in one child process, then tabulates mean ± std over seeds:

* :func:`run_child_workflows`: the run's ``monai.bundle run`` workflows in a child process of the
  calling script (MONAI starts once per run), its output in ``log``; the bundle's one-line input
  error passes through as an :class:`~custom_components.io.InputDataError`.
* :func:`summarise`: per row, the mean ± std cells of the Markdown table and the ``<key>_mean`` /
  ``<key>_std`` columns of the CSV (sample std; NaN values, i.e. undefined metrics, left out).
* :func:`write_comparison`: ``comparison.md`` and ``comparison.csv``, atomically.
* :func:`main`: a comparison script's entry point: the child process of :func:`run_child_workflows`,
  or the ``fire`` command line with an input error as one ``error:`` line (exit code 2).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from custom_components.handlers.report import format_mean_std, markdown_table
from custom_components.io import InputDataError, atomic_write_text

__all__ = ["WORKFLOWS_FLAG", "main", "mean_std", "run_child_workflows", "run_workflows", "summarise", "write_comparison"]

#: ``<script> --run_workflows JSON``: the child process runs the workflows of one run
WORKFLOWS_FLAG = "--run_workflows"


def run_workflows(workflows: list[dict]) -> None:
    """Run ``monai.bundle run`` workflows one after the other in this process."""
    from monai.bundle import run

    for workflow in workflows:
        run(**workflow)


def run_child_workflows(script: str | Path, workflows: list[dict], cwd: Path, log: Path, label: str,
                        append: bool = False) -> None:  # fmt: skip
    """Run ``workflows`` in ``python script --run_workflows JSON`` (cwd ``cwd``), output in ``log``."""
    cmd = [sys.executable, str(Path(script).resolve()), WORKFLOWS_FLAG, json.dumps(workflows)]
    with open(log, "a" if append else "w") as fh:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode == 2:  # the bundle's one-line input error: pass it on as it is
        errors = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
        if errors:
            raise InputDataError(label, f"{errors[-1][len('error: '):]} (log {log})")
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN mean for none)."""
    mean = sum(values) / len(values) if values else float("nan")
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def summarise(results: dict[str, list[dict[str, float]]], columns: tuple[str, ...] | list[str],
              first: str) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(Markdown rows, CSV rows) of ``{row name: [per-seed {column: value}]}``; ``first`` names the row column."""
    rows, csv_rows = [], []
    for name, per_seed in results.items():
        row, csv_row = {first: name, "seeds": len(per_seed)}, {first: name, "seeds": len(per_seed)}
        for key in columns:
            values = [r[key] for r in per_seed if not math.isnan(r[key])]
            row[key] = format_mean_std(values) if values else "n/a"
            csv_row[f"{key}_mean"], csv_row[f"{key}_std"] = mean_std(values)
        rows.append(row)
        csv_rows.append(csv_row)
    return rows, csv_rows


def write_comparison(out: Path, heading: str, rows: list[dict], csv_rows: list[dict], columns: list[str]) -> str:
    """Write ``out/comparison.md`` (``heading`` + the table) and ``out/comparison.csv``; return the Markdown."""
    table = heading + markdown_table(rows, columns) + "\n"
    atomic_write_text(table, out / "comparison.md")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(csv_rows[0]))
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write_text(buf.getvalue(), out / "comparison.csv")
    return table


def main(compare: Callable[..., Any], **fire_kwargs: Any) -> None:
    """Run a comparison script: the workflows of one run (its child process) or ``fire.Fire(compare)``."""
    if len(sys.argv) == 3 and sys.argv[1] == WORKFLOWS_FLAG:  # the child process of run_child_workflows
        from custom_components import errors

        errors.install()
        run_workflows(json.loads(sys.argv[2]))
        sys.exit(0)
    import fire

    try:
        fire.Fire(compare, **fire_kwargs)
    except InputDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
