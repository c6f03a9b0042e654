"""Ignite iterations, collation and targets for MONAI's RetinaNet detector.

A batch is a list of dicts (``collate_fn=no_collation``): ``image`` (C, W, H) tensor, ``box``
``(N, 4)`` float ``[x_min, y_min, x_max, y_max]`` along the image array's axes, ``label`` ``(N,)``
int64 (``N = 0`` for a "No finding" image), ``image_id``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DetectionTargetsd", "detection_batch", "DetectionIteration", "DetectionEvalIteration", "image_paths"]


class DetectionTargetsd:
    """Datalist ``box`` / ``label`` lists -> ``(N, 4)`` float32 and ``(N,)`` int64 tensors (``N`` may be 0)."""

    def __init__(self, box_key: str = "box", label_key: str = "label") -> None:
        self.box_key, self.label_key = box_key, label_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        box = torch.as_tensor(np.asarray(d.get(self.box_key, []), dtype=np.float32)).reshape(-1, 4)
        label = torch.as_tensor(np.asarray(d.get(self.label_key, []), dtype=np.int64)).reshape(-1)
        if len(box) != len(label):
            raise ValueError(f"{d.get('image_id', '?')}: {len(box)} boxes but {len(label)} labels")
        d[self.box_key], d[self.label_key] = box, label
        return d


def detection_batch(
    batch: Sequence[Mapping[str, Any]] | Mapping[str, Any], device: torch.device | str | None
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[str]]:
    """Images, targets (``boxes``/``labels`` as MONAI's detector names them) and ids of a list batch."""
    items = [batch] if isinstance(batch, Mapping) else list(batch)
    images = [torch.as_tensor(d["image"]).float().to(device) for d in items]
    targets = [{"boxes": torch.as_tensor(d["box"]).float().reshape(-1, 4).to(device),
                "labels": torch.as_tensor(d["label"]).long().reshape(-1).to(device)} for d in items]
    ids = [str(d.get("image_id", i)) for i, d in enumerate(items)]
    return images, targets, ids


def image_paths(batch: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[str]:
    """Source file of each image of a list batch (MetaTensor ``filename_or_obj``), ``""`` when unknown."""
    items = [batch] if isinstance(batch, Mapping) else list(batch)
    return [str(getattr(d["image"], "meta", {}).get("filename_or_obj", "")) for d in items]


class DetectionIteration:
    """``SupervisedTrainer`` iteration: detector losses (focal classification + ``box_loss_weight`` x
    smooth-L1 regression), backward, gradient-norm clipping at ``grad_clip`` (0: off), optimizer step."""

    def __init__(self, detector: torch.nn.Module, grad_clip: float = 1.0, box_loss_weight: float = 1.0) -> None:
        self.detector = detector
        self.grad_clip = float(grad_clip)
        self.box_loss_weight = float(box_loss_weight)

    def __call__(self, engine: Any, batch: Any) -> dict[str, Any]:
        images, targets, ids = detection_batch(batch, engine.state.device if hasattr(engine.state, "device") else None)
        self.detector.train()
        engine.optimizer.zero_grad(set_to_none=True)
        losses = self.detector(images, targets)
        loss_cls, loss_box = losses[self.detector.cls_key], losses[self.detector.box_reg_key]
        loss = loss_cls + self.box_loss_weight * loss_box
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in engine.network.parameters() if p.requires_grad], self.grad_clip)
        engine.optimizer.step()
        return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(), "image_id": ids}


class DetectionEvalIteration:
    """``SupervisedEvaluator`` iteration: the detector's boxes per image.

    Output: ``pred`` (list of ``{"boxes", "labels", "scores"}`` on the CPU), ``target`` (list of
    ``{"boxes", "labels"}``), ``image`` (list of CPU tensors, for overlays) and ``image_id``.
    """

    def __init__(self, detector: torch.nn.Module) -> None:
        self.detector = detector

    def __call__(self, engine: Any, batch: Any) -> dict[str, Any]:
        images, targets, ids = detection_batch(batch, engine.state.device if hasattr(engine.state, "device") else None)
        self.detector.eval()
        with torch.no_grad():
            dets = self.detector(images)
        score_key = self.detector.pred_score_key
        pred = [{"boxes": d["boxes"].detach().float().cpu(), "labels": d["labels"].detach().long().cpu(),
                 "scores": d[score_key].detach().float().cpu()} for d in dets]
        target = [{k: v.cpu() for k, v in t.items()} for t in targets]
        return {"pred": pred, "target": target, "image": [i.cpu() for i in images], "image_id": ids,
                "image_path": image_paths(batch)}
