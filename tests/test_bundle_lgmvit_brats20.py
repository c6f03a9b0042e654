"""End-to-end checks of bundles/lgmvit_brats20 on a tiny BraTS-format twin, each in a subprocess.

Covers: train 1 epoch + evaluate + inference, TensorBoard content, verify_metadata,
verify_net_in_out, ckpt_export (TorchScript equals eager), torchrun with 2 CPU processes,
resume after a killed training, pack -> download -> run, and a clear error on bad input.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from custom_components.data.synthetic import write_brats20_twin
from custom_components.io import load_checkpoint

from bundle_utils import (
    REPO,
    SCHEMA,
    TINY,
    bundle_cmd,
    config_arg,
    resumes_after_kill,
    torchrun_trains_one_epoch,
    verify_bundle,
)
from bundle_utils import run as _run

BUNDLE = REPO / "bundles" / "lgmvit_brats20"

pytestmark = pytest.mark.slow


def run(cmd, cwd: Path = BUNDLE, **kwargs):
    return _run(cmd, cwd=cwd, **kwargs)


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats_twin")
    return write_brats20_twin(root, n_per_split=(3, 2, 2), shape=(40, 40, 16), seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin) -> Path:
    bundle_root = tmp_path_factory.mktemp("bundle_root")
    run(bundle_cmd("training", bundle_root, twin, args=["--num_epochs", "2"]))
    return bundle_root


def test_training_outputs(trained):
    assert (trained / "models" / "model.pt").is_file()
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2
    assert set(last) >= {"network", "optimizer", "lr_scheduler", "best", "trainer"}
    # the network weights load with weights_only=True into the eager model
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("blocks.") for k in state)
    assert not list(trained.rglob("*.tmp*")), "temporary files left behind"


def test_tensorboard_has_losses_metrics_and_maps(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train_loss", "train_loss_cls", "train_loss_loc"} <= scalars
    assert {"val_f1", "val_accuracy", "val_auroc", "val_ap", "val_kappa"} <= scalars
    images = set(acc.Tags()["images"])
    assert {"val_eafem/image", "val_eafem/mask", "val_eafem/map"} <= images
    # the guidance term is active on this data (positive slices exist)
    assert any(e.value > 0 for e in acc.Scalars("train_loss_loc"))


def test_evaluate_writes_metric_tables(trained, twin):
    run(bundle_cmd("evaluating", trained, twin, "configs/evaluate.json"))
    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"f1", "accuracy", "auroc", "ap", "kappa"}
    # AUROC/AP/kappa are null (NaN) only when the test split holds a single class
    assert all(metrics[k] is None or 0.0 <= metrics[k] <= 1.0 for k in ("f1", "accuracy", "auroc", "ap"))
    assert metrics["kappa"] is None or -1.0 <= metrics["kappa"] <= 1.0
    assert metrics["accuracy"] is not None and metrics["f1"] is not None
    test_cases = json.loads((trained / "data" / "prepared_32" / "datalist.json").read_text())["test"]
    assert report["n_samples"] == sum(c["n_slices"] for c in test_cases)
    md = (trained / "eval" / "metrics_test.md").read_text()
    assert "| f1 |" in md and "| kappa |" in md


def test_inference_writes_predictions_and_maps(trained, twin):
    import nibabel as nib

    run(bundle_cmd("inferring", trained, twin, "configs/inference.json"))
    out = trained / "eval" / "inference"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    test_cases = json.loads((trained / "data" / "prepared_32" / "datalist.json").read_text())["test"]
    assert len(rows) == sum(c["n_slices"] for c in test_cases)
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    for case in test_cases:
        vol = nib.load(str(out / "maps" / f"{case['case']}_eafem.nii.gz"))
        # on the source scan's grid (40 x 40 x 16 twin), not the prepared 32 x 32 slices
        source = nib.load(str(twin / case["case"] / f"{case['case']}_flair.nii.gz"))
        assert vol.shape == source.shape and (vol.affine == source.affine).all()
        assert (out / "maps" / f"{case['case']}_eafem.png").is_file()
    quality = json.loads((out / "explanation_quality.json").read_text())
    assert quality["overall"]["n_slices"] == sum(c["n_positive"] for c in test_cases)
    assert 0.0 <= quality["overall"]["pointing_game"] <= 1.0


def test_verify_metadata_and_net_in_out(monkeypatch):
    if not SCHEMA.is_file():
        pytest.skip("shared schema not present")
    # the paper-size network (ViT-B/16 at 256) against the metadata's input/output description
    verify_bundle(BUNDLE, monkeypatch)


def test_ckpt_export_torchscript_matches_eager(trained, tmp_path):
    ts = tmp_path / "model.ts"
    run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
         "--config_file", config_arg("configs/train.json", "configs/demo.json"), *TINY])  # fmt: skip
    from custom_components.networks import AttributionViT

    demo = json.loads((BUNDLE / "configs" / "demo.json").read_text())
    eager = AttributionViT(
        img_size=32, patch_size=8, hidden_size=demo["network_def#hidden_size"], num_layers=demo["network_def#num_layers"],
        num_heads=demo["network_def#num_heads"], mlp_dim=demo["network_def#mlp_dim"],
    )  # fmt: skip
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(ts))
    x = torch.rand(3, 3, 32, 32)
    out = scripted(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 1)
    torch.testing.assert_close(out, eager.eval()(x), rtol=1e-5, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = bundle_cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1"])
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29517)


def test_killed_training_resumes_from_last_checkpoint(tmp_path, twin):
    epochs = 40
    command = bundle_cmd("training", tmp_path, twin, args=["--num_epochs", str(epochs)])
    resumes_after_kill(command, BUNDLE, tmp_path / "models" / "last.pt", epochs)


def test_packed_bundle_downloads_and_runs(tmp_path, twin):
    zip_path = tmp_path / "lgmvit_brats20.zip"
    run([sys.executable, str(REPO / "scripts" / "pack_bundle.py"), "lgmvit_brats20", "--out", str(zip_path)], cwd=REPO)
    run([sys.executable, "-m", "monai.bundle", "download", "--name", "lgmvit_brats20", "--url", zip_path.as_uri(),
         "--bundle_dir", str(tmp_path / "installed")], cwd=tmp_path)  # fmt: skip
    installed = tmp_path / "installed" / "lgmvit_brats20"
    assert (installed / "configs" / "train.json").is_file() and (installed / "LICENSE").is_file()
    run(bundle_cmd("training", installed, twin, args=["--num_epochs", "1"]), cwd=installed)
    assert (installed / "models" / "model.pt").is_file()


def test_bad_dataset_gives_one_clear_error(tmp_path, twin):
    import shutil

    broken = tmp_path / "MICCAI_BraTS2020_TrainingData"
    shutil.copytree(twin, broken)
    case = sorted(p for p in broken.iterdir() if p.is_dir())[0]
    victim = next(case.glob("*_t2.nii*"))
    victim.unlink()
    proc = run(bundle_cmd("training", tmp_path / "root", broken), check=False)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and case.name in proc.stderr and "t2" in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing half-written for the broken case
    assert not (tmp_path / "root" / "data" / "prepared_32" / case.name / "meta.json").exists()
