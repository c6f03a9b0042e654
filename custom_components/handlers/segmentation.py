"""Ignite handlers of the 2-D segmentation bundles: gradient clipping, per-image scores, masks and overlays.

- :class:`GradientClipping`: clip the gradient norm between MONAI's ``loss.backward()`` and
  ``optimizer.step()`` (``IterationEvents.BACKWARD_COMPLETED`` of ``SupervisedTrainer``), as the
  reference's ``clip_grad_norm_(..., 1.0)``; with AMP the gradients are unscaled first.
- :class:`SegmentationCaseWriter`: one CSV row per image (case, foreground Dice, IoU, pixel counts).
- :class:`SegmentationPredictionWriter`: predicted masks (PNG 0/255) and overlays (prediction
  filled red, ground-truth outline green) of every image.
- :class:`SegmentationPanels`: the same overlays of a few validation images in TensorBoard each
  validation epoch.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_components.io import atomic_write, atomic_write_text
from custom_components.metrics.segmentation import per_image_scores, predicted_mask

__all__ = ["GradientClipping", "SegmentationCaseWriter", "SegmentationPredictionWriter", "SegmentationPanels", "overlay"]

logger = logging.getLogger(__name__)

PRED_COLOUR = (255, 0, 0)
GT_COLOUR = (0, 255, 0)


class GradientClipping:
    """``torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm)`` before every optimizer step.

    The total norm before clipping is kept in ``engine.state.grad_norm`` (for logging).
    """

    def __init__(self, network: torch.nn.Module, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.network, self.max_norm, self.norm_type = network, float(max_norm), float(norm_type)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.max_norm, norm_type=self.norm_type)
        engine.state.grad_norm = float(norm)


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (3, H, W) or (H, W) array of any range -> (H, W, 3) uint8 (per-image min-max)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)).round().astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 overlay: prediction filled with red at ``alpha``, ground-truth outline in green."""
    out = _to_uint8_rgb(image).astype(np.float32)
    p = np.asarray(pred).astype(bool)
    out[p] = (1 - alpha) * out[p] + alpha * np.asarray(PRED_COLOUR, np.float32)
    out = out.round().astype(np.uint8)
    if label is not None:
        out[_outline(np.asarray(label))] = GT_COLOUR
    return out


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_write(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _cases(engine: Engine, n: int) -> list[str]:
    cases = engine.state.batch.get("case") if isinstance(engine.state.batch, dict) else None
    if cases is None:
        start = (engine.state.iteration - 1) * n
        return [str(start + i) for i in range(n)]
    return [str(c) for c in cases]


class SegmentationCaseWriter:
    """Per-image foreground Dice / IoU (MONAI ``compute_dice`` / ``compute_iou``, empty/empty = 1) to a CSV.

    Columns ``case, dice, iou, label_pixels, pred_pixels``; written atomically at ``Events.COMPLETED``
    (rank 0). The means of the columns equal MONAI's ``DiceMetric`` / ``MeanIoU`` with the same settings.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        scores = per_image_scores(out)
        pred = predicted_mask(torch.as_tensor(out["pred"])).flatten(1).sum(1).cpu()
        label = torch.as_tensor(out["label"]).round().flatten(1).sum(1).cpu()
        for i, case in enumerate(_cases(engine, len(pred))):
            self.rows.append({"case": case, "dice": float(scores["dice"][i]), "iou": float(scores["iou"][i]),
                              "label_pixels": int(label[i]), "pred_pixels": int(pred[i])})

    def write(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["case", "dice", "iou", "label_pixels", "pred_pixels"])
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(buf.getvalue(), self.path)
        logger.info("per-image scores of %d images -> %s", len(self.rows), self.path)


class SegmentationPredictionWriter:
    """Write ``<output_dir>/masks/<case>.png`` (0/255) and ``overlays/<case>.png`` for every image.

    The overlay is drawn on the prepared image ``<image_dir>/<case>.png`` when it exists (else on the
    network input, min-max scaled); the ground-truth outline is drawn when the batch has a label.
    ``csv_path`` (optional): an index with one row per image (``case, mask, overlay, pred_pixels,
    pred_fraction``; paths relative to ``output_dir``), written atomically at the end (rank 0).
    """

    def __init__(self, output_dir: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                 write_overlays: bool = True, csv_path: str | os.PathLike | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.image_dir = Path(image_dir) if image_dir else None
        self.write_overlays = write_overlays
        self.csv_path = Path(csv_path) if csv_path else None
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if self.csv_path is not None:
            engine.add_event_handler(Events.COMPLETED, self.write_index)

    def write_index(self, engine: Engine) -> None:
        if idist.get_rank() != 0 or self.csv_path is None:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["case", "mask", "overlay", "pred_pixels", "pred_fraction"])
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(buf.getvalue(), self.csv_path)

    def __call__(self, engine: Engine) -> None:
        from PIL import Image

        out = engine.state.output
        masks = predicted_mask(torch.as_tensor(out["pred"])).squeeze(1).cpu().numpy().astype(np.uint8)
        labels = out.get("label")
        labels = torch.as_tensor(labels).round().squeeze(1).cpu().numpy() if labels is not None else None
        for i, case in enumerate(_cases(engine, len(masks))):
            _save_png(masks[i] * 255, self.output_dir / "masks" / f"{case}.png")
            self.rows.append({"case": case, "mask": f"masks/{case}.png",
                              "overlay": f"overlays/{case}.png" if self.write_overlays else "",
                              "pred_pixels": int(masks[i].sum()), "pred_fraction": float(masks[i].mean())})
            if not self.write_overlays:
                continue
            source = self.image_dir / f"{case}.png" if self.image_dir else None
            if source is not None and source.is_file():
                image = np.asarray(Image.open(source).convert("RGB"))
            else:
                image = torch.as_tensor(out["image"][i]).float().cpu().numpy()
            label = labels[i] if labels is not None else None
            _save_png(overlay(image, masks[i], label), self.output_dir / "overlays" / f"{case}.png")


class SegmentationPanels:
    """TensorBoard overlays of ``num_images`` validation images after each validation run (rank 0).

    ``<tag>/overlay`` (prediction red, ground truth green outline) at the evaluator's epoch (the
    trainer's under MONAI's ``ValidationHandler``). A DDP network is unwrapped (no collective call).
    """

    def __init__(self, network: torch.nn.Module, dataset: Sequence[dict], summary_writer: Any, num_images: int = 4,
                 tag: str = "segmentation", device: str | torch.device | None = None) -> None:
        self.network, self.dataset, self.writer = network, dataset, summary_writer
        self.num_images, self.tag, self.device = int(num_images), tag, device
        self._items: list[dict] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0 or self.num_images <= 0:
            return
        if self._items is None:
            self._items = [self.dataset[i] for i in range(min(self.num_images, len(self.dataset)))]
        if not self._items:
            return
        device = self.device or getattr(engine.state, "device", None) or "cpu"
        images = torch.stack([torch.as_tensor(it["image"]) for it in self._items]).float().to(device)
        model = getattr(self.network, "module", self.network)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                masks = predicted_mask(model(images)).squeeze(1).cpu().numpy()
        finally:
            model.train(was_training)
        panels = []
        for it, image, mask in zip(self._items, images.cpu().numpy(), masks, strict=True):
            label = torch.as_tensor(it["label"]).round().squeeze(0).numpy() if "label" in it else None
            panels.append(overlay(image, mask, label))
        self.writer.add_images(f"{self.tag}/overlay", np.stack(panels), engine.state.epoch, dataformats="NHWC")
        self.writer.flush()
