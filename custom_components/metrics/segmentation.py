"""Binary segmentation outputs for MONAI's Dice / IoU metrics (LVM-Med 2-D protocol, spec lvmmed.md section 4).

The network gives ``(B, C, H, W)`` logits (softmax over C classes), the label is ``(B, 1, H, W)``
class indices. :func:`onehot_output` turns an engine output into one-hot ``(prediction, label)``
for MONAI's ``DiceMetric`` / ``MeanIoU`` (through ``IgniteMetricHandler``), and
:func:`per_image_scores` gives the foreground Dice and IoU of each image with MONAI's
``compute_dice`` / ``compute_iou``. Both use ``include_background=False, ignore_empty=False``: an
image with an empty ground truth scores 1 when its prediction is empty too and 0 otherwise (the
reference's "empty/empty = 1"), so every image counts in the mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_iou

__all__ = ["onehot_output", "per_image_scores", "predicted_mask"]


def predicted_mask(logits: torch.Tensor) -> torch.Tensor:
    """Class index per pixel, ``(B, 1, H, W)`` long."""
    return logits.argmax(1, keepdim=True)


def _onehot(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = indices.long().squeeze(1)
    return F.one_hot(idx, num_classes).movedim(-1, 1).float()


def onehot_output(
    output: Mapping[str, Any], pred_key: str = "pred", label_key: str = "label"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(one-hot argmax prediction, one-hot label)`` of a batch output, both ``(B, C, H, W)``."""
    logits = torch.as_tensor(output[pred_key])
    num_classes = logits.shape[1]
    label = torch.as_tensor(output[label_key]).to(logits.device)
    return _onehot(predicted_mask(logits), num_classes), _onehot(label.round(), num_classes)


def per_image_scores(output: Mapping[str, Any], pred_key: str = "pred", label_key: str = "label") -> dict[str, torch.Tensor]:
    """Per-image foreground Dice and IoU (mean over the non-background classes): ``{"dice": (B,), "iou": (B,)}``."""
    pred, label = onehot_output(output, pred_key, label_key)
    dice = compute_dice(pred, label, include_background=False, ignore_empty=False)
    iou = compute_iou(pred, label, include_background=False, ignore_empty=False)
    return {"dice": dice.mean(1).cpu(), "iou": iou.mean(1).cpu()}
