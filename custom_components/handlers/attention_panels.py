"""Per-image PNG panels of class attention maps with predicted and ground-truth boxes, and the predicted boxes as JSON / CSV.

For HAM's inference (spec ``ham.md`` section 6): for every finding that has a ground-truth box on
the image or a predicted probability >= ``cls_thresh``, the predicted boxes are the bounding boxes
of the connected components of the binarised map
(:func:`~custom_components.metrics.localization.predicted_boxes`: refined map R >= 0.999, i.e. the
min-max map >= 0.4 + ln(999)/100). A panel is the image followed by one tile per such finding: the
map over the image (:func:`~custom_components.reports.explanation_html.heatmap_overlay`), the
ground-truth boxes in green, the predicted boxes in magenta, and a caption with the finding's name
and probability.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_components.data.nihcxr14 import FINDINGS
from custom_components.handlers.prediction_csv import rank_path
from custom_components.io import atomic_save_json, atomic_write, atomic_write_text
from custom_components.metrics.localization import CAM_THRESHOLD, predicted_boxes
from custom_components.reports.explanation_html import heatmap_overlay

__all__ = ["AttentionPanelWriter", "attention_panel", "CAPTION_HEIGHT", "GT_COLOUR", "PRED_COLOUR"]

logger = logging.getLogger(__name__)

#: height in pixels of the caption strip above each tile
CAPTION_HEIGHT = 16
GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 255)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / (hi - lo) * 255).round().astype(np.uint8) if hi > lo else np.zeros(image.shape, np.uint8)


def attention_panel(
    image: np.ndarray,
    tiles: Sequence[Mapping[str, Any]],
    scale: int = 1,
    image_caption: str = "image",
) -> np.ndarray:
    """The panel as (CAPTION_HEIGHT + H·scale, (1 + len(tiles))·W·scale, 3) uint8 RGB.

    ``image``: (H, W) grey (any range, min-maxed for display). Each tile: ``map`` (H, W) in
    [0, 1], ``pred_boxes`` and ``gt_boxes`` (lists of ``[x, y, w, h]`` in image pixels, the box
    covering ``[x, x + w) x [y, y + h)``) and ``caption``. Tiles are upscaled by the integer
    ``scale`` (nearest) so that small images keep legible captions; box outlines are ``scale``
    pixels wide on the box's border pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    scale = max(int(scale), 1)
    grey = _to_uint8(np.asarray(image, dtype=np.float32))
    height, width = grey.shape
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    up = lambda a: np.kron(a, np.ones((scale, scale, 1), dtype=a.dtype)) if scale > 1 else a  # noqa: E731
    panel = Image.new("RGB", ((1 + len(tiles)) * width * scale, CAPTION_HEIGHT + height * scale))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=11)
    captions = [image_caption] + [str(t["caption"]) for t in tiles]
    for i, caption in enumerate(captions):
        left = i * width * scale
        if i == 0:
            tile = up(rgb)
        else:
            tile = up(heatmap_overlay(rgb, np.asarray(tiles[i - 1]["map"], dtype=np.float32)))
        panel.paste(Image.fromarray(tile), (left, CAPTION_HEIGHT))
        draw.text((left + 2, 2), caption, fill=(255, 255, 255), font=font)
        if i == 0:
            continue
        for key, colour in (("gt_boxes", GT_COLOUR), ("pred_boxes", PRED_COLOUR)):
            for x, y, w, h in tiles[i - 1].get(key, ()):
                x0, y0 = round(float(x)), round(float(y))
                x1, y1 = max(round(float(x) + float(w)), x0 + 1), max(round(float(y) + float(h)), y0 + 1)
                x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
                if x1 <= x0 or y1 <= y0:
                    continue
                draw.rectangle(
                    [left + x0 * scale, CAPTION_HEIGHT + y0 * scale, left + x1 * scale - 1, CAPTION_HEIGHT + y1 * scale - 1],
                    outline=colour, width=scale,
                )
    return np.asarray(panel)


class AttentionPanelWriter:
    """During an inference run, write attention panels (PNG) and the predicted boxes (JSON and CSV).

    Reads ``engine.state.output``: ``image`` (B, C, H, W), ``pred`` (logits; the findings' from
    column ``pred_offset``, HAM: after the abnormality logit) and ``map`` (B, len(class_names), H, W),
    the refined maps by default (see ``threshold`` / ``normalize``); ``engine.state.batch[id_key]``
    names the images, whose ground-truth boxes (``{finding: [[x, y, w, h]]}`` in prepared-image
    pixels) and, when present, original size (``[width, height]`` under ``original_size_key``) come
    from ``datalist`` (the dataset's entries). The evaluator needs ``decollate=False``.

    Writes, atomically:

    * ``<output_dir>/<panel_folder>/<id>.png`` for the first ``num_panels`` images (-1: all; 0: none), see
      :func:`attention_panel`;
    * ``<output_dir>/<name>.json``: ``{id: {finding: {"probability", "boxes", "gt_boxes"
      [, "boxes_original"]}}}`` and ``<output_dir>/<name>.csv``: one row per predicted box
      (``id, finding, probability, x, y, w, h`` in prepared-image pixels, then ``x_original ..
      h_original`` when the datalist gives the original size: the prepared image is the original
      resized without cropping, so the boxes scale by original / prepared size), for every image
      and every shown finding (ground-truth box or probability >= ``cls_thresh``).

    On several ranks each writes its own ``.rank<N>`` box files (panels have distinct names).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        datalist: Sequence[Mapping[str, Any]] = (),
        class_names: Sequence[str] = FINDINGS,
        name: str = "boxes",
        num_panels: int = 100,
        cls_thresh: float = 0.5,
        threshold: float = CAM_THRESHOLD,
        normalize: bool = False,
        pred_offset: int = 1,
        scale: int = 1,
        display_channel: int = 0,
        id_key: str = "case",
        boxes_key: str = "boxes",
        original_size_key: str = "original_size",
        panel_folder: str = "panels",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.panel_dir = self.output_dir / panel_folder
        self.class_names = tuple(class_names)
        self.name, self.num_panels = name, int(num_panels)
        self.cls_thresh, self.threshold, self.normalize = float(cls_thresh), float(threshold), bool(normalize)
        self.pred_offset, self.scale, self.display_channel = int(pred_offset), int(scale), int(display_channel)
        self.id_key = id_key
        self.entries = {str(e[id_key]): e for e in datalist if id_key in e}
        self.boxes_key, self.original_size_key = boxes_key, original_size_key
        self.boxes: dict[str, dict[str, dict[str, Any]]] = {}
        self.panels_written = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.boxes, self.panels_written = {}, 0

    def _original_scale(self, entry: Mapping[str, Any], height: int, width: int) -> tuple[float, float] | None:
        size = entry.get(self.original_size_key)
        if not size:
            return None
        return float(size[0]) / width, float(size[1]) / height

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        ids = [str(i) for i in engine.state.batch[self.id_key]]
        logits = out["pred"].detach().float().cpu()[:, self.pred_offset: self.pred_offset + len(self.class_names)]
        probs = torch.sigmoid(logits)
        maps = out["map"].detach().float().cpu()
        if maps.shape[1] != len(self.class_names):
            raise ValueError(f"{maps.shape[1]} maps per image for {len(self.class_names)} class names")
        images = out["image"][:, self.display_channel].detach().float().cpu().numpy()
        height, width = maps.shape[-2:]
        for b, case in enumerate(ids):
            entry = self.entries.get(case, {})
            gt = entry.get(self.boxes_key) or {}
            factor = self._original_scale(entry, height, width)
            per_finding: dict[str, dict[str, Any]] = {}
            tiles = []
            for c, finding in enumerate(self.class_names):
                p = float(probs[b, c])
                if finding not in gt and p < self.cls_thresh:
                    continue
                boxes = predicted_boxes(maps[b, c], self.threshold, self.normalize)
                gt_boxes = [[float(v) for v in g] for g in gt.get(finding, [])]
                record = {"probability": round(p, 6), "boxes": boxes, "gt_boxes": gt_boxes}
                if factor is not None:
                    record["boxes_original"] = [[round(x * factor[0], 3), round(y * factor[1], 3),
                                                 round(w * factor[0], 3), round(h * factor[1], 3)] for x, y, w, h in boxes]
                per_finding[finding] = record
                tiles.append({"map": maps[b, c].numpy(), "pred_boxes": boxes, "gt_boxes": record["gt_boxes"],
                              "caption": f"{finding} p={p:.2f}"})
            self.boxes[case] = per_finding
            if self.num_panels < 0 or self.panels_written < self.num_panels:
                self._write_panel(case, images[b], tiles)

    def _write_panel(self, case: str, image: np.ndarray, tiles: list[dict[str, Any]]) -> None:
        from PIL import Image

        caption = "image" if tiles else f"image: no finding >= {self.cls_thresh:g}"
        rgb = attention_panel(image, tiles, self.scale, caption)
        with atomic_write(self.panel_dir / f"{case}.png", suffix=".png") as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
        self.panels_written += 1

    def write(self, engine: Engine) -> None:
        json_path = rank_path(self.output_dir / f"{self.name}.json")
        atomic_save_json(self.boxes, json_path)
        with_original = any("boxes_original" in r for per in self.boxes.values() for r in per.values())
        columns = [self.id_key, "finding", "probability", "x", "y", "w", "h"]
        columns += ["x_original", "y_original", "w_original", "h_original"] if with_original else []
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for case, per_finding in self.boxes.items():
            for finding, record in per_finding.items():
                blank = ["", "", "", ""] if with_original else []  # an image without its original size
                originals = record.get("boxes_original", [blank for _ in record["boxes"]])
                for box, original in zip(record["boxes"], originals, strict=True):
                    writer.writerow([case, finding, f"{record['probability']:.6f}", *box, *original])
        atomic_write_text(buf.getvalue(), json_path.with_suffix(".csv"))
        logger.info("%d attention panels in %s; predicted boxes in %s (.csv)", self.panels_written,
                    self.output_dir / "panels", json_path)
