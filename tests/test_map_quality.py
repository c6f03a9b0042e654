"""Pointing game and IoU at top-k % on hand-made maps and masks (spec explanations.md sections 7 and 10)."""

from __future__ import annotations

import pytest
import torch

from custom_components.metrics.map_quality import map_quality, pointing_game_hits, topk_box_iou


def test_pointing_game_inside_outside_and_ties():
    masks = torch.zeros(3, 5, 5)
    masks[:, 1:3, 1:3] = 1
    maps = torch.zeros(3, 5, 5)
    maps[0, 2, 2] = 1.0  # single maximum inside
    maps[1, 4, 4] = 1.0  # single maximum outside
    maps[2, 4, 4] = maps[2, 1, 1] = 1.0  # tied maxima, one inside -> hit
    assert pointing_game_hits(maps, masks).tolist() == [True, False, True]


def test_topk_rectangle_spans_two_blobs_iou_by_hand():
    # 20 x 20 map with two 2x2 blobs (8 pixels); the threshold is the value at sorted index
    # floor(400 * k / 100) = 7 for k = 1.75, i.e. the 8th largest: exactly the blobs are selected
    m = torch.zeros(1, 20, 20)
    m[0, 2:4, 3:5] = 1.0
    m[0, 10:12, 12:14] = 0.9
    # the enclosing rectangle: rows 2..11, cols 3..13 -> 10 x 11 = 110 pixels
    gt = torch.zeros(1, 20, 20)
    gt[0, 0:6, 0:6] = 1  # 36 pixels; overlap with the rectangle: rows 2..5, cols 3..5 = 4 x 3 = 12
    iou = topk_box_iou(m, gt, k=1.75)
    # at k = 2 the index is 8, the threshold 0: every pixel is foreground (the reference's tie rule)
    assert topk_box_iou(m, gt, k=2.0).item() == pytest.approx(36 / 400)
    assert iou.item() == pytest.approx(12 / (110 + 36 - 12))


def test_topk_threshold_index_and_ties():
    # unique maximum and floor(N*k/100) == 0: only the maximum is selected (a 1-pixel rectangle)
    m = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    gt = torch.zeros(1, 10, 10)
    gt[0, 9, 9] = 1
    assert topk_box_iou(m, gt, k=0.5).item() == pytest.approx(1.0)
    # ties at the threshold are all kept (more than k %): a constant map selects everything
    flat = torch.ones(1, 10, 10)
    assert topk_box_iou(flat, torch.ones(1, 10, 10), k=10.0).item() == pytest.approx(1.0)
    for bad in (0.0, 100.0, 150.0):
        with pytest.raises(ValueError):
            topk_box_iou(m, gt, k=bad)


def test_rectangle_equals_bounding_box_of_binarised_map_random():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 16, 16, generator=g)
    masks = (torch.rand(6, 16, 16, generator=g) > 0.7).float()
    for k in (5.0, 10.0, 20.0, 40.0):
        got = topk_box_iou(maps, masks, k)
        for i in range(6):
            vals = maps[i].flatten().sort(descending=True).values
            fg = maps[i] >= vals[int(256 * k / 100)]
            rows, cols = fg.any(1).nonzero().flatten(), fg.any(0).nonzero().flatten()
            box = torch.zeros(16, 16, dtype=torch.bool)
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            gt = masks[i] > 0.5
            assert got[i].item() == pytest.approx(((box & gt).sum() / (box | gt).sum()).item())


def test_map_quality_scores_only_annotated_slices():
    maps = torch.rand(3, 8, 8)
    masks = torch.zeros(3, 8, 8)
    masks[1, 2:5, 2:5] = 1
    out = map_quality(maps, masks, ks=(5.0, 40.0))
    assert set(out) == {"pointing_game", "iou_top5", "iou_top40"}
    assert all(len(v) == 1 for v in out.values())
