"""HAM metrics (spec ``ham.md`` section 6): per-finding AUROC against sklearn, TIoU / TIoR on hand-made rectangles."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from sklearn.metrics import roc_auc_score

from custom_components.data.nihcxr14 import FINDINGS, boxes_to_masks
from custom_components.metrics import (
    CAM_THRESHOLD,
    MINMAX_THRESHOLD,
    LocalizationAccuracy,
    MultiLabelAUROC,
    binarize_maps,
    iou_ior,
    localization_accuracy,
    localization_rows,
    minmax_normalize,
    multilabel_accuracy,
    multilabel_auroc,
)

from bundle_utils import subprocess_env


def rect(h: int, w: int, r0: int, r1: int, c0: int, c1: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.float64)
    m[r0:r1, c0:c1] = value
    return m


# ---------------------------------------------------------------- binarisation


def test_refined_threshold_equals_minmax_threshold():
    assert abs(MINMAX_THRESHOLD - (0.4 + math.log(999) / 100)) < 1e-15
    m_hat = torch.linspace(0, 1, 200001, dtype=torch.float64)
    refined = torch.sigmoid(100 * (m_hat - 0.4))  # HAM's R with cam_w 100, cam_sigma 0.4
    assert float(torch.sigmoid(torch.tensor(100 * (0.4 - 0.4)))) == 0.5
    away = (m_hat - MINMAX_THRESHOLD).abs() > 1e-9
    assert torch.equal((refined >= CAM_THRESHOLD)[away], (m_hat >= MINMAX_THRESHOLD)[away])
    # raw CAMs: min-max then the same threshold; scale and offset do not matter
    cam = torch.rand(3, 2, 9, 9, dtype=torch.float64)
    r = torch.sigmoid(100 * (minmax_normalize(cam) - 0.4))
    assert torch.equal(binarize_maps(r), binarize_maps(7 * cam + 3, MINMAX_THRESHOLD, normalize=True))


def test_minmax_of_a_constant_map_is_zero():
    maps = torch.stack([torch.full((4, 4), 2.5), torch.arange(16.0).reshape(4, 4)])
    out = minmax_normalize(maps)
    assert not out.isnan().any() and out[0].eq(0).all() and out[1].min() == 0 and out[1].max() == 1


# ---------------------------------------------------------------- IoU and IoR on rectangles


def test_iou_ior_hand_made_rectangles():
    g = rect(16, 16, 4, 8, 4, 8)  # |G| = 16
    cases = {
        "exact cover": (g.clone(), 1.0, 1.0),
        "miss": (rect(16, 16, 10, 14, 10, 14), 0.0, 0.0),
        "inside": (rect(16, 16, 5, 7, 5, 7), 4 / 16, 1.0),  # IoR = 1, IoU = |P| / |G|
        "contains": (rect(16, 16, 2, 10, 2, 10), 16 / 64, 16 / 64),
        "overlap": (rect(16, 16, 6, 10, 6, 10), 4 / 28, 4 / 16),
        "empty prediction": (torch.zeros(16, 16, dtype=torch.float64), 0.0, 0.0),
    }
    for name, (p, want_iou, want_ior) in cases.items():
        iou, ior = iou_ior(p > 0.5, g > 0.5)
        assert (float(iou), float(ior)) == pytest.approx((want_iou, want_ior), abs=1e-12), name


def test_two_boxes_of_one_finding_form_a_union_mask():
    boxes = {"Nodule": [[2, 2, 4, 4], [10, 10, 3, 3]]}  # 16 + 9 pixels, disjoint
    masks = torch.from_numpy(boxes_to_masks(boxes, (16, 16))).double()[None]  # (1, 14, 16, 16)
    nodule = FINDINGS.index("Nodule")
    assert masks[0, nodule].sum() == 25 and masks.sum() == 25
    maps = torch.zeros_like(masks)
    maps[0, nodule] = masks[0, nodule]  # covers both boxes exactly
    rows = localization_rows(maps, masks, threshold=0.5)
    assert rows.tolist() == [[nodule, 1.0, 1.0]]
    maps[0, nodule, 10:13, 10:13] = 0  # covers only the first box
    rows = localization_rows(maps, masks, threshold=0.5)
    assert rows[0, 1] == pytest.approx(16 / 25) and rows[0, 2] == 1.0


def test_rows_cover_every_gt_class_regardless_of_prediction():
    masks = torch.zeros(2, 14, 8, 8)
    masks[0, 0, 0:4, 0:4] = 1
    masks[0, 5, 4:8, 4:8] = 1
    masks[1, 2, 2:6, 2:6] = 1
    refined = torch.zeros(2, 14, 4, 4)  # 4x4 maps, upsampled (bilinear) to the 8x8 masks
    refined[0, 0, 0:2, 0:2] = 1.0  # class 0 found
    refined[0, 3] = 1.0  # a predicted class without a box: not evaluated
    rows = localization_rows(refined, masks)  # class 5 (map all 0) and image 1 class 2 still count, with 0
    assert rows[:, 0].tolist() == [0, 5, 2]
    assert rows[0, 1] > 0 and rows[1:, 1:].abs().sum() == 0
    up = torch.nn.functional.interpolate(refined[:1, :1], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    iou, _ = iou_ior(up >= CAM_THRESHOLD, masks[0, 0] > 0)
    assert rows[0, 1] == pytest.approx(float(iou))
    has_gt = torch.zeros(2, 14)
    has_gt[1, 2] = 1
    assert localization_rows(refined, masks, has_gt=has_gt)[:, 0].tolist() == [2]
    assert localization_rows(refined, torch.zeros(2, 14, 8, 8)).shape == (0, 3)


def test_tiou_tior_per_class_and_means():
    rows = torch.tensor([
        [0, 0.05, 0.95], [0, 0.15, 0.5], [0, 0.55, 0.2], [0, 0.8, 1.0],  # class 0: 4 cases
        [3, 0.5, 0.74],  # class 3: 1 case, exactly on a threshold
    ], dtype=torch.float64)  # fmt: skip
    r = localization_accuracy(rows, FINDINGS)
    assert r["n_cases"] == 5 and r["classes"] == ["Atelectasis", "Infiltration"]
    a = r["per_class"]["Atelectasis"]
    assert a["n"] == 4 and a["tiou"]["0.1"] == 0.75 and a["tiou"]["0.5"] == 0.5 and a["tiou"]["0.6"] == 0.25
    assert a["tiou"]["0.7"] == 0.25 and a["tior"]["0.1"] == 1.0 and a["tior"]["0.25"] == 0.75 and a["tior"]["0.9"] == 0.5
    assert a["mean_iou"] == pytest.approx(1.55 / 4)
    i = r["per_class"]["Infiltration"]
    assert i["tiou"]["0.5"] == 1.0 and i["tiou"]["0.6"] == 0.0 and i["tior"]["0.5"] == 1.0 and i["tior"]["0.75"] == 0.0
    assert r["tiou"]["0.5"] == pytest.approx((0.5 + 1.0) / 2)  # mean over the findings with cases
    assert r["mtiou"] == pytest.approx(sum(r["tiou"].values()) / 7)
    assert r["mtior"] == pytest.approx(sum(r["tior"].values()) / 5)
    empty = localization_accuracy(torch.zeros(0, 3))
    assert empty["n_cases"] == 0 and math.isnan(empty["mtiou"]) and empty["per_class"] == {}
    with pytest.raises(ValueError, match="class index 14"):
        localization_accuracy(torch.tensor([[14.0, 0.5, 0.5]]))


# ---------------------------------------------------------------- classification


def test_multilabel_auroc_agrees_with_sklearn_and_counts_undefined():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 14)) < 0.3).astype(float)
    y[:, 13] = 0  # Hernia absent: undefined
    y[:, 12] = 1  # every sample positive: undefined
    s = np.round(rng.normal(size=(60, 14)) + y, 1)  # rounded: ties
    r = multilabel_auroc(torch.from_numpy(s), torch.from_numpy(y), FINDINGS)
    for i, name in enumerate(FINDINGS[:12]):
        assert r["per_class"][name] == pytest.approx(roc_auc_score(y[:, i], s[:, i]), abs=1e-12)
    assert r["n_undefined"] == 2 and r["undefined"] == ["Pleural_Thickening", "Hernia"]
    ref = [roc_auc_score(y[:, i], s[:, i]) for i in range(12)]
    assert r["mean"] == pytest.approx(np.mean(ref), abs=1e-12)
    nan0 = multilabel_auroc(s, y, FINDINGS, nan_as_zero=True)  # the reference's NaN -> 0
    assert nan0["mean"] == pytest.approx(sum(ref) / 14, abs=1e-12)
    # logits and sigmoid probabilities rank the same
    assert multilabel_auroc(torch.sigmoid(torch.from_numpy(s)), y, FINDINGS)["mean"] == pytest.approx(r["mean"], abs=1e-12)
    acc = multilabel_accuracy(torch.tensor([[0.7, 0.5], [0.2, 0.9]]), torch.tensor([[1, 1], [1, 1]]), ["a", "b"])
    assert acc == {"per_class": {"a": 0.5, "b": 0.5}, "mean": 0.5}  # 0.5 is not > 0.5


# ---------------------------------------------------------------- ignite


def _run(metric, name: str, batches: list) -> Engine:
    engine = Engine(lambda e, b: b)
    metric.attach(engine, name)
    engine.run(batches, max_epochs=1)
    return engine


def test_ignite_metrics_pool_the_epoch():
    torch.manual_seed(0)
    maps, masks = torch.rand(5, 14, 8, 8), torch.zeros(5, 14, 16, 16)
    masks[0, 1, 2:9, 3:12] = 1
    masks[2, 1, 0:5, 0:5] = 1
    masks[3, 6, 8:16, 8:16] = 1
    masks[4, 6, 1:3, 1:3] = 1
    batches = [(maps[:2], masks[:2]), ([maps[2], maps[3], maps[4]], [masks[2], masks[3], masks[4]])]  # a decollated list
    metric = LocalizationAccuracy(threshold=0.6, normalize=True, score="tior_0.25", summary_keys=True)
    engine = _run(metric, "loc", batches)
    want = localization_accuracy(localization_rows(maps, masks, threshold=0.6, normalize=True))
    assert engine.state.metrics["loc"] == want["tior"]["0.25"]
    assert engine.state.metric_details["loc"] == want and want["n_cases"] == 4
    assert engine.state.metrics["loc_mtiou"] == want["mtiou"] and engine.state.metrics["loc_tiou_0.3"] == want["tiou"]["0.3"]
    assert "loc_tior_0.25" not in engine.state.metrics
    empty = _run(LocalizationAccuracy(), "loc", [(maps[:1], torch.zeros(1, 14, 16, 16))])
    assert math.isnan(empty.state.metrics["loc"]) and "no image has a box" in empty.state.metric_notes["loc"][0]
    with pytest.raises(ValueError, match="score must be one of"):
        LocalizationAccuracy(score="tiou_0.15")

    logits, labels = torch.randn(9, 14), (torch.rand(9, 14) < 0.4).float()
    labels[:, 13] = 0
    engine = _run(MultiLabelAUROC(summary_keys=True), "auc", [(logits[:4], labels[:4]), (logits[4:], labels[4:])])
    want = multilabel_auroc(logits, labels, FINDINGS)
    assert engine.state.metrics["auc"] == pytest.approx(want["mean"], abs=1e-12)
    assert engine.state.metrics["auc_Cardiomegaly"] == want["per_class"]["Cardiomegaly"]
    assert "Hernia" in engine.state.metric_notes["auc"][0] and "left out of the mean" in engine.state.metric_notes["auc"][0]
    assert engine.state.metric_sample_counts["auc"] == 9


GATHER = textwrap.dedent(
    """
    import json, sys, torch
    import ignite.distributed as idist
    from custom_components.metrics import LocalizationAccuracy, MultiLabelAUROC, localization_accuracy, localization_rows
    from custom_components.metrics import multilabel_auroc

    def run(local_rank, out):
        rank = idist.get_rank()
        g = torch.Generator().manual_seed(0)
        maps, masks = torch.rand(7, 14, 8, 8, generator=g), (torch.rand(7, 14, 8, 8, generator=g) > 0.7).float()
        masks[:, 8:] = 0
        logits, labels = torch.randn(7, 14, generator=g), (torch.rand(7, 14, generator=g) > 0.5).float()
        part = slice(0, 2) if rank == 0 else slice(2, 7)  # uneven
        loc, auc = LocalizationAccuracy(threshold=0.5), MultiLabelAUROC()
        loc.update((maps[part], masks[part])); auc.update((logits[part], labels[part]))
        values = [loc.compute(), auc.compute()]
        if rank == 0:
            ref = [localization_accuracy(localization_rows(maps, masks, threshold=0.5))["mtiou"],
                   multilabel_auroc(logits, labels)["mean"]]
            json.dump({"values": values, "ref": ref}, open(out, "w"))

    if __name__ == "__main__":
        with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
            parallel.run(run, sys.argv[1])
    """
)


def test_gather_over_two_processes(tmp_path):
    out, script = tmp_path / "result.json", tmp_path / "gather_loc.py"
    script.write_text(GATHER)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=180,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["values"] == pytest.approx(result["ref"], abs=1e-12)
