"""HAM's evaluation and inference outputs on hand-made cases: boxes from maps, result tables, panels, best checkpoints."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from custom_components.data.nihcxr14 import FINDINGS, boxes_to_masks
from custom_components.handlers.attention_panels import (
    CAPTION_HEIGHT,
    GT_COLOUR,
    PRED_COLOUR,
    AttentionPanelWriter,
    attention_panel,
)
from custom_components.handlers.checkpoint import BestMetricSaver
from custom_components.handlers.report import MetricsReportWriter
from custom_components.metrics.localization import (
    MINMAX_THRESHOLD,
    localization_accuracy,
    predicted_boxes,
    region_boxes,
)
from custom_components.networks.ham import refine_cams
from custom_components.reports.metric_tables import AUROCTable, LocalizationTable, table_csv, write_table

# --------------------------------------------------------------------------- boxes from maps


def test_two_blobs_give_two_exact_boxes():
    region = np.zeros((20, 30), bool)
    region[2:6, 3:10] = True  # x 3, y 2, w 7, h 4
    region[12:19, 20:22] = True  # x 20, y 12, w 2, h 7
    region[13, 21] = False  # a hole does not split a component
    assert region_boxes(region) == [[3, 2, 7, 4], [20, 12, 2, 7]]


def test_boxes_round_trip_through_masks():
    boxes = [[4, 1, 5, 3], [15, 10, 6, 8]]
    mask = boxes_to_masks({"Mass": boxes}, (24, 20))[FINDINGS.index("Mass")]
    assert region_boxes(mask) == boxes


def test_diagonal_neighbours_join_with_8_connectivity_only():
    region = np.zeros((6, 6), bool)
    region[1, 1] = region[2, 2] = True
    assert region_boxes(region) == [[1, 1, 2, 2]]
    assert region_boxes(region, connectivity=4) == [[1, 1, 1, 1], [2, 2, 1, 1]]


def test_empty_and_constant_maps_give_no_box():
    assert region_boxes(np.zeros((5, 5))) == []
    # a constant CAM min-maxes to 0 (spec section 11), so neither its refined map nor its min-max map reaches the threshold
    constant = torch.full((1, 1, 8, 8), 3.0)
    assert predicted_boxes(refine_cams(constant, (8, 8))[0, 0]) == []
    assert predicted_boxes(constant[0, 0], MINMAX_THRESHOLD, normalize=True) == []
    # the all-zero CAM (ReLU of a map with nothing active) stays exactly constant when upsampled
    assert predicted_boxes(refine_cams(torch.zeros(1, 1, 8, 8), (16, 16))[0, 0]) == []


def test_predicted_boxes_use_hams_threshold_on_refined_maps():
    cam = torch.zeros(1, 1, 10, 10)
    cam[0, 0, 2:4, 5:9] = 1.0  # min-max 1 inside, 0 outside
    cam[0, 0, 7, 0] = 0.46  # below 0.4 + ln(999)/100 = 0.4691: not part of the region
    cam[0, 0, 8, 8] = 0.48  # above it: its own one-pixel box
    refined = refine_cams(cam, (10, 10))[0, 0]
    assert predicted_boxes(refined) == [[5, 2, 4, 2], [8, 8, 1, 1]]
    assert predicted_boxes(cam[0, 0], MINMAX_THRESHOLD, normalize=True) == [[5, 2, 4, 2], [8, 8, 1, 1]]


# --------------------------------------------------------------------------- tables


def _auroc_details() -> dict:
    per_class = dict.fromkeys(FINDINGS, float("nan"))
    per_class.update({"Nodule": 0.75, "Mass": 0.5})
    return {"auroc": {"per_class": per_class, "mean": 0.625},
            "abnormal_auroc": {"per_class": {"abnormal": 0.8}, "mean": 0.8}}


def _localization_details() -> dict:
    # rows [class, IoU, IoR]: Mass two cases, Nodule one
    mass, nodule = FINDINGS.index("Mass"), FINDINGS.index("Nodule")
    rows = torch.tensor([[mass, 0.35, 0.95], [mass, 0.05, 0.2], [nodule, 0.6, 0.6]], dtype=torch.float64)
    return {"mtiou": localization_accuracy(rows)}


def _read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_auroc_table_rows_and_undefined_cells():
    table = AUROCTable("auroc", {"abnormal": "abnormal_auroc"})(_auroc_details())
    rows = _read_csv(table_csv(table))
    assert [r["finding"] for r in rows] == [*FINDINGS, "mean", "abnormal"]
    by = {r["finding"]: r["auroc"] for r in rows}
    assert float(by["Nodule"]) == 0.75 and float(by["mean"]) == 0.625 and float(by["abnormal"]) == 0.8
    assert by["Hernia"] == ""  # undefined AUC: empty cell, null in JSON
    assert table.to_json()["rows"][FINDINGS.index("Hernia")]["auroc"] is None


def test_localization_tables_by_hand():
    details = _localization_details()
    tiou = _read_csv(table_csv(LocalizationTable("mtiou", "tiou")(details)))
    assert list(tiou[0]) == ["finding", "n", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "mean"]
    by = {r["finding"]: r for r in tiou}
    assert [r["finding"] for r in tiou] == ["Mass", "Nodule", "mean"]
    # Mass IoUs 0.35 and 0.05: half its cases reach 0.1 .. 0.3, none 0.4+; Nodule 0.6 reaches 0.1 .. 0.6
    assert [float(by["Mass"][t]) for t in ("0.1", "0.3", "0.4")] == [0.5, 0.5, 0.0]
    assert [float(by["Nodule"][t]) for t in ("0.6", "0.7")] == [1.0, 0.0]
    assert float(by["mean"]["0.1"]) == 0.75 and by["mean"]["n"] == "3" and by["Mass"]["n"] == "2"
    assert math.isclose(float(by["Mass"]["mean"]), 1.5 / 7)
    assert math.isclose(float(by["mean"]["mean"]), details["mtiou"]["mtiou"])
    tior = {r["finding"]: r for r in _read_csv(table_csv(LocalizationTable("mtiou", "tior")(details)))}
    assert [float(tior["Mass"][t]) for t in ("0.1", "0.25", "0.5", "0.75", "0.9")] == [1.0, 0.5, 0.5, 0.5, 0.5]
    assert math.isclose(float(tior["mean"]["mean"]), details["mtiou"]["mtior"])


def test_missing_metric_names_the_metric():
    with pytest.raises(KeyError, match="mtiou"):
        LocalizationTable("mtiou")({})


def test_write_table_markdown_in_percent(tmp_path):
    csv_path, md_path = write_table(AUROCTable()(_auroc_details()), tmp_path / "t")
    assert csv_path.name == "t.csv" and md_path.name == "t.md"
    md = md_path.read_text()
    assert "| Nodule | 75.00 |" in md and "| Hernia | n/a |" in md
    assert not list(tmp_path.glob(".*tmp*"))


def test_report_writer_tables(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"auroc": 0.625, "mtiou": _localization_details()["mtiou"]["mtiou"]}
    engine.state.metric_details = {**_auroc_details(), **_localization_details()}
    writer = MetricsReportWriter(tmp_path, ["auroc", "mtiou"], filename="metrics_test", tables={
        "auroc": AUROCTable("auroc", {"abnormal": "abnormal_auroc"}), "tiou": LocalizationTable("mtiou", "tiou")})
    writer(engine)
    report = json.loads((tmp_path / "metrics_test.json").read_text())
    assert set(report["tables"]) == {"auroc", "tiou"}
    rows = _read_csv((tmp_path / "metrics_test_tiou.csv").read_text())
    assert math.isclose(float(rows[-1]["mean"]), report["metrics"]["mtiou"])
    assert report["tables"]["tiou"]["rows"][-1]["mean"] == pytest.approx(report["metrics"]["mtiou"])
    assert (tmp_path / "metrics_test_auroc.md").is_file()
    assert "## T(IoU)" in (tmp_path / "metrics_test.md").read_text()


# --------------------------------------------------------------------------- panels


def test_attention_panel_draws_boxes_where_expected():
    image = np.linspace(0, 1, 20 * 30).reshape(20, 30)
    tile = {"map": np.zeros((20, 30)), "gt_boxes": [[2.0, 3.0, 6.0, 5.0]], "pred_boxes": [[15, 10, 10, 8]],
            "caption": "Mass p=0.90"}
    panel = attention_panel(image, [tile], scale=2)
    assert panel.shape == (CAPTION_HEIGHT + 40, 2 * 60, 3)
    left, top = 60, CAPTION_HEIGHT
    # outlines on the boxes' border pixels (2 px wide at scale 2), nothing inside
    assert tuple(panel[top + 3 * 2, left + 4 * 2]) == GT_COLOUR  # top edge of the GT box
    assert tuple(panel[top + 7 * 2 + 1, left + 2 * 2 + 1]) == GT_COLOUR  # bottom-left corner (row 7, col 2)
    assert tuple(panel[top + 10 * 2, left + 20 * 2]) == PRED_COLOUR
    assert tuple(panel[top + 17 * 2 + 1, left + 24 * 2 + 1]) == PRED_COLOUR
    assert tuple(panel[top + 5 * 2, left + 4 * 2]) not in (GT_COLOUR, PRED_COLOUR)  # inside the GT box
    # the image tile carries no box
    image_tile = panel[top:, :left].reshape(-1, 3)
    assert not any((image_tile == c).all(1).any() for c in (GT_COLOUR, PRED_COLOUR))


def _panel_engine(outputs: list[dict]) -> Engine:
    return Engine(lambda engine, batch: outputs[engine.state.iteration - 1])


def test_panel_writer_boxes_files_and_limit(tmp_path):
    h = w = 16
    maps = torch.zeros(2, len(FINDINGS), h, w)
    mass, nodule = FINDINGS.index("Mass"), FINDINGS.index("Nodule")
    maps[0, mass, 2:6, 3:9] = 1.0  # refined maps: already 0/1
    maps[1, nodule, 8:12, 8:10] = 1.0
    logits = torch.full((2, 1 + len(FINDINGS)), -5.0)
    logits[0, 1 + mass] = 3.0  # Mass predicted on image a; Nodule on image b only through its GT box
    datalist = [{"case": "a", "boxes": {}, "original_size": [64, 32]},
                {"case": "b", "boxes": {"Nodule": [[8.0, 8.0, 2.0, 4.0]]}}]
    out = {"image": torch.rand(2, 3, h, w), "pred": logits, "map": maps}
    writer = AttentionPanelWriter(tmp_path, datalist, name="boxes_test", num_panels=1)
    engine = _panel_engine([out])
    writer.attach(engine)
    engine.run([{"case": ["a", "b"]}], max_epochs=1)
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["a.png"]  # num_panels = 1
    record = json.loads((tmp_path / "boxes_test.json").read_text())
    assert list(record["a"]) == ["Mass"] and record["a"]["Mass"]["boxes"] == [[3, 2, 6, 4]]
    assert record["a"]["Mass"]["boxes_original"] == [[12.0, 4.0, 24.0, 8.0]]  # x4 in x, x2 in y
    assert record["b"]["Nodule"]["gt_boxes"] == [[8.0, 8.0, 2.0, 4.0]]
    assert record["b"]["Nodule"]["boxes"] == [[8, 8, 2, 4]] and "boxes_original" not in record["b"]["Nodule"]
    rows = _read_csv((tmp_path / "boxes_test.csv").read_text())
    assert [(r["case"], r["finding"], r["x"], r["w"], r["x_original"]) for r in rows] == [
        ("a", "Mass", "3", "6", "12.0"), ("b", "Nodule", "8", "2", "")]
    from PIL import Image

    with Image.open(tmp_path / "panels" / "a.png") as im:
        assert im.size == (2 * w, CAPTION_HEIGHT + h)  # image + the Mass tile


# --------------------------------------------------------------------------- best checkpoints


def test_best_saver_never_saves_an_undefined_metric_and_removes_a_stale_file(tmp_path):
    net = torch.nn.Linear(2, 1)
    stale = tmp_path / "model_mtiou.pt"
    torch.save({"stale": torch.zeros(1)}, stale)
    saver = BestMetricSaver(str(tmp_path), net, "val_mtiou", filename="model_mtiou.pt")
    engine = Engine(lambda e, b: None)
    engine.state.epoch = 1
    engine.state.metrics = {"val_mtiou": float("nan")}
    saver(engine)
    assert not stale.exists() and saver.best_value is None
    engine.state.epoch, engine.state.metrics = 2, {"val_mtiou": 0.25}
    saver(engine)
    assert stale.is_file() and saver.best_epoch == 2
    engine.state.epoch, engine.state.metrics = 3, {"val_mtiou": float("nan")}
    saver(engine)  # a later NaN leaves this run's best file alone
    assert stale.is_file() and saver.best_epoch == 2
    state = torch.load(stale, weights_only=True)
    torch.testing.assert_close(state["weight"], net.weight)
