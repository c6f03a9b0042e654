"""Detection scores with MONAI's COCO metric (``monai.apps.detection.metrics``).

:func:`coco_scores` matches predictions to ground truth per class with
:func:`~monai.apps.detection.metrics.matching.matching_batch` (IoU thresholds 0.50:0.95:0.05, at most
``max_detections`` boxes per image) and reads AP@0.5 and mAP@[0.5:0.95] per class from
:class:`~monai.apps.detection.metrics.coco.COCOMetric`. A class without ground-truth boxes in the
evaluated images has no AP (``None``, "n/a"): MONAI's COCOMetric reports -1 for it **and averages
that -1 into its overall value**; here the overall numbers are the mean over the classes that do
have ground truth (the COCO convention), and the classes left out are listed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

__all__ = ["coco_scores", "gather_objects", "DetectionMAP"]


def _np(x: Any, shape: tuple[int, ...], dtype) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr.astype(dtype).reshape(shape)


def coco_scores(
    preds: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    max_detections: int = 100,
) -> dict[str, Any]:
    """AP@0.5 and mAP@[0.5:0.95] per class and overall.

    ``preds``: per image ``{"boxes" (D, 4), "labels" (D,), "scores" (D,)}``; ``targets``: per image
    ``{"boxes" (G, 4), "labels" (G,)}``. Returns ``{"map50", "map", "per_class": {name: {"ap50", "map",
    "n_gt"}}, "no_gt": [names], "n_images"}`` (``map50`` / ``map`` ``None`` when no class has ground truth).
    """
    classes = list(classes)
    n_gt = np.zeros(len(classes), dtype=int)
    gt_boxes, gt_classes, pb, pc, ps = [], [], [], [], []
    for p, t in zip(preds, targets, strict=True):
        gl = _np(t["labels"], (-1,), np.int64)
        gt_boxes.append(_np(t["boxes"], (-1, 4), np.float64))
        gt_classes.append(gl)
        n_gt += np.bincount(gl, minlength=len(classes))[: len(classes)]
        pb.append(_np(p["boxes"], (-1, 4), np.float64))
        pc.append(_np(p["labels"], (-1,), np.int64))
        ps.append(_np(p["scores"], (-1,), np.float64))
    per_class = {c: {"ap50": None, "map": None, "n_gt": int(n_gt[i])} for i, c in enumerate(classes)}
    out: dict[str, Any] = {"map50": None, "map": None, "per_class": per_class, "n_images": len(targets),
                           "no_gt": [c for i, c in enumerate(classes) if n_gt[i] == 0]}
    if n_gt.sum() == 0:
        return out
    metric = COCOMetric(classes=classes, iou_list=[0.5], iou_range=[0.5, 0.95, 0.05],
                        max_detection=[max_detections], verbose=False)
    results = matching_batch(box_iou, metric.iou_thresholds, pb, pc, ps, gt_boxes, gt_classes,
                             max_detections=max_detections)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # COCOMetric warns on the root logger for every class without a box
    try:
        raw, _ = metric(results)
    finally:
        logging.disable(previous)
    for i, c in enumerate(classes):
        if n_gt[i] > 0:
            per_class[c]["ap50"] = float(raw[f"{c}_AP_IoU_0.50_MaxDet_{max_detections}"])
            per_class[c]["map"] = float(raw[f"{c}_mAP_IoU_0.50_0.95_0.05_MaxDet_{max_detections}"])
    with_gt = [v for v in per_class.values() if v["n_gt"] > 0]
    out["map50"] = float(np.mean([v["ap50"] for v in with_gt]))
    out["map"] = float(np.mean([v["map"] for v in with_gt]))
    return out


def gather_objects(items: list) -> list:
    """Concatenate a per-rank list over all ranks (identity without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


class DetectionMAP(Metric):
    """Ignite metric: ``score`` (``"map50"`` or ``"map"``) of :func:`coco_scores` over an epoch, all ranks.

    With ``details=True`` the whole :func:`coco_scores` result is also stored in
    ``engine.state.metric_details[name]`` (the report writer reads it). A split without any
    ground-truth box scores 0.0 (so best-model selection keeps working) and says so in the details.
    """

    def __init__(self, classes: Sequence[str], score: str = "map50", max_detections: int = 100,
                 output_transform: Callable = lambda x: (x["pred"], x["target"]), details: bool = False) -> None:
        if score not in ("map50", "map"):
            raise ValueError(f"score must be 'map50' or 'map', got {score!r}")
        self.classes, self.score, self.max_detections, self.details = list(classes), score, int(max_detections), details
        self.last: dict[str, Any] | None = None
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._preds: list = []
        self._targets: list = []

    def update(self, output: tuple[Sequence, Sequence]) -> None:
        preds, targets = output
        self._preds += [{k: v.detach().cpu() for k, v in p.items()} for p in preds]
        self._targets += [{k: v.detach().cpu() for k, v in t.items()} for t in targets]

    def compute(self) -> float:
        self.last = coco_scores(gather_objects(self._preds), gather_objects(self._targets), self.classes,
                                self.max_detections)
        value = self.last[self.score]
        return 0.0 if value is None else value

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        if self.details:
            if not hasattr(engine.state, "metric_details") or engine.state.metric_details is None:
                engine.state.metric_details = {}
            engine.state.metric_details[name] = self.last
