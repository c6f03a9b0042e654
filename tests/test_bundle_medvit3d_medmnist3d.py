"""End-to-end checks of bundles/medvit3d_medmnist3d on a tiny OrganMNIST3D-format twin, each in a subprocess.

Covers: train 2 epochs + evaluate (official ACC/AUC) + inference CSV, TensorBoard content,
verify_metadata, verify_net_in_out (MedViT-3D T at 28^3), ckpt_export (TorchScript equals eager),
torchrun with 2 CPU processes, accuracy under FGSM / PGD (configs/evaluate_robustness.json),
resume after a killed training, pack -> download -> run, and one clear error line for broken
MedMNIST files. Uses configs/demo.json (28^3 twin, stem stride 4, a shallow MedViT-3D).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from custom_components.data.synthetic import write_medmnist3d_twin
from custom_components.io import load_checkpoint

from bundle_utils import REPO, config_arg, torchrun_trains_one_epoch, verify_bundle
from bundle_utils import run as _run
from medmnist_bundle_checks import (
    BAD_INPUTS,
    bad_input_gives_one_clear_error,
    killed_training_resumes,
    packed_bundle_downloads_and_runs,
    robustness_report,
)

BUNDLE = REPO / "bundles" / "medvit3d_medmnist3d"
N_SPLITS = (22, 11, 11)
N_CLASSES = 11  # OrganMNIST3D

pytestmark = pytest.mark.slow


def run(cmd, cwd: Path = BUNDLE, **kwargs):
    return _run(cmd, cwd=cwd, **kwargs)


def cmd(run_id: str, bundle_root: Path, dataset_dir: Path, *extra_configs: str, args=()) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra_configs),
        "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset_dir), *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medmnist3d_twin")
    write_medmnist3d_twin(root / "organmnist3d.npz", name="organmnist3d", n=N_SPLITS, size=28, seed=3)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin) -> Path:
    bundle_root = tmp_path_factory.mktemp("bundle_root")
    run(cmd("training", bundle_root, twin, args=["--num_epochs", "2"]))
    return bundle_root


def test_training_outputs_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2
    assert set(last) >= {"network", "optimizer", "lr_scheduler", "best", "trainer"}
    assert last["lr_scheduler"]["milestones"] == {1: 2}  # 50 % / 75 % of 2 epochs
    assert last["optimizer"]["param_groups"][0]["weight_decay"] == 0.05  # AdamW recipe
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert state["proj_head.weight"].shape[0] == N_CLASSES
    assert state["stem.0.0.weight"].ndim == 5  # Conv3d
    events = list((trained / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"train_loss", "val_auc", "val_acc"} <= set(acc.Tags()["scalars"])


def test_evaluate_reports_official_acc_auc(trained, twin):
    run(cmd("evaluating", trained, twin, "configs/evaluate.json"))
    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    assert set(report["metrics"]) == {"ACC", "AUC"}
    assert all(0.0 <= report["metrics"][k] <= 1.0 for k in ("ACC", "AUC"))
    assert report["n_samples"] == N_SPLITS[2]
    assert report["extra"]["task"] == "multi-class" and report["extra"]["dataset"] == "organmnist3d"


def test_inference_writes_predictions_csv(trained, twin):
    run(cmd("inferring", trained, twin, "configs/inference.json"))
    rows = list(csv.reader((trained / "eval" / "inference" / "predictions.csv").open()))
    assert [r[0] for r in rows] == [f"test_{i}" for i in range(N_SPLITS[2])]  # dataset order
    probs = torch.tensor([[float(v) for v in r[1:]] for r in rows])
    assert probs.shape == (N_SPLITS[2], N_CLASSES)
    torch.testing.assert_close(probs.sum(1), torch.ones(N_SPLITS[2]), atol=1e-5, rtol=0)


def test_verify_metadata_and_net_in_out(monkeypatch):
    # the default network: MedViT-3D (T depths), 1 x 28^3 -> 11 logits
    verify_bundle(BUNDLE, monkeypatch)


def test_ckpt_export_torchscript_matches_eager(trained, tmp_path):
    from custom_components.networks.medvit3d import MedViT3D

    ts = tmp_path / "model.ts"
    run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
         "--config_file", config_arg("configs/train.json", "configs/demo.json")])  # fmt: skip
    demo = json.loads((BUNDLE / "configs" / "demo.json").read_text())
    eager = MedViT3D(depths=demo["depths"], num_classes=N_CLASSES, stem_stride=demo["stem_stride"], path_dropout=0.0)
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(ts))
    x = torch.randn(2, 1, 28, 28, 28)
    out = scripted(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, N_CLASSES)
    torch.testing.assert_close(out, eager.eval()(x), rtol=1e-4, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1"])
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29533)


def test_accuracy_under_fgsm_and_pgd(trained, twin):
    report = robustness_report(BUNDLE, cmd, trained, twin, N_SPLITS[2])
    assert report["task"] == "multi-class"


def test_killed_training_resumes_from_last_checkpoint(tmp_path, twin):
    killed_training_resumes(BUNDLE, cmd, tmp_path / "root", twin)


def test_packed_bundle_downloads_and_runs(tmp_path, twin):
    packed_bundle_downloads_and_runs("medvit3d_medmnist3d", cmd, tmp_path, twin)


# the reader is the 2-D one (all five cases run in tests/test_bundle_medvit_medmnist2d.py); here the
# most common case and the 3-D-specific shape check, to keep the file short
@pytest.mark.parametrize("case", ["missing", "wrong_shape"])
def test_bad_input_gives_one_clear_error(case, tmp_path, twin):
    assert case in BAD_INPUTS
    bad_input_gives_one_clear_error(BUNDLE, cmd, case, twin / "organmnist3d.npz", tmp_path)


def test_shape_transform_follows_the_official_recipe(tmp_path):
    """AdrenalMNIST3D / VesselMNIST3D: training voxels x U(0, 1), evaluation voxels x 0.5 (MedMNIST-3D recipe)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([BUNDLE / "configs" / "train.json", BUNDLE / "configs" / "demo.json"])
    parser.update({"data_flag": "vesselmnist3d", "dataset_dir": str(tmp_path)})
    assert parser.get_parsed_content("shape_transform") is True
    item = {"image": torch.ones(1, 28, 28, 28), "label": torch.tensor(0)}
    evaluated = parser.get_parsed_content("preprocessing")(dict(item))["image"]
    torch.testing.assert_close(evaluated, torch.full_like(evaluated, (0.5 - 0.5) / 0.5))
    trained_scales = {float(parser.get_parsed_content("train#preprocessing")(dict(item))["image"].flatten()[0]) for _ in range(4)}
    assert len(trained_scales) == 4 and all(-1.0 <= v <= 1.0 for v in trained_scales)
    parser.update({"data_flag": "organmnist3d"})
    assert parser.get_parsed_content("shape_transform", lazy=False) is False
