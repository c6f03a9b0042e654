"""Weighted boxes fusion (Solovyev, Wang, Gabruseva, "Weighted boxes fusion: Ensembling boxes from
different object detection models", Image and Vision Computing 2021), written from the paper.

Used to fuse the boxes several radiologists drew on one VinDr-CXR image (LVM-Med's detection
protocol: ``iou_thr=0.2``, ``skip_box_thr=1e-4``). Written here rather than depending on
``ensemble-boxes`` (a small pure-Python package, but one more pinned dependency for ~60 lines whose
behaviour the tests pin down in closed form).

Algorithm, per label independently:

1. every box of every source ``m`` gets confidence ``score * weights[m]``; boxes whose score is
   below ``skip_box_thr`` are dropped;
2. boxes are visited by decreasing confidence (stable: source order, then box order, on ties);
   each joins the first cluster whose current fused box it overlaps with IoU **strictly greater**
   than ``iou_thr`` (the best such cluster), else it starts a new cluster;
3. a cluster's fused box is the confidence-weighted mean of its boxes' corners, recomputed after
   every join; its score is the mean confidence of its boxes times
   ``min(len(weights), cluster size) / sum(weights)`` (the paper's ``avg`` rescaling: a box that
   fewer sources agree on is down-weighted).

Coordinates are any consistent ``[x_min, y_min, x_max, y_max]`` units (pixels here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["box_iou_xyxy", "weighted_boxes_fusion"]


def box_iou_xyxy(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[x0, y0, x1, y1]`` box with each row of ``boxes``."""
    if len(boxes) == 0:
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def weighted_boxes_fusion(
    boxes_list: Sequence[Sequence[Sequence[float]]],
    scores_list: Sequence[Sequence[float]] | None = None,
    labels_list: Sequence[Sequence[int]] | None = None,
    weights: Sequence[float] | None = None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse boxes from several sources (readers / models); see the module docstring.

    Args:
        boxes_list: per source, its boxes ``[[x0, y0, x1, y1], ...]``.
        scores_list: per source, a score per box (default 1 for every box).
        labels_list: per source, an integer label per box (default 0).
        weights: one weight per source (default 1 each).

    Returns:
        ``(boxes (K, 4), scores (K,), labels (K,))``, sorted by decreasing score (stable).
    """
    n = len(boxes_list)
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} box sources")
    entries = []  # (confidence, label, box, order)
    for m, boxes in enumerate(boxes_list):
        scores = [1.0] * len(boxes) if scores_list is None else scores_list[m]
        labels = [0] * len(boxes) if labels_list is None else labels_list[m]
        if not len(scores) == len(labels) == len(boxes):
            raise ValueError(f"source {m}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        for b, (box, score, label) in enumerate(zip(boxes, scores, labels, strict=True)):
            box = np.asarray(box, dtype=float)
            if box.shape != (4,) or box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"source {m} box {b}: not [x0, y0, x1, y1] with x0 <= x1, y0 <= y1: {box.tolist()}")
            if float(score) < skip_box_thr:
                continue
            entries.append((float(score) * weights[m], int(label), box, len(entries)))
    out_boxes, out_scores, out_labels = [], [], []
    for label in sorted({e[1] for e in entries}):
        items = sorted((e for e in entries if e[1] == label), key=lambda e: (-e[0], e[3]))
        clusters: list[list[tuple[float, np.ndarray]]] = []
        fused: list[np.ndarray] = []
        for conf, _, box, _ in items:
            ious = box_iou_xyxy(box, np.asarray(fused)) if fused else np.zeros(0)
            best = int(np.argmax(ious)) if len(ious) else -1
            if best >= 0 and ious[best] > iou_thr:
                clusters[best].append((conf, box))
                c = np.array([x[0] for x in clusters[best]])
                fused[best] = (c[:, None] * np.stack([x[1] for x in clusters[best]])).sum(0) / c.sum()
            else:
                clusters.append([(conf, box)])
                fused.append(box.copy())
        for cluster, fbox in zip(clusters, fused, strict=True):
            mean_conf = float(np.mean([x[0] for x in cluster]))
            out_boxes.append(fbox)
            out_scores.append(mean_conf * min(len(weights), len(cluster)) / float(weights.sum()))
            out_labels.append(label)
    if not out_boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return np.asarray(out_boxes)[order], np.asarray(out_scores)[order], np.asarray(out_labels, dtype=int)[order]
