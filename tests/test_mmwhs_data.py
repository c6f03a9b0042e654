"""MM-WHS data and per-volume metrics (spec lvmmed.md sections 4 and 7).

Label mapping round trip; the reference's intensity pipeline against a direct formula; the
published split; preparation on the format twin (slice labels = label 420 present, source grid);
balanced training slices; bad inputs as one line naming the file; per-volume 3-D IoU / Dice of
stacked slices equal to the closed form on the 3-D array and to MONAI's metrics on the one-hot
volume; the NIfTI prediction writer puts the predicted classes back on the label's grid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.data import mmwhs
from custom_components.data.datalists import load_split
from custom_components.data.synthetic import write_mmwhs_twin
from custom_components.io import InputDataError
from custom_components.metrics.volume_segmentation import VolumeSegmentationMetric, stack_slices, volume_scores


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return write_mmwhs_twin(tmp_path_factory.mktemp("mmwhs"), n_per_split=(2, 1, 1), shape=(24, 20, 8), seed=1)


@pytest.fixture(scope="module")
def store(twin, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    return mmwhs.prepare_mmwhs(twin, out, image_size=16, progress=False)


def test_label_mapping_round_trip():
    rng = np.random.default_rng(0)
    values = rng.choice(mmwhs.LABEL_VALUES, size=(5, 6, 7)).astype(np.int16)
    classes = mmwhs.map_labels(values)
    assert classes.dtype == np.uint8 and set(np.unique(classes)) <= set(range(8))
    np.testing.assert_array_equal(mmwhs.unmap_labels(classes), values)
    assert mmwhs.map_labels(np.array([420.0, 0.0, 850.0])).tolist() == [2, 0, 7]
    np.testing.assert_array_equal(mmwhs.map_labels(mmwhs.unmap_labels(np.arange(8))), np.arange(8))


def test_intensity_pipeline_matches_the_formula():
    v = np.random.default_rng(1).normal(100, 300, (10, 11, 12)).astype(np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    c = np.clip(v, lo, hi)
    expected = np.rint(np.clip((c - c.mean()) / c.std() / 10, 0, 1) * 255)
    out = mmwhs.normalise_intensity(v)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected).max() <= 1  # float32 vs float64 rounding at .5
    assert not mmwhs.normalise_intensity(np.full((3, 3, 3), 7.0)).any()


def test_published_splits():
    for modality in ("ct", "mr"):
        split = load_split(f"mmwhs_{modality}")
        assert [len(split[k]) for k in ("training", "validation", "test")] == [13, 3, 4]
        assert split["test"] == [f"{modality}_train_{n}" for n in (1002, 1010, 1012, 1019)]
        assert sorted(c for v in split.values() for c in v) == [f"{modality}_train_{n}" for n in range(1001, 1021)]


def test_preparation_on_the_twin(twin, store):
    datalist = json.loads(store.read_text())
    assert {k: [e["case"] for e in v] for k, v in datalist.items()} == {
        "training": ["ct_train_1001", "ct_train_1003"], "validation": ["ct_train_1004"], "test": ["ct_train_1002"]}
    meta = json.loads((store.parent / "ct_train_1001" / "meta.json").read_text())
    label = nib.load(twin / "ct_train" / "ct_train_1001_label.nii.gz")
    seg = np.asarray(label.dataobj)
    assert meta["labels"] == [int((seg[:, :, k] == 420).any()) for k in range(seg.shape[2])]
    assert 0 < sum(meta["labels"]) < len(meta["labels"])
    np.testing.assert_allclose(meta["grid"]["affine"], label.affine)
    image = np.load(store.parent / "ct_train_1001" / "image.npy")
    mask = np.load(store.parent / "ct_train_1001" / "mask.npy")
    assert image.shape == (8, 1, 16, 16) and image.dtype == np.uint8 and mask.shape == (8, 16, 16)
    # nearest resize of slice k = source [:, :, k] transposed
    rows = (np.arange(16) * 20 / 16).astype(int)
    cols = (np.arange(16) * 24 / 16).astype(int)
    np.testing.assert_array_equal(mask[3], mmwhs.map_labels(seg[:, :, 3].T[np.ix_(rows, cols)]))
    # a second preparation skips the prepared cases
    before = (store.parent / "ct_train_1001" / "image.npy").stat().st_mtime_ns
    mmwhs.prepare_mmwhs(twin, store.parent, image_size=16, progress=False)
    assert (store.parent / "ct_train_1001" / "image.npy").stat().st_mtime_ns == before


def test_balanced_training_slices(store):
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 0])
    idx = mmwhs.balanced_indices(labels, seed=3)
    assert len(idx) == 6 and {1, 4, 7} <= set(idx) and idx == sorted(idx)
    assert mmwhs.balanced_indices(labels, seed=3) == idx
    assert mmwhs.balanced_indices(np.array([1, 1, 1, 0]), 0) == [0, 1, 2, 3]
    train = mmwhs.MMWHSSlices(store, "training", "balanced", "unit")
    n_pos = sum(int(e["n_positive"]) for e in json.loads(store.read_text())["training"])
    assert len(train) == 2 * n_pos
    item = train[0]
    assert item["image"].shape == (1, 16, 16) and item["label"].shape == (1, 16, 16) and float(item["image"].max()) <= 1


def _prepare_error(root, tmp_path) -> str:
    with pytest.raises(InputDataError) as e:
        mmwhs.prepare_mmwhs(root, tmp_path / "out", image_size=16, progress=False)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("problem", ["value", "shape", "affine", "missing", "unreadable"])
def test_bad_inputs_one_line_naming_the_file(problem, twin, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(twin, root)
    label = root / "ct_train" / "ct_train_1003_label.nii.gz"
    img = nib.load(label)
    data = np.asarray(img.dataobj)
    if problem == "value":
        data = data.copy()
        data[0, 0, 0] = 421
        nib.save(nib.Nifti1Image(data, img.affine, img.header), label)
        assert _prepare_error(root, tmp_path).startswith(f"{label}: label values outside {{0, 205, 420")
        assert "421" in _prepare_error(root, tmp_path)
    elif problem == "shape":
        nib.save(nib.Nifti1Image(data[:, :, :-1], img.affine, img.header), label)
        assert _prepare_error(root, tmp_path).startswith(f"{label}: case ct_train_1003: label shape (24, 20, 7) differs")
    elif problem == "affine":
        affine = img.affine.copy()
        affine[0, 3] += 5
        nib.save(nib.Nifti1Image(data, affine), label)
        assert _prepare_error(root, tmp_path).startswith(f"{label}: case ct_train_1003: label affine differs")
    elif problem == "missing":
        label.unlink()
        assert _prepare_error(root, tmp_path).startswith(f"{label}: case ct_train_1003: missing label file")
    else:
        image = root / "ct_train" / "ct_train_1003_image.nii.gz"
        image.write_bytes(image.read_bytes()[:200])
        assert _prepare_error(root, tmp_path).startswith(f"{image}: case ct_train_1003: cannot read")


def test_stacked_slice_iou_equals_3d_iou_and_monai():
    from monai.metrics import DiceMetric, MeanIoU

    rng = np.random.default_rng(2)
    label = rng.integers(0, 8, (6, 9, 10))
    pred = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, 8, label.shape))
    pred[pred == 6] = 0  # a class predicted nowhere
    scores = volume_scores(stack_slices({k: pred[k] for k in range(6)[::-1]}), label, 8)
    for c in range(1, 8):
        p, y = pred == c, label == c
        assert scores["iou"][c - 1] == pytest.approx((p & y).sum() / (p | y).sum())
        assert scores["dice"][c - 1] == pytest.approx(2 * (p & y).sum() / (p.sum() + y.sum()))
    onehot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a), 8).permute(3, 0, 1, 2)[None].float()  # noqa: E731
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(onehot(pred), onehot(label))
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(onehot(pred), onehot(label))
    np.testing.assert_allclose(scores["iou"], iou[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores["dice"], dice[0].numpy(), rtol=1e-6)

    # the Ignite metric over shuffled slice batches of two volumes gives the same per-volume numbers
    metric = VolumeSegmentationMetric(mmwhs.STRUCTURES, target_class=2, prefix="val_")
    metric.reset()
    other = np.zeros_like(label)
    items = [("a", k, pred[k], label[k]) for k in range(6)] + [("b", k, other[k], label[k]) for k in range(6)]
    for i in rng.permutation(len(items)).reshape(3, 4):
        logits = torch.nn.functional.one_hot(torch.as_tensor(np.stack([items[j][2] for j in i])), 8).permute(0, 3, 1, 2)
        lab = torch.as_tensor(np.stack([items[j][3] for j in i]))[:, None].float()
        metric.update((logits.float(), lab, [items[j][0] for j in i], torch.tensor([items[j][1] for j in i])))
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))
    metric.completed(engine, "val_iou")
    rows = {r["case"]: r for r in metric.per_volume}
    assert rows["a"]["iou_la_blood"] == pytest.approx(scores["iou"][1])
    assert rows["b"]["iou_la_blood"] == 0.0
    assert engine.state.metrics["val_iou"] == pytest.approx(scores["iou"][1] / 2)
    assert engine.state.metrics["val_dice"] == pytest.approx(scores["dice"][1] / 2)
    assert engine.state.metrics["val_mean_iou"] == pytest.approx(scores["iou"].mean() / 2)


def test_prediction_writer_puts_classes_on_the_label_grid(twin, store, tmp_path):
    from custom_components.handlers.volume_segmentation import VolumePredictionWriter

    case = "ct_train_1002"
    mask = np.load(store.parent / case / "mask.npy")  # the prepared label: a perfect prediction
    writer = VolumePredictionWriter(tmp_path / "out", store.parent, mmwhs.LABEL_VALUES, csv_path=tmp_path / "p.csv")
    writer.reset()
    for a in (4, 0):  # batches in any order; the volume is written once complete
        logits = torch.nn.functional.one_hot(torch.as_tensor(mask[a : a + 4]).long(), 8).permute(0, 3, 1, 2).float()
        engine = SimpleNamespace(state=SimpleNamespace(
            output={"pred": logits}, batch={"case": [case] * 4, "slice": torch.arange(a, a + 4)}))
        writer.collect(engine)
    writer.finish(None)
    out = nib.load(tmp_path / "out" / f"{case}_pred.nii.gz")
    label = nib.load(twin / "ct_train" / f"{case}_label.nii.gz")
    assert out.shape == label.shape and out.get_data_dtype() == np.uint16
    np.testing.assert_allclose(out.affine, label.affine, atol=1e-5)
    pred, seg = np.asarray(out.dataobj), np.asarray(label.dataobj)
    assert set(np.unique(pred)) <= set(mmwhs.LABEL_VALUES)
    # 16 px store, 24 x 20 source: nearest down and up again loses thin parts only
    assert (pred == seg).mean() > 0.8
    assert "ct_train_1002_pred.nii.gz" in (tmp_path / "p.csv").read_text()


def test_reference_frame_split_to_volumes_and_script(tmp_path, twin):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import prepare_mmwhs

    from custom_components.data.splits import set_sizes

    assert set_sizes(20, mmwhs.SPLIT_RATIOS) == (13, 3, 4)
    ref = {"train": ["ct_train_1020_image_frame_32.png", "ct_train_1006_image_frame_21.png", "ct_train_1020_image_frame_3.png"],
           "val": ["ct_train_1004_image_frame_1.png"], "test": ["ct_train_1019_label_frame_98.png"]}
    path = tmp_path / "MMWHS_CT_Heart.json"
    path.write_text(json.dumps(ref))
    assert mmwhs.reference_split_volumes(path) == {
        "training": ["ct_train_1006", "ct_train_1020"], "validation": ["ct_train_1004"], "test": ["ct_train_1019"]}
    out = tmp_path / "mmwhs_ct.json"
    assert prepare_mmwhs.main(["split_from_reference", "--split_json", str(path), "--out", str(out)]) == 0
    assert load_split(out) == mmwhs.reference_split_volumes(path)
    ref["test"].append("ct_train_1006_image_frame_2.png")
    path.write_text(json.dumps(ref))
    with pytest.raises(InputDataError, match="ct_train_1006 has frames in both 'training' and 'test'"):
        mmwhs.reference_split_volumes(path)
    store = tmp_path / "store"
    assert prepare_mmwhs.main(["prepare", "--dataset_dir", str(twin), "--output_dir", str(store), "--image_size", "16",
                               "--progress", "False", "--split", "random"]) == 0  # fmt: skip
    assert sorted(c for v in load_split(store / "split.json").values() for c in v) == sorted(
        mmwhs.find_cases(twin, "ct"))
