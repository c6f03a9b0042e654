"""The unlabelled collection of LVM-Med pre-training: sources merged, volumes as slices, every bad input one line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from custom_components.data.ssl_collection import (
    LoadSSLImaged,
    NormalizeImageNetd,
    held_out_list,
    load_ssl_image,
    prepare_ssl_collection,
    volume_slices,
)
from custom_components.data.synthetic import write_ssl2d_twin
from custom_components.io import InputDataError


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return write_ssl2d_twin(tmp_path_factory.mktemp("ssl2d"), n_images=12, size=24, seed=3, volume_shape=(20, 20, 5))


def _collection(path):
    return json.loads(path.read_text())


def test_twin_datalist_becomes_the_collection_with_volume_slices(twin, tmp_path):
    path = prepare_ssl_collection(twin, tmp_path / "prep", graph_size=4)
    data = _collection(path)
    listed = json.loads((twin / "datalist.json").read_text())
    images = [str((twin / e["image"]).resolve()) for e in listed["training"] if e["image"].endswith(".png")]
    slices = sorted((tmp_path / "prep" / "slices").rglob("*.png"))
    assert len(slices) == 5  # every slice of the twin volume has contrast
    assert [e["image"] for e in data["training"]] == images + [str(p.resolve()) for p in slices]
    assert [e["image"] for e in data["test"]] == [str((twin / e["image"]).resolve()) for e in listed["test"]]
    assert held_out_list(path, "test", 3) == data["test"]
    # another slice axis never reuses the slices written for this one
    prepare_ssl_collection(twin, tmp_path / "prep", graph_size=4, slice_axis=0)
    assert len(list((tmp_path / "prep" / "slices").iterdir())) == 2
    assert len(sorted((tmp_path / "prep" / "slices").rglob("*.png"))) == 5 + 20


def test_folders_and_datalists_merge_in_order(twin, tmp_path):
    path = prepare_ssl_collection([twin / "grey", twin / "rgb", twin / "datalist.json"], tmp_path / "prep", graph_size=4)
    data = _collection(path)
    grey, rgb = sorted((twin / "grey").glob("*.png")), sorted((twin / "rgb").glob("*.png"))
    n_listed = len(json.loads((twin / "datalist.json").read_text())["training"]) - 1 + 5  # volume -> 5 slices
    assert [e["image"] for e in data["training"][: len(grey) + len(rgb)]] == [str(p.resolve()) for p in grey + rgb]
    assert len(data["training"]) == len(grey) + len(rgb) + n_listed


def test_volume_slices_window_and_rerun(tmp_path):
    vol = np.zeros((6, 5, 3), np.float32)
    vol[..., 1] = np.arange(30, dtype=np.float32).reshape(6, 5)  # slices 0 and 2 are constant
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    out = volume_slices(tmp_path / "v.nii.gz", tmp_path / "slices")
    assert [p.name for p in out] == ["0001.png"]
    arr = np.asarray(Image.open(out[0]))
    lo, hi = np.percentile(vol, (0.5, 99.5))
    expected = np.round(np.clip((vol[..., 1] - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(arr, expected)
    mtime = out[0].stat().st_mtime_ns
    assert volume_slices(tmp_path / "v.nii.gz", tmp_path / "slices") == out and out[0].stat().st_mtime_ns == mtime


def test_channels_grey_repeated_and_rgb_to_grey(twin):
    grey = next((twin / "grey").glob("*.png"))
    rgb = next((twin / "rgb").glob("*.png"))
    g1, g3 = load_ssl_image(grey, 1), load_ssl_image(grey, 3)
    assert g1.shape[0] == 1 and g3.shape[0] == 3 and torch.equal(g3, g1.expand(3, -1, -1))
    c3, c1 = load_ssl_image(rgb, 3), load_ssl_image(rgb, 1)
    luma = (0.299 * c3[0] + 0.587 * c3[1] + 0.114 * c3[2])[None]  # ITU-R 601
    assert c1.shape == luma.shape and (c1 - luma).abs().max() <= 1.0 / 255 + 1e-6
    item = LoadSSLImaged("image", channels=3)({"image": str(rgb), "other": 1})
    assert torch.equal(item["image"], c3) and item["other"] == 1
    normed = NormalizeImageNetd("image")({"image": torch.ones(3, 2, 2)})["image"]
    torch.testing.assert_close(normed[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def _one_line(exc: InputDataError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_unreadable_image_names_the_file(twin, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((twin / "grey").glob("*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    victim = sorted(folder.glob("*.png"))[2]
    victim.write_bytes(victim.read_bytes()[:30])
    with pytest.raises(InputDataError) as e:
        prepare_ssl_collection(folder, tmp_path / "prep", graph_size=2)
    assert _one_line(e.value).startswith(str(victim))
    with pytest.raises(InputDataError, match="cannot read image"):
        load_ssl_image(victim)


def test_unreadable_volume_names_the_file(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(InputDataError) as e:
        prepare_ssl_collection(tmp_path, tmp_path / "prep", graph_size=1)
    assert _one_line(e.value).startswith(str(tmp_path / "bad.nii.gz")) and "NIfTI" in str(e.value)


def test_empty_sources_and_small_collections_are_one_line(twin, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="holds no PNG/JPEG image") as e:
        prepare_ssl_collection(tmp_path / "empty", tmp_path / "prep")
    _one_line(e.value)
    (tmp_path / "empty.json").write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(InputDataError, match="holds no PNG/JPEG image"):
        prepare_ssl_collection(tmp_path / "empty.json", tmp_path / "prep")
    (tmp_path / "testonly.json").write_text(json.dumps({"test": [str(next((twin / "grey").glob("*.png")))]}))
    with pytest.raises(InputDataError, match="no training image"):
        prepare_ssl_collection(tmp_path / "testonly.json", tmp_path / "prep")
    one = next((twin / "grey").glob("*.png"))
    with pytest.raises(InputDataError, match=r"1 training image\(s\), fewer than one graph \(graph_size 16\)") as e:
        prepare_ssl_collection(one, tmp_path / "prep", graph_size=16)
    _one_line(e.value)
    with pytest.raises(InputDataError, match="does not exist"):
        prepare_ssl_collection(tmp_path / "nowhere", tmp_path / "prep")
    (tmp_path / "missing.json").write_text(json.dumps({"training": ["gone.png"]}))
    with pytest.raises(InputDataError, match=r"gone\.png: listed in .* but missing"):
        prepare_ssl_collection(tmp_path / "missing.json", tmp_path / "prep")
    path = prepare_ssl_collection(twin / "grey", tmp_path / "prep2", graph_size=2)
    with pytest.raises(InputDataError, match="0 held-out image"):
        held_out_list(path, "test", 2)
