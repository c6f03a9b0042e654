"""The prepared slice store writer: atomic case writes, leftovers of a killed run are removed."""

import json

import numpy as np

from custom_components.data.store import write_case
from custom_components.io import atomic_write


def test_write_case_removes_leftover_temp_files_and_writes_marker_last(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    # what a run killed inside atomic_write leaves: temp names as atomic_write makes them
    with atomic_write(case / "image.npy", suffix=".npy") as tmp:
        leftover = tmp.name
    (case / leftover).write_bytes(b"partial")
    (case / ".mask.npy.q1w2e3.tmp.npy").write_bytes(b"partial")
    (case / "meta.json").write_text('{"stale": true}')
    meta = write_case(case, np.zeros((2, 3, 4, 4), np.float16), np.ones((2, 4, 4), np.uint8), {"n_slices": 2, "labels": [1, 1]})
    names = sorted(p.name for p in case.iterdir())
    assert names == ["image.npy", "mask.npy", "meta.json"]
    assert json.loads((case / "meta.json").read_text()) == meta
    assert np.load(case / "mask.npy").sum() == 32


def test_truncated_store_file_gives_input_error(tmp_path):
    import pytest

    from custom_components.data.slice_store import SliceDataset
    from custom_components.io import InputDataError

    case = tmp_path / "c1"
    write_case(case, np.zeros((2, 3, 4, 4), np.float16), np.zeros((2, 4, 4), np.uint8), {"n_slices": 2, "labels": [0, 0]})
    data = (case / "image.npy").read_bytes()
    (case / "image.npy").write_bytes(data[: len(data) // 3])
    ds = SliceDataset([{"case": "c1"}], root=tmp_path)
    with pytest.raises(InputDataError, match="c1"):
        ds[0]
