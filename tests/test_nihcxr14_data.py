"""NIH ChestX-ray14 reading, checks, resumable preparation and splits (HAM spec ``ham.md`` sections 5, 7, 8, 10)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from custom_components.data import nihcxr14 as nih
from custom_components.data.synthetic import write_nihcxr14_twin
from custom_components.io import InputDataError

REPO = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih_cxr14_sample"
TWIN_SIZE, STORE_SIZE = 64, 32
HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _json(path: Path):
    return json.loads(Path(path).read_text())


def _csv_boxes(path: Path) -> dict[str, dict[str, list[list[float]]]]:
    """Independent reading of a BBox_List_2017.csv: the first six fields of every row after the header."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    for r in rows:
        name = "Infiltration" if r[1] == "Infiltrate" else r[1]
        out.setdefault(r[0], {}).setdefault(name, []).append([float(v) for v in r[2:6]])
    return out


def _csv_labels(path: Path) -> dict[str, set[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return {r[0]: set() if r[1] == "No Finding" else set(r[1].split("|")) for r in rows}


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_nihcxr14_twin(tmp_path_factory.mktemp("nih_twin"), n_images=24, size=TWIN_SIZE, seed=1)


@pytest.fixture(scope="module")
def store(twin, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nih_store")
    nih.prepare_nihcxr14(twin, out, image_size=STORE_SIZE, progress=False)
    return out


def _copy(twin: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(twin, tmp_path / "ds"))


# ---------------------------------------------------------------- parsing


def test_findings_order_and_label_vector():
    assert nih.FINDINGS[:8] == nih.BOX_FINDINGS == ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass",
                                                    "Nodule", "Pneumonia", "Pneumothorax")
    assert nih.FINDINGS[8:] == ("Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
    assert nih.label_vector([]) == [0] * 14
    assert nih.label_vector(["Hernia", "Atelectasis"]) == [1] + [0] * 12 + [1]


def test_data_entry_by_position_2017_trailing_field_and_v2020(tmp_path):
    rows_2017 = [HEADER_2017,
                 "00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA,2682,2749,0.143,0.143,",
                 "00000001_001.png,No Finding,1,1,058Y,M,AP,2500,2048,0.168,0.168,",
                 "",  # a blank line is skipped
                 "00000002_000.png,Hernia|Infiltration|Atelectasis,0,2,81,F,PA,2048,2500,0.14300000000000002,0.171,"]
    p2017 = tmp_path / "Data_Entry_2017.csv"
    p2017.write_text("\r\n".join(rows_2017) + "\r\n")
    p2020 = tmp_path / "Data_Entry_2017_v2020.csv"
    p2020.write_text("\n".join(r.removesuffix(",") for r in rows_2017) + "\n")
    for path in (p2017, p2020):
        rows = nih.read_data_entry(path)
        assert list(rows) == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
        r = rows["00000002_000.png"]
        assert r.findings == ("Atelectasis", "Infiltration", "Hernia") and r.patient == "2" and r.follow_up == 0
        assert r.label == [1, 0, 0, 1] + [0] * 9 + [1]
        assert r.original_size == (2048, 2500) and r.spacing == (0.14300000000000002, 0.171) and r.gender == "F"
        assert rows["00000001_001.png"].label == [0] * 14 and rows["00000001_001.png"].age == 58  # "058Y"
        assert rows["00000001_000.png"].label[1] == rows["00000001_000.png"].label[10] == 1
        assert rows["00000002_000.png"].line == 5
    # the 11 fields by position: a 12th non-empty field is not a trailing comma
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER_2017 + "\n00000001_000.png,Mass,0,1,58,M,PA,2682,2749,0.143,0.143,extra\n")
    with pytest.raises(InputDataError, match=r"bad.csv: row 2: 12 fields, expected 11"):
        nih.read_data_entry(bad)


def test_bbox_list_by_position_and_infiltrate(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                    "00000001_000.png,Infiltrate,10.5,20.25,30,40\n"
                    "00000001_000.png,Infiltrate,1,2,3,4,,,\n"  # official rows may carry the empty fields too
                    "00000002_000.png,Nodule,5,6,7.125,8\n")
    boxes = nih.read_bbox_list(path)
    assert boxes == {"00000001_000.png": {"Infiltration": [[10.5, 20.25, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]]},
                     "00000002_000.png": {"Nodule": [[5.0, 6.0, 7.125, 8.0]]}}


def test_ham_and_chexpert_box_json(tmp_path, twin):
    csv_boxes = nih.read_bbox_list(twin / "BBox_List_2017.csv")
    ham = tmp_path / "BBoxes.json"
    ham.write_text(json.dumps(csv_boxes))
    assert nih.compare_boxes(csv_boxes, nih.read_ham_boxes(ham)) == []
    changed = json.loads(ham.read_text())
    name = sorted(changed)[0]
    finding = sorted(changed[name])[0]
    changed[name][finding][0][0] += 1
    diffs = nih.compare_boxes(csv_boxes, changed)
    assert len(diffs) == 1 and diffs[0].startswith(f"{name} / {finding}:")

    chex = tmp_path / "chexpert.json"
    chex.write_text(json.dumps({"valid/patient1/study1/view1_frontal.jpg": {
        "edema": [[10, 20, 50, 80]], "Enlarg_Cardiomediastinum": [[0, 0, 4, 4], [1, 1, 2, 3]],
        "Pleural Effusion": [[5, 5, 6, 7]]}}))
    got = nih.read_chexpert_boxes(chex)["valid/patient1/study1/view1_frontal.jpg"]
    assert got == {"Edema": [[10.0, 20.0, 40.0, 60.0]],
                   "Enlarged Cardiomediastinum": [[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 1.0, 2.0]],
                   "Pleural Effusion": [[5.0, 5.0, 1.0, 2.0]]}
    chex.write_text(json.dumps({"a.jpg": {"Edema": [[10, 20, 5, 80]]}}))
    with pytest.raises(InputDataError, match=r"chexpert.json: a.jpg / Edema .*w or h <= 0"):
        nih.read_chexpert_boxes(chex)
    chex.write_text(json.dumps({"a.jpg": {"Lung Tumour": [[1, 2, 3, 4]]}}))
    with pytest.raises(InputDataError, match=r"chexpert\.json: unknown CheXpert finding 'Lung Tumour'"):
        nih.read_chexpert_boxes(chex)


# ---------------------------------------------------------------- boxes and masks


def test_box_masks_areas_union_and_rescale():
    m = nih.boxes_to_masks({"Mass": [[3, 5, 7, 4]]}, (32, 24))
    assert m.shape == (14, 24, 32) and m[4].sum() == 28 and m[4][5:9, 3:10].all() and m.sum() == 28
    two = nih.boxes_to_masks({"Mass": [[0, 0, 4, 4], [2, 2, 4, 4]]}, (8, 8))
    assert two[4].sum() == 16 + 16 - 4  # union of overlapping boxes
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.uniform(0, 600, 2)
        w, h = rng.uniform(20, 400, 2)
        big = nih.boxes_to_masks({"Nodule": [[x, y, w, h]]}, (1024, 1024))[5].sum()
        scaled = nih.rescale_boxes({"Nodule": [[x, y, w, h]]}, (1024, 1024), (512, 512))
        assert scaled["Nodule"][0] == pytest.approx([x / 2, y / 2, w / 2, h / 2], abs=1e-3)
        small = nih.boxes_to_masks(scaled, (512, 512))[5].sum()
        assert abs(small - big / 4) <= (w + h) / 2 + 1  # area / 4, up to one boundary row and column
    # clipped to the image after rescaling (a box inside the tolerance may touch the edge)
    assert nih.rescale_boxes({"Mass": [[-0.5, 10, 20, 1030]]}, (1024, 1024), (512, 512))["Mass"][0] == [0.0, 5.0, 9.75, 507.0]


def test_box_masks_transform_orders():
    t = nih.BoxMasksd(spatial_size=(6, 8))
    d = t({"image": torch.zeros(1, 6, 8), "boxes": {"Mass": [[1, 2, 3, 1]]}})
    assert "boxes" not in d and d["box_mask"].shape == (14, 6, 8) and d["box_mask"][4, 2, 1:4].sum() == 3
    d = nih.BoxMasksd(order="xy")({"image": torch.zeros(1, 8, 6), "boxes": {"Mass": [[1, 2, 3, 1]]}})
    assert d["box_mask"].shape == (14, 8, 6) and d["box_mask"][4, 1:4, 2].sum() == 3  # MONAI's (W, H) PNG layout
    d = nih.BoxMasksd(keep_boxes=True)({"image": torch.zeros(1, 4, 4), "boxes": {}})
    assert d["boxes"] == {} and d["box_mask"].sum() == 0


def test_patient_folds_disjoint_balanced_and_seeded():
    patient_of = {f"{p:08d}_{k:03d}.png": str(p) for p in range(17) for k in range(1 + p % 4)}
    names = sorted(patient_of)
    folds = nih.patient_folds(names, patient_of, 5, seed=3)
    assert sorted(n for f in folds for n in f) == names
    owners = [{patient_of[n] for n in f} for f in folds]
    assert all(not (owners[i] & owners[j]) for i in range(5) for j in range(i + 1, 5))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 4  # at most one (largest) patient group apart
    assert folds == nih.patient_folds(list(reversed(names)), patient_of, 5, seed=3)
    assert folds != nih.patient_folds(names, patient_of, 5, seed=4)
    train, val = nih.patient_val_split(names, patient_of, 0.2, seed=0, exclude_patients={"0", "1"})
    assert {patient_of[n] for n in train}.isdisjoint({patient_of[n] for n in val}) and sorted(train + val) == names
    assert len({patient_of[n] for n in val}) == 3 and not {"0", "1"} & {patient_of[n] for n in val}  # round(15 * 0.2)
    with pytest.raises(ValueError, match="3 patients cannot fill 5"):
        nih.patient_folds(names[:6], patient_of, 5)


# ---------------------------------------------------------------- the twin through the preparation


def test_twin_round_trip(twin, store):
    labels = _csv_labels(twin / "Data_Entry_2017.csv")
    boxes = _csv_boxes(twin / "BBox_List_2017.csv")
    train_val = (twin / "train_val_list.txt").read_text().split()
    test = (twin / "test_list.txt").read_text().split()
    assert len(labels) == 24 and len(boxes) >= 5 and not set(train_val) & set(test)
    assert {f for per in boxes.values() for f in per} >= {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass"}
    assert sum(1 for v in labels.values() if not v) >= 2  # No Finding images

    images = sorted(p.name for p in (store / "images").iterdir())
    assert images == sorted(labels) and not [n for n in images if ".tmp" in n]
    for name in images:
        with Image.open(store / "images" / name) as im:
            assert im.size == (STORE_SIZE, STORE_SIZE) and im.mode == "L"
    record = _json(store / "prepare.json")
    assert record["settings"]["image_size"] == STORE_SIZE and record["counts"]["images"] == 24

    scale = STORE_SIZE / TWIN_SIZE
    official = _json(store / "datalist_official.json")
    assert list(official) == ["training", "validation", "test", "test_boxes"]
    for key, entries in official.items():
        for e in entries:
            name = f"{e['case']}.png"
            assert e["image"] == f"images/{name}" and (store / e["image"]).is_file()
            assert e["label"] == [int(f in labels[name]) for f in nih.FINDINGS]
            assert e["patient"] == str(int(name[:8]))
            want = {f: [[v * scale for v in b] for b in bs] for f, bs in boxes.get(name, {}).items()}
            assert e["boxes"].keys() == want.keys()
            for f in want:
                assert np.allclose(e["boxes"][f], want[f], atol=1e-3)
            assert e["has_boxes"] == int(name in boxes)
            assert e["tag"] == ([int(f in boxes[name]) for f in nih.FINDINGS] if name in boxes else e["label"])
            assert e["flag"] == (0 if key == "training" else 1)
    tr, va = [{f"{e['case']}.png" for e in official[k]} for k in ("training", "validation")]
    assert tr | va == set(train_val) and not tr & va and va
    assert {e["patient"] for e in official["training"]}.isdisjoint({e["patient"] for e in official["validation"]})
    assert [f"{e['case']}.png" for e in official["test"]] == test
    assert [f"{e['case']}.png" for e in official["test_boxes"]] == sorted(boxes)
    # the lesion blob is inside its box: brighter there than in the rest of the prepared image
    e = official["test_boxes"][0]
    img = np.asarray(Image.open(store / e["image"]), dtype=np.float64)
    m = nih.boxes_to_masks(e["boxes"], (STORE_SIZE, STORE_SIZE)).any(0)
    assert img[m].mean() > img[~m].mean()

    nobox = _json(store / "datalist_nobox.json")
    assert {f"{e['case']}.png" for k in ("training", "validation") for e in nobox[k]} == set(labels) - set(boxes)
    assert [f"{e['case']}.png" for e in nobox["test"]] == sorted(boxes)

    folds = [_json(store / f"datalist_box_fold{k}.json") for k in range(1, 6)]
    tests = [{f"{e['case']}.png" for e in f["test"]} for f in folds]
    assert set().union(*tests) == set(boxes) and sum(len(t) for t in tests) == len(boxes)
    owners = [{e["patient"] for e in f["test"]} for f in folds]
    assert all(not (owners[i] & owners[j]) for i in range(5) for j in range(i + 1, 5))  # patient-wise folds
    for f, t, o in zip(folds, tests, owners, strict=True):
        sup = {f"{e['case']}.png" for e in f["box_supervised"]}
        assert sup == set(boxes) - t and all(e["flag"] == 1 and e["has_boxes"] == 1 for e in f["box_supervised"])
        assert {f"{e['case']}.png" for e in f["training"] if e["flag"]} == sup
        assert not {e["patient"] for k in ("training", "validation") for e in f[k]} & o  # no test patient trains
        assert not {e["patient"] for e in f["validation"]} & {e["patient"] for e in f["training"]}
        assert all(e["flag"] == 1 for k in ("validation", "test") for e in f[k])


def test_batches_layout_and_v2020_table_prepare_the_same(twin, store, tmp_path):
    other = write_nihcxr14_twin(tmp_path / "b", n_images=24, size=TWIN_SIZE, seed=1, layout="batches", data_entry="v2020")
    assert (other / "images_001" / "images").is_dir() and (other / "Data_Entry_2017_v2020.csv").is_file()
    assert not (other / "Data_Entry_2017.csv").exists()
    nih.prepare_nihcxr14(other, tmp_path / "out", image_size=STORE_SIZE, progress=False)
    for key in ("official", "nobox", "box_fold3"):
        assert _json(tmp_path / "out" / f"datalist_{key}.json") == _json(store / f"datalist_{key}.json")
    for p in (store / "images").iterdir():  # the same seed draws the same pixels
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "out" / "images" / p.name)))


def test_options_select_on_test_folds_float16_and_ham_json(twin, tmp_path):
    ham = tmp_path / "BBoxes.json"
    ham.write_text(json.dumps(nih.read_bbox_list(twin / "BBox_List_2017.csv")))
    out = tmp_path / "out"
    written = nih.prepare_nihcxr14(twin, out, image_size=24, dtype="float16", select_on_test=True, folds="2",
                                   boxes_json=ham, progress=False)
    assert sorted(written) == ["box_fold2", "nobox", "official", "record"]
    official = _json(written["official"])
    assert official["validation"] == official["test"]  # the reference's selection on the test list
    assert len(official["training"]) == len((twin / "train_val_list.txt").read_text().split())
    fold = _json(written["box_fold2"])
    assert fold["validation"] == fold["test"]
    arr = np.load(out / official["test"][0]["image"])
    assert arr.dtype == np.float16 and arr.shape == (24, 24) and arr.min() >= 0 and arr.max() <= 1
    # the HAM JSON gives the same boxes as the CSV
    ref = tmp_path / "ref"
    nih.prepare_nihcxr14(twin, ref, image_size=24, dtype="float16", select_on_test=True, folds=2, progress=False)
    assert _json(ref / "datalist_box_fold2.json") == fold
    with pytest.raises(ValueError, match=r"folds are numbered 1..5, got \[6\]"):
        nih.prepare_nihcxr14(twin, ref, image_size=24, dtype="float16", folds=6, progress=False)


def test_datalist_from_lists(store):
    dl = nih.datalist_from_lists(store, [], [])
    assert dl == {"training": [], "box_supervised": [], "validation": [], "test": []}
    official = _json(store / "datalist_official.json")
    train = [f"{e['case']}.png" for e in official["training"]]
    box = [f"{e['case']}.png" for e in official["test_boxes"]][:2]
    dl = nih.datalist_from_lists(store, train, box, box_supervised=box[:1], validation=[])
    assert [e["flag"] for e in dl["training"]] == [0] * len(train) + [1]
    assert dl["test"] == official["test_boxes"][:2]
    with pytest.raises(InputDataError, match=r"test list: 1 names are not images of this store, e\.g\. nope\.png"):
        nih.datalist_from_lists(store, train, ["nope.png"])


# ---------------------------------------------------------------- resumable, atomic


def test_interrupted_and_repeated_preparation(twin, store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    calls = []
    real = nih._prepare_image

    def dies_after_five(task):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the run is stopped while preparing the sixth image
        calls.append(task)
        real(task)

    monkeypatch.setattr(nih, "_prepare_image", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        nih.prepare_nihcxr14(twin, out, image_size=STORE_SIZE, progress=False)
    done = sorted(p.name for p in (out / "images").iterdir())
    assert len(done) == 5 and not list(out.glob("datalist_*.json"))
    stamps = {n: (out / "images" / n).stat().st_mtime_ns for n in done}
    # what a SIGKILL mid-write leaves: atomic_write's temporary beside the final names
    (out / "images" / ".00099999_000.png.ab12CD34.tmp.png").write_bytes(b"\x89PNG partial")

    calls.clear()
    monkeypatch.setattr(nih, "_prepare_image", lambda task: (calls.append(task), real(task)))
    capsys.readouterr()
    nih.prepare_nihcxr14(twin, out, image_size=STORE_SIZE, progress=False)
    printed = capsys.readouterr().out
    assert "removed 1 temporary files" in printed and "5 images were already prepared" in printed
    assert len(calls) == 19 and {Path(t[1]).name for t in calls}.isdisjoint(done)
    assert all((out / "images" / n).stat().st_mtime_ns == stamps[n] for n in done)  # reused, not rewritten
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    for p in (store / "images").iterdir():  # the same images and datalists as an uninterrupted run
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(out / "images" / p.name)))
    for p in store.glob("datalist_*.json"):
        assert _json(p) == _json(out / p.name)

    calls.clear()
    nih.prepare_nihcxr14(twin, out, image_size=STORE_SIZE, progress=False)  # repeated: nothing to do
    assert calls == [] and all((out / "images" / n).stat().st_mtime_ns == stamps[n] for n in done)
    # other settings: refused, or redone from scratch with overwrite
    with pytest.raises(InputDataError, match=r"store: the store was prepared with .*'image_size': 32.*overwrite=True"):
        nih.prepare_nihcxr14(twin, out, image_size=16, progress=False)
    nih.prepare_nihcxr14(twin, out, image_size=16, overwrite=True, progress=False)
    assert len(calls) == 24 and Image.open(out / "images" / done[0]).size == (16, 16)


def test_worker_processes_prepare_the_same_images(twin, store, tmp_path):
    nih.prepare_nihcxr14(twin, tmp_path / "w", image_size=STORE_SIZE, num_workers=2, progress=False)
    for p in (store / "images").iterdir():
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "w" / "images" / p.name)))


# ---------------------------------------------------------------- bad files: one error line naming the file


def _rewrite(path: Path, edit) -> None:
    path.write_text(edit(path.read_text()))


def _first_box_row(ds: Path) -> list[str]:
    return (ds / "BBox_List_2017.csv").read_text().splitlines()[1].split(",")


def _truncate_png(ds: Path) -> str:
    name = sorted((ds / "images").iterdir())[3]
    data = name.read_bytes()
    name.write_bytes(data[: len(data) // 2])
    return f"{name.name}: corrupt or truncated image file"


def _box_outside(ds: Path) -> str:
    row = _first_box_row(ds)
    bad = ",".join([*row[:2], str(TWIN_SIZE - 5), row[3], "20", row[5]])
    _rewrite(ds / "BBox_List_2017.csv", lambda t: t.replace(",".join(row), bad))
    return f"BBox_List_2017.csv: {row[0]} / .* is outside the {TWIN_SIZE}x{TWIN_SIZE} image"


def _unknown_finding(ds: Path) -> str:
    _rewrite(ds / "Data_Entry_2017.csv", lambda t: t.replace("No Finding", "No Findings", 1))
    return "Data_Entry_2017.csv: row [0-9]+: unknown finding 'No Findings'"


def _unknown_box_finding(ds: Path) -> str:
    row = _first_box_row(ds)
    _rewrite(ds / "BBox_List_2017.csv", lambda t: t.replace(",".join(row), ",".join([row[0], "Lesion", *row[2:]])))
    return "BBox_List_2017.csv: row 2: unknown finding 'Lesion'"


def _missing_image(ds: Path) -> str:
    victim = sorted((ds / "images").iterdir())[5]
    victim.unlink()
    return f"Data_Entry_2017.csv: row [0-9]+: image {victim.name} not found"


def _list_name_without_row(ds: Path) -> str:
    _rewrite(ds / "test_list.txt", lambda t: t + "00099999_000.png\n")
    return "test_list.txt: entry [0-9]+: 00099999_000.png has no row in Data_Entry_2017.csv"


def _box_without_row(ds: Path) -> str:
    _rewrite(ds / "BBox_List_2017.csv", lambda t: t + "00099999_000.png,Mass,1,2,3,4\n")
    return "BBox_List_2017.csv: boxes for 00099999_000.png, which has no row"


def _name_in_both_lists(ds: Path) -> str:
    first = (ds / "train_val_list.txt").read_text().split()[0]
    _rewrite(ds / "test_list.txt", lambda t: t + first + "\n")
    return f"test_list.txt: entry [0-9]+: {first} is also in train_val_list.txt"


def _short_row(ds: Path) -> str:
    _rewrite(ds / "Data_Entry_2017.csv", lambda t: t.replace(",2500,2048,", ",2500,", 1))
    return "Data_Entry_2017.csv: row 2: 10 fields, expected 11"


def _bad_number(ds: Path) -> str:
    _rewrite(ds / "Data_Entry_2017.csv", lambda t: t.replace(",2500,2048,", ",2500,wide,", 1))
    return "Data_Entry_2017.csv: row 2: height 'wide' is not a whole number"


def _bad_header(ds: Path) -> str:
    _rewrite(ds / "BBox_List_2017.csv", lambda t: t.replace("Bbox [x", "Box [x", 1))
    return "BBox_List_2017.csv: header is not 'Image Index,Finding Label,Bbox"


def _duplicate_row(ds: Path) -> str:
    _rewrite(ds / "Data_Entry_2017.csv", lambda t: t + t.splitlines()[3] + "\n")
    return "Data_Entry_2017.csv: row 26: .* already listed in row 4"


BAD_CASES = [_truncate_png, _box_outside, _unknown_finding, _unknown_box_finding, _missing_image, _list_name_without_row,
             _box_without_row, _name_in_both_lists, _short_row, _bad_number, _bad_header, _duplicate_row]


@pytest.mark.parametrize("make_bad", BAD_CASES, ids=[f.__name__.strip("_") for f in BAD_CASES])
def test_bad_files_raise_one_line_naming_the_file(twin, tmp_path, make_bad):
    ds = _copy(twin, tmp_path)
    pattern = make_bad(ds)
    with pytest.raises(InputDataError, match=pattern) as err:
        nih.prepare_nihcxr14(ds, tmp_path / "out", image_size=STORE_SIZE, progress=False)
    assert "\n" not in str(err.value) and str(ds) in err.value.source


def test_missing_images_skip_and_cli_error_line(twin, tmp_path, capsys):
    ds = _copy(twin, tmp_path)
    box_image = next(iter(nih.read_bbox_list(ds / "BBox_List_2017.csv")))
    (ds / "images" / box_image).unlink()
    train_val = (ds / "train_val_list.txt").read_text().split()
    (ds / "train_val_list.txt").write_text("\n".join(train_val[1:]))  # no trailing newline, one name left out
    capsys.readouterr()
    written = nih.prepare_nihcxr14(ds, tmp_path / "out", image_size=STORE_SIZE, missing_images="skip", progress=False)
    printed = capsys.readouterr().out
    assert f"1 of 24 rows of Data_Entry_2017.csv have no image (skipped): {box_image}" in printed
    assert "1 box images are missing" in printed and "1 names of test_list.txt have no image" in printed
    assert f"1 rows of Data_Entry_2017.csv are in neither list (left out of the official split): {train_val[0]}" in printed
    record = _json(written["record"])
    assert record["missing"]["rows_without_image"] == record["missing"]["box_images_without_image"] == [box_image]
    assert record["missing"]["test_list_without_image"] == [box_image]
    assert record["missing"]["in_neither_list"] == [train_val[0]] and "train_val_list_without_image" not in record["missing"]
    assert record["counts"]["train_val"] == len(train_val) - 1
    cases = {e["case"] for e in _json(written["official"])["test"]}
    assert len(cases) == len((ds / "test_list.txt").read_text().split()) - 1 and Path(box_image).stem not in cases

    mod = _load_script("prepare_nihcxr14")
    argv = ["prepare", "--dataset_dir", str(ds), "--output_dir", str(tmp_path / "cli"), "--image_size", str(STORE_SIZE),
            "--progress", "False"]
    assert mod.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ds / 'Data_Entry_2017.csv'}: row ") and box_image in err[0]
    assert mod.main([*argv, "--crf"]) == 2
    assert "CRF box refinement (spec section 5) is not available" in capsys.readouterr().err
    assert mod.main([*argv, "--missing_images", "skip"]) == 0
    assert _json(tmp_path / "cli" / "datalist_nobox.json") == _json(tmp_path / "out" / "datalist_nobox.json")


def test_make_synthetic_command(tmp_path):
    mod = _load_script("make_synthetic")
    assert mod.main(["nihcxr14", "--output_dir", str(tmp_path / "t"), "--n_images", "20", "--size", "48"]) == 0
    assert len(list((tmp_path / "t" / "images").iterdir())) == 20
    assert (tmp_path / "t" / "Data_Entry_2017.csv").read_text().splitlines()[0] == HEADER_2017
    assert (tmp_path / "t" / "BBox_List_2017.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    rows = (tmp_path / "t" / "Data_Entry_2017.csv").read_text().splitlines()[1:]
    assert all(len(r.split(",")) == 12 and r.endswith(",") for r in rows)
    with Image.open(sorted((tmp_path / "t" / "images").iterdir())[0]) as im:
        assert im.size == (48, 48)


# ---------------------------------------------------------------- the real-format sample


@pytest.mark.skipif(not REAL.is_dir(), reason="real-format NIH sample not present")
def test_real_sample_prepared(tmp_path, capsys):
    written = nih.prepare_nihcxr14(REAL, tmp_path, image_size=128, progress=False)
    assert "official" not in written and "the official split is not written" in capsys.readouterr().out
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(images) == 16 and images == sorted(p.name for p in (REAL / "images").iterdir())
    for name in images:
        with Image.open(tmp_path / "images" / name) as im:
            assert im.size == (128, 128) and im.mode == "L"
    raw = _csv_boxes(REAL / "BBox_List_2017.csv")
    assert sum(len(b) for per in raw.values() for b in per.values()) == 18
    test = {f"{e['case']}.png": e for e in _json(written["nobox"])["test"]}
    assert sorted(test) == images  # every sample image carries a box
    assert sum(len(b) for e in test.values() for b in e["boxes"].values()) == 18
    assert sorted(n for n, e in test.items() if "Infiltration" in e["boxes"]) == ["00000032_037.png", "00000211_016.png"]
    for name, e in test.items():
        for f, bs in raw[name].items():
            assert np.allclose(e["boxes"][f], np.asarray(bs) / 8, atol=1e-3)  # 1024 -> 128
    assert test["00000830_000.png"]["boxes"].keys() == {"Atelectasis", "Mass"}
    labels = _csv_labels(REAL / "Data_Entry_2017.csv")
    assert test["00000211_019.png"]["label"] == [int(f in labels["00000211_019.png"]) for f in nih.FINDINGS]
    assert test["00000211_019.png"]["tag"] == [0, 1] + [0] * 12  # its one box: Cardiomegaly
    tests = [{e["patient"] for e in _json(tmp_path / f"datalist_box_fold{k}.json")["test"]} for k in range(1, 6)]
    assert all(not (tests[i] & tests[j]) for i in range(5) for j in range(i + 1, 5))
    assert sum(len(_json(tmp_path / f"datalist_box_fold{k}.json")["test"]) for k in range(1, 6)) == 16
