"""PredictionWriter writes each scan as soon as it is complete and keeps only the current one in memory."""

from types import SimpleNamespace

import nibabel as nib
import pytest
import torch

from custom_components.handlers.prediction_writer import PredictionWriter


def batch(case: str, slices: list[int], fill: float) -> SimpleNamespace:
    n = len(slices)
    out = {
        "pred": torch.full((n, 1), fill),
        "map": torch.full((n, 8, 8), fill),
        "image": torch.rand(n, 3, 8, 8),
        "label": torch.ones(n, 1),
        "mask": torch.zeros(n, 1, 8, 8),
        "case": [case] * n,
        "slice": torch.tensor(slices),
    }
    out["mask"][:, :, 2:4, 2:4] = 1
    return SimpleNamespace(state=SimpleNamespace(output=out))


def test_scans_are_written_when_complete(tmp_path):
    writer = PredictionWriter(str(tmp_path), png_slices=2)
    writer.collect(batch("A", [0, 1], 1.0))
    writer.collect(batch("A", [2], 2.0))
    assert not (tmp_path / "maps" / "A_eafem.nii.gz").exists()
    writer.collect(batch("B", [0, 1], 3.0))  # A is complete now
    vol = nib.load(str(tmp_path / "maps" / "A_eafem.nii.gz")).get_fdata()
    assert vol.shape == (8, 8, 3) and vol[0, 0].tolist() == [1.0, 1.0, 2.0]
    assert set(writer.maps) == {"B"}
    writer.write(None)
    assert (tmp_path / "maps" / "B_eafem.nii.gz").is_file() and (tmp_path / "maps" / "B_eafem.png").is_file()
    assert len((tmp_path / "predictions.csv").read_text().strip().splitlines()) == 1 + 5
    assert (tmp_path / "explanation_quality.json").is_file()


def test_scan_coming_back_after_it_was_written_is_an_error(tmp_path):
    writer = PredictionWriter(str(tmp_path))
    writer.collect(batch("A", [0], 1.0))
    writer.collect(batch("B", [0], 1.0))
    with pytest.raises(RuntimeError, match="grouped by scan"):
        writer.collect(batch("A", [1], 1.0))
