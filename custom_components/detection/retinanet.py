"""RetinaNet with a ResNet-FPN backbone on MONAI's detection code (``monai.apps.detection``).

:class:`DetectionNetwork` is the bundle's ``network_def``: MONAI's
:class:`~monai.apps.detection.networks.retinanet_network.RetinaNet` over a torchvision-layout ResNet
(:class:`~custom_components.networks.ham.DilatedResNet` at output stride 32, i.e. a plain ResNet)
and an FPN (:func:`~custom_components.detection.torchvision_parts.resnet_fpn_feature_extractor`).
Its ``forward(images)`` returns **one tensor** ``(B, num_classes + 4, sum(H_l W_l A))``: channel
first, the class logits followed by the 4 box-regression deltas of every anchor, anchors ordered as
MONAI's detector orders them (level, then axis 0, axis 1, anchor) -- what ``verify_net_in_out`` and
``ckpt_export`` (traced) see; decoding boxes from it needs the detector's anchors and box coder.
``forward(images, raw=True)`` returns RetinaNet's dict of per-level maps, which the detector uses.

:func:`build_detector` wraps it in MONAI's
:class:`~monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` (anchors, box coder,
matcher, sampler, focal loss, box selection); the network may be DDP-wrapped, the detector calls it
through :class:`RawHeads`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from torch import nn

from custom_components.detection import torchvision_parts
from custom_components.networks.ham import DilatedResNet

__all__ = ["DetectionNetwork", "detection_network", "RawHeads", "build_detector", "flatten_head_maps", "INITS"]

logger = logging.getLogger(__name__)

INITS = ("scratch", "imagenet", "lvmmed")


def flatten_head_maps(maps: Sequence[torch.Tensor], num_anchors: int) -> torch.Tensor:
    """Per-level maps ``(B, A*C, H, W)`` -> ``(B, sum(H W A), C)`` in the detector's anchor order."""
    out = []
    for m in maps:
        b, ac, h, w = m.shape
        c = ac // num_anchors
        out.append(m.view(b, num_anchors, c, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, c))
    return torch.cat(out, dim=1)


class DetectionNetwork(nn.Module):
    """RetinaNet + ResNet-FPN; one-tensor forward (see module docstring)."""

    def __init__(
        self,
        num_classes: int,
        arch: str = "resnet50",
        num_anchors: int = 3,
        returned_layers: Sequence[int] = (1, 2, 3, 4),
        fpn_channels: int = 256,
        trainable_layers: int = 5,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        layers = sorted(int(k) for k in returned_layers)
        if not layers or layers[0] < 1 or layers[-1] > 4 or layers != list(range(layers[0], layers[-1] + 1)):
            # the anchor scales and size_divisible below assume one stride-2 step between levels
            raise ValueError(f"returned_layers must be consecutive ResNet layers in 1..4, got {list(returned_layers)}")
        # the ResNet (weights already loaded, if any); the FPN body keeps its stem and layers up to
        # the last returned one, so unused later layers are not part of this network
        backbone = DilatedResNet(arch, output_stride=32, dilation=False) if backbone is None else backbone
        extractor = torchvision_parts.resnet_fpn_feature_extractor(
            backbone, returned_layers=returned_layers, trainable_layers=trainable_layers, out_channels=fpn_channels
        )
        stride = 2 ** (min(returned_layers) + 1)
        self.retinanet = RetinaNet(
            spatial_dims=2,
            num_classes=num_classes,
            num_anchors=num_anchors,
            feature_extractor=extractor,
            size_divisible=stride * 2 ** (len(returned_layers)),
        )
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.spatial_dims = 2
        self.size_divisible = self.retinanet.size_divisible
        self.cls_key = self.retinanet.cls_key
        self.box_reg_key = self.retinanet.box_reg_key
        self.feature_map_scales = [2**i for i in range(len(returned_layers) + 1)]

    def forward(self, images: torch.Tensor, raw: bool = False):
        out = self.retinanet(images)
        if raw:
            return out
        cls = flatten_head_maps(out[self.cls_key], self.num_anchors)
        box = flatten_head_maps(out[self.box_reg_key], self.num_anchors)
        return torch.cat([cls, box], dim=-1).transpose(1, 2)


def detection_network(
    num_classes: int,
    arch: str = "resnet50",
    init: str = "scratch",
    pretrained_path: str | Path | None = None,
    **kwargs,
) -> DetectionNetwork:
    """Build :class:`DetectionNetwork`; ``init`` ``imagenet`` / ``lvmmed`` load a local torchvision-layout
    ResNet file strictly into the backbone (every backbone tensor from the file, only ``fc.*`` left out)."""
    from custom_components.io import InputDataError
    from custom_components.networks.pretrained import load_pretrained_resnet

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    backbone = DilatedResNet(arch, output_stride=32, dilation=False)
    if init == "scratch":
        if pretrained_path:
            raise ValueError(f"init 'scratch' takes no pretrained_path, got {str(pretrained_path)!r}")
    else:
        if not pretrained_path or not Path(pretrained_path).is_file():
            source = str(pretrained_path or f"init {init!r}")
            raise InputDataError(source, f"init {init!r} needs an existing local ResNet checkpoint (pretrained_path)")
        load_pretrained_resnet(backbone, pretrained_path)  # strict: every backbone tensor, only fc.* left out
        count = sum(1 for k in backbone.state_dict() if not k.endswith("num_batches_tracked"))
        logger.info("%s: loaded %d backbone tensors (%s init, %s)", pretrained_path, count, init, arch)
    return DetectionNetwork(num_classes, arch=arch, backbone=backbone, **kwargs)


class RawHeads(nn.Module):
    """What the detector calls: the (possibly DDP-wrapped) network's per-level head maps."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        inner = network.module if hasattr(network, "module") else network
        for name in ("num_classes", "spatial_dims", "size_divisible", "cls_key", "box_reg_key"):
            setattr(self, name, getattr(inner, name))

    def forward(self, images: torch.Tensor):
        return self.network(images, raw=True)


def build_detector(
    network: nn.Module,
    base_anchor_shapes: Sequence[Sequence[float]] = ((32, 32), (24, 48), (48, 24)),
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    score_thresh: float = 0.05,
    topk_candidates_per_level: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> RetinaNetDetector:
    """MONAI's RetinaNetDetector around ``network``: anchors ``base_anchor_shapes`` (x, y extents in
    pixels at the first FPN level, doubled per level), torchvision-style matcher (``fg_iou`` /
    ``bg_iou``, low-quality matches kept) and balanced sampler, MONAI's default focal + smooth-L1 losses.
    Boxes are ``[x_min, y_min, x_max, y_max]`` along the image array's axes 0 and 1."""
    torchvision_parts.install()
    inner = network.module if hasattr(network, "module") else network
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=inner.feature_map_scales, base_anchor_shapes=[list(s) for s in base_anchor_shapes]
    )
    if anchors.num_anchors_per_location()[0] != inner.num_anchors:
        raise ValueError(f"{len(base_anchor_shapes)} anchor shapes but the network has {inner.num_anchors} anchors per location")
    det = RetinaNetDetector(network=RawHeads(network), anchor_generator=anchors, debug=False)
    det.set_regular_matcher(fg_iou, bg_iou, allow_low_quality_matches=True)
    det.set_balanced_sampler(batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction)
    det.set_box_selector_parameters(
        score_thresh=score_thresh,
        topk_candidates_per_level=topk_candidates_per_level,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )
    return det
