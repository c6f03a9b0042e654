"""End-to-end checks of bundles/ham_nihcxr14 on a tiny NIH ChestX-ray14-format twin, each in a subprocess.

Covers: train 2 epochs (validation on the box test images, ``--select_on_test``, so that the mTIoU /
mTIoR checkpoints exist) + evaluate (metrics JSON and the AUROC / TIoU / TIoR tables) + inference
(probability CSV, attention panels, predicted boxes), TensorBoard content (every loss term,
attention panels), the no-box method, verify_metadata, verify_net_in_out, ckpt_export (TorchScript equals eager), torchrun with
2 CPU processes, resume after a killed training, and a clear error on a broken release.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
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
    # validation = the box test images (the default validation split has no box, so no mTIoU / mTIoR)
    run(cmd("training", bundle_root, twin, args=["--num_epochs", "2", "--select_on_test", "True"]))
    return bundle_root


BEST_FILES = {"best": "model.pt", "best_mtiou": "model_mtiou.pt", "best_mtior": "model_mtior.pt"}


def test_training_outputs(trained):
    last = load_checkpoint(trained / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2
    assert set(last) >= {"network", "optimizer", "lr_scheduler", "trainer", *BEST_FILES}
    states = {key: torch.load(trained / "models" / name, weights_only=True) for key, name in BEST_FILES.items()}
    state = states["best"]
    assert any(k.startswith("fa_layer.") for k in state) and "cls_fc.weight" in state
    # each best file is the network of its best epoch: the last epoch's equals last.pt's network, and
    # files of the same best epoch are equal
    epochs = {key: last[key]["best_epoch"] for key in BEST_FILES}
    assert set(epochs.values()) <= {1, 2}
    for key, saved in states.items():
        if epochs[key] == 2:
            assert all(torch.equal(saved[k], last["network"][k]) for k in saved)
        for other, saved_other in states.items():
            if epochs[other] == epochs[key]:
                assert all(torch.equal(saved[k], saved_other[k]) for k in saved)
    assert not list(trained.rglob("*.tmp*")), "temporary files left behind"


def test_tensorboard_has_every_loss_term_and_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train_loss", *(f"train_{k}" for k in HAM_LOSS_TERMS)} <= scalars
    assert {"val_auroc", "val_mtiou", "val_mtior"} <= scalars
    # the default split (box_fold1) supervises boxes: the box term is active
    assert any(e.value > 0 for e in acc.Scalars("train_loss_ex_cls"))
    panels = {f"attention/{k}" for k in ("image", "abnormal_map", "finding_map", "box_mask")}
    assert panels <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("attention/finding_map")] == [1, 2]  # once per validation epoch


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
    assert report["extra"]["eval_model"] == "model.pt"

    def table(name: str) -> dict[str, dict]:
        rows = list(csv.DictReader((trained / "eval" / f"metrics_test_{name}.csv").open()))
        assert (trained / "eval" / f"metrics_test_{name}.md").is_file()
        return {r["finding"]: r for r in rows}

    def same(cell: str, value) -> bool:  # empty cell <-> null (undefined)
        return (cell == "" and value is None) or (value is not None and abs(float(cell) - value) < 1e-12)

    auroc = table("auroc")
    assert list(auroc) == [*FINDINGS, "mean", "abnormal"]
    assert all(same(auroc[f]["auroc"], metrics[f"auroc_{f}"]) for f in FINDINGS)
    assert same(auroc["mean"]["auroc"], metrics["auroc"]) and same(auroc["abnormal"]["auroc"], metrics["abnormal_auroc"])
    box_findings = sorted({f for e in test for f in e["boxes"]}, key=FINDINGS.index)
    for name, thresholds in (("tiou", ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]),
                             ("tior", ["0.1", "0.25", "0.5", "0.75", "0.9"])):
        rows = table(name)
        assert list(rows) == [*box_findings, "mean"]
        assert list(rows["mean"]) == ["finding", "n", *thresholds, "mean"]
        assert int(rows["mean"]["n"]) == n_cases
        assert same(rows["mean"]["mean"], metrics[f"m{name}"])
        for t in ("0.1", "0.5"):
            assert same(rows["mean"][t], metrics[f"mtiou_{name}_{t}"])
    assert report["tables"]["tiou"]["rows"][-1]["mean"] == pytest.approx(metrics["mtiou"])


def test_evaluate_loads_the_chosen_checkpoint(trained, twin, tmp_path):
    out = tmp_path / "eval_mtior"
    run(cmd("evaluating", trained, twin, "configs/evaluate.json",
            args=["--eval_model", "model_mtior.pt", "--output_dir", str(out)]))  # fmt: skip
    report = json.loads((out / "metrics_test.json").read_text())
    assert report["extra"]["eval_model"] == "model_mtior.pt" and "model_mtior.pt" in report["title"]


def test_inference_writes_probability_csv(trained, twin):
    run(cmd("inferring", trained, twin, "configs/inference.json"))
    rows = list(csv.DictReader((trained / "eval" / "inference" / "predictions_test.csv").open()))
    test = json.loads((trained / "data" / "prepared_32" / "datalist_box_fold1.json").read_text())["test"]
    assert [r["case"] for r in rows] == [e["case"] for e in test]
    assert list(rows[0]) == ["case", "abnormal", *FINDINGS]
    assert all(0.0 <= float(r[c]) <= 1.0 for r in rows for c in ("abnormal", *FINDINGS))
    from PIL import Image

    from custom_components.handlers.attention_panels import CAPTION_HEIGHT, GT_COLOUR, PRED_COLOUR

    out = trained / "eval" / "inference"
    boxes = json.loads((out / "boxes_test.json").read_text())
    probs = {r["case"]: r for r in rows}
    tile = 32 * (256 // 32)  # inference.json upscales 32-pixel images to 256-pixel tiles
    for entry in test:
        shown = boxes[entry["case"]]
        # the findings with a ground-truth box, and those predicted (probability >= 0.5)
        expected = [f for f in FINDINGS if f in entry["boxes"] or float(probs[entry["case"]][f]) >= 0.5]
        assert list(shown) == expected
        with Image.open(out / "panels_test" / f"{entry['case']}.png") as im:
            assert im.format == "PNG" and im.size == ((1 + len(shown)) * tile, CAPTION_HEIGHT + tile)
            panel = np.asarray(im.convert("RGB"))
        for i, (finding, record) in enumerate(shown.items(), start=1):
            area = panel[CAPTION_HEIGHT:, i * tile:(i + 1) * tile].reshape(-1, 3)
            assert record["gt_boxes"] == entry["boxes"].get(finding, [])
            if record["gt_boxes"]:
                assert (area == GT_COLOUR).all(1).any(), f"{finding}: no ground-truth box drawn"
            for x, y, _, _ in record["boxes"]:  # predicted boxes are drawn last: their corner is magenta
                assert tuple(panel[CAPTION_HEIGHT + y * 8, i * tile + x * 8]) == PRED_COLOUR
    box_rows = list(csv.DictReader((out / "boxes_test.csv").open()))
    assert len(box_rows) == sum(len(r["boxes"]) for per in boxes.values() for r in per.values())


def test_nobox_method_trains_without_box_term(tmp_path, twin):
    run(cmd("training", tmp_path, twin, "configs/methods/nobox.json", args=["--num_epochs", "1"]))
    assert load_checkpoint(tmp_path / "models" / "last.pt")["trainer"]["epoch"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert all(e.value == 0 for e in acc.Scalars("train_loss_ex_cls"))
    # its validation split has no box: mTIoU / mTIoR are undefined, so no "best" localisation checkpoint
    assert not (tmp_path / "models" / "model_mtiou.pt").exists()
    assert not (tmp_path / "models" / "model_mtior.pt").exists()


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


def test_packed_bundle_downloads_and_runs(tmp_path, twin):
    zip_path = tmp_path / "ham_nihcxr14.zip"
    run([sys.executable, str(REPO / "scripts" / "pack_bundle.py"), "ham_nihcxr14", "--out", str(zip_path)], cwd=REPO)
    run([sys.executable, "-m", "monai.bundle", "download", "--name", "ham_nihcxr14", "--url", zip_path.as_uri(),
         "--bundle_dir", str(tmp_path / "installed")], cwd=tmp_path)  # fmt: skip
    installed = tmp_path / "installed" / "ham_nihcxr14"
    assert (installed / "configs" / "train.json").is_file() and (installed / "LICENSE").is_file()
    assert (installed / "configs" / "methods" / "baseline.json").is_file()
    run(cmd("training", installed, twin, args=["--num_epochs", "1"]), cwd=installed)
    assert load_checkpoint(installed / "models" / "last.pt")["trainer"]["epoch"] == 1
