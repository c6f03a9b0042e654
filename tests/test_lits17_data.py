"""LiTS17 preparation into the slice store, and the sampler's last-batch crop (LGM-ViT spec section 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.data.datalists import datalist_path, load_split
from custom_components.data.lits17 import case_id, find_volumes, load_volume, prepare_lits17
from custom_components.data.slice_store import ScanChunkBatchSampler, SliceDataset
from custom_components.data.synthetic import write_lits17_twin
from custom_components.io import InputDataError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = SHARED / "lits17_format"
SHAPE = (40, 36, 20)  # non-square: nothing may assume 512 x 512


def nib_labels(seg_path: Path, target: str = "organ") -> np.ndarray:
    """Independent per-slice labels from nibabel: slice k = seg[:, :, k]."""
    seg = np.asanyarray(nib.load(seg_path).dataobj)
    fg = seg > 0 if target == "organ" else seg == 2
    return np.array([int(fg[:, :, k].any()) for k in range(seg.shape[2])])


def seg_of(root: Path, case: str) -> Path:
    return next((root / "segmentations").glob(f"segmentation-{case.split('-')[1]}.nii*"))


def minmax(sl: np.ndarray) -> np.ndarray:
    sl = sl.astype(np.float32)
    return (sl - sl.min()) / (sl.max() - sl.min())


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_lits17_twin(tmp_path_factory.mktemp("twin"), shape=SHAPE, seed=2)


@pytest.fixture(scope="module")
def store(twin, tmp_path_factory) -> Path:
    return prepare_lits17(twin, tmp_path_factory.mktemp("store"), image_size=64, progress=False)


def one_case(tmp_path: Path, case: str = "volume-15", **kw) -> Path:
    """A one-volume twin (volume-15 is a training case of the published split)."""
    return write_lits17_twin(tmp_path / "ds", case_ids=[case], shape=kw.pop("shape", SHAPE), **kw)


# ---------------------------------------------------------------- datalist


def test_shipped_datalist_matches_published_split():
    dl = json.loads(datalist_path("lits17").read_text())
    assert list(dl) == ["training", "validation", "test"]
    assert [len(dl[k]) for k in dl] == [92, 13, 26]  # spec section 6
    e = dl["training"][0]
    assert e == {"case": e["case"], "image": f"{e['case']}/image.npy", "mask": f"{e['case']}/mask.npy"}
    assert all(x["case"].startswith("volume-") and "." not in x["case"] for v in dl.values() for x in v)
    published = SHARED / "splits" / "lits17_lgmvit_split.json"
    if published.is_file():
        pub = load_split(published)  # volume-N.nii names, same order
        assert {k: [case_id(c) for c in v] for k, v in pub.items()} == load_split("lits17")


# ---------------------------------------------------------------- twin -> prepare


def test_twin_layout(twin):
    found = find_volumes(twin)
    split = load_split("lits17")
    ids = split["training"][:3] + split["validation"][:2] + split["test"][:2]
    assert sorted(found, key=lambda c: int(c.split("-")[1])) == list(found) and set(found) == set(ids)
    for case, files in found.items():
        assert files.volume == twin / "scans" / f"{case}.nii"
        assert files.seg == seg_of(twin, case) and files.seg.name.endswith(".nii")
    vol, seg = nib.load(found[ids[0]].volume), nib.load(found[ids[0]].seg)
    assert vol.shape == seg.shape == SHAPE
    assert vol.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(vol.affine, seg.affine)
    assert abs(vol.affine[0, 0]) < 1 and abs(vol.affine[1, 1]) < 1  # sub-millimetre in-plane
    ct = np.asanyarray(vol.dataobj)
    assert ct.min() <= -1000 + 60 and ct.max() >= 400
    for case in ids:
        s = np.asanyarray(nib.load(found[case].seg).dataobj)
        assert set(np.unique(s)) == {0, 1, 2}
        liver, tumour = nib_labels(found[case].seg), nib_labels(found[case].seg, "lesion")
        run = np.flatnonzero(liver)
        assert 0 < len(run) < SHAPE[2] and run[-1] - run[0] + 1 == len(run)  # contiguous liver slices
        assert 0 < tumour.sum() < liver.sum() and not (tumour & ~liver).any()  # tumour inside the liver


@pytest.mark.parametrize("target", ["organ", "lesion"])
def test_prepare_labels_and_split(twin, store, tmp_path, target):
    out = store.parent if target == "organ" else tmp_path
    dl_path = store if target == "organ" else prepare_lits17(
        twin, out, image_size=32, target="lesion", dtype="float32", progress=False)
    size, dtype = (64, np.float16) if target == "organ" else (32, np.float32)
    dl = json.loads(dl_path.read_text())
    split = load_split("lits17")
    assert [e["case"] for e in dl["training"]] == split["training"][:3]
    assert [e["case"] for e in dl["validation"]] == split["validation"][:2]
    assert [e["case"] for e in dl["test"]] == split["test"][:2]
    for entries in dl.values():
        for e in entries:
            case = e["case"]
            ref = nib_labels(seg_of(twin, case), target)
            meta = json.loads((out / case / "meta.json").read_text())
            assert meta["labels"] == ref.tolist() and meta["target"] == target and meta["hu_window"] is None
            assert e["n_slices"] == meta["n_slices"] == SHAPE[2] and e["n_positive"] == ref.sum()
            assert meta["sources"] == {"volume": f"{case}.nii", "seg": f"segmentation-{case[7:]}.nii"}
            image, mask = np.load(out / e["image"]), np.load(out / e["mask"])
            assert image.shape == (SHAPE[2], 3, size, size) and image.dtype == dtype
            assert mask.shape == (SHAPE[2], size, size) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1}
            np.testing.assert_array_equal(image[:, 0], image[:, 2])  # CT repeated to 3 channels
    assert not list(out.rglob("*.tmp"))


def test_load_volume_orientation_and_hu_window(tmp_path):
    root = one_case(tmp_path, shape=(32, 32, 12))
    files = find_volumes(root)["volume-15"]
    ct = np.asanyarray(nib.load(files.volume).dataobj)
    seg = np.asanyarray(nib.load(files.seg).dataobj)
    image, mask = load_volume(files.volume, files.seg, image_size=32)  # native size: no resampling
    assert image.shape == (12, 3, 32, 32) and image.dtype == np.float32
    np.testing.assert_array_equal(mask, (seg > 0).transpose(2, 1, 0))  # (z, y, x)
    _, lesion = load_volume(files.volume, files.seg, image_size=32, target="lesion")
    np.testing.assert_array_equal(lesion, (seg == 2).transpose(2, 1, 0))
    k = 9
    sl = ct[:, :, k].T
    np.testing.assert_allclose(image[k, 1], minmax(sl), atol=1e-6)  # raw HU, per-slice min-max
    win, _ = load_volume(files.volume, files.seg, image_size=32, hu_window=(-100, 400))
    np.testing.assert_allclose(win[k, 1], minmax(np.clip(sl, -100, 400)), atol=1e-6)  # clip, then min-max
    # the slice holds air and bone, so this is the fixed window (x - lo) / (hi - lo)
    np.testing.assert_allclose(win[k, 1], (np.clip(sl, -100, 400) + 100) / 500, atol=1e-6)
    assert not np.allclose(win, image) and win.min() >= 0 and win.max() <= 1
    np.testing.assert_array_equal(load_volume(files.volume, files.seg, 32, hu_window="-100,400")[0], win)
    with pytest.raises(ValueError, match="lo < hi"):
        load_volume(files.volume, files.seg, 32, hu_window=(400, -100))
    with pytest.raises(ValueError, match="target"):
        load_volume(files.volume, files.seg, 32, target="tumour")


# ---------------------------------------------------------------- store: dataset, resume


def test_slice_dataset_reads_store(store, twin):
    ds = SliceDataset(store, split="training")
    split = load_split("lits17")
    assert ds.case_ids == split["training"][:3] and len(ds) == 3 * SHAPE[2]
    np.testing.assert_array_equal(ds.labels, np.concatenate([nib_labels(seg_of(twin, c)) for c in ds.case_ids]))
    for i in range(0, len(ds), 3):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
        assert item["label"].item() == float(item["mask"].any()) == ds.labels[i]  # 40x36 -> 64 keeps every pixel
    sampler = ScanChunkBatchSampler(ds.case_slice_ranges, chunk_size=8, last_batch_min_ratio=0.7)
    batches = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler))
    assert [len(b["slice"]) for b in batches] == [8, 8] * 3  # 20 = 2*8 + 4, 4 < 5.6: 16-slice crop


def test_resume_and_changed_settings(twin, tmp_path, capsys):
    case = load_split("lits17")["training"][0]
    out = tmp_path / "store"
    prepare_lits17(twin, out, image_size=32, cases=[case], progress=False)
    mtime = (out / case / "image.npy").stat().st_mtime_ns
    capsys.readouterr()
    prepare_lits17(twin, out, image_size=32, cases=[f"{case}.nii"], progress=False)  # published name accepted
    assert "1 cases were already prepared" in capsys.readouterr().out
    assert (out / case / "image.npy").stat().st_mtime_ns == mtime
    # a changed target or HU window is not "prepared": the case is redone
    prepare_lits17(twin, out, image_size=32, cases=[case], target="lesion", progress=False)
    meta = json.loads((out / case / "meta.json").read_text())
    assert meta["target"] == "lesion" and meta["labels"] == nib_labels(seg_of(twin, case), "lesion").tolist()
    before = np.load(out / case / "image.npy")
    dl = prepare_lits17(twin, out, image_size=32, cases=[case], target="lesion", hu_window=(-100, 400),
                        progress=False)
    assert json.loads((out / case / "meta.json").read_text())["hu_window"] == [-100, 400]
    assert not np.array_equal(np.load(out / case / "image.npy"), before)
    assert [e["case"] for e in json.loads(dl.read_text())["training"]] == [case]
    assert not list(out.rglob("*.tmp"))


def test_other_layouts_and_unsplit(twin, tmp_path):
    # LiTS's original release: "Training Batch 1/2" folders with both kinds of file, gzipped here
    ds = tmp_path / "orig"
    for batch, n in (("Training Batch 1", 6), ("Training Batch 2", 64)):
        (ds / batch).mkdir(parents=True)
        shutil.copy(twin / "scans" / f"volume-{n}.nii", ds / batch)
        shutil.copy(twin / "segmentations" / f"segmentation-{n}.nii", ds / batch)
    found = find_volumes(ds)
    assert list(found) == ["volume-6", "volume-64"]
    assert found["volume-64"].seg == ds / "Training Batch 2" / "segmentation-64.nii"
    # flat layout, .nii.gz, a volume outside the split (only when requested: "unsplit")
    flat = tmp_path / "flat"
    write_lits17_twin(flat, case_ids=["volume-999"], shape=SHAPE, compress=True)
    for p in list(flat.rglob("*.nii.gz")):
        p.rename(flat / p.name)
    assert find_volumes(flat)["volume-999"].seg == flat / "segmentation-999.nii.gz"
    with pytest.raises(InputDataError, match="empty datalist"):
        prepare_lits17(flat, tmp_path / "out", image_size=16, progress=False)
    dl = json.loads(prepare_lits17(flat, tmp_path / "out", image_size=16, cases=["volume-999"],
                                   progress=False).read_text())
    assert [e["case"] for e in dl["unsplit"]] == ["volume-999"] and dl["training"] == []
    with pytest.raises(InputDataError, match="requested cases not found: volume-998"):
        prepare_lits17(flat, tmp_path / "out", cases=["volume-998"], progress=False)
    with pytest.raises(InputDataError, match="no LiTS17 volumes"):
        find_volumes(tmp_path / "out")  # a store, not a dataset
    with pytest.raises(InputDataError, match="does not exist"):
        find_volumes(tmp_path / "missing")


# ---------------------------------------------------------------- bad inputs


def _expect_error(root: Path, out: Path, file_part: str, *problem: str, case: str = "volume-15") -> None:
    with pytest.raises(InputDataError) as ei:
        prepare_lits17(root, out, split=None, image_size=16, progress=False)
    msg = str(ei.value)
    assert f"case {case}" in msg and file_part in msg and "\n" not in msg, msg
    for p in problem:
        assert p in msg, msg
    assert not (out / case / "meta.json").exists() and not (out / "datalist.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_missing_segmentation(tmp_path):
    root = one_case(tmp_path)
    (root / "segmentations" / "segmentation-15.nii").unlink()
    assert find_volumes(root)["volume-15"].seg is None
    _expect_error(root, tmp_path / "out", "segmentation-15.nii", "missing segmentation")


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file(tmp_path, compress):
    root = one_case(tmp_path, compress=compress)
    f = root / "scans" / f"volume-15.nii{'.gz' if compress else ''}"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect_error(root, tmp_path / "out", f.name, "cannot read")


def _rewrite(path: Path, fn) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(fn(np.asanyarray(img.dataobj).copy()), img.affine), path)


def test_shape_mismatch(tmp_path):
    root = one_case(tmp_path)
    _rewrite(root / "scans" / "volume-15.nii", lambda a: a[:, :, :-2])
    _expect_error(root, tmp_path / "out", "volume-15.nii", "(40, 36, 18)", "(40, 36, 20)", "segmentation-15.nii")


def test_bad_label(tmp_path):
    root = one_case(tmp_path)
    _rewrite(root / "segmentations" / "segmentation-15.nii", lambda a: np.where(a == 2, 3, a).astype(np.uint8))
    _expect_error(root, tmp_path / "out", "segmentation-15.nii", "outside {0, 1, 2}: 3")


@pytest.mark.parametrize("relabel, words", [
    (lambda a: np.where(a == 1, 0, a).astype(np.uint8), "only labels 0 and 2"),  # tumour-only convention
    (np.zeros_like, "all background"),
])
def test_organ_target_needs_the_liver_label(tmp_path, relabel, words):
    """seg > 0 on a map without label 1 would be wrong liver labels: an error naming the file, not a silent run."""
    root = one_case(tmp_path)
    seg = root / "segmentations" / "segmentation-15.nii"
    _rewrite(seg, relabel)
    _expect_error(root, tmp_path / "out", seg.name, "no liver label (1)", words, "--target organ")
    with pytest.raises(InputDataError, match="no liver label"):
        load_volume(root / "scans" / "volume-15.nii", seg, image_size=16)
    # the lesion target reads label 2 only: a map without liver (or without anything) is fine there
    _, mask = load_volume(root / "scans" / "volume-15.nii", seg, image_size=16, target="lesion")
    assert mask.shape == (SHAPE[2], 16, 16)


def test_nan_and_4d(tmp_path):
    root = one_case(tmp_path)
    f = root / "scans" / "volume-15.nii"
    orig = f.read_bytes()
    _rewrite(f, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.nan, a).astype(np.float32))
    _expect_error(root, tmp_path / "out", f.name, "NaN")
    f.write_bytes(orig)
    _rewrite(f, lambda a: a[..., None].repeat(2, -1))
    _expect_error(root, tmp_path / "out", f.name, "3-D")


def test_cli(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "lits17", "--output_dir", str(tmp_path / "ds"),
         "--shape", "24,20,10", "--case_ids", "volume-15"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ds" / "segmentations" / "segmentation-15.nii").is_file()
    (tmp_path / "ds" / "segmentations" / "segmentation-15.nii").rename(tmp_path / "seg.nii")
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_lits17.py"), "prepare", "--dataset_dir",
           str(tmp_path / "ds"), "--output_dir", str(tmp_path / "out"), "--image_size", "16",
           "--target", "lesion", "--hu_window", "-100,400", "--progress", "False"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "volume-15" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- sampler crop (spec section 10)


def test_chunk_sampler_last_batch_min_ratio():
    s = ScanChunkBatchSampler([(0, 100)], chunk_size=32, shuffle=False, last_batch_min_ratio=0.7)
    starts = set()
    for e in range(8):
        s.set_epoch(e)
        batches = list(s)
        assert [len(b) for b in batches] == [32, 32, 32] and len(s) == 3
        flat = [i for b in batches for i in b]
        assert flat == list(range(flat[0], flat[0] + 96)) and 0 <= flat[0] <= 4  # contiguous 96-slice run
        starts.add(flat[0])
    assert len(starts) > 1  # a new run each epoch
    s = ScanChunkBatchSampler([(0, 120)], chunk_size=32, last_batch_min_ratio=0.7)  # r = 24 >= 22.4
    assert [len(b) for b in s] == [32, 32, 32, 24] and [i for b in s for i in b] == list(range(120))
    s = ScanChunkBatchSampler([(0, 100), (100, 120)], chunk_size=32, shuffle=False)  # default: no crop
    assert [len(b) for b in s] == [32, 32, 32, 4, 20]
    s = ScanChunkBatchSampler([(0, 100), (100, 120)], chunk_size=32, shuffle=False, last_batch_min_ratio=0.7)
    assert [len(b) for b in s] == [32, 32, 32, 20] and len(s) == 4  # shorter than a chunk: kept whole
    with pytest.raises(ValueError):
        ScanChunkBatchSampler([(0, 10)], last_batch_min_ratio=1.5)


# ---------------------------------------------------------------- real-format sample


@pytest.mark.skipif(not (REAL / "scans").is_dir(), reason="real-format LiTS17 sample absent")
@pytest.mark.parametrize("target", ["organ", "lesion"])
def test_real_format_sample(tmp_path, target):
    dl_path = prepare_lits17(REAL, tmp_path, image_size=64, target=target, cases=["volume-0"], progress=False)
    dl = json.loads(dl_path.read_text())
    key = {c: k for k, v in load_split("lits17").items() for c in v}.get("volume-0", "unsplit")
    assert key == "training"  # volume-0 is listed in the published split (a placeholder, not that patient)
    entry = next(e for e in dl[key] if e["case"] == "volume-0")
    labels = json.loads((tmp_path / "volume-0" / "meta.json").read_text())["labels"]
    ref = nib_labels(REAL / "segmentations" / "segmentation-0.nii.gz", target)
    assert labels == ref.tolist() and entry["n_slices"] == 112
    if target == "organ":
        assert np.flatnonzero(labels).tolist() == list(range(70, 112)) and entry["n_positive"] == 42  # README
    else:
        assert entry["n_positive"] == 0  # no tumour label in the sample
    image = np.load(tmp_path / "volume-0" / "image.npy", mmap_mode="r")
    assert image.shape == (112, 3, 64, 64) and image.dtype == np.float16
    ds = SliceDataset(dl_path, split=key)
    assert len(ds) == 112 and int(ds.labels.sum()) == entry["n_positive"]
