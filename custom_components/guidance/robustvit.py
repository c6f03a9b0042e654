"""RobustViT foreground/background relevance loss (LGM-ViT's competing-methods variant).

Chefer, Schwartz, Wolf, "Optimizing Relevance Maps of Vision Transformers Improves Robustness",
NeurIPS 2022; spec ``specs/lgmvit.md`` section 8.1: on positive slices,

    L = 0.3 * MSE(R * M, M) + 2 * MSE(R * (1 - M), 0)

with binary M and R the per-sample min-maxed GAE relevance at the mask size. Only the
relevance terms are used (BCE on the ground truth replaces RobustViT's self-label CE).
"""

from __future__ import annotations

import torch

from custom_components.guidance.base import GuidanceLoss
from custom_components.guidance.gradmask import _check_same_size, select_positive_maps

__all__ = ["RobustViTLoss"]


class RobustViTLoss(GuidanceLoss):
    """Args:
    fg_weight: weight of the foreground term MSE(R * M, M) (0.3).
    bg_weight: weight of the background term MSE(R * (1 - M), 0) (2.0).
    """

    needs_images = False

    def __init__(self, fg_weight: float = 0.3, bg_weight: float = 2.0) -> None:
        super().__init__()
        self.fg_weight = float(fg_weight)
        self.bg_weight = float(bg_weight)

    def forward(self, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        selected = select_positive_maps(maps, masks, labels)
        if selected is None:
            return self.zero_like(maps)
        r, m = selected
        _check_same_size(r, m)
        m = (m > 0.5).to(r.dtype)
        fg = (r * m - m).pow(2).mean()
        bg = (r * (1.0 - m)).pow(2).mean()
        return self.fg_weight * fg + self.bg_weight * bg
