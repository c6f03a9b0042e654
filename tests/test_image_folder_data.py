"""Image-folder datalists (Kvasir v2, MURA v1.1, CP-CHILD, DUKE) and ImageFolderDataset on format twins."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from custom_components.data.image_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KVASIR_CLASSES,
    ImageFolderDataset,
    cp_child_datalist,
    duke_datalist,
    kvasir_datalist,
    mura_datalist,
    prepare_datalist,
    rasterise_boxes,
    write_datalist,
)
from custom_components.data.synthetic import write_kvasir_twin, write_mura_twin
from custom_components.io import InputDataError

REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def kvasir_root(tmp_path_factory):
    return write_kvasir_twin(tmp_path_factory.mktemp("kvasir"), n_per_class=6, size=(64, 48), seed=0)


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return write_mura_twin(tmp_path_factory.mktemp("mura"), n_patients=8, size=(40, 56), seed=0)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _all(dl):
    return [e for split in dl.values() for e in split]


def _cases_disjoint(dl):
    sets = {k: {e["case"] for e in v} for k, v in dl.items()}
    keys = list(sets)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not sets[a] & sets[b], (a, b)


# --------------------------------------------------------------------------- Kvasir


def test_kvasir_twin_layout(kvasir_root):
    base = kvasir_root / "kvasir-dataset-v2"
    assert sorted(os.listdir(base)) == sorted(KVASIR_CLASSES)
    for cls in KVASIR_CLASSES:
        files = os.listdir(base / cls)
        assert len(files) == 6 and all(f.endswith(".jpg") for f in files)
    with Image.open(next((base / "esophagitis").iterdir())) as im:
        assert im.format == "JPEG" and im.size == (64, 48)
    assert len(os.listdir(kvasir_root / "masks" / "kvasir-dataset-v2" / "esophagitis")) == 3


def test_kvasir_datalist(kvasir_root):
    dl = kvasir_datalist(kvasir_root, negatives=("normal-z-line", "polyps"), masks_dir="masks")
    assert list(dl) == ["training", "validation", "test"]
    entries = _all(dl)
    # labels equal an independent count from the folder names
    base = kvasir_root / "kvasir-dataset-v2"
    expected = {f"kvasir-dataset-v2/{c}/{f}": int(c == "esophagitis")
                for c in ("esophagitis", "normal-z-line", "polyps") for f in os.listdir(base / c)}
    assert {e["image"]: e["label"] for e in entries} == expected
    # per class: round(6 * 0.1) = 1 -> at least 1 val, round(6 * 0.2) = 1 test; negatives 12 -> 1 / 2
    assert [len(dl[k]) for k in ("training", "validation", "test")] == [13, 2, 3]
    assert all(sum(e["label"] for e in dl[k]) >= 1 for k in dl)
    _cases_disjoint(dl)
    # masks attached to exactly the esophagitis images that have one, with the mirrored name
    masked = [e for e in entries if "mask" in e]
    mask_dir = "masks/kvasir-dataset-v2/esophagitis"
    mask_files = {f"{mask_dir}/{f}" for f in os.listdir(kvasir_root / mask_dir)}
    assert {e["mask"] for e in masked} == mask_files
    for e in masked:
        assert Path(e["mask"]).stem == Path(e["image"]).stem and e["label"] == 1
    # default negatives: only normal-z-line
    assert {e["image"].split("/")[1] for e in _all(kvasir_datalist(kvasir_root))} == {"esophagitis", "normal-z-line"}


def test_kvasir_determinism(tmp_path):
    root = write_kvasir_twin(tmp_path, n_per_class=10, size=(16, 12), with_masks=False, seed=1)
    a, b = kvasir_datalist(root, seed=3), kvasir_datalist(root, seed=3)
    assert a == b
    c = kvasir_datalist(root, seed=4)
    assert any({e["case"] for e in a[k]} != {e["case"] for e in c[k]} for k in a)
    write_datalist(a, tmp_path / "dl" / "k.json")
    assert json.loads((tmp_path / "dl" / "k.json").read_text()) == a


def test_kvasir_bad_inputs(kvasir_root, tmp_path):
    root = _copy(kvasir_root, tmp_path)
    eso = root / "kvasir-dataset-v2" / "esophagitis"
    bad = sorted(eso.iterdir())[0]
    bad.write_bytes(b"this is not a jpeg")
    kvasir_datalist(root)  # headers are only checked on request
    with pytest.raises(InputDataError, match=bad.name):
        kvasir_datalist(root, check_images=True)
    for p in eso.iterdir():
        p.unlink()
    with pytest.raises(InputDataError, match=r"esophagitis.*no images"):
        kvasir_datalist(root)
    with pytest.raises(InputDataError, match="kvasir-dataset-v2"):
        kvasir_datalist(tmp_path / "nowhere")
    with pytest.raises(InputDataError, match="no-such-class"):
        kvasir_datalist(root, positive="normal-cecum", negatives=["no-such-class"])


def test_truncated_jpeg_found_when_the_datalist_is_built(kvasir_root, tmp_path, monkeypatch):
    """A JPEG cut short passes PIL's verify(); the datalist check decodes it, once, and names it."""
    import custom_components.data.image_folders as imf

    root = _copy(kvasir_root, tmp_path)
    bad = sorted((root / "kvasir-dataset-v2" / "esophagitis").iterdir())[1]
    whole = bad.read_bytes()
    bad.write_bytes(whole[: int(len(whole) * 0.6)])
    with pytest.raises(InputDataError) as err:
        kvasir_datalist(root, check_images=True)
    assert str(err.value).startswith(f"{bad}: ") and "truncated" in str(err.value) and "\n" not in str(err.value)

    out = tmp_path / "datalists" / "kvasir.json"
    record = tmp_path / "datalists" / "kvasir.checked.json"
    with pytest.raises(InputDataError, match=bad.name):  # the bundles' preparation checks by default
        prepare_datalist("kvasir", root, out, masks_dir="masks")
    assert not out.exists()  # no datalist with a broken file in it
    good = set(json.loads(record.read_text())["files"])  # the files checked before the bad one are kept
    assert good and str(bad.resolve()) not in good

    bad.write_bytes(whole)  # repaired: only what was not yet recorded is decoded
    decoded = []
    real = imf.check_image_file
    monkeypatch.setattr(imf, "check_image_file", lambda path, what="image": (decoded.append(path), real(path, what)))
    prepare_datalist("kvasir", root, out, masks_dir="masks")
    datalist = json.loads(out.read_text())
    n_files = sum(1 + ("mask" in e) for v in datalist.values() for e in v)
    assert len(decoded) == n_files - len(good) and bad in decoded
    assert len(json.loads(record.read_text())["files"]) == n_files
    decoded.clear()
    prepare_datalist("kvasir", root, out, masks_dir="masks")  # a re-run (every bundle run) decodes nothing
    assert decoded == []
    bad.write_bytes(whole[:-100])  # changed since the check (size / mtime): decoded again, and refused
    with pytest.raises(InputDataError, match=bad.name):
        prepare_datalist("kvasir", root, out, masks_dir="masks")
    assert decoded == [bad]
    prepare_datalist("kvasir", root, out, check_images=False)  # opt out: existence only


def test_unreadable_file_in_getitem_names_the_file(kvasir_root, tmp_path):
    """Found mid-epoch (a datalist built without the check): InputDataError with the path, not a PIL traceback."""
    root = _copy(kvasir_root, tmp_path)
    dl = kvasir_datalist(root, masks_dir="masks")
    entries = [e for e in dl["training"] + dl["validation"] + dl["test"] if "mask" in e][:2]
    image, mask = root / entries[0]["image"], root / entries[1]["mask"]
    image.write_bytes(image.read_bytes()[:-400])
    mask.write_bytes(mask.read_bytes()[:60])
    ds = ImageFolderDataset(entries, root, image_size=32)
    for i, path in enumerate((image, mask)):
        with pytest.raises(InputDataError) as err:
            ds[i]
        assert err.value.source == str(path) and "\n" not in str(err.value), str(err.value)


# --------------------------------------------------------------------------- MURA


def _read_mura_csvs(root: Path, split: str) -> dict[str, int]:
    """Independent label per image: study label from labeled_studies, image list from image_paths."""
    base = root / "MURA-v1.1"
    with open(base / f"{split}_labeled_studies.csv") as f:
        studies = {row[0]: int(row[1]) for row in csv.reader(f) if row}
    with open(base / f"{split}_image_paths.csv") as f:
        images = [row[0] for row in csv.reader(f) if row]
    return {img: studies[img[: img.rindex("/") + 1]] for img in images}


def test_mura_twin_layout(mura_root):
    base = mura_root / "MURA-v1.1"
    first = (base / "train_image_paths.csv").read_text().splitlines()[0]
    assert first.startswith("MURA-v1.1/train/XR_") and "/patient00001/study1_" in first and first.endswith("/image1.png")
    study = (base / "train_labeled_studies.csv").read_text().splitlines()[0]
    assert study.endswith("/,1") or study.endswith("/,0")
    modes = set()
    for split in ("train", "valid"):
        for img in _read_mura_csvs(mura_root, split):
            with Image.open(mura_root / img) as im:
                modes.add(im.mode)
    assert modes == {"L", "RGB"}


def test_mura_datalist(mura_root):
    dl = mura_datalist(mura_root, boxes_json=mura_root / "mura_boxes.json", check_images=True)
    train, valid = _read_mura_csvs(mura_root, "train"), _read_mura_csvs(mura_root, "valid")
    assert {e["image"]: e["label"] for e in dl["test"]} == valid
    assert {e["image"]: e["label"] for e in dl["training"] + dl["validation"]} == train
    assert dl["validation"] and dl["training"]
    _cases_disjoint(dl)
    for e in _all(dl):
        assert e["case"] == e["image"].split("/")[3] and e["image"].startswith(e["study"] + "/")
        assert e["label"] == int(e["study"].endswith("_positive"))
    # patient-level: every image of a patient in one split
    boxes = json.loads((mura_root / "mura_boxes.json").read_text())
    with_boxes = {e["image"]: e["boxes"] for e in _all(dl) if "boxes" in e}
    assert with_boxes == {k: [[float(v) for v in b] for b in bs] for k, bs in boxes.items()}
    assert all(e["label"] == 1 for e in _all(dl) if "boxes" in e)
    assert mura_datalist(mura_root, seed=5) == mura_datalist(mura_root, seed=5)
    # body-part filter
    wrist = mura_datalist(mura_root, body_parts=["XR_WRIST"])
    assert _all(wrist) and all("/XR_WRIST/" in e["image"] for e in _all(wrist))


def test_mura_box_masks_dir(mura_root, tmp_path):
    dl = mura_datalist(mura_root, boxes_json=mura_root / "mura_boxes.json", box_masks_dir=tmp_path / "bm")
    masked = [e for e in _all(dl) if "mask" in e]
    boxes = json.loads((mura_root / "mura_boxes.json").read_text())
    assert len(masked) == len(boxes)
    e = masked[0]
    m = np.asarray(Image.open(e["mask"])) > 0
    with Image.open(mura_root / e["image"]) as im:
        assert m.shape == (im.size[1], im.size[0])
    x, y, w, h = boxes[e["image"]][0]
    assert m.sum() == w * h and m[y:y + h, x:x + w].all()


def test_mura_bad_inputs(mura_root, tmp_path):
    root = _copy(mura_root, tmp_path)
    base = root / "MURA-v1.1"
    listed = (base / "valid_image_paths.csv").read_text().splitlines()[0]
    (root / listed).unlink()
    with pytest.raises(InputDataError, match="image listed but missing") as ei:
        mura_datalist(root)
    assert ei.value.source.endswith(listed)
    (base / "valid_labeled_studies.csv").unlink()
    with pytest.raises(InputDataError, match=r"valid_labeled_studies.csv"):
        mura_datalist(root)


def test_mura_bad_rows_and_patient_overlap(mura_root, tmp_path):
    root = _copy(mura_root, tmp_path)
    base = root / "MURA-v1.1"
    studies = (base / "train_labeled_studies.csv").read_text()
    (base / "train_labeled_studies.csv").write_text(studies + "MURA-v1.1/train/XR_HAND/patient09999/study1_positive/\n")
    with pytest.raises(InputDataError, match=r"train_labeled_studies.csv: line \d+"):
        mura_datalist(root)
    (base / "train_labeled_studies.csv").write_text(studies)
    # a train patient appearing in the official valid split
    train_img = (base / "train_image_paths.csv").read_text().splitlines()[0]
    study = train_img.rsplit("/", 1)[0]
    new_study = study.replace("/train/", "/valid/").rsplit("/", 1)[0] + "/study9_" + study.rsplit("_", 1)[1]
    shutil.copytree(root / study, root / new_study)
    with open(base / "valid_image_paths.csv", "a") as f:
        f.write(new_study + "/" + train_img.rsplit("/", 1)[1] + "\n")
    with open(base / "valid_labeled_studies.csv", "a") as f:
        f.write(f"{new_study}/,{int(new_study.endswith('positive'))}\n")
    with pytest.raises(InputDataError, match="patient00001 is in both"):
        mura_datalist(root)


# --------------------------------------------------------------------------- CP-CHILD, DUKE


def _png(path: Path, size=(12, 10), value=100, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path, format=fmt)


def test_cp_child_datalist(tmp_path):
    n = {"Train": 5, "Test": 2}
    for sub in ("CP-CHILD-A", "CP-CHILD-B"):
        for split, k in n.items():
            for cls in ("Polyp", "Non-Polyp"):
                for i in range(k):
                    _png(tmp_path / sub / split / cls / f"{i}.jpg", fmt="JPEG")
    dl = cp_child_datalist(tmp_path)
    assert len(dl["test"]) == 8 and len(dl["training"]) + len(dl["validation"]) == 20
    assert len(dl["validation"]) == 2  # round(10 * 0.1) per class
    assert all(e["label"] == int("/Polyp/" in e["image"]) for e in _all(dl))
    assert all("/Test/" in e["image"] for e in dl["test"])
    _cases_disjoint(dl)
    assert len(_all(cp_child_datalist(tmp_path, subsets="CP-CHILD-A"))) == 14
    shutil.rmtree(tmp_path / "CP-CHILD-B" / "Test" / "Polyp")
    with pytest.raises(InputDataError, match="CP-CHILD-B/Test/Polyp"):
        cp_child_datalist(tmp_path)


def test_duke_datalist(tmp_path):
    for p in range(10):
        for s in range(3):
            _png(tmp_path / ("pos" if s == 0 and p < 6 else "neg") / f"{p:03d}_{s}.png")
    dl = duke_datalist(tmp_path, seed=1)
    assert len(_all(dl)) == 30
    _cases_disjoint(dl)
    assert all(e["case"] == Path(e["image"]).stem.split("_")[0] for e in _all(dl))
    assert all(e["label"] == int(e["image"].startswith("pos/")) for e in _all(dl))
    assert all(dl[k] for k in dl)
    bal = duke_datalist(tmp_path, balance=True)
    assert len(_all(bal)) == 30  # 6 pos <= 24 neg: nothing dropped
    for p in range(10, 30):
        _png(tmp_path / "pos" / f"{p:03d}_0.png")
    bal = duke_datalist(tmp_path, balance=True)
    assert sum(e["label"] for e in _all(bal)) == 24 == sum(1 - e["label"] for e in _all(bal))
    (tmp_path / "neg" / "bad.png").write_bytes(b"")
    with pytest.raises(InputDataError, match=r"bad.png"):
        duke_datalist(tmp_path)


# --------------------------------------------------------------------------- masks and dataset


def test_rasterise_boxes():
    m = rasterise_boxes([[2, 1, 3, 2], [8, 5, 10, 10]], (10, 7))
    assert m.dtype == np.uint8 and m.shape == (7, 10)
    assert m[1:3, 2:5].all() and m[5:7, 8:10].all() and m.sum() == 6 + 4
    assert rasterise_boxes([], (4, 3)).sum() == 0


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def _expected_bbox(box, sx, sy, left, top, out):
    """Output pixels whose centres map back inside the original box."""
    x, y, w, h = box
    cols = [c for c in range(out) if x <= (c + left + 0.5) / sx < x + w]
    rows = [r for r in range(out) if y <= (r + top + 0.5) / sy < y + h]
    return rows[0], rows[-1], cols[0], cols[-1]


@pytest.mark.parametrize("mode", ["short_side_crop", "resize"])
def test_dataset_mask_geometry(tmp_path, mode):
    box = [24, 12, 16, 24]  # x, y, w, h in a 64 x 48 (W x H) image
    arr = np.zeros((48, 64), np.uint8)
    arr[12:36, 24:40] = 255
    Image.fromarray(arr).save(tmp_path / "img.png")  # grey on purpose
    entries = [{"image": "img.png", "label": 1, "case": "a", "boxes": [box]},
               {"image": "img.png", "label": 0, "case": "b"}]
    ds = ImageFolderDataset(entries, tmp_path, image_size=32, resize_mode=mode, resize_short=40, normalize="none")
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(item["image"][0], item["image"][2])  # grey -> RGB
    if mode == "short_side_crop":
        # short side 48 -> 40: (W, H) = (int(40 * 64 / 48), 40) = (53, 40); CenterCrop 32 at (10, 4)
        expected = _expected_bbox(box, 53 / 64, 40 / 48, 10, 4, 32)
        assert expected == (6, 25, 10, 22)
    else:
        expected = _expected_bbox(box, 32 / 64, 32 / 48, 0, 0, 32)
    got = _bbox(item["mask"][0])
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected, strict=True)), (got, expected)
    m = item["mask"][0].bool()
    # the bright box of the image lies under the mask
    assert item["image"][0][m].mean() > 0.8 and item["image"][0][~m].mean() < 0.1
    assert "mask" not in ds[1] and ds[1]["label"].shape == (1,)


def test_dataset_from_datalist(kvasir_root, tmp_path):
    dl = kvasir_datalist(kvasir_root, masks_dir="masks")
    path = write_datalist(dl, tmp_path / "kvasir.json")
    ds = ImageFolderDataset(path, kvasir_root, split="training", image_size=32, label_dtype="long")
    assert len(ds) == len(dl["training"])
    items = [ds[i] for i in range(len(ds))]
    for it, e in zip(items, dl["training"], strict=True):
        assert it["image"].shape == (3, 32, 32) and it["label"].dtype == torch.long and int(it["label"]) == e["label"]
        assert it["case"] == e["case"] and ("mask" in it) == ("mask" in e)
    # ImageNet normalisation: un-normalised values lie in [0, 1]
    raw = torch.stack([it["image"] for it in items]) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) \
        + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    plain = ImageFolderDataset(path, kvasir_root, split="training", image_size=32, normalize="none")[0]["image"]
    assert torch.allclose(plain, raw[0], atol=1e-5)
    # the synthetic lesion (bright) is where the mask is
    masked = [it for it in items if "mask" in it]
    for it in masked:
        m = it["mask"][0].bool()
        assert m.any() and it["image"].mean(0)[m].mean() > it["image"].mean(0)[~m].mean()
    with pytest.raises(InputDataError, match="no split"):
        ImageFolderDataset(path, kvasir_root, split="nope")


def test_cli(kvasir_root, tmp_path, capsys):
    mod = _load_script("prepare_image_folders")
    out = tmp_path / "k.json"
    assert mod.main(["kvasir", "--root", str(kvasir_root), "--out", str(out), "--masks_dir", "masks"]) == 0
    assert json.loads(out.read_text()) == kvasir_datalist(kvasir_root, masks_dir="masks")
    capsys.readouterr()
    assert mod.main(["mura", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "MURA-v1.1" in err[0]
    assert not (tmp_path / "m.json").exists()


def test_make_synthetic_commands(tmp_path):
    mod = _load_script("make_synthetic")
    assert {"kvasir", "mura"} <= set(mod.COMMANDS)
    assert mod.main(["mura", "--output_dir", str(tmp_path / "m"), "--n_patients", "4", "--size", "16,20",
                     "--body_parts", "XR_ELBOW"]) == 0
    dl = mura_datalist(tmp_path / "m", boxes_json=tmp_path / "m" / "mura_boxes.json")
    assert all("/XR_ELBOW/" in e["image"] for e in _all(dl))
    assert mod.main(["kvasir", "--output_dir", str(tmp_path / "k"), "--n_per_class", "2", "--size", "16,12"]) == 0
    assert len(_all(kvasir_datalist(tmp_path / "k"))) == 4
