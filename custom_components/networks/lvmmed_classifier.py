"""LVM-Med downstream classifier: ResNet encoder + global average pooling + "1 FC" or "FCNs" head.

Spec ``lvmmed.md`` section 4 (Classification) and section 6 (quirks):

* encoder: an ImageNet-layout ResNet (MONAI's ResNet with torchvision's parameter names,
  :class:`~custom_components.networks.ham.DilatedResNet` at output stride 32 without dilation, i.e.
  the plain torchvision ResNet) followed by global average pooling (2048 features for ResNet-50);
* head ``"1fc"``: ``Linear(D, C)``; head ``"fcns"``: ``D -> hidden[0] -> hidden[1] -> ... -> C`` with a
  ReLU between the linear layers (Brain Tumor MRI 512, 256; FGADR 512, 128);
* ``frozen``: the encoder's parameters do not require gradients **and the encoder stays in eval mode**
  (BN running statistics fixed) when the network is put in train mode; ``frozen_bn_train=True``
  reproduces the reference, whose frozen backbone is still in train mode (BN statistics update);
* the encoder is initialised from scratch, ImageNet or LVM-Med weights by
  :func:`custom_components.networks.encoder_init.init_encoder` (strict; logs the tensor count).

``forward`` returns one tensor (logits ``(B, C)``); :meth:`LVMMedClassifier.features` gives the pooled
encoder features ``(B, D)`` (what the linear probe caches) and ``head(features(x)) == forward(x)``.
The network is TorchScript-scriptable (``ckpt_export``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.networks.ham import RESNET_ARCHS, DilatedResNet

__all__ = ["HEADS", "LVMMedClassifier", "classifier_head"]

HEADS = ("1fc", "fcns")


def classifier_head(in_features: int, num_classes: int, head: str = "1fc",
                    hidden_sizes: Sequence[int] = (512, 256)) -> nn.Sequential:
    """The reference's heads: ``1fc`` = one Linear; ``fcns`` = Linear layers through ``hidden_sizes``, ReLU between."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    widths = [int(in_features)] + ([int(h) for h in hidden_sizes] if head == "fcns" else []) + [int(num_classes)]
    if head == "fcns" and len(widths) < 3:
        raise ValueError("head 'fcns' needs at least one hidden size")
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i > 0:
            layers.append(nn.ReLU(inplace=False))
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


class LVMMedClassifier(nn.Module):
    """ResNet encoder + average pooling + classification head (see the module docstring).

    Args:
        num_classes: C (4 for Brain Tumor MRI, 5 for FGADR grading).
        arch: ResNet depth (``resnet50`` as the paper; ``resnet18`` for demos).
        head: ``"1fc"`` or ``"fcns"``.
        hidden_sizes: hidden widths of the ``fcns`` head.
        frozen: freeze the encoder (linear probe / frozen-backbone rows of the paper).
        frozen_bn_train: with ``frozen``, let the encoder follow ``train()`` (reference quirk: BN
            statistics keep updating); default ``False`` keeps it in eval mode.
        init: ``scratch``, ``imagenet`` or ``lvmmed`` (encoder initialisation).
        pretrained_path: the local torchvision-layout ResNet state dict for ``imagenet`` / ``lvmmed``.
        in_channels: input channels (3).
    """

    def __init__(
        self,
        num_classes: int = 4,
        arch: str = "resnet50",
        head: str = "1fc",
        hidden_sizes: Sequence[int] = (512, 256),
        frozen: bool = False,
        frozen_bn_train: bool = False,
        init: str = "scratch",
        pretrained_path: str | Path | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"arch must be one of {sorted(RESNET_ARCHS)}, got {arch!r}")
        self.encoder = DilatedResNet(arch=arch, output_stride=32, pooling=True, dilation=False, in_channels=in_channels)
        self.num_features = int(self.encoder.out_channels)
        self.head = classifier_head(self.num_features, num_classes, head, hidden_sizes)
        self.num_classes = int(num_classes)
        self.frozen = bool(frozen)
        self.frozen_bn_train = bool(frozen_bn_train)
        from custom_components.networks.encoder_init import init_encoder

        self.loaded_tensors = init_encoder(self.encoder, init, pretrained_path)
        if self.frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            if not self.frozen_bn_train:
                self.encoder.eval()

    def train(self, mode: bool = True) -> LVMMedClassifier:
        super().train(mode)
        if self.frozen and not self.frozen_bn_train:
            self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require gradients (the head only when frozen): what the optimizer gets."""
        return [p for p in self.parameters() if p.requires_grad]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features ``(B, D)``."""
        return torch.flatten(F.adaptive_avg_pool2d(self.encoder(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
