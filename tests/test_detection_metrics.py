"""Detection scores (MONAI's COCO metric behind coco_scores / DetectionMAP) in closed form, and the
box overlays drawn where the boxes are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_components.detection.handlers import draw_detections, report_tables
from custom_components.detection.metrics import DetectionMAP, coco_scores

CLASSES = ["a", "b", "c"]


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels).long()}


def _p(boxes, labels, scores):
    return {**_t(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


def test_perfect_predictions_score_one_and_classes_without_gt_are_left_out():
    targets = [_t([[0, 0, 10, 10]], [0]), _t([[20, 20, 30, 40], [1, 1, 5, 5]], [1, 0]), _t([], [])]
    preds = [_p([[0, 0, 10, 10]], [0], [0.9]), _p([[20, 20, 30, 40], [1, 1, 5, 5]], [1, 0], [0.8, 0.7]), _p([], [], [])]
    s = coco_scores(preds, targets, CLASSES)
    assert s["map50"] == pytest.approx(1.0) and s["map"] == pytest.approx(1.0)
    assert s["per_class"]["c"] == {"ap50": None, "map": None, "n_gt": 0} and s["no_gt"] == ["c"]
    assert s["per_class"]["a"]["n_gt"] == 2 and s["n_images"] == 3


def test_half_recall_and_localisation_thresholds():
    # class a: 2 GT, one found (IoU 1), the other missed -> AP@0.5 = 0.5 (101-point interpolation)
    # class b: 1 GT, predicted box with IoU 0.6 -> counts at 0.5, 0.55 (and not from 0.65 on): AP@0.5 = 1,
    #          mAP@[0.5:0.95] = 3/10 (IoU 0.6 >= thresholds 0.5, 0.55, 0.6)
    targets = [_t([[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]], [0, 0, 1])]
    preds = [_p([[0, 0, 10, 10], [20, 0, 30, 6]], [0, 1], [0.9, 0.8])]
    s = coco_scores(preds, targets, CLASSES)
    assert s["per_class"]["a"]["ap50"] == pytest.approx(0.5, abs=0.01)
    assert s["per_class"]["b"]["ap50"] == pytest.approx(1.0)
    assert s["per_class"]["b"]["map"] == pytest.approx(0.3, abs=1e-6)
    assert s["map50"] == pytest.approx((s["per_class"]["a"]["ap50"] + 1.0) / 2)


def test_no_prediction_scores_zero_and_no_gt_scores_none():
    s = coco_scores([_p([], [], [])], [_t([[0, 0, 5, 5]], [2])], CLASSES)
    assert s["map50"] == 0.0 and s["per_class"]["c"]["ap50"] == 0.0
    empty = coco_scores([_p([[0, 0, 5, 5]], [0], [0.5])], [_t([], [])], CLASSES)
    assert empty["map50"] is None and empty["no_gt"] == CLASSES


def test_ignite_metric_accumulates_batches():
    m = DetectionMAP(CLASSES, score="map50")
    m.reset()
    m.update(([_p([[0, 0, 10, 10]], [0], [0.9])], [_t([[0, 0, 10, 10]], [0])]))
    m.update(([_p([], [], [])], [_t([[5, 5, 9, 9]], [0])]))
    assert m.compute() == pytest.approx(0.5, abs=0.01)
    m.reset()
    m.update(([_p([], [], [])], [_t([], [])]))
    assert m.compute() == 0.0  # no ground truth: 0 for model selection, None in the details
    assert m.last["map50"] is None


def test_report_rows_and_markdown():
    s = coco_scores([_p([[0, 0, 10, 10]], [0], [0.9])], [_t([[0, 0, 10, 10]], [0])], CLASSES)
    md, rows = report_tables(s)
    assert [r["class"] for r in rows] == [*CLASSES, "overall (classes with ground truth)"]
    assert "| a | 1 | 100.00 | 100.00 |" in md and "| b | 0 | n/a | n/a |" in md


def test_overlay_draws_boxes_where_they_are():
    image = torch.zeros(3, 40, 30)  # (C, W, H): 40 wide, 30 high
    panel = draw_detections(image, _t([[5, 2, 15, 12]], [0]), _p([[20, 10, 35, 25]], [1], [0.9]), CLASSES)
    assert panel.shape == (30, 40, 3)
    assert tuple(panel[2, 10]) == (0, 220, 0)  # top edge of the ground truth: row y=2, column x=10
    assert tuple(panel[25, 35]) == (230, 0, 0)  # bottom-right corner of the prediction
    low = draw_detections(image, None, _p([[20, 10, 35, 25]], [1], [0.1]), CLASSES, score_thresh=0.3)
    assert not np.any(low[..., 0] != low[..., 1])  # below the threshold: nothing drawn (grey only)
