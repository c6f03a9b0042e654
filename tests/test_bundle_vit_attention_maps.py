"""End-to-end checks of bundles/vit_attention_maps_{kvasir,mura} on their format twins, in subprocesses.

Per bundle: train (demo settings, a tiny ViT at 32x32), evaluate, inference CSV, explain (every
method's maps), evaluate_explanations (against the twin's masks / boxes, checked against an
independent numpy computation), TensorBoard content, verify_metadata, verify_net_in_out (ViT-B/16
at 224), the four initialisations wired to local checkpoints built here, and a clear error for
bad input. Once (Kvasir): torchrun with 2 CPU processes, TorchScript export, resume after a
kill; once (MURA): pack -> download -> run.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_components.data.synthetic import write_kvasir_twin, write_mura_twin, write_standin_vit_checkpoints
from custom_components.io import load_checkpoint

from bundle_utils import REPO, SCHEMA, config_arg, kill_once_checkpointed, verify_bundle
from bundle_utils import run as _run

pytestmark = pytest.mark.slow

BUNDLES = {"kvasir": REPO / "bundles" / "vit_attention_maps_kvasir", "mura": REPO / "bundles" / "vit_attention_maps_mura"}
METHODS = ["attention", "rollout", "gae", "chefer", "gradcam", "eafem"]
SMALL = ["--image_size", "32", "--resize_short", "36", "--network_def#patch_size", "8"]


def cmd(bundle: str, run_id: str, bundle_root: Path, dataset_dir: Path, *extra: str, args=()) -> list[str]:
    gt = ["--masks_dir", "masks"] if bundle == "kvasir" else ["--boxes_json", str(dataset_dir / "mura_boxes.json")]
    return [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra),
        "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset_dir), *SMALL, *gt, *args,
    ]  # fmt: skip


def run(bundle: str, command, **kwargs):
    return _run(command, cwd=BUNDLES[bundle], **kwargs)


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("twins")
    return {
        "kvasir": write_kvasir_twin(root / "kvasir", n_per_class=10, size=(80, 64), seed=1),
        "mura": write_mura_twin(root / "mura", n_patients=8, size=(48, 64), seed=2),
    }


@pytest.fixture(scope="module", params=["kvasir", "mura"])
def trained(request, tmp_path_factory, twins) -> tuple[str, Path, Path]:
    bundle = request.param
    root = tmp_path_factory.mktemp(f"{bundle}_root")
    run(bundle, cmd(bundle, "training", root, twins[bundle], args=["--num_epochs", "2"]))
    return bundle, root, twins[bundle]


def test_training_outputs_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle, root, _ = trained
    models = root / "models" / "random"  # one folder per initialisation
    assert (models / "model.pt").is_file()
    last = load_checkpoint(models / "last.pt")
    assert last["trainer"]["epoch"] == 2 and set(last) >= {"network", "optimizer", "lr_scheduler", "best"}
    state = torch.load(models / "model.pt", weights_only=True)
    assert state["head.weight"].shape[0] == 2
    datalist = json.loads((root / "datalists" / f"{bundle}.json").read_text())
    assert set(datalist) == {"training", "validation", "test"} and all(datalist.values())
    events = list((root / "eval" / "random" / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"train_loss", "val_loss", "val_auroc", "val_accuracy"} <= set(acc.Tags()["scalars"])
    assert {"val_gae/image", "val_gae/map"} <= set(acc.Tags()["images"])


def test_evaluate_and_inference(trained):
    bundle, root, twin = trained
    run(bundle, cmd(bundle, "evaluating", root, twin, "configs/evaluate.json"))
    report = json.loads((root / "eval" / "random" / "metrics_test.json").read_text())
    assert {"f1", "accuracy", "auroc"} <= set(report["metrics"])
    run(bundle, cmd(bundle, "inferring", root, twin, "configs/inference.json"))
    with open(root / "eval" / "random" / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    n_test = len(json.loads((root / "datalists" / f"{bundle}.json").read_text())["test"])
    assert len(rows) == n_test
    for r in rows:
        assert abs(float(r["prob_0"]) + float(r["prob_1"]) - 1) < 1e-5
        assert int(r["pred"]) == int(float(r["prob_1"]) > float(r["prob_0"]))


def test_explain_then_evaluate_explanations(trained):
    bundle, root, twin = trained
    run(bundle, cmd(bundle, "explaining", root, twin, "configs/explain.json"))
    folder = root / "eval" / "random" / "explanations"
    index = json.loads((folder / "index.json").read_text())
    test = json.loads((root / "datalists" / f"{bundle}.json").read_text())["test"]
    assert index["methods"] == METHODS and index["target"] == 1 and index["init"] == "random"
    assert [it["image"] for it in index["items"]] == [e["image"] for e in test]
    assert [it["has_mask"] for it in index["items"]] == [("mask" in e or "boxes" in e) for e in test]
    assert index["n_annotated"] >= 1, "the twin's test split should hold an annotated image"
    n = len(test)
    masks = np.load(folder / "masks.npy")
    assert masks.shape == (n, 32, 32) and np.load(folder / "images.npy").shape == (n, 32, 32, 3)
    for m in METHODS:
        maps = np.load(folder / "maps" / f"{m}.npy")
        assert maps.shape == (n, 32, 32) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1

    run(bundle, cmd(bundle, "evaluating_explanations", root, twin, "configs/evaluate_explanations.json",
                    args=["--faithfulness_steps", "4"]))  # fmt: skip
    summary = json.loads((root / "eval" / "random" / "explanation_metrics.json").read_text())
    assert summary["n_annotated"] == index["n_annotated"]
    assert set(summary["metrics"]) == set(METHODS)
    keys = {"pointing_game", "iou_top5", "iou_top10", "iou_top20", "iou_top40", "energy_pointing_game",
            "deletion_auc", "insertion_auc"}  # fmt: skip
    assert all(set(v) == keys for v in summary["metrics"].values())
    # independent numpy check of the pointing game and top-10 % IoU of one method
    maps = np.load(folder / "maps" / "gradcam.npy")
    hits, ious = [], []
    for i in np.flatnonzero(masks.reshape(n, -1).any(1)):
        m, g = maps[i], masks[i] > 0
        hits.append(float(g[m == m.max()].any()))
        thr = np.sort(m.ravel())[::-1][int(m.size * 10 / 100)]
        rows, cols = np.flatnonzero((m >= thr).any(1)), np.flatnonzero((m >= thr).any(0))
        box = np.zeros_like(g)
        box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
        ious.append((box & g).sum() / (box | g).sum())
    assert summary["metrics"]["gradcam"]["pointing_game"] == pytest.approx(np.mean(hits))
    assert summary["metrics"]["gradcam"]["iou_top10"] == pytest.approx(np.mean(ious), abs=1e-6)
    with open(root / "eval" / "random" / "explanation_scores.csv") as f:
        assert len(list(csv.DictReader(f))) == n * len(METHODS)
    # the HTML report reads the run folder the bundle wrote
    proc = _run([sys.executable, str(REPO / "scripts" / "explanation_report.py"), "--eval_dir", str(root / "eval"),
                 "--out", str(root / "report.html"), "--n_examples", "2"], cwd=REPO)  # fmt: skip
    html = (root / "report.html").read_text()
    assert html.count("<img") == 2 * (2 + len(METHODS)) and "random" in proc.stdout


@pytest.mark.parametrize("bundle", ["kvasir", "mura"])
@pytest.mark.parametrize("init", ["sup", "dino", "mae"])
def test_initialisations_load_local_checkpoints(bundle, init, tmp_path):
    from monai.bundle import ConfigParser

    from custom_components.networks import AttributionViT

    # stand-ins in the released layouts: timm state dict, full DINO checkpoint, fine-tuned MAE
    path = write_standin_vit_checkpoints(tmp_path, img_size=32, patch_size=8, hidden_size=64, num_layers=2,
                                         num_heads=4, mlp_dim=128, seed=5)[init]  # fmt: skip
    torch.manual_seed(5 + ["sup", "dino", "mae"].index(init))  # the stand-ins' documented seeds
    src = AttributionViT(img_size=32, patch_size=8, num_classes=1000, hidden_size=64, num_layers=2, num_heads=4,
                         mlp_dim=128, pos_embed="learnable")  # fmt: skip
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("head")}
    configs = BUNDLES[bundle] / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "demo.json"), str(configs / "init" / f"{init}.json")])
    parser.update({"bundle_root": str(tmp_path), "image_size": 32, "network_def#patch_size": 8,
                   "pretrained_path": str(path), "device": "cpu"})  # fmt: skip
    assert parser.get_parsed_content("init") == init
    assert parser.get_parsed_content("ckpt_dir").endswith(f"models/{init}")
    net = parser.get_parsed_content("network_def")
    loaded = net.state_dict()
    for k, v in backbone.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    assert loaded["head.weight"].shape == (2, 64)


def test_init_hyperparameters_follow_the_study():
    inits = ("random", "sup", "dino", "mae")
    kv = {n: json.loads((BUNDLES["kvasir"] / "configs" / "init" / f"{n}.json").read_text()) for n in inits}
    assert [kv[n]["learning_rate"] for n in kv] == [0.08, 0.0018, 0.0012, 0.02]
    assert [kv[n]["weight_decay"] for n in kv] == [0.0, 0.0, 1e-4, 1e-4]
    assert all(v["momentum"] == 0.1 and v["batch_size"] == 32 and v["num_epochs"] == 25 for v in kv.values())
    mu = {n: json.loads((BUNDLES["mura"] / "configs" / "init" / f"{n}.json").read_text()) for n in inits}
    assert [mu[n]["num_epochs"] for n in mu] == [200, 100, 150, 100]
    assert all(v["learning_rate"] == 1e-3 and v["momentum"] == 0.9 and v["weight_decay"] == 1e-4 and v["batch_size"] == 64
               for v in mu.values())  # fmt: skip


@pytest.mark.parametrize("bundle", ["kvasir", "mura"])
def test_verify_metadata_and_net_in_out(bundle, monkeypatch):
    if not SCHEMA.is_file():
        pytest.skip("shared schema not present")
    verify_bundle(BUNDLES[bundle], monkeypatch)


def test_missing_checkpoint_and_corrupt_image_give_one_clear_error(tmp_path, twins):
    proc = run("kvasir", cmd("kvasir", "training", tmp_path / "a", twins["kvasir"], args=["--init", "dino"]), check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "pretrained_path" in proc.stderr
    assert "Traceback" not in proc.stderr
    import shutil

    broken = tmp_path / "kvasir"
    shutil.copytree(twins["kvasir"], broken)
    victim = sorted((broken / "kvasir-dataset-v2" / "esophagitis").glob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.7)])  # truncated JPEG: headers intact, so verify() would pass
    proc = run("kvasir", cmd("kvasir", "training", tmp_path / "b", broken, args=["--num_epochs", "1"]), check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and victim.name in proc.stderr
    assert "truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b" / "datalists" / "kvasir.json").exists()  # found while preparing, before any epoch
    proc = run("mura", cmd("mura", "training", tmp_path / "c", tmp_path / "nothing_here"), check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "MURA" in proc.stderr


def test_torchrun_export_and_resume_kvasir(tmp_path, twins):
    twin = twins["kvasir"]
    base = cmd("kvasir", "training", tmp_path / "ddp", twin, "configs/multi_gpu_train.json", args=["--num_epochs", "1"])
    run("kvasir", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29533", *base[1:]])
    models = tmp_path / "ddp" / "models" / "random"
    assert (models / "model.pt").is_file() and load_checkpoint(models / "last.pt")["trainer"]["epoch"] == 1
    assert len(list((tmp_path / "ddp" / "eval" / "random" / "tensorboard").glob("events.out.tfevents.*"))) == 1

    ts = tmp_path / "model.ts"
    run("kvasir", [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
                   "--ckpt_file", str(models / "model.pt"), "--meta_file", "configs/metadata.json",
                   "--config_file", config_arg("configs/train.json", "configs/demo.json"), *SMALL])  # fmt: skip
    from custom_components.networks import AttributionViT

    eager = AttributionViT(img_size=32, patch_size=8, num_classes=2, hidden_size=64, num_layers=2, num_heads=4,
                           mlp_dim=128, pos_embed="learnable")  # fmt: skip
    eager.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(ts))(x), eager.eval()(x), rtol=1e-5, atol=1e-5)

    epochs = 30
    resume_cmd = cmd("kvasir", "training", tmp_path / "resume", twin, args=["--num_epochs", str(epochs)])
    last = tmp_path / "resume" / "models" / "random" / "last.pt"
    kill_once_checkpointed(resume_cmd, BUNDLES["kvasir"], last, epochs)
    log = run("kvasir", resume_cmd)
    assert "resumed from" in log.stdout + log.stderr
    final = load_checkpoint(last)["trainer"]
    assert final["epoch"] == epochs and final["iteration"] == epochs * final["epoch_length"]


def test_packed_mura_bundle_downloads_and_runs(tmp_path, twins):
    zip_path = tmp_path / "vit_attention_maps_mura.zip"
    _run([sys.executable, str(REPO / "scripts" / "pack_bundle.py"), "vit_attention_maps_mura", "--out", str(zip_path)], cwd=REPO)
    _run([sys.executable, "-m", "monai.bundle", "download", "--name", "vit_attention_maps_mura", "--url",
          zip_path.as_uri(), "--bundle_dir", str(tmp_path / "installed")], cwd=tmp_path)  # fmt: skip
    installed = tmp_path / "installed" / "vit_attention_maps_mura"
    assert (installed / "configs" / "init" / "mae.json").is_file() and (installed / "LICENSE").is_file()
    _run(cmd("mura", "training", installed, twins["mura"], args=["--num_epochs", "1"]), cwd=installed)
    assert (installed / "models" / "random" / "model.pt").is_file()
