"""The interface of guidance losses: compare explanation maps with ground-truth masks."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["GuidanceLoss", "positive_selection"]


def positive_selection(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B,) selecting positive slices from labels of shape (B,), (B, 1) (0/1) or one-hot (B, 2)."""
    if labels.dim() == 2 and labels.shape[1] == 2:
        return labels[:, 1] > 0.5
    return labels.reshape(labels.shape[0], -1)[:, 0] > 0.5


class GuidanceLoss(nn.Module):
    """``forward(maps, masks, labels) -> scalar``.

    ``maps`` (B, H, W) explanation maps (in the autograd graph), ``masks`` (B, 1, H, W) or
    (B, H, W) binary ground truth, ``labels`` slice labels. Losses apply to positive slices only
    (the LGM-ViT rule) and return an exact zero, still attached to ``maps``, when there is none.
    """

    #: Losses that also read the input images (RES-L) set this; they take ``images=`` then.
    needs_images: bool = False

    def forward(self, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def zero_like(maps: torch.Tensor) -> torch.Tensor:
        return maps.sum() * 0.0
