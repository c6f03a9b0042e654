"""GradMask guidance loss as adapted by LGM-ViT's competing methods.

Spec ``specs/lgmvit.md`` section 8.1: on positive slices, ``MSE(R * (1 - G), 0)`` averaged over
B_pos x H x W, with R the (per-sample min-maxed) relevance at the mask size and G the Gaussian
blur of the binary mask (kernel 51, torchvision sigma 8). The reference min-maxes R twice, a
no-op (quirk Q10): maps arrive normalised once (``GAE(upsample="bilinear", normalize="minmax")``).
The same loss applies to the input-gradient saliency of :class:`~custom_components.explain.InputGradient`
(the original GradMask penalises saliency outside the mask).
"""

from __future__ import annotations

import torch

from custom_components.guidance.base import GuidanceLoss, positive_selection
from custom_components.guidance.blur import gaussian_blur

__all__ = ["GradMaskLoss", "select_positive_maps"]


def select_positive_maps(maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor):
    """(maps, masks) of the positive slices as (P, H, W) float tensors, or None if there is none."""
    positive = positive_selection(labels)
    if not bool(positive.any()):
        return None
    maps = maps[positive].float()
    masks = masks[positive]
    if masks.dim() == 4:
        masks = masks[:, 0]
    return maps, masks.float()


def _check_same_size(maps: torch.Tensor, masks: torch.Tensor) -> None:
    if maps.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"map size {list(maps.shape[-2:])} differs from mask size {list(masks.shape[-2:])}")


class GradMaskLoss(GuidanceLoss):
    """Args:
    kernel_size: Gaussian blur kernel of the masks (51).
    sigma: blur sigma; ``None`` gives torchvision's default (8.0 for 51).
    """

    needs_images = False

    def __init__(self, kernel_size: int = 51, sigma: float | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.sigma = sigma

    def forward(self, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        selected = select_positive_maps(maps, masks, labels)
        if selected is None:
            return self.zero_like(maps)
        r, m = selected
        _check_same_size(r, m)
        with torch.no_grad():
            g = gaussian_blur(m, self.kernel_size, self.sigma)
        return (r * (1.0 - g)).pow(2).mean()
