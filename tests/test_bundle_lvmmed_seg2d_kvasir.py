"""End-to-end checks of bundles/lvmmed_seg2d_kvasir on a tiny Kvasir-SEG-format twin.

Covers: demo training (checkpoints, TensorBoard loss / Dice / IoU and overlays), evaluation (per-image
CSV whose means equal the reported Dice / IoU, recomputed here from the written masks), inference
(mask PNGs equal to the network's argmax, overlays, index CSV), training from an LVM-Med file written
by a MONAI ResNet (tensor count logged, encoder weights equal the file's before training),
torchrun with 2 CPU processes, resume after a killed training and the refusal of a resume with other
settings, verify_metadata / verify_net_in_out, ckpt_export (TorchScript equals eager) and one clear
line for a mask whose size differs from its image. Commands other than torchrun run in forks of one
interpreter (``bundle_utils.ForkedPython``).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_components.data.synthetic import write_kvasir_seg_twin
from custom_components.io import load_checkpoint

from bundle_utils import REPO, ForkedPython, config_arg, kill_once_checkpointed, torchrun_trains_one_epoch, verify_bundle

BUNDLE = REPO / "bundles" / "lvmmed_seg2d_kvasir"
TINY = ["--image_size", "32", "--num_workers", "0", "--batch_size", "8", "--num_panel_images", "2"]
DEMO_DECODER = (64, 32, 16, 16, 8)

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
    return write_kvasir_seg_twin(tmp_path_factory.mktemp("kvasir_seg"), n_images=12, size=48, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin, python) -> Path:
    root = tmp_path_factory.mktemp("root")
    python.run(cmd("training", root, twin, args=["--num_epochs", "2"]), cwd=BUNDLE)
    return root


def _demo_net():
    from custom_components.networks.encoder_init import lvmmed_unet

    return lvmmed_unet("scratch", None, backbone="resnet18", decoder_channels=DEMO_DECODER)


def test_training_outputs_and_tensorboard(trained):
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2 and set(last) >= {"network", "optimizer", "best", "trainer"}
    assert last["best"]["best_epoch"] in (1, 2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "eval" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train_loss", "val_dice", "val_iou"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("segmentation/overlay")] == [1, 2]
    datalist = json.loads((trained / "data" / "prepared_kvasir_32" / "datalist.json").read_text())
    assert {k: len(v) for k, v in datalist.items()} == {"training": 8, "validation": 2, "test": 2}


def test_evaluate_and_infer_agree_with_the_written_masks(trained, twin, python):
    python.run(cmd("evaluating", trained, twin, "configs/evaluate.json"), cwd=BUNDLE)
    python.run(cmd("inferring", trained, twin, "configs/inference.json"), cwd=BUNDLE)
    from PIL import Image

    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    rows = list(csv.DictReader((trained / "eval" / "scores_test.csv").open()))
    store = trained / "data" / "prepared_kvasir_32"
    test = json.loads((store / "datalist.json").read_text())["test"]
    assert [r["case"] for r in rows] == [e["case"] for e in test]
    assert report["metrics"]["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-6)
    assert report["metrics"]["iou"] == pytest.approx(np.mean([float(r["iou"]) for r in rows]), abs=1e-6)
    out = trained / "eval" / "inference"
    index = list(csv.DictReader((out / "predictions_test.csv").open()))
    assert [r["case"] for r in index] == [e["case"] for e in test]
    net = _demo_net().eval()
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    from custom_components.data.seg2d import scale_input

    for row, entry in zip(rows, test, strict=True):
        pred = np.asarray(Image.open(out / "test" / "masks" / f"{entry['case']}.png")) > 0
        gt = np.asarray(Image.open(store / entry["label"])) > 0
        # the CSV's Dice / IoU are those of the written mask (independent closed forms here)
        inter, total, union = (pred & gt).sum(), pred.sum() + gt.sum(), (pred | gt).sum()
        dice = 1.0 if total == 0 else 2 * inter / total
        iou = 1.0 if union == 0 else inter / union
        assert float(row["dice"]) == pytest.approx(dice, abs=1e-6) and float(row["iou"]) == pytest.approx(iou, abs=1e-6)
        # the written mask is the argmax of the trained network on the prepared image
        image = np.asarray(Image.open(store / entry["image"]).convert("RGB")).transpose(2, 0, 1)
        with torch.no_grad():
            logits = net(scale_input(image, "imagenet")[None])
        np.testing.assert_array_equal(pred, logits.argmax(1)[0].numpy() == 1)
        with Image.open(out / "test" / "overlays" / f"{entry['case']}.png") as im:
            assert im.size == (32, 32) and im.mode == "RGB"


def test_lvmmed_init_from_a_monai_resnet_file(tmp_path, twin, python):
    from monai.networks.nets import ResNet

    torch.manual_seed(3)
    src = ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3, num_classes=1000,
                 shortcut_type="A", bias_downsample=False)  # fmt: skip
    weights = tmp_path / "lvmmed_resnet18.torch"
    torch.save(src.state_dict(), weights)
    root = tmp_path / "lvmmed"
    args = ["--pretrained_path", str(weights), "--num_epochs", "1", "--learning_rate", "0"]
    run = python.run(cmd("training", root, twin, "configs/init/lvmmed.json", args=args), cwd=BUNDLE)
    n = len(src.state_dict()) - 2  # all but fc.weight / fc.bias
    assert f"loaded {n} tensors from {weights}" in run.stdout + run.stderr
    state = load_checkpoint(root / "models" / "last.pt")["network"]
    # lr 0: the weights stay the file's (BN running statistics move in training mode)
    for k, v in src.state_dict().items():
        if not k.startswith("fc.") and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(state[f"encoder.{k}"], v, rtol=0, atol=0)
    wrong = tmp_path / "wrong.torch"
    torch.save({k: v for k, v in src.state_dict().items() if k != "layer3.1.conv2.weight"}, wrong)
    proc = python.run(cmd("training", tmp_path / "wrong", twin, "configs/init/lvmmed.json",
                          args=["--pretrained_path", str(wrong)]), cwd=BUNDLE, check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {wrong}: not this ResNet: missing ['layer3.1.conv2.weight']" in proc.stderr


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
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), net.eval()(x), rtol=1e-4, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1", "--batch_size", "4"])
    command = [sys.executable, *command[1:]]
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29553)


def test_killed_training_resumes_and_other_settings_are_refused(tmp_path, twin, python):
    command = cmd("training", tmp_path, twin, args=["--num_epochs", "3", "--batch_size", "4"])
    killed = kill_once_checkpointed([sys.executable, *command[1:]], BUNDLE, tmp_path / "models" / "last.pt", 3)
    refused = python.run([*command, "--input_scaling", "reference_0_255"], cwd=BUNDLE, check=False)
    assert refused.returncode == 2 and "was trained with other settings" in refused.stderr
    assert "input_scaling" in refused.stderr and "Traceback" not in refused.stderr
    resumed = python.run(command, cwd=BUNDLE)
    assert f"at epoch {killed['trainer']['epoch']}" in resumed.stdout + resumed.stderr
    final = load_checkpoint(tmp_path / "models" / "last.pt")
    assert final["trainer"]["epoch"] == 3
    assert final["trainer"]["iteration"] == 3 * final["trainer"]["epoch_length"]


def test_mask_of_another_size_gives_one_clear_error(tmp_path, twin, python):
    from PIL import Image

    broken = tmp_path / "kvasir"
    shutil.copytree(twin, broken)
    victim = sorted((broken / "masks").glob("*.jpg"))[4]
    Image.open(victim).resize((20, 30), Image.NEAREST).save(victim)
    proc = python.run(cmd("training", tmp_path / "root", broken), cwd=BUNDLE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {victim}: mask size 20x30 differs from its image")
    assert "Traceback" not in proc.stderr
