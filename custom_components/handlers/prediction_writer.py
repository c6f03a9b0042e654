"""Write slice predictions (CSV) and explanation maps (one NIfTI volume per scan, PNG panels)."""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_components.data.scan_grid import load_grid, source_nifti, to_source
from custom_components.handlers.report import markdown_table
from custom_components.io import (
    InputDataError,
    atomic_save_json,
    atomic_write,
    atomic_write_text,
)
from custom_components.metrics.classification import positive_probability
from custom_components.metrics.map_quality import map_quality

__all__ = ["PredictionWriter"]

logger = logging.getLogger(__name__)


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)


class PredictionWriter:
    """Collect ``pred`` / ``map`` / ``case`` / ``slice`` outputs of an explaining evaluator.

    At completion writes ``<output_dir>/predictions.csv`` (case, slice, probability, prediction,
    label), ``<output_dir>/maps/<case>_<map_name>.nii.gz`` holding the maps of a scan as one
    float32 volume, and, with ``save_png``, ``<output_dir>/maps/<case>_<map_name>.png``:
    the scan's most confident positive slices above their maps. When the batches carry masks it
    also writes ``explanation_quality.json`` / ``.md``: pointing game and IoU at top-k % of the maps
    over the slices with a non-empty mask (``specs/explanations.md`` section 7), overall and per
    scan. All files are written atomically.

    With ``store_dir`` (the prepared store the batches come from) each scan's volume is on its
    source scan's grid: the maps are resampled back to the source in-plane size, put at their
    source slice index (unseen slices 0) and written with the source's shape, affine and spatial
    header (:mod:`custom_components.data.scan_grid`), so it overlays the scan in a viewer. A case
    whose ``meta.json`` has no grid record (a store prepared by older code), or no ``store_dir``,
    gets the prepared grid instead: (H, W, slices) with an identity affine (a warning names the
    first such case when ``store_dir`` is given).
    """

    def __init__(
        self,
        output_dir: str,
        map_name: str = "eafem",
        threshold: float = 0.5,
        save_png: bool = True,
        png_slices: int = 4,
        display_channel: int = -1,
        topk: tuple[float, ...] = (10.0,),
        store_dir: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.store_dir = None if store_dir is None else Path(store_dir)
        self._warned = False
        self.map_name = map_name
        self.threshold = threshold
        self.save_png = save_png
        self.png_slices = png_slices
        self.display_channel = display_channel
        self.topk = tuple(topk)
        self.quality: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.rows: list[dict] = []
        self.maps: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.images: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.written: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self) -> None:
        self.quality.clear()
        self.rows.clear()
        self.maps.clear()
        self.images.clear()
        self.written.clear()
        self._warned = False

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        probs = positive_probability(out["pred"].float()).cpu()
        cases = _as_list(out.get("case", ["scan"] * len(probs)))
        slices = _as_list(out.get("slice", range(len(probs))))
        labels = _as_list(out["label"]) if "label" in out else [None] * len(probs)
        if "mask" in out:
            self._score(out["map"].cpu(), out["mask"].cpu(), cases)
        maps = out["map"].cpu().numpy()
        shown = out["image"][:, self.display_channel].float().cpu().numpy()
        batch_cases = {str(c) for c in cases}
        revisited = batch_cases & self.written
        if revisited:
            raise RuntimeError(
                f"scan(s) {sorted(revisited)} came back after their maps were written: inference batches must "
                "be grouped by scan (ScanChunkBatchSampler with shuffle=False)"
            )
        # Batches are scan-ordered chunks, so a scan absent from this batch is complete: write it
        # now rather than holding every map of the split in memory (GBs for a real test split).
        if idist.get_rank() == 0:
            for case in [c for c in self.maps if c not in batch_cases]:
                self._write_case(case)
        for i, p in enumerate(probs.tolist()):
            case, index = str(cases[i]), int(slices[i])
            row = {"case": case, "slice": index, "probability": round(p, 6), "prediction": int(p > self.threshold)}
            row["label"] = "" if labels[i] is None else int(labels[i] > 0.5)
            self.rows.append(row)
            self.maps[case][index] = maps[i]
            if self.save_png:
                self.images[case][index] = shown[i]

    def _score(self, maps: torch.Tensor, masks: torch.Tensor, cases: list) -> None:
        for case in dict.fromkeys(str(c) for c in cases):
            rows = torch.tensor([str(c) == case for c in cases])
            for name, values in map_quality(maps[rows], masks[rows], self.topk).items():
                self.quality[case][name].extend(values)

    def _write_quality(self) -> None:
        if not self.quality:
            return
        names = list(next(iter(self.quality.values())))

        def summary(per_name: dict[str, list[float]]) -> dict:
            n = len(per_name[names[0]])
            return {"n_slices": n, **{k: (sum(v) / n if n else None) for k, v in per_name.items()}}

        pooled = {k: [x for case in self.quality.values() for x in case[k]] for k in names}
        per_case = {c: summary(v) for c, v in sorted(self.quality.items())}
        report = {"map": self.map_name, "overall": summary(pooled), "per_case": per_case}
        atomic_save_json(report, self.output_dir / "explanation_quality.json")

        def fmt(row: dict) -> dict:
            return {k: (f"{100 * v:.2f}" if isinstance(v, float) else ("n/a" if v is None else v)) for k, v in row.items()}

        rows = [{"scan": "all", **fmt(report["overall"])}] + [{"scan": c, **fmt(v)} for c, v in report["per_case"].items()]
        text = (
            f"# Explanation quality of the {self.map_name} maps\n\n"
            "Slices with a non-empty mask only; values in percent. Pointing game: the map's maximum lies in the mask. "
            "IoU top-k: box around the top-k % pixels vs the mask.\n\n"
            + markdown_table(rows, ["scan", "n_slices", *names])
            + "\n"
        )
        atomic_write_text(text, self.output_dir / "explanation_quality.md")

    def write(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["case", "slice", "probability", "prediction", "label"])
        writer.writeheader()
        writer.writerows(sorted(self.rows, key=lambda r: (r["case"], r["slice"])))
        atomic_write_text(buf.getvalue(), self.output_dir / "predictions.csv")
        self._write_quality()
        for case in list(self.maps):
            self._write_case(case)

    def _write_case(self, case: str) -> None:
        """Write one scan's map volume (and PNG panel), then free its arrays."""
        by_slice = self.maps.pop(case)
        shown = self.images.pop(case, {})
        order = sorted(by_slice)
        grid = self._grid(case)
        if grid is None:
            volume = np.stack([by_slice[k] for k in order], axis=-1).astype(np.float32)  # (H, W, S)
            image = nib.Nifti1Image(volume, np.eye(4))
        else:
            meta_path = self.store_dir / case / "meta.json"
            try:
                volume = to_source(np.stack([by_slice[k] for k in order]), order, grid)
            except ValueError as e:  # slice indices or map count not matching the store's record
                raise InputDataError(meta_path, f"case {case}: {e}") from e
            image = source_nifti(volume, grid)
        path = self.output_dir / "maps" / f"{case}_{self.map_name}.nii.gz"
        with atomic_write(path, suffix=".nii.gz") as tmp:
            nib.save(image, str(tmp))
        if self.save_png:
            probability = {r["slice"]: r["probability"] for r in self.rows if r["case"] == case}
            top = sorted(order, key=lambda k: -probability[k])[: self.png_slices]
            self._write_png(case, sorted(top), by_slice, shown)
        self.written.add(case)

    def _grid(self, case: str) -> dict | None:
        """The case's source-grid record from the store, or None (prepared grid; warns once)."""
        if self.store_dir is None:
            return None
        grid = load_grid(self.store_dir / case / "meta.json")
        if grid is None and not self._warned:
            self._warned = True
            logger.warning(
                "case %s (and any later case like it): %s has no source-grid record, so its %s maps are written "
                "on the prepared grid with an identity affine; re-prepare the store to get them on the scan's grid",
                case, self.store_dir / case / "meta.json", self.map_name,
            )
        return grid

    def _write_png(self, case: str, slices: list[int], by_slice: dict[int, np.ndarray], shown: dict[int, np.ndarray]) -> None:
        from PIL import Image

        def to_uint8(a: np.ndarray) -> np.ndarray:
            lo, hi = float(a.min()), float(a.max())
            return ((a - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(a.shape, np.uint8)

        top = np.concatenate([to_uint8(shown[k]) for k in slices], axis=1)
        bottom = np.concatenate([to_uint8(by_slice[k]) for k in slices], axis=1)
        path = self.output_dir / "maps" / f"{case}_{self.map_name}.png"
        with atomic_write(path, suffix=".png") as tmp:
            Image.fromarray(np.concatenate([top, bottom], axis=0)).save(tmp, format="PNG")
