"""The CAM baseline of HAM's comparisons: a ResNet with global average pooling and one linear head.

Wang et al., "ChestX-ray8", CVPR 2017 (multi-label ResNet + CAM); Zhou et al., "Learning Deep
Features for Discriminative Localization", CVPR 2016 (CAM). Same interface as
:class:`~custom_components.networks.ham.HAMNet`, so the HAM bundle's iteration, losses and
evaluation run it unchanged: ``forward(x)`` -> logits (B, 1 + num_classes), abnormality first;
``forward_with_maps(x)`` -> :class:`~custom_components.networks.ham.HAMOutput` with the raw CAMs
M = ReLU(W e4) (detached weights, as HAM's) and HAM's refined maps R at the input size.

No foreground attention, no LSE pooling, no fusion head: the backbone's last feature map e4 is
average-pooled and fed to a linear layer with bias (1 + num_classes outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.networks.ham import DilatedResNet, HAMOutput, refine_cams
from custom_components.networks.pretrained import load_pretrained_resnet

__all__ = ["CAMResNet", "cam_resnet"]


class CAMResNet(nn.Module):
    """ResNet + global average pooling + linear head (abnormality and findings); CAMs from the head.

    Args:
        arch, output_stride, pooling, dilation, in_channels: the backbone
            (:class:`~custom_components.networks.ham.DilatedResNet`; output stride 32 is the plain ResNet).
        num_classes: findings (14).
        cam_w, cam_sigma: HAM's refinement of the maps (100, 0.4), so that the localisation
            threshold means the same as for HAM.
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 14, output_stride: int = 32, pooling: bool = True,
                 dilation: bool = True, in_channels: int = 3, cam_w: float = 100.0, cam_sigma: float = 0.4) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.cam_w, self.cam_sigma = float(cam_w), float(cam_sigma)
        self.backbone = DilatedResNet(arch, output_stride, pooling, dilation, in_channels)
        self.fc = nn.Linear(self.backbone.out_channels, 1 + self.num_classes)

    def forward_with_maps(self, x: torch.Tensor, refine: bool = True) -> HAMOutput:
        features = self.backbone(x)
        logits = self.fc(features.mean(dim=(2, 3)))
        cams = F.relu(F.conv2d(features, self.fc.weight.detach()[:, :, None, None]))
        refined = refine_cams(cams, x.shape[-2:], True, self.cam_w, self.cam_sigma) if refine else None
        return HAMOutput(logits, cams, refined)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).mean(dim=(2, 3)))


def cam_resnet(pretrained_path: str | Path | None = None, **kwargs: Any) -> CAMResNet:
    """Build a :class:`CAMResNet`, then load a local torchvision-layout ImageNet ResNet state dict into its backbone."""
    model = CAMResNet(**kwargs)
    if pretrained_path:
        load_pretrained_resnet(model.backbone, pretrained_path)
    return model
