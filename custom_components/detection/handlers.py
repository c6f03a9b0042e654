"""Handlers for detection: TensorBoard box overlays, the evaluation report (Markdown, CSV, JSON) and
the inference writer (MONAI detection-format JSON + PNG overlays).

Images are arrays ``(C, W, H)`` (PIL read with MONAI's default ``reverse_indexing``) and boxes
``[x_min, y_min, x_max, y_max]`` along the array's axes 0 and 1; overlays are drawn as ordinary
``(H, W)`` pictures: ground truth green, predictions (score >= ``score_thresh``) red with class and score.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_components.detection.metrics import coco_scores, gather_objects
from custom_components.io import atomic_save_json, atomic_write, atomic_write_text

__all__ = ["draw_detections", "BoxOverlayPanels", "DetectionReportWriter", "DetectionWriter", "report_tables"]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def draw_detections(
    image: torch.Tensor | np.ndarray,
    target: Mapping[str, Any] | None,
    pred: Mapping[str, Any] | None,
    classes: Sequence[str],
    score_thresh: float = 0.3,
    scale: int = 1,
) -> np.ndarray:
    """RGB uint8 ``(H*scale, W*scale, 3)`` picture of the first image channel with the boxes drawn."""
    from PIL import Image, ImageDraw

    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    grey = np.asarray(arr, dtype=np.float32)[0].T  # (W, H) -> (H, W)
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / (hi - lo) if hi > lo else np.zeros_like(grey)
    im = Image.fromarray(np.round(grey * 255).astype(np.uint8)).convert("RGB")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)

    def boxes(d, key):
        v = d.get(key, [])
        return np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)

    if target is not None:
        for b in boxes(target, "boxes").reshape(-1, 4):
            draw.rectangle([float(v) * scale for v in b], outline=(0, 220, 0))
    if pred is not None:
        scores = boxes(pred, "scores").reshape(-1)
        labels = boxes(pred, "labels").reshape(-1).astype(int)
        for b, s, c in zip(boxes(pred, "boxes").reshape(-1, 4), scores, labels, strict=True):
            if s < score_thresh:
                continue
            xy = [float(v) * scale for v in b]
            draw.rectangle(xy, outline=(230, 0, 0))
            name = classes[c] if 0 <= c < len(classes) else str(c)
            draw.text((xy[0] + 1, xy[1] + 1), f"{name} {s:.2f}", fill=(255, 80, 80))
    return np.asarray(im)


class BoxOverlayPanels:
    """Validation handler: the first ``num_images`` images of each validation run, ground truth and
    predictions drawn, as TensorBoard images ``val_boxes/<k>`` at the trainer's epoch (rank 0)."""

    def __init__(self, summary_writer: Any, classes: Sequence[str], num_images: int = 4, score_thresh: float = 0.3,
                 tag: str = "val_boxes") -> None:
        self.writer, self.classes, self.num_images = summary_writer, list(classes), int(num_images)
        self.score_thresh, self.tag = float(score_thresh), tag
        self._done = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._done = 0

    def __call__(self, engine: Engine) -> None:
        if self.writer is None or self.num_images <= 0 or _rank() != 0 or self._done >= self.num_images:
            return
        out = engine.state.output
        for image, target, pred in zip(out["image"], out["target"], out["pred"], strict=True):
            if self._done >= self.num_images:
                break
            panel = draw_detections(image, target, pred, self.classes, self.score_thresh)
            self.writer.add_image(f"{self.tag}/{self._done}", panel, engine.state.epoch, dataformats="HWC")
            self._done += 1


def report_tables(scores: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table (percent) and CSV rows (fractions) of :func:`coco_scores` output."""
    rows = [{"class": c, "n_gt": v["n_gt"], "ap50": v["ap50"], "map_50_95": v["map"]}
            for c, v in scores["per_class"].items()]
    rows.append({"class": "overall (classes with ground truth)", "n_gt": sum(r["n_gt"] for r in rows),
                 "ap50": scores["map50"], "map_50_95": scores["map"]})

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}"

    lines = ["| class | GT boxes | AP@0.5 (%) | mAP@[0.5:0.95] (%) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['class']} | {r['n_gt']} | {pct(r['ap50'])} | {pct(r['map_50_95'])} |" for r in rows]
    return "\n".join(lines) + "\n", rows


class DetectionReportWriter:
    """Evaluation handler: on completion write ``<filename>.json`` (overall and per-class scores),
    ``<filename>.md`` and ``<filename>.csv`` (per-class AP@0.5 and mAP@[0.5:0.95]) to ``output_dir``.

    Predictions of all ranks are gathered; rank 0 writes (atomically). The overall values are also
    put in ``engine.state.metrics`` as ``map50`` / ``map``.
    """

    def __init__(self, output_dir: str | os.PathLike, classes: Sequence[str], filename: str = "metrics",
                 title: str = "Detection metrics", extra: Mapping[str, Any] | None = None,
                 max_detections: int = 100) -> None:
        self.output_dir, self.classes, self.filename = Path(output_dir), list(classes), filename
        self.title, self.extra, self.max_detections = title, dict(extra or {}), int(max_detections)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._preds, self._targets = [], []

    def _collect(self, engine: Engine) -> None:
        self._preds += engine.state.output["pred"]
        self._targets += engine.state.output["target"]

    def __call__(self, engine: Engine) -> None:
        scores = coco_scores(gather_objects(self._preds), gather_objects(self._targets), self.classes,
                             self.max_detections)
        engine.state.metrics["map50"] = scores["map50"]
        engine.state.metrics["map"] = scores["map"]
        if _rank() != 0:
            return
        table, rows = report_tables(scores)
        base = self.output_dir / self.filename
        notes = []
        if scores["no_gt"]:
            notes.append(f"no ground-truth box (AP n/a, left out of the overall means): {', '.join(scores['no_gt'])}")
        atomic_save_json({"title": self.title, "metrics": {"map50": scores["map50"], "map": scores["map"]},
                          "n_samples": scores["n_images"], "per_class": scores["per_class"],
                          "extra": self.extra, "notes": notes}, base.with_suffix(".json"))
        md = f"# {self.title}\n\n{scores['n_images']} images.\n\n{table}" + "".join(f"\n- {n}\n" for n in notes)
        atomic_write_text(md, base.with_suffix(".md"))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["class", "n_gt", "ap50", "map_50_95"], lineterminator="\n")
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
        atomic_write_text(buf.getvalue(), base.with_suffix(".csv"))


class DetectionWriter:
    """Inference handler: ``<output_dir>/<filename>.json`` in MONAI's detection datalist format
    (``{split: [{"image", "image_id", "box", "label", "label_scores", "class_name"}]}``, boxes in the
    prepared image's pixels), the same boxes one per row in ``predictions_<split>.csv``, and the first
    ``num_panels`` overlays as ``<panel_folder>/<image_id>.png``."""

    def __init__(self, output_dir: str | os.PathLike, classes: Sequence[str], split: str = "test",
                 filename: str | None = None, panel_folder: str | None = None, num_panels: int = 100,
                 score_thresh: float = 0.3, scale: int = 1) -> None:
        self.output_dir, self.classes, self.split = Path(output_dir), list(classes), split
        self.filename = filename or f"boxes_{split}"
        self.panel_folder = panel_folder or f"overlays_{split}"
        self.num_panels, self.score_thresh, self.scale = int(num_panels), float(score_thresh), int(scale)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._entries: list[dict] = []
        self._panels = 0

    def _collect(self, engine: Engine) -> None:
        from PIL import Image

        out = engine.state.output
        for k, (pred, target) in enumerate(zip(out["pred"], out["target"], strict=True)):
            labels = pred["labels"].tolist()
            self._entries.append({
                "image": out.get("image_path", [""] * len(out["pred"]))[k], "image_id": out["image_id"][k],
                "box": [[round(float(v), 3) for v in b] for b in pred["boxes"].tolist()], "label": labels,
                "label_scores": [round(float(s), 5) for s in pred["scores"].tolist()],
                "class_name": [self.classes[c] if 0 <= c < len(self.classes) else str(c) for c in labels],
            })
            if _rank() == 0 and self._panels < self.num_panels:
                panel = draw_detections(out["image"][k], target, pred, self.classes, self.score_thresh, self.scale)
                path = self.output_dir / self.panel_folder / f"{out['image_id'][k]}.png"
                with atomic_write(path, suffix=".png") as tmp:
                    Image.fromarray(panel).save(tmp, format="PNG")
                self._panels += 1

    def __call__(self, engine: Engine) -> None:
        entries = gather_objects(self._entries)
        if _rank() != 0:
            return
        atomic_save_json({self.split: entries, "classes": self.classes, "box_mode": "xyxy"},
                         self.output_dir / f"{self.filename}.json")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image_id", "class_name", "label", "score", "x_min", "y_min", "x_max", "y_max"])
        for e in entries:
            for b, c, s, name in zip(e["box"], e["label"], e["label_scores"], e["class_name"], strict=True):
                w.writerow([e["image_id"], name, c, s, *b])
        atomic_write_text(buf.getvalue(), self.output_dir / f"predictions_{self.split}.csv")
