"""Write the end-of-run metrics as JSON and as a Markdown table.

The JSON keeps raw fractions (machine readable, NaN written as ``null`` so the file stays
valid JSON); the Markdown shows percent with two decimals, the unit of the papers' tables
(e.g. ``91.40``), so a run's report can be pasted next to the published numbers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from custom_components.io import atomic_save_json, atomic_write_text
from custom_components.reports.metric_tables import table_section, write_table

__all__ = ["MetricsReportWriter", "markdown_table", "format_mean_std", "format_percent"]

logger = logging.getLogger(__name__)

DEFAULT_METRICS: tuple[str, ...] = ("f1", "accuracy", "auroc", "ap", "kappa")


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def format_percent(value: float | None, scale: float = 100.0, digits: int = 2) -> str:
    """``0.914 -> "91.40"``; ``None``/NaN -> ``"n/a"`` (undefined metric, e.g. AUROC of one class)."""
    if value is None or _is_nan(float(value)):
        return "n/a"
    return f"{float(value) * scale:.{digits}f}"


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2, ddof: int = 1) -> str:
    """``[0.9126, 0.9140, 0.9154] -> "91.40 ± 0.14"`` (values scaled, e.g. fraction -> percent).

    ``ddof=1`` (sample standard deviation) by default, the usual choice for a few seeds.
    A single value has no standard deviation and is formatted alone (``"91.40"``).
    NaN values are kept, so the result becomes ``"nan ± nan"`` and the problem stays visible.

    Raises:
        ValueError: on an empty sequence.
    """
    vals = [float(v) * scale for v in values]
    if not vals:
        raise ValueError("format_mean_std needs at least one value")
    mean = sum(vals) / len(vals)
    if len(vals) <= ddof:
        return f"{mean:.{digits}f}"
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - ddof)
    return f"{mean:.{digits}f} ± {math.sqrt(var):.{digits}f}"


def _cell(value: Any) -> str:
    # A "|" inside a cell would split it into two columns; newlines would end the row.
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table with ``columns`` as header, one line per row dict.

    Missing keys give empty cells; values are written with ``str`` (format them beforehand,
    e.g. with :func:`format_percent` or :func:`format_mean_std`). Ends with a newline.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _json_value(value: Any) -> Any:
    """Plain JSON value: tensors/numpy scalars -> python numbers, NaN/inf -> None."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # non-scalar tensor/array
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsReportWriter:
    """On ``Events.COMPLETED``, write ``<output_dir>/<filename>.json`` and ``.md`` (rank 0 only).

    Args:
        output_dir: folder for the two files (created if needed).
        metric_names: keys of ``engine.state.metrics`` to report, in order; or a mapping
            ``{state key: display name}`` (e.g. ``{"val_f1": "f1"}`` for MONAI-style names).
            A key absent from ``engine.state.metrics`` is reported as ``null`` / ``n/a`` with
            a warning rather than an exception, so the other numbers of a long test run
            are not lost.
        filename: file stem of both files.
        title: Markdown heading.
        extra: additional JSON-serialisable information stored under ``"extra"`` (e.g.
            checkpoint, split, seed).
        tables: ``{name: spec}``, each spec a callable mapping ``engine.state.metric_details``
            to a :class:`~custom_components.reports.metric_tables.MetricTable` (e.g.
            :class:`~custom_components.reports.metric_tables.AUROCTable`); each table is written
            beside the report as ``<filename>_<name>.csv`` (raw fractions) and ``.md`` (percent),
            stored in the JSON under ``"tables"`` and appended to the report's Markdown.

    JSON layout::

        {"title": ..., "metrics": {"f1": 0.914, ...}, "n_samples": 1234, "extra": {...}, "notes": [...],
         "tables": {name: {"columns": [...], "rows": [{column: value}, ...]}}}   # with ``tables`` only

    ``n_samples`` comes from ``engine.state.metric_sample_counts`` (set by
    :class:`custom_components.metrics.EpochScoreMetric`) or a ``"n"`` metric, else ``null``.
    ``notes`` are the reported metrics' entries of ``engine.state.metric_notes`` (e.g. a class
    left out of a mean AUC, an AUROC undefined on a one-class split), also listed under the
    Markdown table, so that a number is never read without its caveat.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metric_names: Sequence[str] | Mapping[str, str] = DEFAULT_METRICS,
        filename: str = "metrics",
        title: str = "Test metrics",
        extra: Mapping[str, Any] | None = None,
        tables: Mapping[str, Callable[[Mapping[str, Any]], Any]] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.tables = dict(tables or {})
        if isinstance(metric_names, str):
            metric_names = (metric_names,)
        if isinstance(metric_names, Mapping):
            self.metric_names: dict[str, str] = {str(k): str(v) for k, v in metric_names.items()}
        else:
            self.metric_names = {str(k): str(k) for k in metric_names}
        self.filename = filename
        self.title = title
        self.extra = dict(extra) if extra is not None else {}

    @property
    def json_path(self) -> Path:
        return self.output_dir / f"{self.filename}.json"

    @property
    def markdown_path(self) -> Path:
        return self.output_dir / f"{self.filename}.md"

    def table_stem(self, name: str) -> Path:
        """``<output_dir>/<filename>_<name>``: the stem of a table's ``.csv`` and ``.md``."""
        return self.output_dir / f"{self.filename}_{name}"

    def attach(self, engine: Engine) -> None:
        """Register :meth:`__call__` on ``Events.COMPLETED`` (once per engine)."""
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def _num_samples(self, engine: Engine, state_metrics: Mapping[str, Any]) -> int | None:
        """The count behind the first reported metric that has one (metrics may count different units:
        images for an AUROC, (image, finding) cases for a localisation accuracy)."""
        counts = getattr(engine.state, "metric_sample_counts", None)
        if isinstance(counts, Mapping) and counts:
            for key in self.metric_names:
                if key in counts:
                    return int(counts[key])
            return int(max(counts.values()))
        if "n" in state_metrics:
            return int(_json_value(state_metrics["n"]))
        return None

    def _sample_counts(self, engine: Engine) -> dict[str, int]:
        """Reported metric label -> its count, for metrics that record one."""
        counts = getattr(engine.state, "metric_sample_counts", None)
        if not isinstance(counts, Mapping):
            return {}
        return {label: int(counts[key]) for key, label in self.metric_names.items() if key in counts}

    def _notes(self, engine: Engine) -> list[str]:
        """Notes of the reported metrics, in report order, each once."""
        by_metric = getattr(engine.state, "metric_notes", None)
        if not isinstance(by_metric, Mapping):
            return []
        out: list[str] = []
        for key in self.metric_names:
            for note in by_metric.get(key, ()):
                if note not in out:
                    out.append(str(note))
        return out

    def build_report(self, state_metrics: Mapping[str, Any], n_samples: int | None = None,
                     notes: Sequence[str] = ()) -> tuple[dict, str]:
        """The JSON object and the Markdown text for ``state_metrics`` (no file I/O)."""
        values: dict[str, Any] = {}
        for key, label in self.metric_names.items():
            if key not in state_metrics:
                logger.warning("metric %r not found in engine.state.metrics (have %s)", key, sorted(state_metrics))
            values[label] = _json_value(state_metrics.get(key))
        report = {"title": self.title, "metrics": values, "n_samples": n_samples, "extra": self.extra,
                  "notes": list(notes)}
        rows = [{"metric": label, "value": format_percent(v)} for label, v in values.items()]
        md = f"# {self.title}\n\n" + markdown_table(rows, ["metric", "value"])
        if n_samples is not None:
            md += f"\nValues in percent; {n_samples} samples.\n"
        else:
            md += "\nValues in percent.\n"
        if notes:
            md += "\nNotes:\n" + "".join(f"- {n}\n" for n in notes)
        return report, md

    def __call__(self, engine: Engine) -> None:
        # Metrics are already gathered across processes; one writer avoids clobbering.
        if idist.get_rank() != 0:
            return
        state_metrics = dict(engine.state.metrics)
        report, md = self.build_report(state_metrics, self._num_samples(engine, state_metrics), self._notes(engine))
        counts = self._sample_counts(engine)
        if len(set(counts.values())) > 1:  # different units: say which count belongs to which metric
            report["sample_counts"] = counts
            md += "\nCounts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".\n"
        if self.tables:
            details = getattr(engine.state, "metric_details", None) or {}
            built = {name: spec(details) for name, spec in self.tables.items()}
            report["tables"] = {name: table.to_json() for name, table in built.items()}
            md += "".join("\n" + table_section(table, "##") for table in built.values())
            for name, table in built.items():
                write_table(table, self.table_stem(name))
        atomic_save_json(report, self.json_path)
        atomic_write_text(md, self.markdown_path)
        logger.info("metrics report written to %s and %s", self.json_path, self.markdown_path)
