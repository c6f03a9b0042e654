"""MedMNIST npz reading, the dataset table, synthetic twins and the official metrics (spec ``specs/medvit.md`` 4, 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

from custom_components.data.medmnist import (
    MEDMNIST_INFO,
    MedMNISTDataset,
    auc_left_out,
    infer_medmnist_name,
    infer_medmnist_size,
    medmnist_metrics,
    resolve_medmnist_name,
)
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
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0  # noqa: SIM300 (a range reads left to right)
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
    name = "nodulemnist3d.npz" if size == 28 else f"nodulemnist3d_{size}.npz"  # the official MedMNIST+ name
    path = write_medmnist3d_twin(tmp_path / name, name="nodulemnist3d", n=(4, 2, 2), size=size)
    ds = MedMNISTDataset(path, "train", transform=lambda d: {**d, "seen": True})
    item = ds[1]
    assert item["image"].shape == (1, size, size, size) and item["seen"]
    assert item["label"].item() in (0, 1)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _valid_arrays(n=(4, 2, 2)):
    out = {}
    for split, k in zip(("train", "val", "test"), n, strict=True):
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
    with pytest.raises(InputDataError, match=r"train_labels.*out of range"):
        MedMNISTDataset(_write(tmp_path / "breastmnist.npz", **arrays), "train")

    arrays = _valid_arrays()
    arrays["test_labels"] = np.zeros((3, 1), np.uint8)
    with pytest.raises(InputDataError, match="test_images"):
        MedMNISTDataset(_write(tmp_path / "breastmnist.npz", **arrays), "test")

    arrays = _valid_arrays()
    arrays["train_images"] = np.zeros((4, 28, 28, 28), np.uint8)  # 3-D volumes in a 2-D dataset
    with pytest.raises(InputDataError, match="train_images"):
        MedMNISTDataset(_write(tmp_path / "breastmnist.npz", **arrays), "train")

    with pytest.raises(InputDataError, match=r"unknown MedMNIST.*pass --data_flag"):
        MedMNISTDataset(_write(tmp_path / "mystery.npz", **_valid_arrays()), "train")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "breastmnist.npz").write_bytes(b"not a zip")
    with pytest.raises(InputDataError, match="cannot read"):
        MedMNISTDataset(tmp_path / "junk" / "breastmnist.npz", "train")


def _one_line(err: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("file, shape, words", [
    ("breastmnist.npz", (4, 28, 20), ("must be square", "28 x 20")),
    ("pathmnist.npz", (4, 20, 28, 3), ("must be square", "20 x 28")),
    ("organmnist3d.npz", (4, 28, 28, 20), ("must be cubic", "28 x 28 x 20")),
    ("breastmnist.npz", (4, 64, 64), ("64 x 64", "promises 28", "breastmnist_64.npz")),
    ("breastmnist_224.npz", (4, 28, 28), ("28 x 28", "promises 224", "breastmnist.npz")),
    ("organmnist3d_64.npz", (4, 28, 28, 28), ("promises 64",)),
])
def test_wrong_shape_is_refused_not_resized(tmp_path, file, shape, words):
    name = file.split("_")[0].removesuffix(".npz")
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros(shape, np.uint8)
        arrays[f"{split}_labels"] = np.zeros((shape[0], 1), np.uint8)
    path = _write(tmp_path / file, **arrays)
    with pytest.raises(InputDataError) as err:
        MedMNISTDataset(path, "val")
    _one_line(err, path, "'val_images'", name, *words)


def test_size_argument_and_names(tmp_path):
    assert infer_medmnist_size("a/breastmnist.npz") == 28 and infer_medmnist_size("PathMNIST_224.npz") == 224
    assert infer_medmnist_size("breastmnist_100.npz") is None and infer_medmnist_name("breastmnist_100.npz") is None
    assert infer_medmnist_size("my_breast.npz") is None
    path = write_medmnist2d_twin(tmp_path / "breastmnist_64.npz", n=(2, 2, 2), size=64)
    assert MedMNISTDataset(path, "test", size=64)[0]["image"].shape == (1, 64, 64)
    with pytest.raises(InputDataError) as err:  # the bundles' --npz_size disagrees with the file
        MedMNISTDataset(path, "test", size=28)
    _one_line(err, path, "64 x 64", "--npz_size 64")


def test_custom_file_name_needs_the_dataset(tmp_path):
    custom = write_medmnist2d_twin(tmp_path / "my_ultrasound_export.npz", name="pathmnist", n=(3, 9, 2), size=32)
    ds = MedMNISTDataset(custom, "val", name="PathMNIST", size=32)  # any file name, the table from name=
    assert ds.name == "pathmnist" and len(ds) == 9 and ds[0]["image"].shape == (3, 32, 32)
    with pytest.raises(InputDataError) as err:  # nothing to infer from the name, no dataset given
        MedMNISTDataset(custom, "val")
    _one_line(err, custom, "pass --data_flag", "pathmnist")
    # the bundles resolve the table without reading the file; dim keeps 3-D sets out of the 2-D bundle
    assert resolve_medmnist_name(custom, "pathmnist", dim=2) == "pathmnist"
    assert resolve_medmnist_name(tmp_path / "bloodmnist_128.npz", None, dim=2) == "bloodmnist"
    for dataset, words in (("organmnist3d", ("3-D", "2-D")), ("pathmnistt", ("unknown", "'pathmnistt'"))):
        with pytest.raises(InputDataError) as err:
            resolve_medmnist_name(custom, dataset, dim=2)
        _one_line(err, custom, *words)
    official = tmp_path / "organamnist.npz"
    with pytest.raises(InputDataError) as err:  # an official name contradicting --dataset
        resolve_medmnist_name(official, "breastmnist", dim=2)
    _one_line(err, official, "organamnist", "pass --data_flag organamnist")


@pytest.mark.parametrize("dim", [2, 3])
def test_missing_or_empty_split(tmp_path, dim):
    """A test-only file: the training workflow stops at its first split with one line, evaluation works."""
    name = "breastmnist" if dim == 2 else "organmnist3d"
    shape = (28,) * dim
    arrays = {"test_images": np.zeros((3, *shape), np.uint8), "test_labels": np.zeros((3, 1), np.uint8)}
    only_test = _write(tmp_path / f"{name}.npz", **arrays)
    assert len(MedMNISTDataset(only_test, "test")) == 3
    with pytest.raises(InputDataError) as err:
        MedMNISTDataset(only_test, "train")
    _one_line(err, only_test, "no 'train' split", "'train_images'")
    # the same file with empty training arrays (what a "test-only" export can hold): no sampler traceback
    arrays.update(train_images=np.zeros((0, *shape), np.uint8), train_labels=np.zeros((0, 1), np.uint8),
                  val_images=np.zeros((0, *shape), np.uint8), val_labels=np.zeros((0, 1), np.uint8))
    (tmp_path / "empty").mkdir()
    empty = _write(tmp_path / "empty" / f"{name}.npz", **arrays)
    for split in ("train", "val"):
        with pytest.raises(InputDataError) as err:
            MedMNISTDataset(empty, split)
        _one_line(err, empty, f"the {split!r} split is empty", f"'{split}_images'")


def test_auc_left_out():
    assert auc_left_out("multi-class", np.array([0, 0, 2, 2]), 4) == {1: "absent", 3: "absent"}
    assert auc_left_out("multi-class", np.array([[1], [1]]), 3) == {0: "absent", 1: "present in every sample", 2: "absent"}
    assert auc_left_out("binary-class", np.array([0, 0, 0]), 2) == {1: "absent"}
    assert auc_left_out("binary", np.array([0, 1]), 1) == {}
    y = np.array([[0, 1, 1], [0, 1, 0]])
    assert auc_left_out("multi-label", y, 3) == {0: "absent", 1: "present in every sample"}


def test_absent_class_is_named_in_a_warning_and_the_report(tmp_path, caplog):
    """An absent class leaves the mean AUC as before, but a warning and the report's notes say which."""
    import json
    import logging

    from ignite.engine import Engine

    from custom_components.handlers.report import MetricsReportWriter
    from custom_components.metrics.medmnist_metrics import MedMNISTACC, MedMNISTAUC

    arrays = {f"{s}_images": np.zeros((6, 28, 28, 3), np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0], [1], [2], [0], [1], [2]], np.uint8) for s in ("train", "val", "test")})
    ds = MedMNISTDataset(_write(tmp_path / "pathmnist.npz", **arrays), "test")  # 9 classes, 3 present
    logits = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))

    def step(engine, batch):
        i = engine.state.iteration - 1 - (engine.state.epoch - 1) * 2
        return logits[3 * i: 3 * i + 3], batch["label"]

    engine = Engine(step)
    MedMNISTAUC("multi-class").attach(engine, "AUC")
    MedMNISTACC("multi-class").attach(engine, "ACC")
    MetricsReportWriter(tmp_path / "eval", metric_names=["ACC", "AUC"]).attach(engine)
    with caplog.at_level(logging.WARNING):
        state = engine.run(torch.utils.data.DataLoader(ds, batch_size=3), max_epochs=2)  # 2 epochs: one warning
    expected = medmnist_metrics("multi-class", torch.softmax(logits.double(), 1), ds.labels)["AUC"]
    assert state.metrics["AUC"] == pytest.approx(expected)  # value semantics unchanged
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    for words in ("AUC (MedMNISTAUC)", "classes 3, 4, 5, 6, 7, 8 absent", "'test' split (6 samples)", "other 3 of 9"):
        assert words in warned[0], warned[0]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["notes"] == warned
    assert f"- {warned[0]}" in (tmp_path / "eval" / "metrics.md").read_text()


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


@pytest.mark.parametrize("bundle, name, dim", [("medvit_medmnist2d", "pathmnist", 2),
                                               ("medvit3d_medmnist3d", "nodulemnist3d", 3)])
def test_bundle_npz_path_any_name(tmp_path, bundle, name, dim):
    """--npz_path takes any file name; --dataset then gives the task table; without it one clear error."""
    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs"
    writer = write_medmnist2d_twin if dim == 2 else write_medmnist3d_twin
    custom = writer(tmp_path / "export 2024.npz", name=name, n=(4, 3, 2), size=28)

    def parser(**overrides) -> ConfigParser:
        p = ConfigParser()
        p.read_config([configs / "train.json", configs / "evaluate.json"])
        p.update({"dataset_dir": str(tmp_path / "unused"), **overrides})
        return p

    default = parser()  # unchanged default: <dataset_dir>/<default dataset>.npz
    default_name = "breastmnist" if dim == 2 else "organmnist3d"
    assert default.get_parsed_content("npz_path") == str(tmp_path / "unused" / f"{default_name}.npz")
    p = parser(npz_path=str(custom), data_flag=name)
    assert p.get_parsed_content("dataset_name") == name
    assert p.get_parsed_content("num_classes") == MEDMNIST_INFO[name]["n_classes"]
    for key, n in (("train#dataset", 4), ("validate#dataset", 3), ("dataset", 2)):
        ds = p.get_parsed_content(key)
        assert ds.path == custom and ds.name == name and len(ds) == n
    with pytest.raises(Exception) as err:  # MONAI wraps it; the bundles' error hook prints the InputDataError
        parser(npz_path=str(custom)).get_parsed_content("num_classes")
    from custom_components.errors import find_input_error

    found = find_input_error(err.value)
    assert found is not None and found.source == str(custom) and "pass --data_flag" in found.problem
    # an official MedMNIST+ name is enough on its own; its side must match --npz_size
    plus = writer(tmp_path / f"{name}_64.npz", name=name, n=(2, 2, 2), size=64)
    assert parser(npz_path=str(plus), npz_size=64).get_parsed_content("dataset").name == name
    with pytest.raises(Exception) as err:
        parser(npz_path=str(plus)).get_parsed_content("dataset")
    assert "--npz_size 64" in find_input_error(err.value).problem
