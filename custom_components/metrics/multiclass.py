"""Single-label multi-class classification metrics (LVM-Med classification, spec ``lvmmed.md`` section 4).

Pure torch functions on ``(N, C)`` scores (logits or probabilities) and ``(N,)`` class indices:

* :func:`multiclass_accuracy`: fraction of ``argmax == label`` (the paper's metric);
* :func:`macro_f1`: mean over the C classes of the one-class F1 (sklearn ``f1_score(average="macro")``,
  ``zero_division=0``: a class never true and never predicted scores 0);
* :func:`macro_auroc`: one-vs-rest AUROC of each class's softmax probability, mean over the classes
  that occur with both outcomes (sklearn ``roc_auc_score(multi_class="ovr", average="macro")`` when
  every class occurs; sklearn refuses otherwise, here the class is left out and named);
* :func:`per_class_rows`: precision, recall, F1, AUROC and support per class.

The Ignite metrics (:class:`MulticlassAccuracy`, :class:`MacroF1`, :class:`MacroAUROC`) pool the
epoch, gather across processes, return the scalar and put :func:`per_class_rows` in
``engine.state.metric_details[name]``; :class:`PerClassTable` turns those into the per-class table
that :class:`~custom_components.handlers.report.MetricsReportWriter` writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from custom_components.metrics.classification import (
    _stack,
    auroc,
    gather_rows,
    record_metric_notes,
    record_sample_count,
)
from custom_components.reports.metric_tables import MetricTable

__all__ = [
    "multiclass_accuracy",
    "macro_f1",
    "macro_auroc",
    "per_class_rows",
    "MulticlassAccuracy",
    "MacroF1",
    "MacroAUROC",
    "PerClassTable",
]


def _check(scores: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores).detach().cpu().to(torch.float64)
    y = torch.as_tensor(labels).detach().cpu().reshape(-1).long()
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"scores must have shape (N, C) with C >= 2, got {tuple(s.shape)}")
    if s.shape[0] != y.numel():
        raise ValueError(f"{s.shape[0]} score rows but {y.numel()} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= s.shape[1]):
        raise ValueError(f"labels must be class indices in 0..{s.shape[1] - 1}")
    return s, y


def multiclass_accuracy(scores: Any, labels: Any) -> float:
    s, y = _check(scores, labels)
    return float((s.argmax(1) == y).double().mean()) if y.numel() else float("nan")


def _f1_per_class(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[tuple[float, float, float, int]]:
    out = []
    for c in range(num_classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
        out.append((precision, recall, f1, tp + fn))
    return out


def macro_f1(scores: Any, labels: Any) -> float:
    s, y = _check(scores, labels)
    per = _f1_per_class(s.argmax(1), y, s.shape[1])
    return float(sum(f for _, _, f, _ in per) / len(per))


def _ovr_aurocs(s: torch.Tensor, y: torch.Tensor) -> list[float]:
    probs = torch.softmax(s, dim=1)
    return [auroc(probs[:, c], (y == c).double()) for c in range(s.shape[1])]


def macro_auroc(scores: Any, labels: Any) -> float:
    """Mean one-vs-rest AUROC over the classes with both outcomes (NaN when none has)."""
    s, y = _check(scores, labels)
    values = [v for v in _ovr_aurocs(s, y) if not math.isnan(v)]
    return float(sum(values) / len(values)) if values else float("nan")


def per_class_rows(scores: Any, labels: Any, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per class: ``class``, ``precision``, ``recall``, ``f1``, ``auroc`` (one-vs-rest), ``support``."""
    s, y = _check(scores, labels)
    names = list(class_names) if class_names is not None else [str(c) for c in range(s.shape[1])]
    if len(names) != s.shape[1]:
        raise ValueError(f"{len(names)} class names for {s.shape[1]} classes")
    per = _f1_per_class(s.argmax(1), y, s.shape[1])
    aucs = _ovr_aurocs(s, y)
    return [{"class": names[c], "precision": p, "recall": r, "f1": f, "auroc": aucs[c], "support": n}
            for c, (p, r, f, n) in enumerate(per)]


class _PooledMulticlassMetric(Metric):
    """Pools ``(y_pred (B, C), y (B,))`` over an epoch; ``compute`` gathers across ranks and scores."""

    fn: Callable[[Any, Any], float] = staticmethod(multiclass_accuracy)

    def __init__(self, class_names: Sequence[str] | None = None, output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        self.class_names = list(class_names) if class_names is not None else None
        self._rows: list[torch.Tensor] = []
        self._warned: set[str] = set()
        self.details: list[dict[str, Any]] = []
        self.num_samples = 0
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._rows = []
        self.details = []
        self.num_samples = 0

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        y_pred = _stack(output[0], "predictions").to(torch.float64)
        y = _stack(output[1], "labels").reshape(-1).to(torch.float64)
        if y_pred.ndim != 2 or y_pred.shape[0] != y.numel():
            raise ValueError(f"expected logits (B, C) and labels (B,), got {tuple(y_pred.shape)} and {tuple(y.shape)}")
        self._rows.append(torch.cat([y[:, None], y_pred], 1).to(self._device))

    def compute(self) -> float:
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 0, dtype=torch.float64)
        rows = gather_rows(rows)
        if rows.numel() == 0:
            raise NotComputableError(f"{type(self).__name__} needs at least one example")
        labels, scores = rows[:, 0].long(), rows[:, 1:]
        self.num_samples = int(labels.numel())
        self.details = per_class_rows(scores, labels, self.class_names)
        return float(type(self).fn(scores, labels))

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        record_sample_count(engine, name, self.num_samples)
        details = getattr(engine.state, "metric_details", None)
        if not isinstance(details, dict):
            details = {}
            engine.state.metric_details = details
        details[name] = {"per_class": list(self.details)}
        notes = []
        if isinstance(self, MacroAUROC):
            left = [d["class"] for d in self.details if math.isnan(d["auroc"])]
            if left:
                notes.append(f"{name}: one-vs-rest AUROC undefined (a single outcome) for class(es) "
                             f"{', '.join(left)}, left out of the mean")
        record_metric_notes(engine, name, notes, self._warned)


class MulticlassAccuracy(_PooledMulticlassMetric):
    """Epoch accuracy of ``argmax``."""

    fn = staticmethod(multiclass_accuracy)


class MacroF1(_PooledMulticlassMetric):
    """Epoch macro F1 of ``argmax``."""

    fn = staticmethod(macro_f1)


class MacroAUROC(_PooledMulticlassMetric):
    """Epoch macro one-vs-rest AUROC of the softmax probabilities."""

    fn = staticmethod(macro_auroc)


class PerClassTable:
    """Per-class precision / recall / F1 / AUROC / support from one of the metrics above (its details)."""

    def __init__(self, metric: str = "accuracy") -> None:
        self.metric = metric

    def __call__(self, all_details: Any) -> MetricTable:
        if self.metric not in all_details:
            raise KeyError(f"per-class table: no details of metric {self.metric!r} (have {sorted(all_details)})")
        rows = [dict(r) for r in all_details[self.metric]["per_class"]]
        return MetricTable(["class", "precision", "recall", "f1", "auroc", "support"], rows,
                           count_columns={"support"}, title="Per-class results")
