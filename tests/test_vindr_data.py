"""VinDr-CXR reading: weighted boxes fusion in closed form, CSV parsing, preparation, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from custom_components.data import vindr
from custom_components.detection.wbf import box_iou_xyxy, weighted_boxes_fusion
from custom_components.io import InputDataError

HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"


def test_wbf_identical_boxes_fuse_to_the_box():
    b = [10.0, 20.0, 30.0, 50.0]
    boxes, scores, labels = weighted_boxes_fusion([[b], [b], [b]], iou_thr=0.2)
    np.testing.assert_allclose(boxes, [b])
    assert scores.tolist() == [1.0] and labels.tolist() == [0]


def test_wbf_two_readers_average_and_score_rescaling():
    # IoU([0,0,10,10], [0,0,10,20]) = 100/200 = 0.5 > 0.2: one cluster, mean of the corners
    boxes, scores, _ = weighted_boxes_fusion([[[0, 0, 10, 10]], [[0, 0, 10, 20]]], iou_thr=0.2)
    np.testing.assert_allclose(boxes, [[0, 0, 10, 15]])
    assert scores.tolist() == [1.0]
    # three sources, only two agree: score = 1 * min(3, 2) / 3
    boxes, scores, _ = weighted_boxes_fusion([[[0, 0, 10, 10]], [[0, 0, 10, 20]], []], iou_thr=0.2)
    np.testing.assert_allclose(scores, [2 / 3])
    # confidence-weighted corners: scores 0.75 and 0.25 -> y_max = 0.75*10 + 0.25*20 = 12.5, mean conf 0.5
    boxes, scores, _ = weighted_boxes_fusion([[[0, 0, 10, 10]], [[0, 0, 10, 20]]], [[0.75], [0.25]], iou_thr=0.2)
    np.testing.assert_allclose(boxes, [[0, 0, 10, 12.5]])
    np.testing.assert_allclose(scores, [0.5])


def test_wbf_threshold_is_strict_labels_separate_and_skip():
    # IoU exactly 0.2: [0,0,10,10] vs [0,0,10,2] -> 20/100 = 0.2, not > 0.2: two boxes
    a, b = [0, 0, 10, 10], [0, 0, 10, 2]
    assert box_iou_xyxy(np.array(a, float), np.array([b], float))[0] == pytest.approx(0.2)
    boxes, _, _ = weighted_boxes_fusion([[a], [b]], iou_thr=0.2)
    assert len(boxes) == 2
    boxes, _, _ = weighted_boxes_fusion([[a], [b]], iou_thr=0.19)
    assert len(boxes) == 1
    # same box, different labels: never fused
    boxes, _, labels = weighted_boxes_fusion([[a], [a]], labels_list=[[0], [3]], iou_thr=0.2)
    assert sorted(labels.tolist()) == [0, 3] and len(boxes) == 2
    # a box scored below skip_box_thr is ignored
    boxes, scores, _ = weighted_boxes_fusion([[a], [[0, 0, 10, 20]]], [[1.0], [1e-5]], iou_thr=0.2, skip_box_thr=1e-4)
    np.testing.assert_allclose(boxes, [a])
    np.testing.assert_allclose(scores, [0.5])
    empty = weighted_boxes_fusion([[], []])
    assert empty[0].shape == (0, 4)


def _write(tmp_path, text):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + text)
    return path


def test_read_csv_order_no_finding_and_fusion(tmp_path):
    path = _write(tmp_path, "b,No finding,14,R1,,,,\n"
                            "a,Cardiomegaly,3,R1,10,20,30,40\n"
                            "b,No finding,14,R2,,,,\n"
                            "a,Cardiomegaly,3,R2,10,20,30,50\n"
                            "a,Nodule/Mass,8,R2,50,50,60,60\n")
    ann = vindr.read_vindr_csv(path)
    assert list(ann) == ["b", "a"] and ann["b"] == []
    assert [b.label for b in ann["a"]] == [3, 3, 8]
    boxes, labels = vindr.fuse_readers(ann["a"])
    assert labels == [3, 8]
    np.testing.assert_allclose(boxes, [[10, 20, 30, 45], [50, 50, 60, 60]])


def test_csv_order_split():
    s = vindr.csv_order_split([str(i) for i in range(10)])
    assert s == {"training": [str(i) for i in range(7)], "validation": ["7"], "test": ["8", "9"]}


@pytest.mark.parametrize(
    "row, problem",
    [
        ("a,Cardiomegally,3,R1,1,2,3,4\n", "unknown class name 'Cardiomegally'"),
        ("a,Cardiomegaly,4,R1,1,2,3,4\n", "class_id 4 does not match"),
        ("a,Cardiomegaly,3,R1,5,2,3,4\n", "x_min < x_max"),
        ("a,Cardiomegaly,3,R1,1,x,3,4\n", "y_min 'x' is not a number"),
    ],
)
def test_bad_rows_one_line_naming_the_file(tmp_path, row, problem):
    path = _write(tmp_path, row)
    with pytest.raises(InputDataError) as e:
        vindr.read_vindr_csv(path)
    assert str(path) in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)


def test_missing_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("image_id,class_name,x_min,y_min,x_max,y_max\n")
    with pytest.raises(InputDataError, match="rad_id"):
        vindr.read_vindr_csv(path)


def test_prepare_twin_rescales_and_resumes(tmp_path):
    from custom_components.data.synthetic import write_vindr_twin

    root = write_vindr_twin(tmp_path / "vindr", n_images=8, size=40, seed=1, n_dicom=1)
    ann = vindr.read_vindr_csv(root / "train.csv")
    assert sum(1 for b in ann.values() if not b) == 2  # images 3 and 7: "No finding"
    path = vindr.prepare_vindr(root, tmp_path / "prep", image_size=32, progress=False)
    data = json.loads(path.read_text())
    assert [len(data[k]) for k in ("training", "validation", "test")] == [6, 1, 1]
    ids = [e["image_id"] for k in ("training", "validation", "test") for e in data[k]]
    assert ids == list(ann)  # CSV order
    first = data["training"][0]
    fused, _ = vindr.fuse_readers(ann[first["image_id"]])
    # the twin is 40 wide and 50 high: x scales by 32/40, y by 32/50
    np.testing.assert_allclose(first["box"][0], np.array(fused[0]) * [0.8, 0.64, 0.8, 0.64], atol=1e-3)
    assert data["training"][3]["box"] == [] and data["training"][3]["label"] == []
    # resume: a removed image is written again, the others are kept
    png = tmp_path / "prep" / first["image"]
    marker = png.with_suffix(".json")
    marker.unlink()
    png.unlink()
    mtime = (tmp_path / "prep" / data["training"][1]["image"]).stat().st_mtime_ns
    vindr.prepare_vindr(root, tmp_path / "prep", image_size=32, progress=False)
    assert png.is_file() and (tmp_path / "prep" / data["training"][1]["image"]).stat().st_mtime_ns == mtime
    with pytest.raises(InputDataError, match="prepared with"):
        vindr.prepare_vindr(root, tmp_path / "prep", image_size=16, progress=False)
    assert vindr.prepare_vindr(root, tmp_path / "prep", image_size=16, progress=False, overwrite=True).is_file()


def test_box_outside_image_and_unreadable_image(tmp_path):
    from PIL import Image

    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "train" / "a.png")
    (tmp_path / "train.csv").write_text(HEADER + "a,Cardiomegaly,3,R1,10,5,35,15\n")
    with pytest.raises(InputDataError) as e:
        vindr.prepare_vindr(tmp_path, tmp_path / "prep", image_size=16, progress=False)
    assert "train.csv" in str(e.value) and "outside the 30x20 image" in str(e.value)
    # within the tolerance but beyond the border: clamped to the image it would have no area
    (tmp_path / "train.csv").write_text(HEADER + "a,Cardiomegaly,3,R1,30.2,5,30.8,15\n")
    with pytest.raises(InputDataError, match="has no area"):
        vindr.prepare_vindr(tmp_path, tmp_path / "prep_border", image_size=16, progress=False)
    (tmp_path / "train" / "a.png").write_bytes(b"not a png")
    with pytest.raises(InputDataError) as e:
        vindr.prepare_vindr(tmp_path, tmp_path / "prep2", image_size=16, progress=False)
    assert "a.png" in str(e.value)
    (tmp_path / "train" / "a.png").unlink()
    (tmp_path / "train" / "a.dicom").write_bytes(b"\0" * 200)
    with pytest.raises(InputDataError) as e:
        vindr.prepare_vindr(tmp_path, tmp_path / "prep3", image_size=16, progress=False)
    assert "a.dicom" in str(e.value) and "unreadable DICOM" in str(e.value)
    (tmp_path / "train" / "a.dicom").unlink()
    with pytest.raises(InputDataError, match="not found"):
        vindr.prepare_vindr(tmp_path, tmp_path / "prep4", image_size=16, progress=False)


def test_nih_box_list_store(tmp_path):
    from custom_components.data.synthetic import write_nihcxr14_twin

    root = write_nihcxr14_twin(tmp_path / "nih", n_images=24, size=32, seed=0)
    path = vindr.prepare_nih_boxes(root, tmp_path / "prep", image_size=16, progress=False)
    data = json.loads(path.read_text())
    assert data["classes"] == list(vindr.NIH_BOX_CLASSES) and len(data["classes"]) == 8
    entries = data["training"] + data["validation"] + data["test"]
    assert entries and all(e["box"] and max(e["label"]) < 8 for e in entries)
    # boxes [x, y, w, h] in 32 px -> [x0, y0, x1, y1] in 16 px
    from custom_components.data.nihcxr14 import read_bbox_list

    raw = read_bbox_list(root / "BBox_List_2017.csv")
    name = entries[0]["image_id"] + ".png"
    x, y, w, h = next(iter(raw[name].values()))[0]
    np.testing.assert_allclose(entries[0]["box"][0], [x / 2, y / 2, (x + w) / 2, (y + h) / 2], atol=1e-3)


def test_make_synthetic_vindr_command(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["vindr", "--output_dir", str(tmp_path / "v"), "--n_images", "4", "--size", "24"]) in (0, None)
    ann = vindr.read_vindr_csv(tmp_path / "v" / "train.csv")
    assert len(ann) == 4 and all((tmp_path / "v" / "train" / f"{i}.png").is_file() for i in ann)
