"""bundles/ham_nihcxr14 explain + evaluate_explanations + the HTML report, for HAM and the CAM baseline.

On the tiny NIH ChestX-ray14-format twin (demo.json's ResNet-18 at 32 x 32, as
tests/test_bundle_ham_nihcxr14.py), each workflow in a subprocess: the explanations are one item per
(test image, finding with a box), their masks the finding's boxes, the scores carry TIoU / TIoR and
per-finding rows, TensorBoard gets the map panels, and the report opens in headless Chromium
(skipped without a Chromium binary, as tests/test_explanation_report.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_explanation_report import dump_dom, find_chromium, parse

from custom_components.data.nihcxr14 import FINDINGS, boxes_to_masks
from custom_components.data.synthetic import write_nihcxr14_twin

from bundle_utils import REPO, config_arg
from bundle_utils import run as _run

BUNDLE = REPO / "bundles" / "ham_nihcxr14"
TINY = ["--image_size", "32", "--num_workers", "0"]
HAM_METHODS = ["ham", "gradcam", "gradcampp"]
BASELINE_METHODS = ["gradcam", "gradcampp"]

pytestmark = pytest.mark.slow


def cmd(run_id: str, bundle_root: Path, dataset_dir: Path, *configs: str, args=()) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *configs),
        "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset_dir), *TINY, *args,
    ]  # fmt: skip


def run(command):
    return _run(command, cwd=BUNDLE)


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_nihcxr14_twin(tmp_path_factory.mktemp("nih_twin"), n_images=32, size=48, seed=1)


@pytest.fixture(scope="module")
def ham_root(tmp_path_factory, twin) -> Path:
    root = tmp_path_factory.mktemp("ham_root")
    run(cmd("training", root, twin, args=["--num_epochs", "2"]))
    run(cmd("explaining", root, twin, "configs/explain.json"))
    run(cmd("evaluating_explanations", root, twin, "configs/evaluate_explanations.json",
            args=["--faithfulness_steps", "2"]))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def baseline_root(tmp_path_factory, twin) -> Path:
    root = tmp_path_factory.mktemp("baseline_root")
    base = "configs/methods/baseline.json"
    run(cmd("training", root, twin, base, args=["--num_epochs", "1"]))
    run(cmd("explaining", root, twin, base, "configs/explain.json"))
    run(cmd("evaluating_explanations", root, twin, base, "configs/evaluate_explanations.json",
            args=["--faithfulness_steps", "0"]))  # fmt: skip
    return root


def expected_cases(root: Path) -> list[tuple[dict, str]]:
    test = json.loads((root / "data" / "prepared_32" / "datalist_box_fold1.json").read_text())["test"]
    return [(e, f) for e in test for f in FINDINGS if e["boxes"].get(f)]


def test_ham_explanations_are_the_box_cases(ham_root):
    folder = ham_root / "eval" / "explanations"
    index = json.loads((folder / "index.json").read_text())
    cases = expected_cases(ham_root)
    assert cases, "the twin's box fold test split has boxes"
    assert index["target"] == "per_item" and index["activation"] == "sigmoid" and index["init"] == "ham"
    assert index["methods"] == HAM_METHODS and index["n_images"] == len(cases)
    masks = np.load(folder / "masks.npy")
    for k, ((entry, finding), item) in enumerate(zip(cases, index["items"], strict=True)):
        assert item["image"] == entry["image"] and item["target_name"] == finding
        assert item["target"] == 1 + FINDINGS.index(finding) and item["case"] == f"{entry['case']}/{finding}"
        assert item["label"] == entry["label"][FINDINGS.index(finding)] and item["has_mask"]
        box_mask = boxes_to_masks({finding: entry["boxes"][finding]}, (32, 32))[FINDINGS.index(finding)]
        np.testing.assert_array_equal(masks[k], box_mask)
    for m in HAM_METHODS:
        maps = np.load(folder / "maps" / f"{m}.npy")
        assert maps.shape == (len(cases), 32, 32) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_ham_scores_and_tensorboard_panels(ham_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((ham_root / "eval" / "explanation_metrics.json").read_text())
    keys = {"pointing_game", "iou_top5", "iou_top10", "iou_top20", "iou_top40", "energy_pointing_game", "loc_iou",
            "loc_ior", "deletion_auc", "insertion_auc", "mtiou", "mtior",
            *(f"tiou_{t}" for t in ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7")),
            *(f"tior_{t}" for t in ("0.1", "0.25", "0.5", "0.75", "0.9"))}  # fmt: skip
    assert set(summary["metrics"]) == set(HAM_METHODS)
    assert all(set(v) == keys for v in summary["metrics"].values())
    findings = sorted({f for _, f in expected_cases(ham_root)}, key=FINDINGS.index)
    assert list(summary["per_target"]["ham"]) == findings
    assert summary["localization"]["threshold"] == pytest.approx(0.4 + np.log(999) / 100)
    assert (ham_root / "eval" / "explanation_metrics_per_target.csv").is_file()
    assert "## Per target" in (ham_root / "eval" / "explanation_metrics.md").read_text()
    acc = EventAccumulator(str(ham_root / "eval" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"explain/image", "explain/mask", *(f"explain/{m}" for m in HAM_METHODS)} <= set(acc.Tags()["images"])


def test_baseline_explains_with_gradcam(baseline_root):
    index = json.loads((baseline_root / "eval" / "explanations" / "index.json").read_text())
    assert index["init"] == "baseline" and index["methods"] == BASELINE_METHODS
    assert [it["target"] for it in index["items"]] == [1 + FINDINGS.index(f) for _, f in expected_cases(baseline_root)]
    summary = json.loads((baseline_root / "eval" / "explanation_metrics.json").read_text())
    assert set(summary["metrics"]) == set(BASELINE_METHODS) and summary["faithfulness"] is None
    assert "mtiou" in summary["metrics"]["gradcam"]


def test_report_of_ham_and_baseline_opens_in_chromium(ham_root, baseline_root, tmp_path):
    out = tmp_path / "report.html"
    proc = _run([sys.executable, str(REPO / "scripts" / "explanation_report.py"),
                 "--runs", f"{ham_root / 'eval'},{baseline_root / 'eval'}", "--out", str(out)], cwd=BUNDLE)  # fmt: skip
    assert "2 runs" in proc.stdout
    n_cases = len(expected_cases(ham_root))
    n_images = n_cases * (2 + len(HAM_METHODS)) + n_cases * (2 + len(BASELINE_METHODS))
    doc = parse(out.read_text())
    assert len(doc.images) == n_images
    assert len(doc.rows) == len(HAM_METHODS) + len(BASELINE_METHODS) and "mtiou" in doc.header_keys
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (apt-get install chromium)")
    dom, stderr = dump_dom(chromium, out, "#sort=mtiou:desc", tmp_path / "profile")
    shown = parse(dom)
    assert shown.html_attrs.get("data-js-errors") == "0", stderr[-3000:]
    assert shown.html_attrs.get("data-images-loaded") == shown.html_attrs.get("data-images-total") == str(n_images)
    assert shown.html_attrs.get("data-sorted") == "mtiou:desc"
    col = shown.header_keys.index("mtiou")
    values = [float(r[col]["attrs"]["data-value"]) for r in shown.rows]
    assert values == sorted(values, reverse=True)
