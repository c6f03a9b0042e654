"""End-to-end checks of bundles/lvmmed_seg3d_mmwhs on a tiny MM-WHS-format twin (CT).

Covers: demo training (checkpoints, TensorBoard metrics), evaluation (per-volume CSV whose means
equal the report, and whose IoU of label 420 is recomputed here from the trained network's argmax
over the stacked prepared slices), inference (one NIfTI per volume with the input label's shape and
affine, holding MM-WHS label values, equal to the network's argmax put back on the source grid),
torchrun with 2 CPU processes, resume after a killed training and the refusal of a resume with other
settings, verify_metadata / verify_net_in_out, ckpt_export (TorchScript equals eager) and one clear
line for a label with an unknown value. Commands other than torchrun and the killed run run in forks
of one interpreter (``bundle_utils.ForkedPython``).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.data import mmwhs
from custom_components.data.synthetic import write_mmwhs_twin
from custom_components.io import load_checkpoint

from bundle_utils import REPO, ForkedPython, config_arg, kill_once_checkpointed, torchrun_trains_one_epoch, verify_bundle

BUNDLE = REPO / "bundles" / "lvmmed_seg3d_mmwhs"
TINY = ["--image_size", "32", "--num_workers", "0", "--batch_size", "8", "--num_panel_images", "2"]
DEMO_DECODER = (64, 32, 16, 16, 8)
STORE = "data/prepared_mmwhs_ct_32"

pytestmark = pytest.mark.slow


def cmd(run_id: str, root: Path, data: Path, *extra: str, args=()) -> list[str]:
    return [
        "python", "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra),
        "--bundle_root", str(root), "--dataset_dir", str(data), *TINY, *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    forked = ForkedPython(tmp_path_factory.mktemp("forked"))
    yield forked
    forked.close()


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_mmwhs_twin(tmp_path_factory.mktemp("mmwhs"), n_per_split=(2, 1, 1), shape=(24, 20, 8), seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin, python) -> Path:
    root = tmp_path_factory.mktemp("root")
    python.run(cmd("training", root, twin, args=["--num_epochs", "1"]), cwd=BUNDLE)
    return root


def _demo_net():
    from custom_components.networks.encoder_init import lvmmed_unet

    return lvmmed_unet("scratch", None, backbone="resnet18", in_channels=1, out_channels=8, decoder_channels=DEMO_DECODER)


def test_training_outputs_and_tensorboard(trained):
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 1 and set(last) >= {"network", "optimizer", "best", "trainer"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "eval" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train_loss", "val_iou", "val_dice", "val_mean_dice", "val_iou_la_blood"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("segmentation/overlay")] == [1]
    datalist = json.loads((trained / STORE / "datalist.json").read_text())
    assert {k: len(v) for k, v in datalist.items()} == {"training": 2, "validation": 1, "test": 1}


def test_evaluate_and_infer_on_the_volume_grid(trained, twin, python):
    python.run(cmd("evaluating", trained, twin, "configs/evaluate.json"), cwd=BUNDLE)
    python.run(cmd("inferring", trained, twin, "configs/inference.json"), cwd=BUNDLE)
    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    rows = list(csv.DictReader((trained / "eval" / "scores_test.csv").open()))
    assert [r["case"] for r in rows] == ["ct_train_1002"]
    assert report["metrics"]["iou"] == pytest.approx(np.mean([float(r["iou_la_blood"]) for r in rows]), abs=1e-6)
    assert report["metrics"]["mean_dice"] == pytest.approx(np.mean([float(r["mean_dice"]) for r in rows]), abs=1e-6)

    net = _demo_net().eval()
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    case = trained / STORE / "ct_train_1002"
    image, mask = np.load(case / "image.npy"), np.load(case / "mask.npy")
    from custom_components.data.seg2d import scale_input

    with torch.no_grad():
        pred = net(torch.stack([scale_input(x, "imagenet") for x in image])).argmax(1).numpy()
    p, y = pred == 2, mask == 2  # 3-D IoU of label 420 on the stacked slices, closed form
    iou = 1.0 if not (p | y).any() else (p & y).sum() / (p | y).sum()
    assert float(rows[0]["iou_la_blood"]) == pytest.approx(iou, abs=1e-6)

    out = nib.load(trained / "eval" / "inference" / "test" / "ct_train_1002_pred.nii.gz")
    label = nib.load(twin / "ct_train" / "ct_train_1002_label.nii.gz")
    assert out.shape == label.shape
    np.testing.assert_allclose(out.affine, label.affine, atol=1e-5)
    from custom_components.data.scan_grid import load_grid, to_source

    expected = to_source(pred.astype(np.float32), range(len(pred)), load_grid(case / "meta.json"), mode="nearest")
    np.testing.assert_array_equal(np.asarray(out.dataobj), mmwhs.unmap_labels(np.rint(expected).astype(int)))
    index = list(csv.DictReader((trained / "eval" / "inference" / "predictions_test.csv").open()))
    assert [r["case"] for r in index] == ["ct_train_1002"]


def test_verify_metadata_and_net_in_out(monkeypatch):
    verify_bundle(BUNDLE, monkeypatch, config_file=["configs/train.json", "configs/demo.json"])


def test_ckpt_export_torchscript_matches_eager(trained, tmp_path, python):
    ts = tmp_path / "model.ts"
    python.run(["python", "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
                "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
                "--config_file", config_arg("configs/train.json", "configs/demo.json"),
                "--bundle_root", str(trained)], cwd=BUNDLE)  # fmt: skip
    net = _demo_net()
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), net.eval()(x), rtol=1e-4, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1", "--batch_size", "4"])
    command = [sys.executable, *command[1:]]
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29563)


def test_killed_training_resumes_and_other_settings_are_refused(tmp_path, twin, python):
    command = cmd("training", tmp_path, twin, args=["--num_epochs", "2", "--batch_size", "4", "--num_panel_images", "0"])
    killed = kill_once_checkpointed([sys.executable, *command[1:]], BUNDLE, tmp_path / "models" / "last.pt", 2)
    refused = python.run([*command, "--input_scaling", "reference_0_255"], cwd=BUNDLE, check=False)
    assert refused.returncode == 2 and "was trained with other settings" in refused.stderr
    assert "input_scaling" in refused.stderr and "Traceback" not in refused.stderr
    resumed = python.run(command, cwd=BUNDLE)
    assert f"at epoch {killed['trainer']['epoch']}" in resumed.stdout + resumed.stderr
    final = load_checkpoint(tmp_path / "models" / "last.pt")
    assert final["trainer"]["epoch"] == 2
    assert final["trainer"]["iteration"] == 2 * final["trainer"]["epoch_length"]


def test_unknown_label_value_gives_one_clear_error(tmp_path, twin, python):
    broken = tmp_path / "mmwhs"
    shutil.copytree(twin, broken)
    victim = broken / "ct_train" / "ct_train_1003_label.nii.gz"
    img = nib.load(victim)
    data = np.asarray(img.dataobj).copy()
    data[1, 1, 1] = 421
    nib.save(nib.Nifti1Image(data, img.affine, img.header), victim)
    proc = python.run(cmd("training", tmp_path / "root", broken), cwd=BUNDLE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {victim}: label values outside") and "421" in errors[0]
    assert "Traceback" not in proc.stderr
