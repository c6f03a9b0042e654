"""Handlers of slice-wise volume segmentation (LVM-Med MM-WHS bundle): per-volume scores and NIfTI masks.

- :class:`VolumeScoresWriter`: the per-volume rows of a
  :class:`~custom_components.metrics.volume_segmentation.VolumeSegmentationMetric` as a CSV.
- :class:`VolumePredictionWriter`: the predicted class of every slice, stacked back into its volume
  and written as ``<output_dir>/<case>_pred.nii.gz`` on the source volume's grid (its shape, affine
  and spatial header, :mod:`custom_components.data.scan_grid`; slices resampled back with nearest
  interpolation) with the dataset's label values (e.g. MM-WHS 205 ... 850), plus an index CSV. A
  volume is written as soon as all its slices are in; every file atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_components.data.scan_grid import load_grid, source_nifti, to_source
from custom_components.io import InputDataError, atomic_write, atomic_write_text

__all__ = ["VolumePredictionWriter", "VolumeScoresWriter", "label_nifti"]

logger = logging.getLogger(__name__)


def _write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["case"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


class VolumeScoresWriter:
    """Write ``metric.per_volume`` (one row per volume) to ``path`` at ``Events.COMPLETED`` (rank 0)."""

    def __init__(self, metric: Any, path: str | os.PathLike) -> None:
        self.metric, self.path = metric, Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        _write_csv(self.metric.per_volume, self.path)
        logger.info("per-volume scores of %d volumes -> %s", len(self.metric.per_volume), self.path)


def label_nifti(classes: np.ndarray, grid: dict, label_values: Sequence[int]) -> nib.Nifti1Image:
    """Class indices on the source grid -> a uint16 NIfTI of ``label_values`` with the source's affine and header."""
    values = np.asarray(label_values, dtype=np.uint16)
    labels = values[np.asarray(classes, dtype=np.int64)]
    ref = source_nifti(np.zeros((1, 1, 1), np.float32), grid)
    header = ref.header.copy()
    header.set_data_dtype(np.uint16)
    return nib.Nifti1Image(labels, ref.affine, header=header)


class VolumePredictionWriter:
    """Stack each volume's predicted slices and write them on the volume's grid (see the module docstring).

    Args:
        output_dir: folder of ``<case>_pred.nii.gz``.
        store_dir: the prepared slice store the batches come from (``<case>/meta.json`` holds the
            slice count and the source grid).
        label_values: the dataset's label value of each class index.
        csv_path: index ``case, file, n_slices, voxels_<class>...`` (optional).
    """

    def __init__(self, output_dir: str | os.PathLike, store_dir: str | os.PathLike, label_values: Sequence[int],
                 csv_path: str | os.PathLike | None = None, pred_key: str = "pred") -> None:
        self.output_dir, self.store_dir = Path(output_dir), Path(store_dir)
        self.label_values = [int(v) for v in label_values]
        self.csv_path = Path(csv_path) if csv_path else None
        self.pred_key = pred_key
        self.slices: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.rows: list[dict[str, Any]] = []
        self._meta: dict[str, dict] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def reset(self, engine: Engine | None = None) -> None:
        self.slices.clear()
        self.rows.clear()

    def _case_meta(self, case: str) -> dict:
        if case not in self._meta:
            path = self.store_dir / case / "meta.json"
            try:
                meta = json.loads(path.read_text())
                n = int(meta["n_slices"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InputDataError(path, f"case {case}: cannot read the prepared case ({type(e).__name__}: {e})") from e
            grid = load_grid(path)
            if grid is None:
                raise InputDataError(path, f"case {case}: no source-grid record; re-prepare the store")
            self._meta[case] = {"n_slices": n, "grid": grid}
        return self._meta[case]

    def collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        pred = torch.as_tensor(engine.state.output[self.pred_key]).argmax(1).to(torch.uint8).cpu().numpy()
        cases = batch["case"]
        slices = batch["slice"].reshape(-1).tolist() if isinstance(batch["slice"], torch.Tensor) else list(batch["slice"])
        for i, (case, index) in enumerate(zip(cases, slices, strict=True)):
            case = str(case)
            self.slices[case][int(index)] = pred[i]
            if len(self.slices[case]) == self._case_meta(case)["n_slices"]:
                self._write(case)

    def _write(self, case: str) -> None:
        by_slice = self.slices.pop(case)
        grid = self._case_meta(case)["grid"]
        order = sorted(by_slice)
        volume = to_source(np.stack([by_slice[k] for k in order]).astype(np.float32), order, grid, mode="nearest")
        classes = np.rint(volume).astype(np.int64)
        path = self.output_dir / f"{case}_pred.nii.gz"
        with atomic_write(path, suffix=".nii.gz") as tmp:
            nib.save(label_nifti(classes, grid, self.label_values), str(tmp))
        counts = np.bincount(classes.reshape(-1), minlength=len(self.label_values))
        row: dict[str, Any] = {"case": case, "file": path.name, "n_slices": len(order)}
        row.update({f"voxels_{v}": int(n) for v, n in zip(self.label_values, counts, strict=True)})
        self.rows.append(row)

    def finish(self, engine: Engine) -> None:
        for case in list(self.slices):  # volumes not seen whole: written with the unseen slices 0
            logger.warning("case %s: %d of %d slices predicted; the others are written as 0", case,
                           len(self.slices[case]), self._case_meta(case)["n_slices"])
            self._write(case)
        if self.csv_path is not None and idist.get_rank() == 0:
            _write_csv(self.rows, self.csv_path)
        logger.info("predicted masks of %d volumes -> %s", len(self.rows), self.output_dir)
