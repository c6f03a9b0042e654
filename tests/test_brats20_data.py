"""BraTS2020 preparation, slice store and batch sampler (LGM-ViT spec section 6)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.data.brats20 import NiftiScanReader, find_cases, load_case, prepare_brats20
from custom_components.data.datalists import datalist_path, load_split
from custom_components.data.slice_store import ScanChunkBatchSampler, SliceDataset
from custom_components.data.synthetic import write_brats20_twin
from custom_components.io import InputDataError

REPO = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats20_format"
SHAPE = (40, 40, 16)
MODS = ("t1", "t1ce", "t2", "flair", "seg")


def nib_labels_file(path: Path) -> np.ndarray:
    """Independent per-slice labels: slice k is positive iff seg[:, :, k] has any tumour voxel."""
    seg = np.asanyarray(nib.load(path).dataobj)
    return np.array([int(seg[:, :, k].any()) for k in range(seg.shape[2])])


def nib_labels(case_dir: Path) -> np.ndarray:
    return nib_labels_file(next(case_dir.glob("*_seg.nii*")))


def store_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_brats20_twin(tmp_path_factory.mktemp("twin"), shape=SHAPE, seed=3)


@pytest.fixture(scope="module")
def store64(twin, tmp_path_factory) -> Path:
    return prepare_brats20(twin.parent, tmp_path_factory.mktemp("store64"), image_size=64, progress=False)


def one_case(tmp_path: Path, case: str = "BraTS20_Training_001", **kw) -> Path:
    root = write_brats20_twin(tmp_path / "ds", case_ids=[case], shape=SHAPE, **kw)
    return root / case


# ---------------------------------------------------------------- datalists


def test_shipped_datalist_matches_published_split():
    dl = json.loads(datalist_path("brats20").read_text())
    assert list(dl) == ["training", "validation", "test"]
    assert [len(dl[k]) for k in dl] == [258, 37, 74]  # spec section 6
    e = dl["training"][0]
    assert e == {"case": e["case"], "image": f"{e['case']}/image.npy", "mask": f"{e['case']}/mask.npy"}
    split = load_split("brats20")
    assert split["training"] == [x["case"] for x in dl["training"]]
    published = REAL.parent / "splits" / "brats20_lgmvit_split.json"
    if published.is_file():
        assert load_split(published) == split  # same order, train/val/test renamed
    with pytest.raises(InputDataError, match="no_such"):
        datalist_path("no_such")


# ---------------------------------------------------------------- twin -> prepare


def test_twin_layout(twin):
    cases = find_cases(twin)
    assert find_cases(twin.parent) == cases  # the data folder itself or its parent
    split = load_split("brats20")
    assert list(cases) == sorted(split["training"][:3] + split["validation"][:2] + split["test"][:2])
    header = (twin / "name_mapping.csv").read_text().splitlines()[0]
    assert header.startswith("Grade,BraTS_2017_subject_ID,") and header.endswith("BraTS_2020_subject_ID")
    case, case_dir = next(iter(cases.items()))
    imgs = [nib.load(case_dir / f"{case}_{m}.nii.gz") for m in MODS]
    for m, img in zip(MODS, imgs, strict=True):
        assert img.shape == SHAPE
        assert img.get_data_dtype() == (np.uint8 if m == "seg" else np.int16)
        np.testing.assert_array_equal(img.affine, imgs[0].affine)
    np.testing.assert_array_equal(imgs[0].affine, [[-1, 0, 0, 0], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    seg = np.asanyarray(imgs[-1].dataobj)
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    labels = nib_labels(case_dir)
    assert 0 < labels.sum() < len(labels)
    run = np.flatnonzero(labels)
    assert run[-1] - run[0] + 1 == len(run)  # contiguous run of tumour slices
    t1 = np.asanyarray(imgs[0].dataobj)
    assert t1.max() > 100 and (t1 == 0).mean() > 0.2  # raw intensities, zeros outside the brain
    # deterministic from the seed
    again = write_brats20_twin(twin.parent.parent / "again", case_ids=[case], shape=SHAPE, seed=3)
    np.testing.assert_array_equal(np.asanyarray(nib.load(again / case / f"{case}_t2.nii.gz").dataobj),
                                  np.asanyarray(imgs[2].dataobj))


def test_prepare_counts_labels_and_split(twin, tmp_path):
    # image_size 32 < 40: downsampling must not change the slice labels (taken at native size)
    dl_path = prepare_brats20(twin, tmp_path, image_size=32, dtype="float32", progress=False)
    assert dl_path == tmp_path / "datalist.json"
    dl = json.loads(dl_path.read_text())
    split = load_split("brats20")
    assert [e["case"] for e in dl["training"]] == split["training"][:3]
    assert [e["case"] for e in dl["validation"]] == split["validation"][:2]
    assert [e["case"] for e in dl["test"]] == split["test"][:2]
    for entries in dl.values():
        for e in entries:
            case = e["case"]
            ref = nib_labels(twin / case)
            meta = json.loads((tmp_path / case / "meta.json").read_text())
            assert meta["labels"] == ref.tolist()
            assert e["n_slices"] == meta["n_slices"] == SHAPE[2]
            assert e["n_positive"] == ref.sum()
            assert meta["sources"] == {m: f"{case}_{m}.nii.gz" for m in ("t1", "t2", "flair", "seg")}
            image = np.load(tmp_path / e["image"])
            mask = np.load(tmp_path / e["mask"])
            assert image.shape == (SHAPE[2], 3, 32, 32) and image.dtype == np.float32
            assert mask.shape == (SHAPE[2], 32, 32) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1}
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_case_orientation_and_normalisation(twin):
    case_dir = next(iter(find_cases(twin).values()))
    image, mask = load_case(case_dir, image_size=SHAPE[0])  # native size: no resampling
    assert image.shape == (SHAPE[2], 3, SHAPE[1], SHAPE[0]) and image.dtype == np.float32
    seg = np.asanyarray(nib.load(next(case_dir.glob("*_seg.nii.gz"))).dataobj)
    np.testing.assert_array_equal(mask, (seg > 0).transpose(2, 1, 0))  # (z, y, x)
    flair = np.asanyarray(nib.load(next(case_dir.glob("*_flair.nii.gz"))).dataobj).astype(np.float32)
    k = SHAPE[2] // 2
    sl = flair[:, :, k].T
    np.testing.assert_allclose(image[k, 2], (sl - sl.min()) / (sl.max() - sl.min()), atol=1e-6)
    assert image.min() >= 0 and image.max() <= 1
    # bicubic upsampling may overshoot [0, 1] slightly; it is not clipped (spec section 6)
    big, big_mask = load_case(case_dir, image_size=64)
    assert big.shape == (SHAPE[2], 3, 64, 64) and big_mask.shape == (SHAPE[2], 64, 64)
    np.testing.assert_array_equal(big_mask.reshape(SHAPE[2], -1).any(1), nib_labels(case_dir).astype(bool))
    assert NiftiScanReader([case_dir], image_size=32).read_all() == SHAPE[2]


def test_uncompressed_and_case_355_seg_name(tmp_path):
    case = "BraTS20_Training_355"
    case_dir = one_case(tmp_path, case, compress=False)
    assert (case_dir / f"{case}_t1.nii").is_file()
    (case_dir / f"{case}_seg.nii").rename(case_dir / "W39_1998.09.19_Segm.nii")  # the Kaggle copy's name
    dl = json.loads(prepare_brats20(case_dir.parent, tmp_path / "out", image_size=32, progress=False).read_text())
    assert [e["case"] for e in dl["test"]] == [case]  # 355 is a test case of the published split
    meta = json.loads((tmp_path / "out" / case / "meta.json").read_text())
    assert meta["sources"]["seg"] == "W39_1998.09.19_Segm.nii"
    assert meta["labels"] == nib_labels_file(case_dir / "W39_1998.09.19_Segm.nii").tolist()


# ---------------------------------------------------------------- slice dataset


def test_slice_dataset(store64, twin):
    ds = SliceDataset(store64, split="training")
    split = load_split("brats20")
    assert ds.case_ids == split["training"][:3]
    assert len(ds) == 3 * SHAPE[2]
    assert ds.case_slice_ranges == [(0, 16), (16, 32), (32, 48)]
    np.testing.assert_array_equal(ds.labels, np.concatenate([nib_labels(twin / c) for c in ds.case_ids]))
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
        assert item["label"].shape == (1,) and item["label"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"].item() == float(item["mask"].any())  # 40 -> 64 upsampling keeps every pixel
        assert item["label"].item() == ds.labels[i]
        assert item["case"] == ds.case_ids[i // SHAPE[2]] and item["slice"] == i % SHAPE[2]
    assert ds[-1]["slice"] == SHAPE[2] - 1
    with pytest.raises(IndexError):
        ds[len(ds)]
    # transform, list datalist with root, pickling (workers)
    entries = json.loads(store64.read_text())["test"]
    ds2 = SliceDataset(entries, root=store64.parent, transform=lambda d: {**d, "image": d["image"] * 0})
    assert ds2[0]["image"].abs().sum() == 0
    ds3 = pickle.loads(pickle.dumps(SliceDataset(store64, split="validation")))
    assert ds3[5]["case"] == split["validation"][0]


def test_slice_dataset_with_workers_and_chunk_sampler(store64):
    ds = SliceDataset(store64, split="training")
    ds[0]  # open memory maps in the parent first; workers must still work
    sampler = ScanChunkBatchSampler(ds.case_slice_ranges, chunk_size=6, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2)
    seen = []
    for batch in loader:
        assert len(set(batch["case"])) == 1  # one scan per batch
        s = batch["slice"].tolist()
        assert s == list(range(s[0], s[0] + len(s)))  # consecutive slices
        seen += [(c, k) for c, k in zip(batch["case"], s, strict=True)]
    assert len(seen) == len(set(seen)) == len(ds)


def test_slice_dataset_errors(store64, tmp_path):
    with pytest.raises(InputDataError, match="BraTS20_Training_999 is not prepared; run "):
        SliceDataset([{"case": "BraTS20_Training_999"}], root=store64.parent)
    with pytest.raises(InputDataError, match="empty datalist"):
        SliceDataset([], root=store64.parent)
    with pytest.raises(InputDataError, match="unsplit"):
        SliceDataset(store64, split="unsplit")
    with pytest.raises(InputDataError, match="does not exist"):
        SliceDataset(tmp_path / "nope.json", split="training")


# ---------------------------------------------------------------- sampler


def test_chunk_sampler():
    ranges = [(0, 155), (155, 255), (255, 300)]
    s = ScanChunkBatchSampler(ranges[:1], chunk_size=32, shuffle=False)
    assert [len(b) for b in s] == [32, 32, 32, 32, 27] and len(s) == 5
    assert [b[0] for b in s] == [0, 32, 64, 96, 128]

    s = ScanChunkBatchSampler(ranges, chunk_size=32, shuffle=True, seed=0)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(300)) and len(batches) == len(s) == 5 + 4 + 2
    assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)
    assert list(s) == batches  # deterministic for a fixed epoch
    orders = set()
    for e in range(6):
        s.set_epoch(e)
        orders.add(tuple(b[0] for b in s))
    assert len(orders) > 1  # scan order changes with the epoch

    parts = [list(ScanChunkBatchSampler(ranges, shuffle=True, seed=4, num_replicas=2, rank=r)) for r in range(2)]
    idx = [{i for b in p for i in b} for p in parts]
    assert not idx[0] & idx[1] and idx[0] | idx[1] == set(range(300))
    assert len(ScanChunkBatchSampler(ranges, num_replicas=2, rank=1, seed=4)) == len(parts[1])


# ---------------------------------------------------------------- resumability


def test_resume_skip_redo_and_overwrite(twin, tmp_path, capsys):
    out = tmp_path / "store"
    prepare_brats20(twin, out, image_size=32, progress=False)
    split = load_split("brats20")
    done, broken = split["training"][0], split["training"][1]
    mtime = (out / done / "image.npy").stat().st_mtime_ns
    # simulate a run killed while writing `broken`: no marker, a partial image, leftover temp files
    (out / broken / "meta.json").unlink()
    (out / broken / "image.npy").write_bytes(b"\x93NUMPY partial")
    (out / broken / ".image.npy.x1y2.npy.tmp").write_bytes(b"junk")
    (out / broken / ".meta.json.abcd.tmp").write_bytes(b"junk")
    capsys.readouterr()
    prepare_brats20(twin, out, image_size=32, progress=False)
    assert "6 cases were already prepared" in capsys.readouterr().out
    assert (out / done / "image.npy").stat().st_mtime_ns == mtime  # skipped
    assert np.load(out / broken / "image.npy").shape == (SHAPE[2], 3, 32, 32)  # redone
    assert json.loads((out / broken / "meta.json").read_text())["labels"] == nib_labels(twin / broken).tolist()
    assert not list(out.rglob("*.tmp"))
    # a different size or dtype is not "prepared"; overwrite redoes everything
    prepare_brats20(twin, out, image_size=24, progress=False)
    assert np.load(out / done / "image.npy").shape[-1] == 24
    mtime = (out / done / "image.npy").stat().st_mtime_ns
    prepare_brats20(twin, out, image_size=24, overwrite=True, progress=False)
    assert (out / done / "image.npy").stat().st_mtime_ns != mtime
    assert not list(out.rglob("*.tmp"))


def test_missing_and_extra_cases_reported(twin, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(twin, ds / "MICCAI_BraTS2020_TrainingData")
    extra = "BraTS20_Training_999"  # a valid folder name that the published split does not list
    write_brats20_twin(ds, case_ids=[extra], shape=SHAPE)
    dl = json.loads(prepare_brats20(ds, tmp_path / "out", image_size=32, progress=False).read_text())
    out = capsys.readouterr().out
    assert "362 of 369 split cases are not in" in out and "BraTS20_Training_" in out
    assert "1 cases in" in out and extra in out
    assert not (tmp_path / "out" / extra).exists()
    assert sum(len(v) for v in dl.values()) == 7 and "unsplit" not in dl
    # explicitly requested cases outside the split go under "unsplit"
    first = load_split("brats20")["training"][0]
    dl = json.loads(prepare_brats20(ds, tmp_path / "out", image_size=32, cases=[extra, first],
                                    progress=False).read_text())
    assert [e["case"] for e in dl["unsplit"]] == [extra]
    assert [e["case"] for e in dl["training"]] == [first] and dl["validation"] == dl["test"] == []
    with pytest.raises(InputDataError, match="requested cases not found: BraTS20_Training_998"):
        prepare_brats20(ds, tmp_path / "out", cases=["BraTS20_Training_998"], progress=False)


# ---------------------------------------------------------------- bad inputs


def _expect_error(case_dir: Path, out: Path, file_part: str, *problem: str) -> None:
    case = case_dir.name
    with pytest.raises(InputDataError) as ei:
        prepare_brats20(case_dir.parent, out, split=None, image_size=32, progress=False)
    msg = str(ei.value)
    assert case in msg and file_part in msg, msg
    for p in problem:
        assert p in msg, msg
    # nothing half-written for that case, and no datalist
    assert not (out / case / "meta.json").exists() and not (out / "datalist.json").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file(tmp_path, compress):
    case_dir = one_case(tmp_path, compress=compress)
    f = case_dir / f"{case_dir.name}_t2.nii{'.gz' if compress else ''}"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect_error(case_dir, tmp_path / "out", f.name, "cannot read")
    with pytest.raises(InputDataError) as ei:
        load_case(case_dir, 32)
    assert "\n" not in str(ei.value)  # the CLI prints it as one line


def test_missing_modality(tmp_path):
    case_dir = one_case(tmp_path)
    (case_dir / f"{case_dir.name}_flair.nii.gz").unlink()
    _expect_error(case_dir, tmp_path / "out", f"{case_dir.name}_flair", "missing flair")


def test_shape_mismatch(tmp_path):
    case_dir = one_case(tmp_path)
    f = case_dir / f"{case_dir.name}_t1.nii.gz"
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :-2], img.affine), f)
    _expect_error(case_dir, tmp_path / "out", f.name, "(40, 40, 14)", "(40, 40, 16)", "_seg.nii.gz")


def test_nan_in_float_image(tmp_path):
    case_dir = one_case(tmp_path)
    f = case_dir / f"{case_dir.name}_t2.nii.gz"
    img = nib.load(f)
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    arr[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), f)
    _expect_error(case_dir, tmp_path / "out", f.name, "NaN")


def test_bad_seg_label(tmp_path):
    case_dir = one_case(tmp_path)
    f = case_dir / f"{case_dir.name}_seg.nii.gz"
    img = nib.load(f)
    seg = np.asanyarray(img.dataobj).copy()
    seg[seg == 1] = 3
    nib.save(nib.Nifti1Image(seg, img.affine), f)
    _expect_error(case_dir, tmp_path / "out", f.name, "outside {0, 1, 2, 4}: 3")


def test_not_3d(tmp_path):
    case_dir = one_case(tmp_path)
    f = case_dir / f"{case_dir.name}_t1.nii.gz"
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None].repeat(2, -1), img.affine), f)
    _expect_error(case_dir, tmp_path / "out", f.name, "3-D")


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no BraTS2020 case folders"):
        prepare_brats20(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(InputDataError, match="does not exist"):
        find_cases(tmp_path / "missing")


def test_no_split_case_present_is_empty_datalist(tmp_path):
    case_dir = one_case(tmp_path, "BraTS20_Training_999")  # a valid name outside the published split
    with pytest.raises(InputDataError, match="empty datalist"):
        prepare_brats20(case_dir.parent, tmp_path / "out", image_size=32, progress=False)


def test_cli_bad_input_exits_2(tmp_path):
    case_dir = one_case(tmp_path)
    (case_dir / f"{case_dir.name}_t1.nii.gz").unlink()
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_brats20.py"), "prepare",
         "--dataset_dir", str(case_dir.parent), "--output_dir", str(tmp_path / "out"),
         "--split", "None", "--image_size", "32", "--progress", "False"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and case_dir.name in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_make_synthetic_and_prepare(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "brats20", "--output_dir", str(tmp_path / "ds"),
         "--shape", "24,24,8", "--case_ids", "BraTS20_Training_034", "--compress", "False"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ds" / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_034" / "BraTS20_Training_034_seg.nii").is_file()
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_brats20.py"), "prepare", "--dataset_dir", str(tmp_path / "ds"),
         "--output_dir", str(tmp_path / "out"), "--image_size", "32", "--progress", "False"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    dl = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert [e["case"] for e in dl["training"]] == ["BraTS20_Training_034"]


# ---------------------------------------------------------------- real-format sample


@pytest.mark.skipif(not (REAL / "MICCAI_BraTS2020_TrainingData").is_dir(), reason="real-format BraTS sample absent")
def test_real_format_sample(tmp_path):
    data = REAL / "MICCAI_BraTS2020_TrainingData"
    ids = ["BraTS20_Training_001", "BraTS20_Training_002"]
    # the samples reuse IDs of the published split (placeholders, not those patients)
    dl_path = prepare_brats20(REAL, tmp_path, image_size=64, cases=ids, progress=False)
    dl = json.loads(dl_path.read_text())
    split_of = {c: k for k, v in load_split("brats20").items() for c in v}
    expected = {"BraTS20_Training_001": (61, 112, 52), "BraTS20_Training_002": (93, 132, 40)}  # README
    for case in ids:
        key = split_of.get(case, "unsplit")
        entry = next(e for e in dl[key] if e["case"] == case)
        ref = nib_labels(data / case)
        meta = json.loads((tmp_path / case / "meta.json").read_text())
        assert meta["labels"] == ref.tolist()
        first, last, n_pos = expected[case]
        pos = np.flatnonzero(ref)
        assert (pos[0], pos[-1], len(pos)) == (first, last, n_pos)
        assert entry["n_slices"] == 155 and entry["n_positive"] == n_pos
        image = np.load(tmp_path / case / "image.npy", mmap_mode="r")
        assert image.shape == (155, 3, 64, 64) and image.dtype == np.float16
    ds = SliceDataset(dl_path, split=split_of.get(ids[0], "unsplit"))
    assert len(ds) == 310 and int(ds.labels.sum()) == 92
