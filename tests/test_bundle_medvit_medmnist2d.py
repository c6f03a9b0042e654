"""End-to-end checks of bundles/medvit_medmnist2d on a tiny BreastMNIST-format twin, each in a subprocess.

Covers: train 2 epochs + evaluate (official ACC/AUC in the metrics JSON) + inference CSV,
TensorBoard content, verify_metadata, verify_net_in_out (MedViT-T at 224), ckpt_export
(TorchScript equals eager), torchrun with 2 CPU processes, accuracy under FGSM / PGD
(configs/evaluate_robustness.json), resume after a killed training, pack -> download -> run, and
one clear error line for broken MedMNIST files. Uses configs/demo.json (28x28, stem stride 2, a
shallow MedViT) so that the file runs in about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from custom_components.data.synthetic import write_medmnist2d_twin
from custom_components.io import load_checkpoint

from bundle_utils import REPO, config_arg, torchrun_trains_one_epoch, verify_bundle
from bundle_utils import run as _run
from conftest import tiny_medvit
from medmnist_bundle_checks import (
    BAD_INPUTS,
    bad_input_gives_one_clear_error,
    killed_training_resumes,
    packed_bundle_downloads_and_runs,
    robustness_report,
)

BUNDLE = REPO / "bundles" / "medvit_medmnist2d"
N_SPLITS = (48, 16, 20)

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
    root = tmp_path_factory.mktemp("medmnist_twin")
    write_medmnist2d_twin(root / "breastmnist.npz", name="breastmnist", n=N_SPLITS, size=28, seed=3)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, twin) -> Path:
    bundle_root = tmp_path_factory.mktemp("bundle_root")
    run(cmd("training", bundle_root, twin, args=["--num_epochs", "2"]))
    return bundle_root


def test_training_outputs_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (trained / "models" / "model.pt").is_file()
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2
    assert set(last) >= {"network", "optimizer", "lr_scheduler", "best", "trainer"}
    # MultiStepLR milestones at 50 % / 75 % of 2 epochs: both at epoch 1
    assert last["lr_scheduler"]["milestones"] == {1: 2}
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert "proj_head.weight" in state and state["proj_head.weight"].shape[0] == 2
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
    assert report["extra"]["task"] == "binary"


def test_evaluate_any_npz_name_with_dataset(trained, twin, tmp_path):
    """--npz_path with a non-official name: --dataset gives the task table; the report names the file."""
    import shutil

    custom = shutil.copy(twin / "breastmnist.npz", tmp_path / "breast us, export 2.npz")
    run(cmd("evaluating", trained, tmp_path / "nowhere", "configs/evaluate.json",
            args=["--npz_path", str(custom), "--data_flag", "breastmnist", "--output_dir", str(tmp_path / "eval")]))
    report = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    assert report["extra"]["npz"] == str(custom) and report["extra"]["dataset"] == "breastmnist"
    assert report["n_samples"] == N_SPLITS[2] and report["notes"] == []  # both classes in the test split


def test_inference_writes_predictions_csv(trained, twin):
    run(cmd("inferring", trained, twin, "configs/inference.json"))
    rows = list(csv.reader((trained / "eval" / "inference" / "predictions.csv").open()))
    assert len(rows) == N_SPLITS[2]
    assert [r[0] for r in rows] == [f"test_{i}" for i in range(N_SPLITS[2])]  # dataset order
    probs = torch.tensor([[float(v) for v in r[1:]] for r in rows])
    assert probs.shape == (N_SPLITS[2], 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(N_SPLITS[2]), atol=1e-5, rtol=0)


def test_verify_metadata_and_net_in_out(monkeypatch):
    # the paper setting: MedViT-T, 3 x 224 x 224 -> 2 logits
    verify_bundle(BUNDLE, monkeypatch)


def test_ckpt_export_torchscript_matches_eager(trained, tmp_path):
    from custom_components.networks.medvit import MedViT

    ts = tmp_path / "model.ts"
    run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
         "--config_file", config_arg("configs/train.json", "configs/demo.json")])  # fmt: skip
    demo = json.loads((BUNDLE / "configs" / "demo.json").read_text())
    eager = MedViT(depths=demo["network_def#depths"], num_classes=2, in_channels=3, stem_stride=demo["stem_stride"],
                   path_dropout=0.0)  # fmt: skip
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(ts))
    x = torch.randn(3, 3, 28, 28)
    out = scripted(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 2)
    torch.testing.assert_close(out, eager.eval()(x), rtol=1e-4, atol=1e-5)


def test_torchrun_two_cpu_processes(tmp_path, twin):
    command = cmd("training", tmp_path, twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1"])
    torchrun_trains_one_epoch(command, BUNDLE, tmp_path / "models", tmp_path / "eval" / "tensorboard", 29531)


def test_accuracy_under_fgsm_and_pgd(trained, twin):
    report = robustness_report(BUNDLE, cmd, trained, twin, N_SPLITS[2])
    assert report["task"] == "binary" and report["extra"]["image_size"] == 28


def test_killed_training_resumes_from_last_checkpoint(tmp_path, twin):
    killed_training_resumes(BUNDLE, cmd, tmp_path / "root", twin)


def test_packed_bundle_downloads_and_runs(tmp_path, twin):
    packed_bundle_downloads_and_runs("medvit_medmnist2d", cmd, tmp_path, twin)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error(case, tmp_path, twin):
    bad_input_gives_one_clear_error(BUNDLE, cmd, case, twin / "breastmnist.npz", tmp_path)


# ----------------------------------------------------------------------------------------------
# in-process checks of the metrics and the PMC step (fast)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,c", [("binary", 2), ("multi-class", 5), ("multi-label", 4), ("ordinal-regression", 3)])
def test_medmnist_metrics_match_the_official_functions(task, c):
    from custom_components.data.medmnist import medmnist_metrics
    from custom_components.metrics.medmnist_metrics import MedMNISTACC, MedMNISTAUC

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, c, generator=g)
    labels = (torch.rand(40, c, generator=g) > 0.5).float() if task == "multi-label" else torch.arange(40) % c
    scores = torch.sigmoid(logits) if task == "multi-label" else torch.softmax(logits, 1)
    want = medmnist_metrics(task, scores, labels)
    for cls, key in ((MedMNISTACC, "ACC"), (MedMNISTAUC, "AUC")):
        m = cls(task)
        m.update((logits[:25], labels[:25]))
        m.update(([x for x in logits[25:]], [y for y in labels[25:]]))  # decollated lists
        assert m.compute() == pytest.approx(want[key], abs=1e-12)


def test_pmc_iteration_uses_the_mixed_loss():
    from types import SimpleNamespace

    from custom_components.engines.pmc import PMCIteration

    net = tiny_medvit(in_channels=3, num_classes=2, stem_stride=2, pmc_prob=1.0, pmc_lambda=0.5)
    seen = {}

    def loss_fn(logits, y):
        seen.setdefault("targets", []).append(y.clone())
        return torch.nn.functional.cross_entropy(logits, y)

    engine = SimpleNamespace(
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=loss_fn, amp=False, scaler=None,
        amp_kwargs={}, optim_set_to_none=True, non_blocking=False,
        state=SimpleNamespace(device=torch.device("cpu"), iteration=1), fire_event=lambda e: None,
    )  # fmt: skip
    batch = {"image": torch.randn(6, 3, 28, 28), "label": torch.tensor([0, 1, 0, 1, 1, 0])}
    out = PMCIteration()(engine, batch)
    assert net.pmc_applied and len(seen["targets"]) == 2  # CE(y) and CE(y[perm])
    expected = 0.5 * torch.nn.functional.cross_entropy(out["pred"], batch["label"]) + 0.5 * torch.nn.functional.cross_entropy(
        out["pred"], batch["label"][net.pmc_perm]
    )
    torch.testing.assert_close(out["loss"], expected)
