"""Ignite metrics with the official MedMNIST ACC / AUC semantics (``medmnist/evaluator.py``).

:class:`MedMNISTACC` and :class:`MedMNISTAUC` pool the logits and labels of an epoch, gather them
across processes (different lengths per rank allowed, as
:class:`custom_components.metrics.EpochScoreMetric`), turn logits into scores (softmax for
binary / multi-class / ordinal tasks with C >= 2 logits, sigmoid for multi-label or a single
binary logit) and call :func:`custom_components.data.medmnist.medmnist_metrics`.

``output_transform(engine.state.output)`` must give ``(y_pred, y)``: logits (B, C) (or
per-sample (C,) tensors, MONAI's decollated output with ``from_engine(["pred", "label"])``) and
labels (B,) / (B, 1) class indices or (B, C) 0/1 for multi-label.

A class (label) with one outcome only in the evaluated split has no ROC-AUC; like the values of
:func:`~custom_components.data.medmnist.medmnist_metrics`, :class:`MedMNISTAUC` averages over the
other classes, but it says so: one warning per metric naming the classes, the split and its
size, and the same text in ``engine.state.metric_notes[name]`` for the metrics report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from custom_components.data.medmnist import (
    _TASK_ALIASES,
    auc_left_out,
    medmnist_metrics,
)
from custom_components.metrics.classification import (
    _stack,
    evaluated_split,
    gather_rows,
    record_metric_notes,
    record_sample_count,
)

__all__ = ["MedMNISTMetric", "MedMNISTACC", "MedMNISTAUC", "logits_to_scores"]


def logits_to_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities as the MedMNIST evaluator expects them: sigmoid (multi-label, or one binary logit), else softmax."""
    logits = logits.to(torch.float64)
    if logits.ndim == 1:
        logits = logits[:, None]
    if _TASK_ALIASES[task] == "multi-label" or logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


class MedMNISTMetric(Metric):
    """Base: pools scores (N, C) and labels over an epoch, gathers across processes, then :meth:`score`.

    Args:
        task: a MedMNIST task (``binary``, ``multi-class``, ``multi-label``, ``ordinal-regression``
            or an official task string, e.g. ``MEDMNIST_INFO[name]["task"]``).
        threshold: the multi-label / binary decision threshold (0.5 officially).
    """

    key = ""

    def __init__(self, task: str, threshold: float = 0.5, output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        if task not in _TASK_ALIASES:
            raise ValueError(f"unknown MedMNIST task {task!r}; expected one of {sorted(_TASK_ALIASES)}")
        self.task = task
        self.threshold = float(threshold)
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.num_samples = 0
        self.left_out: dict[int, str] = {}  # columns without a defined AUC in the last compute()
        self.num_columns = 0
        self._warned: set[str] = set()
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores = []
        self._labels = []
        self.num_samples = 0
        self.left_out = {}

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        if not isinstance(output, (list, tuple)) or len(output) != 2:
            raise ValueError(f"{type(self).__name__} expects (y_pred, y) from output_transform, got {type(output)}")
        scores = logits_to_scores(_stack(output[0], "predictions"), self.task)
        y = _stack(output[1], "labels").to(torch.float64)
        y = y.reshape(y.shape[0], -1) if y.ndim > 0 else y.reshape(1, 1)
        if y.shape[0] != scores.shape[0]:
            raise ValueError(f"batch has {scores.shape[0]} predictions but {y.shape[0]} labels")
        self._scores.append(scores.to(self._device))
        self._labels.append(y.to(self._device))

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._scores:
            s = torch.zeros(0, 0, dtype=torch.float64)
            y = torch.zeros(0, 0, dtype=torch.float64)
        else:
            s, y = torch.cat(self._scores), torch.cat(self._labels)
        if idist.get_world_size() > 1:
            # scores and labels travel as one row block (a rank may hold none: width 0); labels take
            # one column per class for multi-label tasks, one column otherwise
            both = gather_rows(torch.cat([s, y], dim=1) if s.numel() else torch.zeros(0, 0, dtype=torch.float64))
            multi_label = _TASK_ALIASES[self.task] == "multi-label"
            n_score = both.shape[1] // 2 if multi_label else both.shape[1] - 1
            s, y = both[:, :n_score], both[:, n_score:]
        return s.cpu(), y.cpu()

    def compute(self) -> float:
        s, y = self._gather()
        if s.shape[0] == 0:
            raise NotComputableError(f"{type(self).__name__} must have at least one example before it can be computed")
        self.num_samples = int(s.shape[0])
        if _TASK_ALIASES[self.task] != "multi-label":
            y = y[:, 0].to(torch.int64)
        if self.key == "AUC":
            self.num_columns = int(s.shape[1])
            self.left_out = auc_left_out(self.task, y, self.num_columns)
        return float(self.score(s, y))

    def score(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        return medmnist_metrics(self.task, scores, labels, threshold=self.threshold)[self.key]

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        record_sample_count(engine, name, self.num_samples)
        record_metric_notes(engine, name, self._notes(engine, name), self._warned)

    def _notes(self, engine: Any, name: str) -> list[str]:
        if not self.left_out:
            return []
        head = f"{name} ({type(self).__name__}) on {evaluated_split(engine, self.num_samples)}"
        if _TASK_ALIASES[self.task] == "binary":
            return [f"{head}: the positive class 1 is {self.left_out[1]}, so the AUC is undefined (NaN)"]
        word = "label" if _TASK_ALIASES[self.task] == "multi-label" else "class"
        groups = []
        for reason in ("absent", "present in every sample"):
            cols = [str(c) for c, why in self.left_out.items() if why == reason]
            if cols:
                plural = f"{word}es" if word == "class" else f"{word}s"
                groups.append(f"{plural if len(cols) > 1 else word} {', '.join(cols)} {reason}")
        kept = self.num_columns - len(self.left_out)
        mean = (f"the mean AUC is over the other {kept} of {self.num_columns} {word}s" if kept
                else "the AUC is undefined (NaN)")
        return [f"{head}: {'; '.join(groups)}; their AUC is undefined and left out, so {mean}"]


class MedMNISTACC(MedMNISTMetric):
    """Official MedMNIST ACC: argmax (multi-class/ordinal), last-class score > 0.5 (binary), mean per-label (multi-label)."""

    key = "ACC"


class MedMNISTAUC(MedMNISTMetric):
    """Official MedMNIST AUC: last-class ROC-AUC (binary), mean one-vs-rest / per-label ROC-AUC otherwise."""

    key = "AUC"
