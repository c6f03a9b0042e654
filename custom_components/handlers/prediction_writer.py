"""Write slice predictions (CSV) and explanation maps (one NIfTI volume per scan, PNG panels)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_components.io import atomic_write, atomic_write_text
from custom_components.metrics.classification import positive_probability

__all__ = ["PredictionWriter"]


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)


class PredictionWriter:
    """Collect ``pred`` / ``map`` / ``case`` / ``slice`` outputs of an explaining evaluator.

    At completion writes ``<output_dir>/predictions.csv`` (case, slice, probability, prediction,
    label), ``<output_dir>/maps/<case>_<map_name>.nii.gz`` holding the maps of a scan as an
    (H, W, slices) float32 volume, and, with ``save_png``, ``<output_dir>/maps/<case>_<map_name>.png``:
    the scan's most confident positive slices above their maps. All files are written atomically.
    """

    def __init__(
        self,
        output_dir: str,
        map_name: str = "eafem",
        threshold: float = 0.5,
        save_png: bool = True,
        png_slices: int = 4,
        display_channel: int = -1,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.map_name = map_name
        self.threshold = threshold
        self.save_png = save_png
        self.png_slices = png_slices
        self.display_channel = display_channel
        self.rows: list[dict] = []
        self.maps: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.images: dict[str, dict[int, np.ndarray]] = defaultdict(dict)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self) -> None:
        self.rows.clear()
        self.maps.clear()
        self.images.clear()

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        probs = positive_probability(out["pred"].float()).cpu()
        cases = _as_list(out.get("case", ["scan"] * len(probs)))
        slices = _as_list(out.get("slice", range(len(probs))))
        labels = _as_list(out["label"]) if "label" in out else [None] * len(probs)
        maps = out["map"].cpu().numpy()
        shown = out["image"][:, self.display_channel].float().cpu().numpy()
        for i, p in enumerate(probs.tolist()):
            case, index = str(cases[i]), int(slices[i])
            row = {"case": case, "slice": index, "probability": round(p, 6), "prediction": int(p > self.threshold)}
            row["label"] = "" if labels[i] is None else int(labels[i] > 0.5)
            self.rows.append(row)
            self.maps[case][index] = maps[i]
            if self.save_png:
                self.images[case][index] = shown[i]

    def write(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["case", "slice", "probability", "prediction", "label"])
        writer.writeheader()
        writer.writerows(sorted(self.rows, key=lambda r: (r["case"], r["slice"])))
        atomic_write_text(buf.getvalue(), self.output_dir / "predictions.csv")
        probability = {(r["case"], r["slice"]): r["probability"] for r in self.rows}
        for case, by_slice in self.maps.items():
            order = sorted(by_slice)
            volume = np.stack([by_slice[k] for k in order], axis=-1).astype(np.float32)  # (H, W, S)
            path = self.output_dir / "maps" / f"{case}_{self.map_name}.nii.gz"
            with atomic_write(path, suffix=".nii.gz") as tmp:
                nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp))
            if self.save_png:
                top = sorted(order, key=lambda k: -probability[(case, k)])[: self.png_slices]
                self._write_png(case, sorted(top), by_slice)

    def _write_png(self, case: str, slices: list[int], by_slice: dict[int, np.ndarray]) -> None:
        from PIL import Image

        def to_uint8(a: np.ndarray) -> np.ndarray:
            lo, hi = float(a.min()), float(a.max())
            return ((a - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(a.shape, np.uint8)

        top = np.concatenate([to_uint8(self.images[case][k]) for k in slices], axis=1)
        bottom = np.concatenate([to_uint8(by_slice[k]) for k in slices], axis=1)
        path = self.output_dir / "maps" / f"{case}_{self.map_name}.png"
        with atomic_write(path, suffix=".png") as tmp:
            Image.fromarray(np.concatenate([top, bottom], axis=0)).save(tmp, format="PNG")
