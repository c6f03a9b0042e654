"""Per-scan NIfTI outputs on the source scan's grid (prepare -> PredictionWriter -> source shape/affine).

Twins on an anisotropic, non-square, non-BraTS grid (40 x 32 x 9 voxels, 6.5 mm slices, flipped x/y
and an origin offset); fake per-slice maps go through the writer as the bundles' inference feeds it
(SliceDataset + ScanChunkBatchSampler batches), and the written volumes are checked in closed form.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.data.brats20 import prepare_brats20
from custom_components.data.lits17 import prepare_lits17
from custom_components.data.scan_grid import GRID_VERSION
from custom_components.data.slice_store import ScanChunkBatchSampler, SliceDataset
from custom_components.data.synthetic import write_brats20_twin, write_lits17_twin
from custom_components.handlers.prediction_writer import PredictionWriter
from custom_components.io import InputDataError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPE = (40, 32, 9)  # x != y and both != the prepared size: a missed transpose or resize shows
SPACING = (0.9, 1.1, 6.5)
ORIGIN = (12.5, -30.0, 40.0)
SIZE = 16  # prepared in-plane size

Maps = Callable[[dict], torch.Tensor]  # one batch of SliceDataset items -> (n, SIZE, SIZE) maps


class Prepared(NamedTuple):
    store: Path
    source_of: Callable[[str], Path]  # case -> the source image NIfTI
    seg_of: Callable[[str], Path]  # case -> its segmentation NIfTI


def _brats(root: Path) -> Prepared:
    data = write_brats20_twin(root / "ds", case_ids=["BraTS20_Training_001", "BraTS20_Training_002"], shape=SHAPE,
                              spacing=SPACING, origin=ORIGIN, seed=4)  # fmt: skip
    store = prepare_brats20(data, root / "store", split=None, image_size=SIZE, dtype="float32", progress=False).parent
    return Prepared(store, lambda c: data / c / f"{c}_flair.nii.gz", lambda c: data / c / f"{c}_seg.nii.gz")


def _lits(root: Path) -> Prepared:
    data = write_lits17_twin(root / "ds", case_ids=["volume-3", "volume-4"], shape=SHAPE, spacing=SPACING,
                             origin=ORIGIN, seed=4)  # fmt: skip
    store = prepare_lits17(data, root / "store", split=None, image_size=SIZE, dtype="float32", progress=False).parent
    return Prepared(store, lambda c: data / "scans" / f"{c}.nii",
                    lambda c: data / "segmentations" / f"segmentation-{c.removeprefix('volume-')}.nii")  # fmt: skip


@pytest.fixture(scope="module", params=["brats20", "lits17"])
def prepared(request, tmp_path_factory) -> Prepared:
    """A two-case twin on the anisotropic grid, prepared at SIZE."""
    make = {"brats20": _brats, "lits17": _lits}[request.param]
    return make(tmp_path_factory.mktemp(request.param))


def run_writer(store: Path, out: Path, maps: Maps, keep: Callable[[dict], torch.Tensor] | None = None) -> Path:
    """Feed the writer scan-ordered batches (as the bundle's inference does) with ``maps`` as the explanation."""
    ds = SliceDataset(store / "datalist.json", split="unsplit")
    writer = PredictionWriter(str(out), save_png=False, store_dir=str(store))
    writer.reset()
    for indices in ScanChunkBatchSampler(ds.case_slice_ranges, chunk_size=4, shuffle=False):
        items = [ds[i] for i in indices]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "label")}
        batch.update(case=[it["case"] for it in items], slice=torch.tensor([it["slice"] for it in items]))
        rows = keep(batch) if keep is not None else torch.ones(len(items), dtype=torch.bool)
        if not rows.any():
            continue
        out_ = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out_["case"] = [c for c, r in zip(batch["case"], rows.tolist(), strict=True) if r]
        out_["map"] = maps(batch)[rows]
        out_["pred"] = torch.zeros(int(rows.sum()), 1)
        del out_["mask"]  # no quality scoring needed here
        writer.collect(SimpleNamespace(state=SimpleNamespace(output=out_)))
    writer.write(None)
    return out / "maps"


def cases(store: Path) -> list[str]:
    return [e["case"] for e in json.loads((store / "datalist.json").read_text())["unsplit"]]


# ---------------------------------------------------------------- the written grid


def test_written_maps_have_the_source_grid(prepared, tmp_path):
    store, source_of, _ = prepared
    maps = run_writer(store, tmp_path, lambda b: torch.rand(len(b["case"]), SIZE, SIZE))
    for case in cases(store):
        src, out = nib.load(source_of(case)), nib.load(maps / f"{case}_eafem.nii.gz")
        assert out.shape == src.shape == SHAPE
        np.testing.assert_array_equal(out.affine, src.affine)
        assert out.header.get_zooms() == src.header.get_zooms()
        for key in ("qform_code", "sform_code", "xyzt_units"):
            assert out.header[key] == src.header[key], key
        assert out.get_data_dtype() == np.float32


def test_one_slice_map_comes_back_at_its_source_slice(prepared, tmp_path):
    store, _, _ = prepared
    k = 6
    maps = run_writer(store, tmp_path, lambda b: (b["slice"] == k).float()[:, None, None].expand(-1, SIZE, SIZE))
    for case in cases(store):
        vol = nib.load(maps / f"{case}_eafem.nii.gz").get_fdata()
        # prepared slice k is nibabel slice [:, :, k]; a constant map stays 1 after resampling
        np.testing.assert_allclose(vol[:, :, k], 1.0, atol=1e-6)
        assert not np.delete(vol, k, axis=2).any()


def test_blob_lands_at_its_source_voxel(prepared, tmp_path):
    store, _, _ = prepared
    k, r, c = 3, 4, 11  # prepared slice, row, column of the blob's centre

    def blob(b: dict) -> torch.Tensor:
        m = torch.zeros(len(b["case"]), SIZE, SIZE)
        m[b["slice"] == k, r - 1 : r + 2, c - 1 : c + 2] = 1.0
        return m

    maps = run_writer(store, tmp_path, blob)
    # rows run along source y, columns along source x; half-pixel centres: x = (c + 0.5) * X / w - 0.5
    expected = ((c + 0.5) * SHAPE[0] / SIZE - 0.5, (r + 0.5) * SHAPE[1] / SIZE - 0.5, k)
    for case in cases(store):
        vol = nib.load(maps / f"{case}_eafem.nii.gz").get_fdata()
        idx = np.indices(vol.shape).reshape(3, -1)
        centre = (idx * vol.reshape(-1)).sum(1) / vol.sum()
        np.testing.assert_allclose(centre, expected, atol=0.05)


def test_left_right_asymmetric_map_keeps_its_side(prepared, tmp_path):
    store, _, _ = prepared

    def left(b: dict) -> torch.Tensor:  # 1 on the first half of the prepared columns
        m = torch.zeros(len(b["case"]), SIZE, SIZE)
        m[:, :, : SIZE // 2] = 1.0
        return m

    maps = run_writer(store, tmp_path, left)
    for case in cases(store):
        vol = nib.load(maps / f"{case}_eafem.nii.gz").get_fdata()
        # prepared columns are source x (axis 0): the low-x half is 1, the high-x half 0 (bilinear edge aside)
        np.testing.assert_allclose(vol[: SHAPE[0] // 2 - 2], 1.0, atol=1e-6)
        assert not vol[SHAPE[0] // 2 + 2 :].any()


def test_lesion_map_overlays_the_source_lesion(prepared, tmp_path):
    store, _, seg_of = prepared
    maps = run_writer(store, tmp_path, lambda b: b["mask"][:, 0])  # the prepared mask as the "explanation"
    for case in cases(store):
        vol = nib.load(maps / f"{case}_eafem.nii.gz").get_fdata() > 0.5
        seg = np.asanyarray(nib.load(seg_of(case)).dataobj) > 0
        dice = 2 * (vol & seg).sum() / (vol.sum() + seg.sum())
        mirrored = 2 * (vol[::-1] & seg).sum() / (vol.sum() + seg.sum())
        assert dice > 0.7 and dice > mirrored + 0.2, (case, dice, mirrored)


def test_unseen_slices_are_zero(prepared, tmp_path):
    store, _, _ = prepared
    maps = run_writer(store, tmp_path, lambda b: torch.ones(len(b["case"]), SIZE, SIZE),
                      keep=lambda b: (b["slice"] >= 2) & (b["slice"] < 5))  # fmt: skip
    for case in cases(store):
        vol = nib.load(maps / f"{case}_eafem.nii.gz").get_fdata()
        assert vol.shape == SHAPE
        np.testing.assert_allclose(vol[:, :, 2:5], 1.0, atol=1e-6)
        assert not vol[:, :, :2].any() and not vol[:, :, 5:].any()


# ---------------------------------------------------------------- stores without the record


def test_store_without_grid_record_keeps_prepared_grid_and_warns_once(prepared, tmp_path, caplog):
    store, _, _ = prepared
    old = tmp_path / "old_store"
    for case in cases(store):
        (old / case).mkdir(parents=True)
        for name in ("image.npy", "mask.npy"):
            (old / case / name).write_bytes((store / case / name).read_bytes())
        meta = json.loads((store / case / "meta.json").read_text())
        del meta["grid"]  # as written before the record existed
        (old / case / "meta.json").write_text(json.dumps(meta))
    (old / "datalist.json").write_text((store / "datalist.json").read_text())
    with caplog.at_level(logging.WARNING, logger="custom_components.handlers.prediction_writer"):
        maps = run_writer(old, tmp_path / "out", lambda b: torch.ones(len(b["case"]), SIZE, SIZE))
    first = cases(store)[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and first in warnings[0] and "re-prepare" in warnings[0]
    for case in cases(store):
        out = nib.load(maps / f"{case}_eafem.nii.gz")
        assert out.shape == (SIZE, SIZE, SHAPE[2]) and (out.affine == np.eye(4)).all()


def test_grid_record_of_another_version_is_refused(prepared, tmp_path):
    store, _, _ = prepared
    other = tmp_path / "store"
    case = cases(store)[0]
    (other / case).mkdir(parents=True)
    meta = json.loads((store / case / "meta.json").read_text())
    meta["grid"]["grid_version"] = GRID_VERSION + 1
    (other / case / "meta.json").write_text(json.dumps(meta))
    writer = PredictionWriter(str(tmp_path / "out"), save_png=False, store_dir=str(other))
    writer.maps[case] = {0: np.zeros((SIZE, SIZE), np.float32)}
    with pytest.raises(InputDataError, match="re-prepare"):
        writer._write_case(case)


def test_case_prepared_by_older_code_is_reprepared_with_the_record(tmp_path):
    data = write_brats20_twin(tmp_path / "ds", case_ids=["BraTS20_Training_001"], shape=SHAPE, spacing=SPACING, seed=1)
    kw = {"split": None, "image_size": SIZE, "progress": False}
    store = prepare_brats20(data, tmp_path / "store", **kw).parent
    meta_path = store / "BraTS20_Training_001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["grid"]["source"] == "BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz"
    assert meta["grid"]["slices"] == list(range(SHAPE[2])) and meta["grid"]["zooms"] == pytest.approx(SPACING)
    old = {k: v for k, v in meta.items() if k != "grid"} | {"format_version": 1}
    meta_path.write_text(json.dumps(old))
    prepare_brats20(data, store, **kw)  # the old marker does not match: the case is prepared again
    assert json.loads(meta_path.read_text()) == meta


# ---------------------------------------------------------------- the twins' grid options


def test_twin_grid_options_and_cli(tmp_path):
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "scripts" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    grid = ["--shape", "40,32,9", "--spacing", "0.9,1.1,6.5", "--origin", "12.5,-30,40"]
    assert mod.main(["brats20", "--output_dir", str(tmp_path / "b"), "--case_ids", "BraTS20_Training_001", *grid]) == 0
    assert mod.main(["lits17", "--output_dir", str(tmp_path / "l"), "--case_ids", "volume-3", *grid]) == 0
    expected = np.diag([-0.9, -1.1, 6.5, 1.0])
    expected[:3, 3] = ORIGIN
    for path in (tmp_path / "b" / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz",
                 tmp_path / "l" / "scans" / "volume-3.nii"):  # fmt: skip
        img = nib.load(path)
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, expected, atol=1e-5)
    with pytest.raises(ValueError, match="spacing"):
        write_brats20_twin(tmp_path / "bad", case_ids=["BraTS20_Training_001"], shape=SHAPE, spacing=(1, 0, 1))


# ---------------------------------------------------------------- real-format samples


@pytest.mark.parametrize("dataset", ["brats20", "lits17"])
def test_real_format_sample_maps_overlay_the_source(dataset, tmp_path):
    folder = SHARED / f"{dataset}_format"
    if not folder.is_dir():
        pytest.skip(f"real-format sample {folder} not present")
    if dataset == "brats20":
        case = "BraTS20_Training_001"
        data = folder / "MICCAI_BraTS2020_TrainingData"
        store = prepare_brats20(data, tmp_path / "store", split=None, cases=[case], image_size=64, progress=False).parent
        source, seg = data / case / f"{case}_flair.nii.gz", data / case / f"{case}_seg.nii.gz"
    else:
        case = "volume-0"
        store = prepare_lits17(folder, tmp_path / "store", split=None, cases=[case], image_size=64, progress=False).parent
        source, seg = folder / "scans" / "volume-0.nii.gz", folder / "segmentations" / "segmentation-0.nii.gz"
    maps = run_writer(store, tmp_path / "out", lambda b: b["mask"][:, 0])
    src, out = nib.load(source), nib.load(maps / f"{case}_eafem.nii.gz")
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    assert (out.header["qform_code"], out.header["sform_code"]) == (src.header["qform_code"], src.header["sform_code"])
    vol, ref = out.get_fdata() > 0.5, np.asanyarray(nib.load(seg).dataobj) > 0
    assert 2 * (vol & ref).sum() / (vol.sum() + ref.sum()) > 0.8
