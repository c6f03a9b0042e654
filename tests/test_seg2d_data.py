"""2-D segmentation preparation (Kvasir-SEG, BUSI, ISIC layouts): masks, pairing, resume, errors, split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom_components.data.seg2d import find_cases, prepare_seg2d, read_mask
from custom_components.data.synthetic import write_busi_twin, write_kvasir_seg_twin
from custom_components.io import InputDataError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "kvasir_seg_sample"


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory) -> Path:
    return write_kvasir_seg_twin(tmp_path_factory.mktemp("kvasir_seg"), n_images=10, size=64, seed=3)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_kvasir_twin_prepares_to_binary_masks(kvasir, tmp_path):
    path = prepare_seg2d(kvasir, tmp_path / "p", image_size=32, progress=False)
    datalist = json.loads(path.read_text())
    assert {k: len(v) for k, v in datalist.items()} == {"training": 6, "validation": 2, "test": 2}
    cases = [e["case"] for v in datalist.values() for e in v]
    assert sorted(cases) == sorted(p.stem for p in (kvasir / "images").glob("*.jpg"))
    for entry in datalist["training"]:
        img = np.asarray(Image.open(tmp_path / "p" / entry["image"]))
        mask = np.asarray(Image.open(tmp_path / "p" / entry["label"]))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert mask.shape == (32, 32) and set(np.unique(mask).tolist()) <= {0, 1}
        assert mask.any()
        # the polyp is the bright pink blob: its mean red exceeds the background's
        assert img[..., 0][mask == 1].mean() > img[..., 0][mask == 0].mean()


def test_reference_thresholds_on_jpeg_masks(tmp_path):
    values = np.array([[0, 49, 50, 127], [128, 200, 201, 255]], np.uint8)
    _png(tmp_path / "m.png", values)
    mask, mid = read_mask(tmp_path / "m.png", jpeg=True, max_mid_fraction=1.0)
    np.testing.assert_array_equal(mask, [[0, 0, 0, 0], [1, 1, 1, 1]])
    assert mid == 4  # 50, 127, 128, 200
    with pytest.raises(InputDataError, match="not a binary mask"):
        read_mask(tmp_path / "m.png", jpeg=True, max_mid_fraction=0.25)


def test_png_masks_must_be_binary(tmp_path):
    _png(tmp_path / "ok.png", np.array([[0, 255]], np.uint8))
    _png(tmp_path / "ok01.png", np.array([[0, 1]], np.uint8))
    _png(tmp_path / "bad.png", np.array([[0, 128, 255]], np.uint8))
    np.testing.assert_array_equal(read_mask(tmp_path / "ok.png", jpeg=False)[0], [[0, 1]])
    np.testing.assert_array_equal(read_mask(tmp_path / "ok01.png", jpeg=False)[0], [[0, 1]])
    with pytest.raises(InputDataError, match=r"bad\.png.*other than 0 and 255: 0, 128, 255"):
        read_mask(tmp_path / "bad.png", jpeg=False)


def test_resume_skips_prepared_cases(kvasir, tmp_path):
    out = tmp_path / "p"
    prepare_seg2d(kvasir, out, image_size=32, progress=False)
    victim = sorted((out / "images").glob("*.png"))[0]
    kept = sorted((out / "images").glob("*.png"))[1]
    victim.unlink()  # as if killed before this case's image was written
    before = kept.stat().st_mtime_ns
    first = json.loads((out / "datalist.json").read_text())
    prepare_seg2d(kvasir, out, image_size=32, progress=False)
    assert victim.is_file() and kept.stat().st_mtime_ns == before
    assert json.loads((out / "datalist.json").read_text()) == first
    with pytest.raises(InputDataError, match="other settings"):
        prepare_seg2d(kvasir, out, image_size=48, progress=False)
    # killed before its first record: the settings written at the start still refuse a resume with other ones
    (out / "prepare.json").unlink()
    with pytest.raises(InputDataError, match="other settings"):
        prepare_seg2d(kvasir, out, image_size=48, progress=False)
    (out / "prepare_settings.json").write_text("{not json")
    with pytest.raises(InputDataError, match="unreadable preparation record"):
        prepare_seg2d(kvasir, out, image_size=32, progress=False)


def test_split_proportions_and_seed(tmp_path):
    from custom_components.data.seg2d import SEG2D_RATIOS
    from custom_components.data.splits import random_split

    ids = [f"c{i:04d}" for i in range(1000)]
    sizes = {k: len(v) for k, v in random_split(ids, SEG2D_RATIOS, seed=0).items()}
    assert sizes == {"training": 640, "validation": 160, "test": 200}  # the reference's Kvasir split
    busi = {k: len(v) for k, v in random_split(ids[:647], SEG2D_RATIOS, seed=0).items()}
    assert busi == {"training": 414, "validation": 104, "test": 129}  # reference 413/104/130: same ratios


def test_reference_split_file(kvasir, tmp_path):
    names = sorted(p.name for p in (kvasir / "images").glob("*.jpg"))
    split = tmp_path / "Kvasir.json"
    split.write_text(json.dumps({"train": names[:5], "val": names[5:7], "test": names[7:]}))
    datalist = json.loads(prepare_seg2d(kvasir, tmp_path / "p", image_size=32, split_file=split, progress=False).read_text())
    assert [e["source"] for e in datalist["training"]] == [f"images/{n}" for n in names[:5]]
    assert len(datalist["validation"]) == 2 and len(datalist["test"]) == 3


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_name_the_file(kvasir, tmp_path):
    d = _broken_copy(kvasir, tmp_path / "a")
    victim = sorted((d / "masks").glob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(InputDataError, match=f"{victim.stem}.jpg.*image without a mask"):
        find_cases(d)
    d = _broken_copy(kvasir, tmp_path / "b")
    victim = sorted((d / "masks").glob("*.jpg"))[1]
    Image.open(victim).resize((20, 20)).save(victim)
    with pytest.raises(InputDataError, match=f"{victim.name}: mask size 20x20 differs from its image"):
        prepare_seg2d(d, tmp_path / "pb", image_size=32, progress=False)
    d = _broken_copy(kvasir, tmp_path / "c")
    victim = sorted((d / "images").glob("*.jpg"))[2]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(InputDataError, match=f"{victim.name}: unreadable image"):
        prepare_seg2d(d, tmp_path / "pc", image_size=32, progress=False)
    d = _broken_copy(kvasir, tmp_path / "d")
    victim = sorted((d / "masks").glob("*.jpg"))[3]
    size = Image.open(victim).size
    Image.fromarray(np.full(size[::-1], 128, np.uint8)).save(victim)  # a grey, not a binary mask
    with pytest.raises(InputDataError, match=f"{victim.name}: not a binary mask"):
        prepare_seg2d(d, tmp_path / "pd", image_size=32, progress=False)


def test_busi_layout_sums_extra_masks(tmp_path):
    root = write_busi_twin(tmp_path / "busi", n_per_class=3, size=40, seed=1)
    cases = find_cases(root, "busi")
    assert {c.group for c in cases} == {"benign", "malignant"}  # the reference leaves out "normal"
    two = next(c for c in cases if c.case == "benign_3")
    assert [p.name for p in two.masks] == ["benign (3)_mask.png", "benign (3)_mask_1.png"]
    out = tmp_path / "p"
    prepare_seg2d(root, out, layout="busi", image_size=40, progress=False)
    union = np.zeros((40, 40), bool)
    for p in two.masks:
        union |= np.asarray(Image.open(p)) > 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "benign_3.png")), union.astype(np.uint8))
    all_cases = find_cases(root, "busi", busi_classes=None)
    assert len(all_cases) == 9
    (root / "benign" / "benign (2)_mask.png").unlink()
    with pytest.raises(InputDataError, match=r"benign \(2\)\.png: image without a mask"):
        find_cases(root, "busi")


def test_isic_layout(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(tmp_path / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.png", rng.integers(0, 255, (40, 40, 3), np.uint8))
        Image.open(tmp_path / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.png").save(
            tmp_path / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg")
        (tmp_path / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.png").unlink()
        m = np.zeros((40, 40), np.uint8)
        m[10:30, 20:40] = 255
        _png(tmp_path / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", m)
    out = tmp_path / "p"
    datalist = json.loads(prepare_seg2d(tmp_path, out, layout="isic", image_size=20, progress=False).read_text())
    assert sum(len(v) for v in datalist.values()) == 3
    mask = np.asarray(Image.open(out / "masks" / "ISIC_0000000.png"))
    assert mask.shape == (20, 20) and mask.sum() == 10 * 10  # nearest: rows 10..30, columns 20..40 of 40


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="real Kvasir-SEG sample not present")
def test_real_kvasir_seg_sample(tmp_path):
    path = prepare_seg2d(SAMPLE, tmp_path / "p", image_size=64, progress=False)
    datalist = json.loads(path.read_text())
    entries = [e for v in datalist.values() for e in v]
    assert len(entries) == 5
    for e in entries:
        src = np.asarray(Image.open(SAMPLE / "masks" / Path(e["source"]).name).convert("L"))
        mask = np.asarray(Image.open(tmp_path / "p" / e["label"]))
        assert set(np.unique(mask).tolist()) == {0, 1}
        # the resized polyp covers about the same fraction of the image as the original (> 127)
        assert abs(mask.mean() - (src > 127).mean()) < 0.03


def test_cli_error_is_one_line(kvasir, tmp_path):
    d = _broken_copy(kvasir, tmp_path / "k")
    victim = sorted((d / "images").glob("*.jpg"))[0]
    (d / "masks" / victim.name).unlink()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_seg2d.py"), "prepare", "--dataset_dir", str(d),
                           "--output_dir", str(tmp_path / "o"), "--image_size", "32"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and victim.name in proc.stderr
    assert "Traceback" not in proc.stderr
