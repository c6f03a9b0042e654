"""bundles/lgmvit_lits17 on a tiny LiTS-format twin: scan-chunked training, evaluation, inference,
metadata and network checks (the workflow machinery itself is covered by the BraTS bundle tests)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_components.data.synthetic import write_lits17_twin
from custom_components.io import load_checkpoint

from bundle_utils import REPO, SCHEMA, bundle_cmd, run, verify_bundle

BUNDLE = REPO / "bundles" / "lgmvit_lits17"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_lits17_twin(tmp_path_factory.mktemp("lits_twin"), n_per_split=(3, 2, 2), shape=(48, 48, 20), seed=2)


def test_train_evaluate_infer(tmp_path, twin):
    # the reference batching: consecutive 16-slice chunks of one scan, last-chunk crop for training
    run(bundle_cmd("training", tmp_path, twin, args=["--num_epochs", "2", "--scan_chunked", "true"]), cwd=BUNDLE)
    assert load_checkpoint(tmp_path / "models" / "last.pt")["trainer"]["epoch"] == 2
    datalist = json.loads((tmp_path / "data" / "prepared_organ_32" / "datalist.json").read_text())
    meta = json.loads((tmp_path / "data" / "prepared_organ_32" / datalist["test"][0]["case"] / "meta.json").read_text())
    assert meta["target"] == "organ"

    run(bundle_cmd("evaluating", tmp_path, twin, "configs/evaluate.json"), cwd=BUNDLE)
    report = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    assert report["n_samples"] == sum(c["n_slices"] for c in datalist["test"])
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0

    run(bundle_cmd("inferring", tmp_path, twin, "configs/inference.json"), cwd=BUNDLE)
    out = tmp_path / "eval" / "inference"
    assert len((out / "predictions.csv").read_text().strip().splitlines()) == 1 + report["n_samples"]
    for case in datalist["test"]:
        # on the CT's own grid (48 x 48 x 20 twin, per-volume spacing), not the prepared 32 x 32 slices
        vol = nib.load(out / "maps" / f"{case['case']}_eafem.nii.gz")
        source = nib.load(twin / "scans" / f"{case['case']}.nii")
        assert vol.shape == source.shape and (vol.affine == source.affine).all()


def test_lesion_target_prepares_tumour_labels(tmp_path, twin):
    run(bundle_cmd("training", tmp_path, twin, args=["--num_epochs", "1", "--target", "lesion"]), cwd=BUNDLE)
    datalist = json.loads((tmp_path / "data" / "prepared_lesion_32" / "datalist.json").read_text())
    cases = [c for split in ("training", "validation", "test") for c in datalist[split]]
    assert cases
    for case in cases:  # the bundle's `target` reaches preparation: positives = slices with tumour (label 2)
        number = case["case"].split("-")[1]
        seg = np.asarray(nib.load(str(next((twin / "segmentations").glob(f"segmentation-{number}.nii*")))).dataobj)
        assert case["n_positive"] == int((seg == 2).any(axis=(0, 1)).sum())


def test_verify_metadata_and_net_in_out(monkeypatch):
    if not SCHEMA.is_file():
        pytest.skip("shared schema not present")
    verify_bundle(BUNDLE, monkeypatch)


def test_competing_method_configs_merge_and_train(tmp_path, twin):
    # RES-L is the most involved override (learned imputation net in the optimizer and checkpoint)
    run(bundle_cmd("training", tmp_path, twin, "configs/methods/res_l.json", args=["--num_epochs", "1"]), cwd=BUNDLE)
    last = load_checkpoint(tmp_path / "models" / "last.pt")
    assert any(k.startswith("imputer.") for k in last["guidance"]), sorted(last["guidance"])
    methods = sorted(p.stem for p in (BUNDLE / "configs" / "methods").glob("*.json"))
    assert methods == ["baseline", "gradmask", "lgmvit", "res_g", "res_l", "robustvit"]
