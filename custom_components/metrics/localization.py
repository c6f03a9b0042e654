"""HAM's evaluation (spec ``ham.md`` section 6): per-finding ROC-AUC and localisation accuracy T(IoU) / T(IoR).

**Classification.** :func:`multilabel_auroc` gives the ROC-AUC of each finding (rank based, equal
to scikit-learn's ``roc_auc_score``; logits or probabilities give the same value) and their
mean. A finding with one outcome only in the evaluated set has no AUC: by default it is left
out of the mean and counted (``n_undefined``, named in ``undefined``); ``nan_as_zero=True``
reproduces the reference, which turns such a NaN into 0 and averages over all classes.
:func:`multilabel_accuracy`: per-finding accuracy at ``probability > threshold`` (0.5; strictly
greater, the project's convention in :mod:`custom_components.metrics.classification`).

**Localisation.** For each (image, finding) with a ground-truth box (evaluated whatever the
predicted probability), the predicted region is P = the binarised map and G the union of the
finding's boxes:

* IoU = |P ∩ G| / |P ∪ G|; IoR = |P ∩ G| / |P| (the intersection over the *predicted* region);
  an empty P scores 0 on both.
* Binarisation (:func:`binarize_maps`): HAM's refined map R = sigmoid(cam_w·(M̂ − cam_sigma))
  (cam_w = 100, cam_sigma = 0.4, M̂ the min-max normalised CAM) is thresholded at
  R >= 0.999 (:data:`CAM_THRESHOLD`, the default). Equivalently the min-max map at
  M̂ >= 0.4 + ln(999)/100 ≈ 0.4691 (:data:`MINMAX_THRESHOLD`): pass ``normalize=True`` with that
  threshold for raw CAMs, or ``normalize=True`` / ``False`` with another ``threshold`` for other
  explainers' maps. A map smaller than the mask is first upsampled bilinearly (as HAM's refinement).
* :func:`localization_accuracy`: TIoU(T) of a finding = the fraction of its cases with
  IoU >= T, T in {0.1, ..., 0.7} (:data:`TIOU_THRESHOLDS`); TIoR(T) likewise for IoR,
  T in {0.1, 0.25, 0.5, 0.75, 0.9} (:data:`TIOR_THRESHOLDS`). Means: ``tiou[T]`` = mean over the
  findings with at least one case; ``mtiou`` = mean of ``tiou[T]`` over T (the scalar used for
  checkpoint selection; the reference's exact pooling is not established, this is the
  project's definition); ``mtior`` likewise.

The Ignite metrics :class:`LocalizationAccuracy` and :class:`MultiLabelAUROC` pool an epoch,
gather across processes (:func:`~custom_components.metrics.classification.gather_rows`), return
one scalar (for MONAI's key metric / best-checkpoint selection) and put the full result (per
finding, per threshold) in ``engine.state.metric_details[name]``; ``summary_keys=True`` also
writes ``<name>_<key>`` scalars (``mtior``, ``tiou_0.3``, ..., or one AUC per finding) to
``engine.state.metrics`` for the logs and TensorBoard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from custom_components.data.nihcxr14 import FINDINGS
from custom_components.metrics.classification import (
    _stack,
    auroc,
    evaluated_split,
    gather_rows,
    record_metric_notes,
    record_sample_count,
)

__all__ = [
    "CAM_W",
    "CAM_SIGMA",
    "CAM_THRESHOLD",
    "MINMAX_THRESHOLD",
    "TIOU_THRESHOLDS",
    "TIOR_THRESHOLDS",
    "FINDINGS",
    "minmax_normalize",
    "binarize_maps",
    "iou_ior",
    "region_boxes",
    "predicted_boxes",
    "localization_rows",
    "localization_accuracy",
    "multilabel_auroc",
    "multilabel_accuracy",
    "LocalizationAccuracy",
    "MultiLabelAUROC",
]

CAM_W = 100.0
CAM_SIGMA = 0.4
#: HAM's ``cam_thresh`` on the refined map R
CAM_THRESHOLD = 0.999
#: the same threshold on the min-max normalised map: 0.4 + ln(0.999 / 0.001) / 100 ≈ 0.46908
MINMAX_THRESHOLD = CAM_SIGMA + math.log(CAM_THRESHOLD / (1.0 - CAM_THRESHOLD)) / CAM_W
TIOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
TIOR_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)


def _key(t: float) -> str:
    return f"{t:g}"


# --------------------------------------------------------------------------- maps and regions


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each map over its last two dimensions to [0, 1]; a constant map gives zeros (no NaN)."""
    maps = torch.as_tensor(maps)
    maps = maps.float() if not torch.is_floating_point(maps) else maps
    flat = maps.flatten(-2)
    lo = flat.min(dim=-1).values[..., None, None]
    span = flat.max(dim=-1).values[..., None, None] - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(maps))


def binarize_maps(maps: torch.Tensor, threshold: float = CAM_THRESHOLD, normalize: bool = False) -> torch.Tensor:
    """Predicted regions ``map >= threshold`` (after a per-map min-max when ``normalize``), boolean."""
    maps = torch.as_tensor(maps)
    if normalize:
        maps = minmax_normalize(maps)
    return maps >= threshold


def iou_ior(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU = |P∩G|/|P∪G| and IoR = |P∩G|/|P| over the last two dimensions (0 where the denominator is 0)."""
    pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
    pred = pred if pred.dtype == torch.bool else pred > 0.5
    gt = gt if gt.dtype == torch.bool else gt > 0.5
    if pred.shape != gt.shape:
        raise ValueError(f"regions {list(pred.shape)} and masks {list(gt.shape)} must have the same shape")
    inter = (pred & gt).flatten(-2).sum(-1).double()
    union = (pred | gt).flatten(-2).sum(-1).double()
    area = pred.flatten(-2).sum(-1).double()
    return inter / union.clamp_min(1), inter / area.clamp_min(1)


def region_boxes(region: Any, connectivity: int = 8) -> list[list[int]]:
    """Bounding boxes ``[x, y, w, h]`` (pixels; x the column) of the connected components of a 2-D region.

    ``connectivity`` 8 (default: pixels touching at a corner are one component) or 4. Components
    are ordered by their first pixel in row-major order; an empty region gives no box. A box covers
    its component's pixels ``[x, x + w) x [y, y + h)``, the convention of the datalists' boxes
    (:func:`custom_components.data.nihcxr14.boxes_to_masks` gives back the box as a mask).
    """
    from scipy import ndimage

    region = torch.as_tensor(region).detach().cpu()
    region = (region if region.dtype == torch.bool else region > 0.5).numpy()
    if region.ndim != 2:
        raise ValueError(f"region must be 2-D (H, W), got shape {tuple(region.shape)}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, _ = ndimage.label(region, structure=structure)
    return [[int(sl[1].start), int(sl[0].start), int(sl[1].stop - sl[1].start), int(sl[0].stop - sl[0].start)]
            for sl in ndimage.find_objects(labels)]


def predicted_boxes(map_: Any, threshold: float = CAM_THRESHOLD, normalize: bool = False,
                    connectivity: int = 8) -> list[list[int]]:
    """HAM's predicted boxes of one (H, W) map: :func:`region_boxes` of :func:`binarize_maps` (R >= 0.999
    on a refined map by default; ``normalize=True`` with :data:`MINMAX_THRESHOLD` for a raw CAM)."""
    return region_boxes(binarize_maps(torch.as_tensor(map_), threshold, normalize), connectivity)


def localization_rows(
    maps: torch.Tensor,
    masks: torch.Tensor,
    threshold: float = CAM_THRESHOLD,
    normalize: bool = False,
    has_gt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``[class index, IoU, IoR]`` (float64, (K, 3)) of every (image, class) with ground truth.

    ``maps`` (B, C, h, w) per-class maps (upsampled bilinearly to the mask size when smaller or
    larger), ``masks`` (B, C, H, W) box masks (union of each class's boxes), ``has_gt`` (B, C)
    which pairs to evaluate (default: the non-empty masks). Pairs are evaluated whatever the
    classifier predicts.
    """
    maps, masks = torch.as_tensor(maps), torch.as_tensor(masks)
    if maps.dim() != 4 or masks.dim() != 4 or maps.shape[:2] != masks.shape[:2]:
        raise ValueError(f"maps {list(maps.shape)} and masks {list(masks.shape)} must be (B, C, h, w) and (B, C, H, W)")
    gt = masks > 0.5
    if maps.shape[-2:] != masks.shape[-2:]:
        maps = F.interpolate(maps.float(), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
    which = gt.flatten(2).any(-1) if has_gt is None else torch.as_tensor(has_gt).to(gt.device) > 0.5
    b, c = torch.nonzero(which, as_tuple=True)
    if b.numel() == 0:
        return torch.zeros(0, 3, dtype=torch.float64)
    iou, ior = iou_ior(binarize_maps(maps[b, c], threshold, normalize), gt[b, c])
    return torch.stack([c.double().cpu(), iou.cpu(), ior.cpu()], dim=1)


def localization_accuracy(
    rows: torch.Tensor,
    class_names: Sequence[str] = FINDINGS,
    tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
    tior_thresholds: Sequence[float] = TIOR_THRESHOLDS,
) -> dict[str, Any]:
    """TIoU / TIoR per finding and their means from :func:`localization_rows` (see the module docstring).

    Returns ``{"n_cases", "classes" (findings with cases), "per_class": {finding: {"n", "tiou":
    {"0.1": ...}, "tior": {...}, "mean_iou", "mean_ior"}}, "tiou": {"0.1": mean over findings},
    "tior": {...}, "mtiou", "mtior"}``; means are NaN without any case.
    """
    rows = torch.as_tensor(rows, dtype=torch.float64).reshape(-1, 3)
    per_class: dict[str, dict[str, Any]] = {}
    for ci, name in enumerate(class_names):
        sel = rows[rows[:, 0] == ci]
        if sel.shape[0] == 0:
            continue
        iou, ior = sel[:, 1], sel[:, 2]
        per_class[name] = {
            "n": int(sel.shape[0]),
            "tiou": {_key(t): float((iou >= t).double().mean()) for t in tiou_thresholds},
            "tior": {_key(t): float((ior >= t).double().mean()) for t in tior_thresholds},
            "mean_iou": float(iou.mean()),
            "mean_ior": float(ior.mean()),
        }
    unknown = rows[(rows[:, 0] < 0) | (rows[:, 0] >= len(class_names))]
    if unknown.numel():
        raise ValueError(f"class index {int(unknown[0, 0])} outside the {len(class_names)} class names")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    tiou = {_key(t): mean([v["tiou"][_key(t)] for v in per_class.values()]) for t in tiou_thresholds}
    tior = {_key(t): mean([v["tior"][_key(t)] for v in per_class.values()]) for t in tior_thresholds}
    return {
        "n_cases": int(rows.shape[0]),
        "classes": list(per_class),
        "per_class": per_class,
        "tiou": tiou,
        "tior": tior,
        "mtiou": mean(list(tiou.values())),
        "mtior": mean(list(tior.values())),
    }


# --------------------------------------------------------------------------- classification


def _matrix(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().to(torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{what} must be (N, C), got shape {tuple(t.shape)}")
    return t


def multilabel_auroc(
    scores: Any, labels: Any, class_names: Sequence[str] | None = None, nan_as_zero: bool = False
) -> dict[str, Any]:
    """Per-class ROC-AUC of (N, C) scores against (N, C) 0/1 labels and their mean.

    Returns ``{"per_class": {name: auc (NaN if undefined)}, "mean", "n_undefined", "undefined"
    (names)}``. The mean leaves undefined classes out (NaN if all are), or counts them as 0 with
    ``nan_as_zero`` (the reference).
    """
    s, y = _matrix(scores, "scores"), _matrix(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores {tuple(s.shape)} and labels {tuple(y.shape)} differ in shape")
    names = list(class_names) if class_names is not None else [str(i) for i in range(s.shape[1])]
    if len(names) != s.shape[1]:
        raise ValueError(f"{len(names)} class names for {s.shape[1]} columns")
    per_class = {n: auroc(s[:, i], y[:, i]) for i, n in enumerate(names)}
    undefined = [n for n, v in per_class.items() if math.isnan(v)]
    if nan_as_zero:
        mean = sum(0.0 if math.isnan(v) else v for v in per_class.values()) / len(per_class)
    else:
        defined = [v for v in per_class.values() if not math.isnan(v)]
        mean = sum(defined) / len(defined) if defined else float("nan")
    return {"per_class": per_class, "mean": mean, "n_undefined": len(undefined), "undefined": undefined}


def multilabel_accuracy(probs: Any, labels: Any, class_names: Sequence[str] | None = None,
                        threshold: float = 0.5) -> dict[str, Any]:
    """Per-class accuracy of ``probs > threshold`` against 0/1 labels and the mean over classes."""
    p, y = _matrix(probs, "probabilities"), _matrix(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"probabilities {tuple(p.shape)} and labels {tuple(y.shape)} differ in shape")
    names = list(class_names) if class_names is not None else [str(i) for i in range(p.shape[1])]
    per_class = {n: float(((p[:, i] > threshold) == (y[:, i] > 0.5)).double().mean()) for i, n in enumerate(names)}
    return {"per_class": per_class, "mean": sum(per_class.values()) / len(per_class)}


# --------------------------------------------------------------------------- ignite


def _store_details(engine: Any, name: str, details: Mapping[str, Any], extra: Mapping[str, float] | None) -> None:
    all_details = getattr(engine.state, "metric_details", None)
    if not isinstance(all_details, dict):
        all_details = {}
        engine.state.metric_details = all_details
    all_details[name] = dict(details)
    for key, value in (extra or {}).items():
        engine.state.metrics[f"{name}_{key}"] = value


class LocalizationAccuracy(Metric):
    """Epoch localisation accuracy (T(IoU) / T(IoR), spec section 6) as an Ignite metric.

    ``output_transform(engine.state.output)`` gives ``(maps, masks)`` or ``(maps, masks,
    has_gt)``: per-class maps (B, C, h, w) (refined maps by default; see ``threshold`` /
    ``normalize`` and :func:`binarize_maps`), box masks (B, C, H, W) and optionally which pairs
    have ground truth (B, C); lists of per-sample tensors (MONAI's decollated output) are
    stacked. Each update reduces the batch to rows [class, IoU, IoR] (no map is kept).

    ``compute`` returns ``score``: ``"mtiou"`` (default), ``"mtior"``, ``"tiou_<T>"`` or
    ``"tior_<T>"``; NaN when the epoch held no box (a note says so). The full
    :func:`localization_accuracy` result goes to ``engine.state.metric_details[name]``.
    """

    def __init__(
        self,
        class_names: Sequence[str] = FINDINGS,
        threshold: float = CAM_THRESHOLD,
        normalize: bool = False,
        score: str = "mtiou",
        tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
        tior_thresholds: Sequence[float] = TIOR_THRESHOLDS,
        summary_keys: bool = False,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.class_names = tuple(class_names)
        self.threshold, self.normalize = float(threshold), bool(normalize)
        self.tiou_thresholds, self.tior_thresholds = tuple(tiou_thresholds), tuple(tior_thresholds)
        valid = {"mtiou", "mtior"} | {f"tiou_{_key(t)}" for t in self.tiou_thresholds} | {
            f"tior_{_key(t)}" for t in self.tior_thresholds}
        if score not in valid:
            raise ValueError(f"score must be one of {sorted(valid)}, got {score!r}")
        self.score, self.summary_keys = score, bool(summary_keys)
        self._rows: list[torch.Tensor] = []
        self.result: dict[str, Any] = {}
        self._warned: set[str] = set()
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._rows = []
        self.result = {}

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        if not isinstance(output, (list, tuple)) or len(output) not in (2, 3):
            raise ValueError(f"{type(self).__name__} expects (maps, masks[, has_gt]) from output_transform")
        maps, masks = _stack(output[0], "maps"), _stack(output[1], "masks")
        has_gt = _stack(output[2], "has_gt") if len(output) == 3 else None
        if masks.shape[1] != len(self.class_names):
            raise ValueError(f"masks have {masks.shape[1]} classes, class_names {len(self.class_names)}")
        self._rows.append(localization_rows(maps.detach(), masks.detach(), self.threshold, self.normalize, has_gt))

    def compute(self) -> float:
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 3, dtype=torch.float64)
        rows = gather_rows(rows)
        self.result = localization_accuracy(rows, self.class_names, self.tiou_thresholds, self.tior_thresholds)
        kind, _, t = self.score.partition("_")
        return float(self.result[kind][t] if t else self.result[kind])

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        r = self.result
        extra = None
        if self.summary_keys:
            extra = {"mtiou": r["mtiou"], "mtior": r["mtior"], **{f"tiou_{k}": v for k, v in r["tiou"].items()},
                     **{f"tior_{k}": v for k, v in r["tior"].items()}}
            extra.pop(self.score, None)
        _store_details(engine, name, r, extra)
        record_sample_count(engine, name, r["n_cases"])
        notes = []
        if r["n_cases"] == 0:
            notes.append(f"{name} (localisation) is undefined (NaN) on {evaluated_split(engine, 0)}: no image has a box")
        record_metric_notes(engine, name, notes, self._warned)


class MultiLabelAUROC(Metric):
    """Epoch mean ROC-AUC over findings (:func:`multilabel_auroc`) as an Ignite metric.

    ``output_transform`` gives ``(y_pred, y)``: logits or probabilities (B, C) and 0/1 labels
    (B, C) (or lists of per-sample tensors). ``compute`` returns the mean (undefined classes left
    out and named in a note, or 0 with ``nan_as_zero``); per-class values go to
    ``engine.state.metric_details[name]`` (and ``<name>_<finding>`` metrics with ``summary_keys``).
    """

    def __init__(self, class_names: Sequence[str] = FINDINGS, nan_as_zero: bool = False, summary_keys: bool = False,
                 output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        self.class_names = tuple(class_names)
        self.nan_as_zero, self.summary_keys = bool(nan_as_zero), bool(summary_keys)
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.result: dict[str, Any] = {}
        self.num_samples = 0
        self._warned: set[str] = set()
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores, self._labels = [], []
        self.result = {}
        self.num_samples = 0

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        if not isinstance(output, (list, tuple)) or len(output) != 2:
            raise ValueError(f"{type(self).__name__} expects (y_pred, y) from output_transform, got {type(output)}")
        s = _stack(output[0], "predictions").to(torch.float64).reshape(-1, len(self.class_names))
        y = _stack(output[1], "labels").to(torch.float64).reshape(-1, len(self.class_names))
        if s.shape != y.shape:
            raise ValueError(f"predictions {tuple(s.shape)} and labels {tuple(y.shape)} differ in shape")
        self._scores.append(s.cpu())
        self._labels.append(y.cpu())

    def compute(self) -> float:
        c = len(self.class_names)
        both = torch.cat([torch.cat(self._scores), torch.cat(self._labels)], 1) if self._scores else torch.zeros(0, 2 * c)
        both = gather_rows(both.to(torch.float64))
        self.num_samples = int(both.shape[0])
        if self.num_samples == 0:
            self.result = {"per_class": dict.fromkeys(self.class_names, float("nan")), "mean": float("nan"),
                           "n_undefined": c, "undefined": list(self.class_names)}
        else:
            self.result = multilabel_auroc(both[:, :c], both[:, c:], self.class_names, self.nan_as_zero)
        return float(self.result["mean"])

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        extra = {f: v for f, v in self.result["per_class"].items()} if self.summary_keys else None
        _store_details(engine, name, {**self.result, "nan_as_zero": self.nan_as_zero}, extra)
        record_sample_count(engine, name, self.num_samples)
        notes = []
        if self.result["undefined"]:
            how = "counted as 0 in the mean (nan_as_zero)" if self.nan_as_zero else "left out of the mean"
            where = evaluated_split(engine, self.num_samples)
            notes.append(f"{name}: {self.result['n_undefined']} findings have no AUC on {where} (one outcome only), "
                         f"{how}: {', '.join(self.result['undefined'])}")
        record_metric_notes(engine, name, notes, self._warned)
