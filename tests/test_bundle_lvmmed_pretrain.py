"""End-to-end checks of bundles/lvmmed_pretrain on the tiny ``ssl2d`` twin, each command in a forked interpreter.

Covers: the demo training (2 epochs) with its TensorBoard scalars, ``backbone.pt`` (the backbone of
``last.pt``, torchvision / LVM-Med keys, loads into a fresh MONAI ResNet with no missing or
unexpected keys), evaluate (matching accuracy on the held-out list) and inference (embeddings),
verify_metadata, verify_net_in_out, ckpt_export (TorchScript equals eager), torchrun with 2 CPU
processes, resume after a killed training, the refusal to resume with other settings, and one clear
error line for bad inputs (an unreadable image, an empty folder, a collection smaller than a graph).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from custom_components.data.synthetic import write_ssl2d_twin
from custom_components.io import load_checkpoint

from bundle_utils import (
    REPO,
    SCHEMA,
    ForkedPython,
    config_arg,
    kill_once_checkpointed,
    torchrun_trains_one_epoch,
    verify_bundle,
)

BUNDLE = REPO / "bundles" / "lvmmed_pretrain"
# demo.json (ResNet-18, graphs of 8) at 32 x 32, one graph per step: about a second per epoch
TINY = ["--image_size", "32", "--num_workers", "0"]
SCALARS = ("loss", "matching_accuracy", "solver_seconds", "graph_seconds", "graph_share", "step_seconds", "lr")

pytestmark = pytest.mark.slow


def cmd(run_id: str, bundle_root: Path, dataset_dir: Path, *extra_configs: str, args=(), python="python",
        batch: int = 8) -> list[str]:
    return [
        python, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra_configs),
        "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset_dir), *TINY, "--batch_size", str(batch), *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    forked = ForkedPython(tmp_path_factory.mktemp("forked_python"))
    yield forked
    forked.close()


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    # 30 training images + the volume's 6 slices, 10 held-out images
    return write_ssl2d_twin(tmp_path_factory.mktemp("ssl2d"), n_images=40, size=48, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin, python) -> Path:
    root = tmp_path_factory.mktemp("root")
    python.run(cmd("training", root, twin, args=["--num_epochs", "2"]), cwd=BUNDLE)
    return root


def test_training_writes_checkpoint_backbone_and_scalars(trained):
    from monai.networks.nets import ResNet
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from custom_components.networks.pretrained import load_pretrained_resnet

    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2 and last["trainer"]["iteration"] == 2 * 4
    assert set(last) >= {"network", "objective", "optimizer", "lr_scheduler", "trainer", "fingerprint"}
    backbone = torch.load(trained / "models" / "backbone.pt", weights_only=True)
    assert backbone.keys() == last["network"].keys()
    assert all(torch.equal(backbone[k], last["network"][k]) for k in backbone)
    assert not any(k.startswith(("projector", "gcn", "module.", "fc.")) for k in backbone)
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var"} <= set(backbone)
    fresh = ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3, conv1_t_size=7,
                   conv1_t_stride=2, feed_forward=False, bias_downsample=False)  # fmt: skip
    result = load_pretrained_resnet(fresh, trained / "models" / "backbone.pt")
    assert result["unexpected_keys"] == [] and result["missing_keys"] == []
    assert not list(trained.rglob("*.tmp*")), "temporary files left behind"

    events = list((trained / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    for name in SCALARS:
        values = [e.value for e in acc.Scalars(f"train_{name}")]
        assert len(values) == 8, name
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("train_matching_accuracy"))
    assert all(0.0 < e.value < 1.0 for e in acc.Scalars("train_graph_share"))
    assert all(e.value == pytest.approx(3e-3) for e in acc.Scalars("train_lr"))  # demo: halved after epoch 3


def test_evaluate_and_inference(trained, twin, python):
    python.run(cmd("evaluating", trained, twin, "configs/evaluate.json"), cwd=BUNDLE)
    report = json.loads((trained / "eval" / "metrics_test.json").read_text())
    assert 0.0 <= report["metrics"]["matching_accuracy"] <= 1.0
    # Hamming loss of a graph of 8 = 2 x mismatched nodes = 2 * 8 * (1 - accuracy), one graph
    assert report["metrics"]["loss"] == pytest.approx(16 * (1 - report["metrics"]["matching_accuracy"]))
    python.run(cmd("inferring", trained, twin, "configs/inference.json"), cwd=BUNDLE)
    rows = list(csv.DictReader((trained / "eval" / "inference" / "predictions_test.csv").open()))
    test = json.loads((trained / "data" / "prepared" / "collection.json").read_text())["test"]
    assert [r["image_path"] for r in rows] == [e["image"] for e in test]
    assert len(rows[0]) == 1 + 512


def test_verify_metadata_and_net_in_out(monkeypatch):
    if not SCHEMA.is_file():
        pytest.skip("shared schema not present")
    verify_bundle(BUNDLE, monkeypatch)


def test_ckpt_export_torchscript_matches_eager(trained, tmp_path, python):
    from custom_components.networks.lvmmed_backbone import LVMMedResNet

    ts = tmp_path / "model.ts"
    python.run(["python", "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
                "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
                "--config_file", config_arg("configs/train.json", "configs/demo.json")], cwd=BUNDLE)  # fmt: skip
    eager = LVMMedResNet("resnet18")
    eager.load_state_dict(torch.load(trained / "models" / "backbone.pt", weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = torch.jit.load(str(ts))(x)
        assert out.shape == (2, 512, 2, 2)
        torch.testing.assert_close(out, eager.eval()(x), rtol=1e-5, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1"], python=sys.executable)
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29547)
    assert (tmp_path / "models" / "backbone.pt").is_file()


def test_killed_training_resumes_and_other_settings_are_refused(tmp_path, twin, python):
    epochs = 4  # batches of 16: 2 steps per epoch
    command = cmd("training", tmp_path, twin, args=["--num_epochs", str(epochs)], python=sys.executable, batch=16)
    last = tmp_path / "models" / "last.pt"
    killed = kill_once_checkpointed(command, BUNDLE, last, epochs)
    resumed = python.run(cmd("training", tmp_path, twin, args=["--num_epochs", str(epochs)], batch=16), cwd=BUNDLE)
    assert f"resumed from {last} at epoch {killed['trainer']['epoch']}" in resumed.stdout + resumed.stderr
    final = load_checkpoint(last)
    # every epoch ran exactly once: the iteration count is epochs x the epoch length (36 images // 16)
    assert final["trainer"]["epoch"] == epochs and final["trainer"]["iteration"] == epochs * 2
    other = cmd("training", tmp_path, twin, args=["--num_epochs", str(epochs), "--lam", "70"], batch=16)
    proc = python.run(other, cwd=BUNDLE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "other settings" in proc.stderr and "lam" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("problem", ["unreadable", "empty", "one_image"])
def test_bad_input_gives_one_clear_error(problem, tmp_path, python):
    data = tmp_path / "images"
    data.mkdir()
    if problem == "unreadable":
        write_ssl2d_twin(data, n_images=20, size=32, seed=2)
        victim = data / "grey" / "img_0004.png"
        victim.write_bytes(victim.read_bytes()[:40])  # cut short
        needle = "img_0004.png"
    elif problem == "empty":
        needle = "holds no PNG/JPEG image"
    else:
        write_ssl2d_twin(tmp_path / "twin", n_images=1, size=32, seed=2, n_test=0)
        (data / "one.png").write_bytes((tmp_path / "twin" / "grey" / "img_0000.png").read_bytes())
        needle = "fewer than one graph"
    proc = python.run(cmd("training", tmp_path / "root", data), cwd=BUNDLE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
