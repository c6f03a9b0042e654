"""The lvmmed_det_vindr bundle on its VinDr-CXR format twin: demo training (losses, mAP and box
overlays in TensorBoard), evaluation tables, inference JSON and overlays, verify_metadata,
verify_net_in_out, ckpt_export (traced, equal to eager), torchrun with 2 CPU processes, resume after a
killed training and refusal of other settings, one clear line for a bad input."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_components.data.synthetic import write_vindr_twin
from custom_components.data.vindr import CLASSES
from custom_components.io import load_checkpoint

from bundle_utils import REPO, ForkedPython, config_arg, resumes_after_kill, torchrun_trains_one_epoch, verify_bundle

BUNDLE = REPO / "bundles" / "lvmmed_det_vindr"
TINY = ["--image_size", "32", "--num_workers", "0"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    f = ForkedPython(tmp_path_factory.mktemp("forked_python"))
    yield f
    f.close()


def cmd(run_id: str, bundle_root: Path, dataset_dir: Path, *extra_configs: str, args=()) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra_configs),
        "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset_dir), *TINY, *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_vindr_twin(tmp_path_factory.mktemp("vindr_twin"), n_images=16, size=40, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin, forked) -> Path:
    root = tmp_path_factory.mktemp("bundle_root")
    forked.run(cmd("training", root, twin, args=["--num_epochs", "1"]), cwd=BUNDLE)
    return root


def test_training_outputs_and_tensorboard(trained):
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 1 and {"network", "optimizer", "best"} <= set(last)
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("retinanet.classification_head") for k in state)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((trained / "eval" / "tensorboard").glob("events.out.tfevents.*"))))
    acc.Reload()
    tags = acc.Tags()
    assert {"train_loss", "train_loss_cls", "train_loss_box", "val_map50", "val_map"} <= set(tags["scalars"])
    assert all(np.isfinite(e.value) for e in acc.Scalars("train_loss"))
    assert "val_boxes/0" in tags["images"]


def test_evaluate_tables_and_inference_outputs(trained, twin, forked):
    forked.run(cmd("evaluating", trained, twin, "configs/evaluate.json"), cwd=BUNDLE)
    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    per_class = report["per_class"]
    assert list(per_class) == list(CLASSES)
    with_gt = [v for v in per_class.values() if v["n_gt"] > 0]
    assert with_gt and all(v["ap50"] is not None and 0 <= v["ap50"] <= 1 for v in with_gt)
    assert all(v["ap50"] is None for v in per_class.values() if v["n_gt"] == 0)
    # overall = mean over the classes with ground truth (not MONAI's mean including -1)
    assert report["metrics"]["map50"] == pytest.approx(np.mean([v["ap50"] for v in with_gt]))
    assert report["metrics"]["map"] == pytest.approx(np.mean([v["map"] for v in with_gt]))
    rows = list(csv.DictReader((trained / "eval" / "metrics_test.csv").open()))
    assert [r["class"] for r in rows[:-1]] == list(CLASSES) and rows[-1]["class"].startswith("overall")
    md = (trained / "eval" / "metrics_test.md").read_text()
    assert "| AP@0.5 (%) |" in md and "n/a" in md
    datalist = json.loads((trained / "data" / "prepared_vindr_32" / "datalist.json").read_text())
    assert sum(int(r["n_gt"]) for r in rows[:-1]) == sum(len(e["box"]) for e in datalist["test"])

    forked.run(cmd("inferring", trained, twin, "configs/inference.json"), cwd=BUNDLE)
    out = trained / "eval" / "inference"
    boxes = json.loads((out / "boxes_test.json").read_text())
    assert [e["image_id"] for e in boxes["test"]] == [e["image_id"] for e in datalist["test"]]
    for e in boxes["test"]:
        assert len(e["box"]) == len(e["label"]) == len(e["label_scores"]) == len(e["class_name"])
        assert all(len(b) == 4 and b[0] <= b[2] and b[1] <= b[3] for b in e["box"])
    rows = list(csv.DictReader((out / "predictions_test.csv").open()))
    assert len(rows) == sum(len(e["box"]) for e in boxes["test"])
    overlays = sorted((out / "overlays_test").glob("*.png"))
    assert len(overlays) == len(datalist["test"])
    from PIL import Image

    with Image.open(overlays[0]) as im:
        assert im.size == (256, 256)  # 32 px x scale 8


def test_verify_metadata_and_net_in_out(monkeypatch):
    verify_bundle(BUNDLE, monkeypatch)  # the paper-size ResNet-50 FPN on a 64 x 64 input


def test_ckpt_export_traced_matches_eager(trained, tmp_path, forked):
    ts = tmp_path / "model.ts"
    forked.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
                "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
                "--config_file", config_arg("configs/train.json", "configs/demo.json"), "--image_size", "32",
                "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]"], cwd=BUNDLE)  # fmt: skip
    from custom_components.detection.retinanet import detection_network

    demo = json.loads((BUNDLE / "configs" / "demo.json").read_text())
    eager = detection_network(14, arch=demo["arch"], returned_layers=demo["returned_layers"],
                              fpn_channels=demo["fpn_channels"])
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    traced = torch.jit.load(str(ts))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = traced(x)
        assert isinstance(out, torch.Tensor) and out.shape[:2] == (2, 18)
        torch.testing.assert_close(out, eager.eval()(x), rtol=1e-4, atol=1e-4)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1"])
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29547)


def test_killed_training_resumes_and_other_settings_are_refused(tmp_path, twin, forked):
    epochs = 12
    command = cmd("training", tmp_path, twin, args=["--num_epochs", str(epochs)])
    resumes_after_kill(command, BUNDLE, tmp_path / "models" / "last.pt", epochs)
    proc = forked.run([*command, "--learning_rate", "0.5"], cwd=BUNDLE, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was trained with other settings" in errors[0] and "learning_rate" in errors[0]


def test_bad_inputs_give_one_clear_line(tmp_path, twin, forked):
    broken = tmp_path / "VinDr"
    shutil.copytree(twin, broken)
    table = broken / "train.csv"
    lines = table.read_text().splitlines()
    lines[1] = lines[1].replace(CLASSES[0], "Aortic enlargment")
    table.write_text("\n".join(lines) + "\n")
    proc = forked.run(cmd("training", tmp_path / "root", broken), cwd=BUNDLE, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {table}: row 2: unknown class name 'Aortic enlargment' "
                      f"(VinDr-CXR: {', '.join((*CLASSES, 'No finding'))})"]
