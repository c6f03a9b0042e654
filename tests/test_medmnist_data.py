"""MedMNIST npz reading, the dataset table, synthetic twins and the official metrics (spec ``specs/medvit.md`` 4, 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

from custom_components.data.medmnist import MEDMNIST_INFO, MedMNISTDataset, infer_medmnist_name, medmnist_metrics
from custom_components.data.synthetic import write_medmnist2d_twin, write_medmnist3d_twin
from custom_components.io import InputDataError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "breastmnist.npz"


def test_info_table():
    assert len([k for k, v in MEDMNIST_INFO.items() if v["dim"] == 2]) == 12
    assert len([k for k, v in MEDMNIST_INFO.items() if v["dim"] == 3]) == 6
    assert MEDMNIST_INFO["chestmnist"]["task"] == "multi-label" and MEDMNIST_INFO["chestmnist"]["n_classes"] == 14
    assert MEDMNIST_INFO["retinamnist"]["task"] == "ordinal-regression"
    assert MEDMNIST_INFO["breastmnist"]["n_samples"] == {"train": 546, "val": 78, "test": 156}
    assert MEDMNIST_INFO["organmnist3d"]["n_samples"] == {"train": 971, "val": 161, "test": 610}
    assert infer_medmnist_name("x/OrganMNIST3D_64.npz") == "organmnist3d"
    assert infer_medmnist_name("breastmnist_224.npz") == "breastmnist"


@pytest.mark.skipif(not REAL.is_file(), reason="real BreastMNIST sample absent")
def test_real_breastmnist():
    counts = {s: len(MedMNISTDataset(REAL, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 546, "val": 78, "test": 156}
    train = MedMNISTDataset(REAL, "train")
    assert train.class_counts().tolist() == [147, 399]
    item = train[0]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].dtype == torch.long and item["label"].ndim == 0


@pytest.mark.parametrize("name, shape", [("breastmnist", (1, 28, 28)), ("pathmnist", (3, 28, 28)),
                                         ("chestmnist", (1, 28, 28))])
def test_2d_twins(tmp_path, name, shape):
    path = write_medmnist2d_twin(tmp_path / f"{name}.npz", name=name, n=(30, 10, 10))
    ds = MedMNISTDataset(path, "val")
    assert len(ds) == 10
    item = ds[0]
    assert item["image"].shape == shape
    n = MEDMNIST_INFO[name]["n_classes"]
    if name == "chestmnist":
        assert item["label"].shape == (n,) and item["label"].dtype == torch.float32
    else:
        assert MedMNISTDataset(path, "train").class_counts().min() >= 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, *shape)


@pytest.mark.parametrize("size", [28, 64])
def test_3d_twin(tmp_path, size):
    path = write_medmnist3d_twin(tmp_path / "nodulemnist3d.npz", name="nodulemnist3d", n=(4, 2, 2), size=size)
    ds = MedMNISTDataset(path, "train", transform=lambda d: {**d, "seen": True})
    item = ds[1]
    assert item["image"].shape == (1, size, size, size) and item["seen"]
    assert item["label"].item() in (0, 1)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _valid_arrays(n=(4, 2, 2)):
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        out[f"{split}_images"] = np.zeros((k, 28, 28), np.uint8)
        out[f"{split}_labels"] = np.zeros((k, 1), np.uint8)
    return out


def test_bad_files(tmp_path):
    arrays = _valid_arrays()
    del arrays["val_labels"]
    bad = _write(tmp_path / "breastmnist.npz", **arrays)
    MedMNISTDataset(bad, "train")  # other splits still readable
    with pytest.raises(InputDataError, match="val_labels") as err:
        MedMNISTDataset(bad, "val")
    assert "breastmnist.npz" in str(err.value)

    arrays = _valid_arrays()
    arrays["train_labels"][2, 0] = 2  # BreastMNIST is binary
    with pytest.raises(InputDataError, match="train_labels.*out of range"):
        MedMNISTDataset(_write(tmp_path / "breastmnist.npz", **arrays), "train")

    arrays = _valid_arrays()
    arrays["test_labels"] = np.zeros((3, 1), np.uint8)
    with pytest.raises(InputDataError, match="test_images"):
        MedMNISTDataset(_write(tmp_path / "breastmnist.npz", **arrays), "test")

    arrays = _valid_arrays()
    arrays["train_images"] = np.zeros((4, 28, 28, 28), np.uint8)  # 3-D volumes in a 2-D dataset
    with pytest.raises(InputDataError, match="train_images"):
        MedMNISTDataset(_write(tmp_path / "breastmnist.npz", **arrays), "train")

    with pytest.raises(InputDataError, match="unknown MedMNIST"):
        MedMNISTDataset(_write(tmp_path / "mystery.npz", **_valid_arrays()), "train")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "breastmnist.npz").write_bytes(b"not a zip")
    with pytest.raises(InputDataError, match="cannot read"):
        MedMNISTDataset(tmp_path / "junk" / "breastmnist.npz", "train")


def test_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    # binary: (N, 2) softmax scores -> last column; also (N,) scores
    y = rng.integers(0, 2, 40)
    p1 = np.clip(y * 0.3 + rng.random(40) * 0.7, 0, 1)
    p1[:4] = 0.5  # ties
    scores = np.stack([1 - p1, p1], 1)
    m = medmnist_metrics("binary-class", scores, y[:, None])
    assert m["AUC"] == pytest.approx(roc_auc_score(y, p1))
    assert m["ACC"] == pytest.approx(accuracy_score(y, p1 > 0.5))
    assert medmnist_metrics("binary", torch.tensor(p1), torch.tensor(y)) == pytest.approx(m)

    # multi-class: one-vs-rest mean AUC, argmax ACC
    y = rng.integers(0, 4, 50)
    logits = rng.normal(size=(50, 4)) + np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = medmnist_metrics("multi-class", probs, y[:, None])
    ovr = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(4)])
    assert m["AUC"] == pytest.approx(ovr)
    assert m["AUC"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["ACC"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert medmnist_metrics("ordinal-regression", probs, y) == pytest.approx(m)

    # multi-label: mean per-label AUC, mean per-label ACC at 0.5
    y = rng.integers(0, 2, (30, 5))
    probs = np.clip(y * 0.4 + rng.random((30, 5)) * 0.6, 0, 1)
    m = medmnist_metrics("multi-label, binary-class", probs, y)
    assert m["AUC"] == pytest.approx(roc_auc_score(y, probs, average="macro"))
    assert m["ACC"] == pytest.approx(np.mean([accuracy_score(y[:, i], probs[:, i] > 0.5) for i in range(5)]))
