"""scripts/compare_init.py on the Kvasir-SEG twin: demo settings, 1 seed, scratch vs lvmmed; resumable."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from custom_components.data.synthetic import write_kvasir_seg_twin

from bundle_utils import REPO, subprocess_env

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "compare_init.py"


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(), cwd=REPO)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_compare_two_inits_one_seed_and_resume(tmp_path):
    from monai.networks.nets import ResNet

    twin = write_kvasir_seg_twin(tmp_path / "kvasir", n_images=10, size=40, seed=2)
    torch.manual_seed(0)
    src = ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3, num_classes=1000,
                 shortcut_type="A", bias_downsample=False)  # fmt: skip
    weights = tmp_path / "lvmmed_resnet18.torch"
    torch.save(src.state_dict(), weights)
    out = tmp_path / "cmp"
    args = ["lvmmed_seg2d_kvasir", "--dataset_dir", str(twin), "--seeds", "1", "--demo", "--inits", "scratch,lvmmed",
            "--pretrained_path", str(weights), "--output_dir", str(out), "--image_size", "32", "--num_epochs", "1",
            "--num_panel_images", "0"]  # fmt: skip
    first = _run(args)
    assert "scratch seed 42 ..." in first.stdout and "lvmmed seed 42 ..." in first.stdout
    log = (out / "lvmmed_seed42" / "log.txt").read_text()
    assert f"loaded {len(src.state_dict()) - 2} tensors from {weights.resolve()}" in log
    assert "encoder initialisation: scratch" in (out / "scratch_seed42" / "log.txt").read_text()
    assert "tensors from" not in (out / "scratch_seed42" / "log.txt").read_text()
    rows = {r["init"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert list(rows) == ["scratch", "lvmmed"]
    for init, row in rows.items():
        metrics = json.loads((out / f"{init}_seed42" / "eval" / "metrics_test.json").read_text())["metrics"]
        assert float(row["dice_mean"]) == pytest.approx(metrics["dice"]) and float(row["iou_std"]) == 0.0
    table = (out / "comparison.md").read_text()
    assert "| init | seeds | dice | iou |" in table and f"{100 * metrics['dice']:.2f}" in table
    # one shared prepared store
    assert (out / "prepared" / "datalist.json").is_file() and not (out / "scratch_seed42" / "data").exists()
    # a second call reruns nothing
    mtime = (out / "lvmmed_seed42" / "eval" / "metrics_test.json").stat().st_mtime_ns
    again = _run(args)
    assert again.stdout.count("done before, not rerun") == 2
    assert (out / "lvmmed_seed42" / "eval" / "metrics_test.json").stat().st_mtime_ns == mtime


def test_missing_encoder_file_stops_before_any_run(tmp_path):
    proc = _run(["lvmmed_seg2d_kvasir", "--dataset_dir", str(tmp_path), "--inits", "lvmmed", "--output_dir",
                 str(tmp_path / "cmp")], check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--pretrained_path FILE" in proc.stderr and not (tmp_path / "cmp").exists()
