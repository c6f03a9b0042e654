"""End-to-end checks of bundles/lvmmed_cls_brain on a tiny Brain Tumor MRI-format twin.

Covers: a 2-epoch demo training killed after its first checkpoint, refused with other settings and
resumed (checkpoints, TensorBoard scalars and the labelled example panel), evaluation (metrics JSON +
per-class table), inference (probability CSV), the linear probe on cached features from an LVM-Med
file written by a MONAI ResNet (tensor count logged, encoder unchanged, cache reused by a second
run), torchrun with 2 CPU processes, verify_metadata / verify_net_in_out, ckpt_export (TorchScript
equals eager), and one clear line for an empty class folder. Commands other than torchrun and the
killed training run in forks of one interpreter (``bundle_utils.ForkedPython``).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from custom_components.data.synthetic import write_brain_tumor_twin
from custom_components.io import load_checkpoint
from custom_components.networks.ham import DilatedResNet

from bundle_utils import REPO, ForkedPython, config_arg, kill_once_checkpointed, torchrun_trains_one_epoch, verify_bundle

BUNDLE = REPO / "bundles" / "lvmmed_cls_brain"
TINY = ["--image_size", "32", "--num_workers", "0", "--batch_size", "8", "--num_panel_images", "4"]
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]

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
    return write_brain_tumor_twin(tmp_path_factory.mktemp("brain"), n_per_class=(5, 2), size=40, seed=1)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, twin, python) -> dict:
    """A 2-epoch demo training killed after its first checkpoint, a refused rerun with another learning
    rate, then the rerun that resumes it; the trained bundle root serves the other tests."""
    root = tmp_path_factory.mktemp("root")
    command = cmd("training", root, twin, args=["--num_epochs", "2", "--batch_size", "4"])
    killed = kill_once_checkpointed([sys.executable, *command[1:]], BUNDLE, root / "models" / "last.pt", 2)
    refused = python.run([*command, "--learning_rate", "0.01"], cwd=BUNDLE, check=False)
    resumed = python.run(command, cwd=BUNDLE)
    return {"root": root, "killed": killed, "refused": refused, "resumed": resumed}


@pytest.fixture(scope="module")
def trained(interrupted) -> Path:
    return interrupted["root"]


def test_training_outputs_and_tensorboard(trained):
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2 and set(last) >= {"network", "optimizer", "best", "trainer"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "eval" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train_loss", "val_accuracy", "val_f1", "val_auroc"} <= set(events.Tags()["scalars"])
    assert "val_examples" in events.Tags()["images"]
    datalist = json.loads((trained / "datalists" / "brain_tumor.json").read_text())
    assert len(datalist["validation"]) == round(0.3 * 20) and len(datalist["test"]) == 8


def test_evaluate_writes_metrics_and_per_class_table(trained, twin, python):
    python.run(cmd("evaluating", trained, twin, "configs/evaluate.json"), cwd=BUNDLE)
    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    assert set(report["metrics"]) == {"accuracy", "macro_f1", "macro_auroc"} and report["n_samples"] == 8
    rows = report["tables"]["per_class"]["rows"]
    assert [r["class"] for r in rows] == CLASSES and [r["support"] for r in rows] == [2, 2, 2, 2]
    recall = sum(r["recall"] * r["support"] for r in rows) / 8
    assert recall == pytest.approx(report["metrics"]["accuracy"])  # accuracy = support-weighted recall
    assert (trained / "eval" / "metrics_test_per_class.csv").is_file()


def test_inference_writes_probability_csv(trained, twin, python):
    python.run(cmd("inferring", trained, twin, "configs/inference.json"), cwd=BUNDLE)
    with open(trained / "eval" / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and rows[0]["image_path"].startswith("Testing/")
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in range(4)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and int(r["pred"]) == probs.index(max(probs))


def test_linear_probe_from_an_lvmmed_file_uses_the_cache(tmp_path, twin, python):
    torch.manual_seed(3)
    src = DilatedResNet("resnet18", output_stride=32, dilation=False)
    weights = tmp_path / "lvmmed_resnet18.torch"
    torch.save({**src.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, weights)
    root = tmp_path / "probe"
    probe = cmd("training", root, twin, "configs/init/lvmmed.json", "configs/linear_probe.json",
                args=["--pretrained_path", str(weights), "--num_epochs", "1"])  # fmt: skip
    first = python.run(probe, cwd=BUNDLE)
    log = first.stdout + first.stderr
    assert f"loaded {len(src.state_dict())} tensors from {weights}" in log
    assert "features of training: 14 x 512 computed" in log
    caches = sorted(p.name for p in (root / "feature_cache").glob("*.pt"))
    assert [c.split("_")[0] for c in caches] == ["training", "validation"]
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    for k, v in src.state_dict().items():  # the frozen encoder is the file's
        torch.testing.assert_close(state[f"encoder.{k}"], v)
    again = python.run([*probe, "--resume", "False"], cwd=BUNDLE)
    assert "features of training: 14 x 512 from" in again.stdout + again.stderr
    assert sorted(p.name for p in (root / "feature_cache").glob("*.pt")) == caches


def test_verify_metadata_and_net_in_out(monkeypatch):
    verify_bundle(BUNDLE, monkeypatch, config_file=["configs/train.json", "configs/demo.json"])  # type: ignore[arg-type]


def test_ckpt_export_torchscript_matches_eager(trained, tmp_path, python):
    ts = tmp_path / "model.ts"
    python.run(["python", "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
                "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
                "--config_file", config_arg("configs/train.json", "configs/demo.json"),
                "--bundle_root", str(trained)], cwd=BUNDLE)  # fmt: skip
    from custom_components.networks.lvmmed_classifier import LVMMedClassifier

    net = LVMMedClassifier(num_classes=4, arch="resnet18")
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), net.eval()(x), rtol=1e-4, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = [sys.executable, *cmd("training", tmp_path, twin, "configs/multi_gpu_train.json",
                                    args=["--num_epochs", "1", "--batch_size", "4"])[1:]]
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29547)


def test_killed_training_resumes_and_other_settings_are_refused(interrupted):
    refused = interrupted["refused"]
    assert refused.returncode == 2 and "was trained with other settings" in refused.stderr
    assert "learning_rate" in refused.stderr and "Traceback" not in refused.stderr
    resumed = interrupted["resumed"]
    assert f"at epoch {interrupted['killed']['trainer']['epoch']}" in resumed.stdout + resumed.stderr
    final = load_checkpoint(interrupted["root"] / "models" / "last.pt")
    assert final["trainer"]["epoch"] == 2
    assert final["trainer"]["iteration"] == 2 * final["trainer"]["epoch_length"]


def test_empty_class_folder_gives_one_clear_error(tmp_path, twin, python):
    broken = tmp_path / "brain"
    shutil.copytree(twin, broken)
    empty = broken / "Testing" / "pituitary"
    for p in empty.iterdir():
        p.unlink()
    proc = python.run(cmd("training", tmp_path / "root", broken), cwd=BUNDLE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {empty}: class folder is empty (no image)"]
    assert "Traceback" not in proc.stderr
