"""LVM-Med backbone: a MONAI ResNet returning its last feature map (spec ``specs/lvmmed.md`` sections 2-3).

The self-supervised objective reads the backbone maps y (B, D, R, S) (ResNet-50 at 224: 2048 x 7 x 7)
for its local term and pools them for the projector, so the backbone stops before the pooling and
the classifier: :class:`LVMMedResNet` is MONAI's :class:`~monai.networks.nets.ResNet` laid out as
torchvision's (7x7 stride-2 stem, max-pool, layer strides 1/2/2/2, 1x1-conv + BN shortcuts without
bias), through :class:`~custom_components.networks.ham.DilatedResNet` at output stride 32 without
dilation. Its ``forward`` is written out (TorchScript-scriptable) and returns one tensor.

Key layout: MONAI's ResNet names its parameters as torchvision does (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` / ``.1`` ...), which is also the layout of the
published ``lvmmed_resnet.torch`` (a torchvision ResNet-50 state dict) and of ImageNet files. The
network has no ``fc``; :func:`backbone_state_dict` gives exactly those keys (no objective,
projector or DDP prefix), and :func:`load_backbone_weights` loads such a file (ImageNet, LVM-Med,
or this bundle's ``backbone.pt``) through
:func:`~custom_components.networks.pretrained.load_pretrained_resnet` (every backbone tensor must
come from the file with its shape; ``fc.*`` is dropped; one error line naming the file otherwise).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from custom_components.networks.ham import DilatedResNet
from custom_components.networks.pretrained import load_pretrained_resnet, load_pretrained_vit
from custom_components.networks.vit import AttributionViT

__all__ = [
    "LVMMedResNet",
    "LVMMED_ARCHS",
    "lvmmed_resnet",
    "backbone_state_dict",
    "load_backbone_weights",
    "ViTFeatureMap",
    "lvmmed_vit",
]

logger = logging.getLogger(__name__)

#: backbones of the pre-training bundle (2-D, basic or bottleneck blocks)
LVMMED_ARCHS = ("resnet18", "resnet34", "resnet50")


class LVMMedResNet(DilatedResNet):
    """2-D torchvision-layout ResNet whose ``forward`` returns the last feature map (B, D, H/32, W/32).

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (D = 512, 512, 2048).
        in_channels: 1 (grey) or 3 (RGB; ImageNet and LVM-Med files are RGB, a grey stem sums their filters).
    """

    def __init__(self, arch: str = "resnet50", in_channels: int = 3) -> None:
        if arch not in LVMMED_ARCHS:
            raise ValueError(f"arch must be one of {LVMMED_ARCHS}, got {arch!r}")
        if int(in_channels) not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        super().__init__(arch=arch, output_stride=32, pooling=True, dilation=False, in_channels=int(in_channels))
        self.in_channels = int(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def backbone_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict in the torchvision / LVM-Med key layout, detached on the CPU.

    A DDP (``.module``) wrapper is removed; keys are those of the bare :class:`LVMMedResNet`.
    """
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_backbone_weights(model: torch.nn.Module, path: str | os.PathLike) -> int:
    """Load a torchvision-layout ResNet file (ImageNet, ``lvmmed_resnet.torch``, ``backbone.pt``) into ``model``.

    Strict: every backbone tensor must be in the file with its shape, and every file tensor but
    ``fc.*`` must belong to the backbone (:func:`load_pretrained_resnet`; an
    :class:`~custom_components.io.InputDataError` names the file otherwise). Returns and logs the
    number of tensors loaded.
    """
    result = load_pretrained_resnet(model, path)
    n = len(model.state_dict()) - len(result["missing_keys"])
    logger.info("%s: loaded %d backbone tensors", Path(path).name, n)
    return n


def lvmmed_resnet(arch: str = "resnet50", in_channels: int = 3, pretrained_path: str | os.PathLike | None = None) -> LVMMedResNet:
    """:class:`LVMMedResNet`, initialised from ``pretrained_path`` when given (ImageNet / LVM-Med file)."""
    model = LVMMedResNet(arch=arch, in_channels=in_channels)
    if pretrained_path:
        load_backbone_weights(model, pretrained_path)
    return model


class ViTFeatureMap(AttributionViT):
    """The collection's ViT (:class:`~custom_components.networks.vit.AttributionViT`) as a feature-map backbone.

    ``forward`` returns the patch tokens after the last block and the final norm, without the CLS
    token, as a map (B, D, g, g), g = img_size / patch_size (ViT-B/16 at 224: 768 x 14 x 14, the
    map LVM-Med's ViT variant feeds the objective). The classifier head of the timm layout is kept
    so that timm / DINO / MAE files load unchanged, but takes no part in ``forward`` (under DDP
    its parameters need ``find_unused_parameters=True``). This is not the SAM ViT-B encoder of the
    released ``lvmmed_vit.pth`` (windowed attention, relative positions): the spec's key mapping
    for that file is not implemented here.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_channels = self.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)[:, 1:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_size, self.grid_size, self.grid_size)


def lvmmed_vit(pretrained_path: str | os.PathLike | None = None, **kwargs) -> ViTFeatureMap:
    """:class:`ViTFeatureMap` (``AttributionViT`` arguments), initialised from a local timm-layout file when given."""
    model = ViTFeatureMap(**kwargs)
    if pretrained_path:
        load_pretrained_vit(model, pretrained_path)
    return model
