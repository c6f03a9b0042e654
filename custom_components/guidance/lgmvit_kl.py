"""The LGM-ViT localization loss: KL(softmax(blurred mask) || softmax(explanation map)).

Spec ``specs/lgmvit.md`` section 4. For each positive slice b, P_b = softmax(vec E_b) and
Q_b = softmax(vec G_b) over all pixels, G_b the Gaussian-blurred mask; the loss is the mean over
positive slices of sum_x Q_b(x) (log Q_b(x) - log P_b(x)) (the reference's
``KLDivLoss(reduction="batchmean", log_target=True)``). Its gradient w.r.t. E_b is (P_b - Q_b) / B_pos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_components.guidance.base import GuidanceLoss, positive_selection
from custom_components.guidance.blur import gaussian_blur

__all__ = ["LGMViTKLLoss"]


class LGMViTKLLoss(GuidanceLoss):
    """Args:
    kernel_size: Gaussian blur kernel of the masks (51).
    sigma: blur sigma; ``None`` gives torchvision's default for the kernel (8.0 for 51).
    """

    def __init__(self, kernel_size: int = 51, sigma: float | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.sigma = sigma

    def forward(self, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positive = positive_selection(labels)
        if not bool(positive.any()):
            return self.zero_like(maps)
        maps = maps[positive].float()
        masks = masks[positive]
        if masks.dim() == 4:
            masks = masks[:, 0]
        if masks.shape[-2:] != maps.shape[-2:]:
            raise ValueError(f"map size {list(maps.shape[-2:])} differs from mask size {list(masks.shape[-2:])}")
        with torch.no_grad():
            log_q = F.log_softmax(gaussian_blur(masks, self.kernel_size, self.sigma).flatten(1), dim=1)
        log_p = F.log_softmax(maps.flatten(1), dim=1)
        return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
