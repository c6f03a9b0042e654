"""Result tables (rows x columns) built from the Ignite metrics' per-class details, written as Markdown and CSV.

The metrics of :mod:`custom_components.metrics.localization` put their full result in
``engine.state.metric_details[name]``; a table spec turns those details into a
:class:`MetricTable`, and :func:`write_table` writes it twice, atomically:

* ``<stem>.csv``: raw fractions (as in the metrics JSON; an undefined value is an empty cell),
  first column the row name, for scripts;
* ``<stem>.md``: the same table with the fractions in percent (two decimals, ``n/a`` when
  undefined), the unit of the papers' tables.

Specs (HAM's evaluation tables, spec ``ham.md`` section 6):

* :class:`AUROCTable`: one row per finding + ``mean`` (+ one row per extra AUROC metric, e.g. the
  abnormality head), column ``auroc``.
* :class:`LocalizationTable`: TIoU or TIoR: one row per finding with at least one box case +
  ``mean``, columns ``n`` (cases), one per threshold T and ``mean`` (over T; the ``mean`` row's
  ``mean`` is mTIoU / mTIoR).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custom_components.io import atomic_write_text

__all__ = ["MetricTable", "AUROCTable", "LocalizationTable", "write_table", "table_markdown", "table_csv",
           "table_section"]


@dataclass
class MetricTable:
    """``columns`` (the first names the rows), ``rows`` (dicts keyed by column; floats are fractions);
    ``count_columns`` are integers shown as they are (not in percent); ``note`` goes under the Markdown."""

    columns: list[str]
    rows: list[dict[str, Any]]
    count_columns: set[str] = field(default_factory=set)
    title: str = ""
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """``{"columns", "rows"}`` with NaN as ``None`` (valid JSON)."""
        return {"columns": list(self.columns), "rows": [{c: _plain(r.get(c)) for c in self.columns} for r in self.rows]}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _details(all_details: Mapping[str, Any], metric: str, kind: str) -> Mapping[str, Any]:
    if metric not in all_details:
        raise KeyError(f"{kind} table: no details of metric {metric!r} (have {sorted(all_details)})")
    return all_details[metric]


class AUROCTable:
    """AUROC per finding and the mean, from a :class:`~custom_components.metrics.MultiLabelAUROC`.

    Args:
        metric: the name of the AUROC metric (its per-class details).
        extra_rows: ``{row name: metric name}`` of further AUROC metrics appended after ``mean``,
            each given by its first (only) class, e.g. ``{"abnormal": "abnormal_auroc"}``.
    """

    def __init__(self, metric: str = "auroc", extra_rows: Mapping[str, str] | None = None) -> None:
        self.metric = metric
        self.extra_rows = dict(extra_rows or {})

    def __call__(self, all_details: Mapping[str, Any]) -> MetricTable:
        details = _details(all_details, self.metric, "AUROC")
        rows = [{"finding": name, "auroc": value} for name, value in details["per_class"].items()]
        rows.append({"finding": "mean", "auroc": details["mean"]})
        for row_name, metric in self.extra_rows.items():
            rows.append({"finding": row_name, "auroc": next(iter(_details(all_details, metric, "AUROC")["per_class"].values()))})
        return MetricTable(["finding", "auroc"], rows, title="AUROC")


class LocalizationTable:
    """TIoU (``kind="tiou"``) or TIoR (``"tior"``) per finding and threshold from a
    :class:`~custom_components.metrics.LocalizationAccuracy` (either score; both hold every value)."""

    def __init__(self, metric: str = "mtiou", kind: str = "tiou") -> None:
        if kind not in ("tiou", "tior"):
            raise ValueError(f"kind must be 'tiou' or 'tior', got {kind!r}")
        self.metric, self.kind = metric, kind

    def __call__(self, all_details: Mapping[str, Any]) -> MetricTable:
        details = _details(all_details, self.metric, self.kind.upper())
        thresholds = list(details[self.kind])
        rows = []
        for name, per in details["per_class"].items():
            values = per[self.kind]
            rows.append({"finding": name, "n": per["n"], **values, "mean": sum(values.values()) / len(values)})
        rows.append({"finding": "mean", "n": details["n_cases"], **details[self.kind], "mean": details[f"m{self.kind}"]})
        title = "T(IoU)" if self.kind == "tiou" else "T(IoR)"
        return MetricTable(["finding", "n", *thresholds, "mean"], rows, {"n"}, title,
                           "n: (image, finding) cases with a box; mean: over the thresholds.")


def _format_percent(value: Any) -> str:
    # report.format_percent, imported lazily: handlers.report imports this module
    from custom_components.handlers.report import format_percent

    return format_percent(value)


def table_markdown(table: MetricTable) -> str:
    """The table as GitHub Markdown, fractions in percent (two decimals), undefined values ``n/a``."""
    from custom_components.handlers.report import markdown_table

    def cell(column: str, value: Any) -> Any:
        if column == table.columns[0] or column in table.count_columns or isinstance(value, str):
            return value
        return _format_percent(value)

    rows = [{c: cell(c, r.get(c)) for c in table.columns} for r in table.rows]
    return markdown_table(rows, table.columns)


def table_csv(table: MetricTable) -> str:
    """The table as CSV: header, then raw values (full float precision; undefined -> empty cell)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["" if (v := _plain(row.get(c))) is None else v for c in table.columns])
    return buf.getvalue()


def table_section(table: MetricTable, heading: str = "#") -> str:
    """The titled Markdown table with its note (``heading``: the title's ``#`` level)."""
    note = "\nValues in percent." + (f" {table.note}" if table.note else "") + "\n"
    return (f"{heading} {table.title}\n\n" if table.title else "") + table_markdown(table) + note


def write_table(table: MetricTable, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` atomically; returns both paths."""
    stem = Path(stem)
    csv_path, md_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    atomic_write_text(table_csv(table), csv_path)
    atomic_write_text(table_section(table), md_path)
    return csv_path, md_path
