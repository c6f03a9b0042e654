"""Initialise a ResNet encoder from scratch, ImageNet or LVM-Med weights (spec lvmmed.md sections 4 and 6).

The downstream LVM-Med bundles choose the encoder's initialisation with ``init`` (an override file
``configs/init/<name>.json``):

- ``scratch``: MONAI's default initialisation; no file (a path given is an error, so a forgotten
  override cannot silently train from scratch while the log names a checkpoint).
- ``imagenet`` / ``lvmmed``: a local torchvision-layout ResNet state dict (the published
  ``lvmmed_resnet.torch`` and torchvision's ImageNet files use that layout; MONAI's ``ResNet`` with
  ``bias_downsample=False`` and the ``ResNetEncoder`` inside ``FlexibleUNet`` use the same key
  names). Loading goes through
  :func:`~custom_components.networks.pretrained.load_pretrained_resnet`: wrappers and a
  ``module.``/``model.``/``backbone.`` prefix are removed, ``fc.*`` is dropped, and every other
  tensor must match the encoder one to one with the same shape (the reference's ``strict=False``
  silent partial load is the quirk this replaces); otherwise one
  :class:`~custom_components.io.InputDataError` line names the file.

MONAI's ``resnet18``/``resnet34`` encoders (FlexibleUNet) use parameter-free "A" shortcuts, so a
torchvision ResNet-18/34 file does not fit them (its ``downsample`` convs are reported as
unexpected); ResNet-50 and deeper use torchvision's "B" shortcuts and fit.

:func:`init_encoder` returns (and logs) the number of tensors loaded. :func:`lvmmed_unet` builds
MONAI's ``FlexibleUNet`` (its ResNet encoder is the ``encoder`` attribute) and initialises it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import FlexibleUNet

from custom_components.io import InputDataError
from custom_components.networks.pretrained import load_pretrained_resnet

__all__ = ["INITS", "check_encoder_init", "init_encoder", "resnet_encoder", "lvmmed_unet", "scriptable_shortcuts"]

logger = logging.getLogger(__name__)

#: initialisations of the LVM-Med downstream bundles
INITS = ("scratch", "imagenet", "lvmmed")


def check_encoder_init(init: str, path: str | Path | None) -> None:
    """Check that ``init`` and the checkpoint path agree (before a long run starts)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "scratch":
        if path:
            raise ValueError(f"init 'scratch' trains from scratch but pretrained_path={str(path)!r} is set")
        return
    if not path:
        raise InputDataError(f"init {init!r}", "needs a local ResNet state dict file: pass --pretrained_path FILE")
    if not Path(path).is_file():
        raise InputDataError(path, f"checkpoint for init {init!r} does not exist")


def resnet_encoder(module: nn.Module) -> nn.Module:
    """The ResNet inside ``module``: ``FlexibleUNet.encoder``, or ``module`` itself for a bare ResNet."""
    if isinstance(module, FlexibleUNet):
        return module.encoder
    if hasattr(module, "conv1") and hasattr(module, "layer1"):
        return module
    encoder = getattr(module, "encoder", None)
    if encoder is not None and hasattr(encoder, "conv1") and hasattr(encoder, "layer1"):
        return encoder
    raise TypeError(f"{type(module).__name__} is neither a ResNet nor a network with a ResNet 'encoder'")


@contextmanager
def _without_classifier(encoder: nn.Module) -> Iterator[None]:
    """Hide a bare ResNet's ``fc`` head while loading (the file's ``fc.*`` is dropped, the head stays)."""
    head = getattr(encoder, "fc", None)
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        yield
        return
    encoder.fc = nn.Identity()
    try:
        yield
    finally:
        encoder.fc = head


def init_encoder(encoder: nn.Module, init: str, path: str | Path | None = None) -> int:
    """Initialise ``encoder`` (a ResNet, or a network holding one as ``encoder``); returns the tensors loaded.

    ``scratch`` loads nothing (returns 0). ``imagenet`` / ``lvmmed`` load every encoder tensor from
    ``path`` (strict, see the module docstring) and log ``loaded N tensors from FILE``.
    """
    check_encoder_init(init, path)
    if init == "scratch":
        logger.info("encoder initialisation: scratch (no pretrained weights)")
        return 0
    resnet = resnet_encoder(encoder)
    with _without_classifier(resnet):
        total = len(resnet.state_dict())
        result = load_pretrained_resnet(resnet, path)
    loaded = total - len(result["missing_keys"])
    logger.info("encoder initialisation %s: loaded %d tensors from %s", init, loaded, path)
    return loaded


class ZeroPadShortcut(nn.Module):
    """MONAI's type-"A" ResNet shortcut as a module: strided subsampling, zero channels appended.

    Computes what ``ResNet._downsample_basic_block`` computes (including its ``.data``: no gradient
    flows through the shortcut), but TorchScript can compile a module where it cannot compile the
    ``functools.partial`` MONAI stores, so ``ckpt_export`` works for ResNet-10/18/34 encoders.
    No parameters: state dicts are unchanged.
    """

    def __init__(self, planes: int, stride: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.planes, self.stride, self.spatial_dims = int(planes), int(stride), int(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 3:
            out = F.avg_pool3d(x, kernel_size=1, stride=self.stride)
        elif self.spatial_dims == 2:
            out = F.avg_pool2d(x, kernel_size=1, stride=self.stride)
        else:
            out = F.avg_pool1d(x, kernel_size=1, stride=self.stride)
        shape = list(out.shape)
        shape[1] = self.planes - shape[1]
        zeros = torch.zeros(shape, dtype=out.dtype, device=out.device)
        return torch.cat([out.detach(), zeros], dim=1)


def scriptable_shortcuts(module: nn.Module) -> int:
    """Replace every ``functools.partial`` type-"A" shortcut under ``module`` by :class:`ZeroPadShortcut`; returns the count."""
    count = 0
    for block in module.modules():
        down = getattr(block, "downsample", None)
        if isinstance(down, functools.partial):
            kw = down.keywords
            block.downsample = ZeroPadShortcut(kw["planes"], kw["stride"], kw.get("spatial_dims", 3))
            count += 1
    return count


def lvmmed_unet(
    init: str = "scratch",
    pretrained_path: str | Path | None = None,
    backbone: str = "resnet50",
    in_channels: int = 3,
    out_channels: int = 2,
    spatial_dims: int = 2,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
    upsample: str = "nontrainable",
    interp_mode: str = "nearest",
) -> FlexibleUNet:
    """MONAI ``FlexibleUNet`` with a ResNet encoder initialised by :func:`init_encoder`.

    The decoder widths (256, 128, 64, 32, 16) and nearest upsampling follow the U-Net of
    ``segmentation_models_pytorch`` that the reference uses. The forward returns one logits tensor
    ``(B, out_channels, H, W)``. ResNet-10/18/34 encoders get :func:`scriptable_shortcuts` (same
    computation, TorchScript-compilable).
    """
    net = FlexibleUNet(
        in_channels=in_channels,
        out_channels=out_channels,
        backbone=backbone,
        pretrained=False,
        decoder_channels=tuple(decoder_channels),
        spatial_dims=spatial_dims,
        norm=norm,
        upsample=upsample,
        interp_mode=interp_mode,
    )
    scriptable_shortcuts(net)
    init_encoder(net, init, pretrained_path)
    return net
