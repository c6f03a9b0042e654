"""Slice-level binary classification metrics (LGM-ViT spec §7).

Two layers:

* pure torch functions on 1-D scores and 0/1 labels (:func:`f1_score`, :func:`accuracy`,
  :func:`cohen_kappa`, :func:`auroc`, :func:`average_precision`,
  :func:`classification_metrics`). They reproduce scikit-learn's definitions exactly but
  need no scikit-learn at run time, so bundles only depend on torch/MONAI/ignite.
* ignite metrics (:class:`EpochScoreMetric` and its subclasses :class:`F1`,
  :class:`Accuracy`, :class:`AUROC`, :class:`AveragePrecision`, :class:`CohenKappa`) that pool
  the probabilities of the whole epoch, gather them across processes and call the functions
  above. They can be used directly as MONAI ``key_val_metric`` / ``additional_metrics``.

Conventions
-----------
* A prediction is positive when ``score > threshold`` (strictly greater, as torchmetrics'
  binary metrics used by the reference implementation).
* AUROC and AP are rank based, so they are identical on logits and on sigmoid(logits).
* Degenerate inputs, chosen to match scikit-learn where it is defined:

  - F1 with no true and no predicted positives: ``0.0`` (sklearn ``zero_division=0``).
  - Cohen's kappa when the expected agreement is 1 (labels and predictions are all the same
    single class): ``nan`` (sklearn's default ``replace_undefined_by=nan``).
  - AUROC with a single class present: ``nan`` (sklearn raises / returns nan with a warning).
  - AP with a single class present: ``nan``. **sklearn differs here**: it returns ``0.0``
    when there is no positive and ``1.0`` when all samples are positive; we return ``nan``
    for both so that a degenerate split is visible in a report instead of looking like a
    real score.

  The ignite metrics below also say so: an undefined value is logged once per metric (rank 0)
  and recorded in ``engine.state.metric_notes[name]``, which
  :class:`custom_components.handlers.report.MetricsReportWriter` writes under ``"notes"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

__all__ = [
    "positive_probability",
    "f1_score",
    "accuracy",
    "cohen_kappa",
    "auroc",
    "average_precision",
    "classification_metrics",
    "EpochScoreMetric",
    "gather_rows",
    "F1",
    "Accuracy",
    "AUROC",
    "AveragePrecision",
    "CohenKappa",
    "record_metric_notes",
    "record_sample_count",
    "evaluated_split",
]

logger = logging.getLogger(__name__)

ArrayLike = Any  # torch.Tensor, numpy array or a sequence of numbers


# --------------------------------------------------------------------------------------
# logits -> probability of class 1
# --------------------------------------------------------------------------------------
def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """Probability of the positive class from model logits, shape ``(B,)``.

    * ``(B,)`` or ``(B, 1)``: a single logit per sample, probability = ``sigmoid``.
    * ``(B, 2)``: two class logits, probability = ``softmax(dim=1)[:, 1]``.

    The dtype of ``logits`` is kept (pass float64 logits to avoid sigmoid saturation ties).

    Raises:
        ValueError: any other shape.
    """
    logits = torch.as_tensor(logits)
    if not torch.is_floating_point(logits):
        logits = logits.float()
    if logits.ndim == 1:
        return torch.sigmoid(logits)
    if logits.ndim == 2 and logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.ndim == 2 and logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1]
    raise ValueError(
        f"logits must have shape (B,), (B, 1) or (B, 2) for binary classification, got {tuple(logits.shape)}"
    )


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _as_1d(x: ArrayLike, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    # (N, 1) columns are common (labels of shape (B, 1)); anything else is ambiguous.
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    elif t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"{what} must be 1-D (or (N, 1)), got shape {tuple(t.shape)}")
    return t


def _validate(scores: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scores float64, labels bool)`` after checking shapes and values."""
    s = _as_1d(scores, "scores").to(torch.float64)
    y = _as_1d(labels, "labels")
    if s.numel() != y.numel():
        raise ValueError(f"scores and labels have different lengths: {s.numel()} vs {y.numel()}")
    if s.numel() == 0:
        raise ValueError("cannot compute classification metrics on zero samples")
    if torch.isnan(s).any():
        raise ValueError(f"NaN in predictions ({int(torch.isnan(s).sum())} of {s.numel()} scores)")
    if torch.isinf(s).any():
        raise ValueError(f"infinite values in predictions ({int(torch.isinf(s).sum())} of {s.numel()} scores)")
    if y.dtype == torch.bool:
        return s, y
    y_f = y.to(torch.float64)
    bad = ~((y_f == 0) | (y_f == 1))
    if bad.any():
        bad_values = sorted({float(v) for v in y_f[bad].unique().tolist()}, key=lambda v: (math.isnan(v), v))
        raise ValueError(f"labels must be 0 or 1, found {bad_values[:10]}")
    return s, y_f == 1


def _counts(scores: ArrayLike, labels: ArrayLike, threshold: float) -> tuple[int, int, int, int]:
    """Confusion counts ``(tp, fp, fn, tn)`` as python ints (exact arithmetic downstream)."""
    s, y = _validate(scores, labels)
    pred = s > threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    return tp, fp, fn, tn


# --------------------------------------------------------------------------------------
# threshold metrics
# --------------------------------------------------------------------------------------
def f1_score(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """F1 of the positive class for predictions ``scores > threshold``.

    ``0.0`` when there are neither true nor predicted positives (sklearn ``zero_division=0``).
    """
    tp, fp, fn, _ = _counts(scores, labels, threshold)
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def accuracy(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Fraction of samples where ``scores > threshold`` equals the label."""
    tp, fp, fn, tn = _counts(scores, labels, threshold)
    return (tp + tn) / (tp + fp + fn + tn)


def cohen_kappa(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Cohen's kappa between labels and ``scores > threshold``.

    ``kappa = (p_o - p_e) / (1 - p_e)``, computed from integer counts so that the undefined
    case ``p_e == 1`` is detected exactly; it returns ``nan`` like sklearn's default.
    """
    tp, fp, fn, tn = _counts(scores, labels, threshold)
    n = tp + fp + fn + tn
    true_pos, true_neg = tp + fn, fp + tn
    pred_pos, pred_neg = tp + fp, fn + tn
    # Everything multiplied by n^2 to stay in integers.
    observed = n * (tp + tn)
    expected = true_pos * pred_pos + true_neg * pred_neg
    if expected == n * n:
        return float("nan")
    return (observed - expected) / (n * n - expected)


# --------------------------------------------------------------------------------------
# rank metrics
# --------------------------------------------------------------------------------------
def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Equal to sklearn's ``roc_auc_score`` (trapezoidal ROC area, where a tie between a positive
    and a negative counts 1/2). ``nan`` if only one class is present.
    """
    s, y = _validate(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    # 1-based rank of the last member of each tie group, then the group's average rank.
    last_rank = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = last_rank - (counts.to(torch.float64) - 1) / 2
    rank_sum_pos = float(avg_rank[inverse][y].sum())
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision exactly as sklearn's ``average_precision_score``.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score values taken as thresholds in
    decreasing order (no interpolation). ``nan`` if only one class is present (see module
    docstring: sklearn returns 0.0 / 1.0 there).
    """
    s, y = _validate(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        return float("nan")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    pos_per_group = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, y.to(torch.float64))
    # Descending thresholds: cumulative sums give TP and TP+FP at each distinct threshold.
    pos_desc = pos_per_group.flip(0)
    tps = torch.cumsum(pos_desc, 0)
    predicted = torch.cumsum(counts.flip(0).to(torch.float64), 0)
    precision = tps / predicted
    recall_step = pos_desc / n_pos  # R_n - R_{n-1}
    return float((recall_step * precision).sum())


def classification_metrics(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> dict[str, float | int]:
    """All five metrics of spec §7 plus sample counts.

    Returns:
        ``{"f1", "accuracy", "auroc", "ap", "kappa"}`` as floats (fractions, not percent) and
        ``"n"``, ``"n_positive"`` as ints.
    """
    s, y = _validate(scores, labels)
    return {
        "f1": f1_score(s, y, threshold),
        "accuracy": accuracy(s, y, threshold),
        "auroc": auroc(s, y),
        "ap": average_precision(s, y),
        "kappa": cohen_kappa(s, y, threshold),
        "n": int(y.numel()),
        "n_positive": int(y.sum()),
    }


# --------------------------------------------------------------------------------------
# ignite metrics
# --------------------------------------------------------------------------------------
def _stack(x: Any, what: str) -> torch.Tensor:
    """Tensor from a batch tensor or from a list of per-sample tensors/numbers (MONAI decollated)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"empty list of {what}")
        items = [torch.as_tensor(v).detach() for v in x]
        return torch.stack([v.to(items[0].device) for v in items], dim=0)
    return torch.as_tensor(x)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate the (n_r, w) float64 rows of every process (n_r may differ; w may be 0 where n_r is).

    ``all_gather`` needs equal shapes: exchange the shapes, pad to the largest, trim after.
    Single-process: the rows themselves (on the CPU).
    """
    ws = idist.get_world_size()
    if ws == 1:
        return rows.cpu()
    shape = torch.tensor([rows.shape[0], rows.shape[1] if rows.dim() == 2 else 0], device=idist.device())
    shapes = idist.all_gather(shape).reshape(ws, 2).tolist()
    n_max, width = max(int(n) for n, _ in shapes), max(int(w) for _, w in shapes)
    padded = torch.zeros(n_max, width, dtype=torch.float64, device=idist.device())
    if rows.numel():
        padded[: rows.shape[0]] = rows.to(padded)
    gathered = idist.all_gather(padded).reshape(ws, n_max, width)
    return torch.cat([gathered[r, : int(shapes[r][0])] for r in range(ws)], dim=0).cpu()


def evaluated_split(engine: Any, n_samples: int) -> str:
    """``"the 'test' split (156 samples)"`` when the engine's dataset names its split, else ``"156 samples"``."""
    dataset = getattr(getattr(getattr(engine, "state", None), "dataloader", None), "dataset", None)
    split = getattr(dataset, "split", None)
    return f"the {split!r} split ({n_samples} samples)" if isinstance(split, str) else f"{n_samples} samples"


def record_sample_count(engine: Any, name: str, count: int) -> None:
    """Store ``count`` as ``engine.state.metric_sample_counts[name]`` (read by the report writers)."""
    counts = getattr(engine.state, "metric_sample_counts", None)
    if not isinstance(counts, dict):
        counts = {}
        engine.state.metric_sample_counts = counts
    counts[name] = count


def record_metric_notes(engine: Any, name: str, notes: Sequence[str], warned: set[str]) -> None:
    """Store ``notes`` as ``engine.state.metric_notes[name]`` and log each note not in ``warned`` once.

    Validation runs every epoch: ``warned`` (kept by the metric) stops the same warning from
    repeating; only rank 0 logs, so ``torchrun`` does not print it once per process.
    """
    all_notes = getattr(engine.state, "metric_notes", None)
    if not isinstance(all_notes, dict):
        all_notes = {}
        engine.state.metric_notes = all_notes
    all_notes[name] = list(notes)
    for note in notes:
        if note not in warned:
            warned.add(note)
            if idist.get_rank() == 0:
                logger.warning("%s", note)


class EpochScoreMetric(Metric):
    """Base ignite metric: pools positive-class probabilities and labels over an epoch.

    ``output_transform(engine.state.output)`` must give ``(y_pred, y)`` where ``y_pred`` are
    logits of shape ``(B,)``, ``(B, 1)`` or ``(B, 2)`` (see :func:`positive_probability`) and
    ``y`` are 0/1 labels of shape ``(B,)`` or ``(B, 1)``. Both may also be lists of
    per-sample tensors (MONAI's decollated output with
    ``output_transform=from_engine(["pred", "label"])``); they are stacked.

    ``compute`` gathers the pooled vectors from all processes (different lengths per rank
    are allowed), then calls :meth:`score`. Subclasses implement :meth:`score`.

    After each epoch, the number of pooled samples is also stored in
    ``engine.state.metric_sample_counts[name]`` so that report writers can show it, and a value
    left undefined by the data (:meth:`undefined_reason`) in ``engine.state.metric_notes[name]``
    (see :func:`record_metric_notes`).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.threshold = float(threshold)
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.num_samples = 0
        self.undefined: str | None = None  # why the last computed value is NaN, if the data explain it
        self._warned: set[str] = set()
        # skip_unrolling: we stack decollated lists ourselves, one update per batch instead of
        # ignite's one update per sample.
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._probs = []
        self._labels = []
        self.num_samples = 0
        self.undefined = None

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        if not isinstance(output, (list, tuple)) or len(output) != 2:
            raise ValueError(f"{type(self).__name__} expects (y_pred, y) from output_transform, got {type(output)}")
        y_pred = _stack(output[0], "predictions")
        y = _stack(output[1], "labels")
        # float64 before sigmoid/softmax: fewer saturation ties that would move AUROC/AP.
        probs = positive_probability(y_pred.to(torch.float64))
        labels = y.reshape(-1) if y.ndim <= 1 or (y.ndim == 2 and y.shape[1] == 1) else None
        if labels is None:
            raise ValueError(f"labels must have shape (B,) or (B, 1), got {tuple(y.shape)}")
        if labels.numel() != probs.numel():
            raise ValueError(f"batch has {probs.numel()} predictions but {labels.numel()} labels")
        self._probs.append(probs.to(self._device))
        self._labels.append(labels.to(device=self._device, dtype=torch.float64))

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.cat(self._probs) if self._probs else torch.zeros(0, dtype=torch.float64, device=self._device)
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.float64, device=self._device)
        both = gather_rows(torch.stack([probs, labels], dim=1))
        return both[:, 0], both[:, 1]

    def compute(self) -> float:
        probs, labels = self._gather()
        if probs.numel() == 0:
            raise NotComputableError(f"{type(self).__name__} must have at least one example before it can be computed")
        self.num_samples = int(probs.numel())
        value = float(self.score(probs, labels))
        self.undefined = self.undefined_reason(probs, labels) if math.isnan(value) else None
        return value

    def score(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        """The metric value from pooled probabilities and 0/1 labels (override)."""
        raise NotImplementedError

    def undefined_reason(self, probs: torch.Tensor, labels: torch.Tensor) -> str | None:
        """Why :meth:`score` gave NaN on these data (override), e.g. ``"all samples are negative"``."""
        return None

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        record_sample_count(engine, name, self.num_samples)
        notes = []
        if self.undefined is not None:
            notes.append(f"{name} ({type(self).__name__}) is undefined (NaN, n/a in the report) on "
                         f"{evaluated_split(engine, self.num_samples)}: {self.undefined}")
        record_metric_notes(engine, name, notes, self._warned)


def _one_class(labels: torch.Tensor) -> str | None:
    n_pos = int((labels > 0.5).sum())
    if n_pos == 0:
        return "every sample is negative (label 0), so there is no positive to rank"
    if n_pos == labels.numel():
        return "every sample is positive (label 1), so there is no negative to rank"
    return None


class F1(EpochScoreMetric):
    """Epoch F1 of the positive class at ``probability > threshold``."""

    def score(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        return f1_score(probs, labels, self.threshold)


class Accuracy(EpochScoreMetric):
    """Epoch accuracy at ``probability > threshold``."""

    def score(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy(probs, labels, self.threshold)


class AUROC(EpochScoreMetric):
    """Epoch AUROC (``threshold`` unused; ``nan`` with a single class)."""

    def score(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        return auroc(probs, labels)

    def undefined_reason(self, probs: torch.Tensor, labels: torch.Tensor) -> str | None:
        return _one_class(labels)


class AveragePrecision(EpochScoreMetric):
    """Epoch average precision (``threshold`` unused; ``nan`` with a single class)."""

    def score(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        return average_precision(probs, labels)

    def undefined_reason(self, probs: torch.Tensor, labels: torch.Tensor) -> str | None:
        return _one_class(labels)


class CohenKappa(EpochScoreMetric):
    """Epoch Cohen's kappa at ``probability > threshold``."""

    def score(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        return cohen_kappa(probs, labels, self.threshold)

    def undefined_reason(self, probs: torch.Tensor, labels: torch.Tensor) -> str | None:
        # NaN only when labels and predictions are all one and the same class
        return "labels and predictions are all the same single class (chance agreement is 1)"
