"""End-to-end checks of bundles/ham_nihcxr14 on a tiny NIH ChestX-ray14-format twin, each in a subprocess.

Covers: train 2 epochs + evaluate + inference, TensorBoard content (every loss term), the no-box
method, verify_metadata, verify_net_in_out, ckpt_export (TorchScript equals eager), torchrun with
2 CPU processes, resume after a killed training, and a clear error on a broken release.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from custom_components.data.nihcxr14 import FINDINGS
from custom_components.data.synthetic import write_nihcxr14_twin
from custom_components.guidance.ham import HAM_LOSS_TERMS
from custom_components.io import load_checkpoint

from bundle_utils import (
    REPO,
    SCHEMA,
    config_arg,
    resumes_after_kill,
    torchrun_trains_one_epoch,
    verify_bundle,
)
from bundle_utils import run as _run

BUNDLE = REPO / "bundles" / "ham_nihcxr14"
# demo.json's ResNet-18 at 32 x 32: seconds per run on 2 CPU cores
TINY = ["--image_size", "32", "--num_workers", "0"]

pytestmark = pytest.mark.slow


def run(cmd, cwd: Path = BUNDLE, **kwargs):
    return _run(cmd, cwd=cwd, **kwargs)


def cmd(run_id: str, bundle_root: Path, dataset_dir: Path, *extra_configs: str, args=()) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra_configs),
        "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset_dir), *TINY, *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_nihcxr14_twin(tmp_path_factory.mktemp("nih_twin"), n_images=32, size=48, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin) -> Path:
    bundle_root = tmp_path_factory.mktemp("bundle_root")
    run(cmd("training", bundle_root, twin, args=["--num_epochs", "2"]))
    return bundle_root


def test_training_outputs(trained):
    assert (trained / "models" / "model.pt").is_file()
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2
    assert set(last) >= {"network", "optimizer", "lr_scheduler", "best", "trainer"}
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("fa_layer.") for k in state) and "cls_fc.weight" in state
    assert not list(trained.rglob("*.tmp*")), "temporary files left behind"


def test_tensorboard_has_every_loss_term_and_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train_loss", *(f"train_{k}" for k in HAM_LOSS_TERMS)} <= scalars
    assert {"val_auroc", "val_mtiou"} <= scalars
    # the default split (box_fold1) supervises boxes: the box term is active
    assert any(e.value > 0 for e in acc.Scalars("train_loss_ex_cls"))


def test_evaluate_writes_auroc_and_localisation_report(trained, twin):
    run(cmd("evaluating", trained, twin, "configs/evaluate.json"))
    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    metrics = report["metrics"]
    assert {"auroc", "abnormal_auroc", "mtiou", "mtior", *(f"auroc_{f}" for f in FINDINGS)} <= set(metrics)
    test = json.loads((trained / "data" / "prepared_32" / "datalist_box_fold1.json").read_text())["test"]
    # n_samples is the count of the first reported metric (the AUROC's images); the localisation
    # metrics count (image, finding) cases with a box, listed per metric when the counts differ
    n_cases = sum(len(e["boxes"]) for e in test)
    assert report["n_samples"] == len(test)
    if n_cases != len(test):
        assert report["sample_counts"]["auroc"] == len(test) and report["sample_counts"]["mtiou"] == n_cases
    # every test image of a box fold has boxes: the localisation accuracy is defined
    assert metrics["mtiou"] is not None and 0.0 <= metrics["mtiou"] <= 1.0
    assert metrics["auroc"] is None or 0.0 <= metrics["auroc"] <= 1.0
    assert "| auroc |" in (trained / "eval" / "metrics_test.md").read_text()


def test_inference_writes_probability_csv(trained, twin):
    run(cmd("inferring", trained, twin, "configs/inference.json"))
    rows = list(csv.DictReader((trained / "eval" / "inference" / "predictions_test.csv").open()))
    test = json.loads((trained / "data" / "prepared_32" / "datalist_box_fold1.json").read_text())["test"]
    assert [r["case"] for r in rows] == [e["case"] for e in test]
    assert list(rows[0]) == ["case", "abnormal", *FINDINGS]
    assert all(0.0 <= float(r[c]) <= 1.0 for r in rows for c in ("abnormal", *FINDINGS))


def test_nobox_method_trains_without_box_term(tmp_path, twin):
    run(cmd("training", tmp_path, twin, "configs/methods/nobox.json", args=["--num_epochs", "1"]))
    assert load_checkpoint(tmp_path / "models" / "last.pt")["trainer"]["epoch"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert all(e.value == 0 for e in acc.Scalars("train_loss_ex_cls"))


def test_verify_metadata_and_net_in_out(monkeypatch):
    if not SCHEMA.is_file():
        pytest.skip("shared schema not present")
    # the paper-size network (ResNet-50, output stride 8 at 512) against the metadata
    verify_bundle(BUNDLE, monkeypatch)


def test_ckpt_export_torchscript_matches_eager(trained, tmp_path):
    ts = tmp_path / "model.ts"
    run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
         "--config_file", config_arg("configs/train.json", "configs/demo.json"), "--image_size", "32"])  # fmt: skip
    from custom_components.networks.ham import HAMNet

    demo = json.loads((BUNDLE / "configs" / "demo.json").read_text())
    eager = HAMNet(arch=demo["arch"], fusion_channels=demo["fusion_channels"])
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(ts))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = scripted(x)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 15)
        torch.testing.assert_close(out, eager.eval()(x), rtol=1e-5, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1"])
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29531)


def test_killed_training_resumes_from_last_checkpoint(tmp_path, twin):
    epochs = 30
    command = cmd("training", tmp_path, twin, args=["--num_epochs", str(epochs)])
    resumes_after_kill(command, BUNDLE, tmp_path / "models" / "last.pt", epochs)


def test_broken_release_gives_one_clear_error(tmp_path, twin):
    import shutil

    broken = tmp_path / "NIHChestXray14"
    shutil.copytree(twin, broken)
    victim = sorted((broken / "images").glob("*.png"))[0]
    victim.unlink()
    proc = run(cmd("training", tmp_path / "root", broken), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and victim.stem in proc.stderr
    assert "Traceback" not in proc.stderr
