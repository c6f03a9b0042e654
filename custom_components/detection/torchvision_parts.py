"""The torchvision pieces MONAI's RetinaNet reaches for, written here because torchvision does not
import beside this torch build.

MONAI 1.6.1 takes four names from torchvision through ``optional_import``:

- ``retinanet_detector.Matcher`` and ``retinanet_detector.BalancedPositiveNegativeSampler``
  (``torchvision.models.detection._utils``): the detector builds them in ``set_regular_matcher`` /
  ``set_balanced_sampler`` and dispatches on ``isinstance`` against these module attributes;
- ``backbone_fpn_utils.torchvision_models._utils.IntermediateLayerGetter`` (``BackboneWithFPN``);
- ``retinanet_network._validate_trainable_layers`` (``resnet_fpn_feature_extractor``).

:func:`install` puts the replacements below at exactly those module attributes (idempotent). The
behaviour follows torchvision's documented semantics; the code is written from that description,
not copied.

:func:`resnet_fpn_feature_extractor` builds the ResNet-FPN feature extractor from MONAI's
:class:`~monai.networks.blocks.feature_pyramid_network.FeaturePyramidNetwork` without going through
``BackboneWithFPN`` at all, so the detector's network needs no patched module to be built.
"""

from __future__ import annotations

import types
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torch import nn

__all__ = [
    "Matcher",
    "BalancedPositiveNegativeSampler",
    "IntermediateLayerGetter",
    "validate_trainable_layers",
    "ResNetFPN",
    "resnet_fpn_feature_extractor",
    "install",
]


class Matcher:
    """Assign to every prediction (column) the ground-truth box (row) it overlaps most.

    ``match_quality_matrix`` is ``(M ground truths, N predictions)``. The result is an int64 vector of
    length N: the index of the best ground truth when its quality is ``>= high_threshold``,
    :attr:`BELOW_LOW_THRESHOLD` (-1) when the best quality is ``< low_threshold`` and
    :attr:`BETWEEN_THRESHOLDS` (-2) in between. With ``allow_low_quality_matches`` every ground truth
    also keeps the predictions that reach its own highest quality (ties included), each such
    prediction then pointing at its best ground truth, whatever the thresholds say.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        if match_quality_matrix.numel() == 0:
            if match_quality_matrix.shape[0] == 0:
                raise ValueError("No ground-truth boxes available for one of the images during training")
            raise ValueError("No proposal boxes available for one of the images during training")
        best_quality, best_gt = match_quality_matrix.max(dim=0)
        matches = best_gt.clone()
        matches[best_quality < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (best_quality >= self.low_threshold) & (best_quality < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            per_gt_best = match_quality_matrix.max(dim=1).values
            keep = (match_quality_matrix == per_gt_best[:, None]).any(dim=0)
            matches[keep] = best_gt[keep]
        return matches


class BalancedPositiveNegativeSampler:
    """Draw at most ``batch_size_per_image`` elements per image, a ``positive_fraction`` of them positive.

    Input: one tensor per image with values ``>= 1`` (positive), ``0`` (negative) and ``-1``
    (ignored). Positives are capped at ``int(batch_size_per_image * positive_fraction)``; negatives
    fill the rest of the budget as far as they go. Returns two lists of uint8 masks (positives,
    negatives), each shaped like its input, drawn uniformly without replacement.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __call__(self, matched_idxs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pos_masks, neg_masks = [], []
        for labels in matched_idxs:
            positive = torch.nonzero(labels >= 1).flatten()
            negative = torch.nonzero(labels == 0).flatten()
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            chosen_pos = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
            chosen_neg = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels, dtype=torch.uint8)
            neg_mask = torch.zeros_like(labels, dtype=torch.uint8)
            pos_mask[chosen_pos] = 1
            neg_mask[chosen_neg] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


class IntermediateLayerGetter(nn.ModuleDict):
    """Run a model's direct children in registration order and return the outputs of some of them.

    ``return_layers`` maps child names to output names; children after the last requested one are
    dropped (so their parameters are not part of this module). The model's own ``forward`` is not
    used: this only works for models whose children are applied one after another.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        names = [name for name, _ in model.named_children()]
        if not set(return_layers).issubset(names):
            raise ValueError(f"return_layers are not present in model: {sorted(set(return_layers) - set(names))}")
        wanted = dict(return_layers)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        remaining = set(wanted)
        for name, module in model.named_children():
            layers[name] = module
            remaining.discard(name)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = wanted

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def validate_trainable_layers(
    is_trained: bool, trainable_backbone_layers: int | None, max_value: int, default_value: int
) -> int:
    """Number of trainable backbone layers: all of them for an untrained backbone (a warning when a
    value was passed), ``default_value`` when ``None``, else the value checked to lie in ``[0, max_value]``."""
    if not is_trained:
        if trainable_backbone_layers is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if neither pretrained nor pretrained_backbone "
                f"have been set to True, falling back to trainable_backbone_layers={max_value} so that all layers "
                "are trainable",
                stacklevel=2,
            )
        trainable_backbone_layers = max_value
    if trainable_backbone_layers is None:
        trainable_backbone_layers = default_value
    if not 0 <= trainable_backbone_layers <= max_value:
        raise ValueError(f"Trainable backbone layers should be in the range [0,{max_value}], got {trainable_backbone_layers}")
    return int(trainable_backbone_layers)


class ResNetFPN(nn.Module):
    """ResNet body (:class:`IntermediateLayerGetter`) followed by MONAI's FeaturePyramidNetwork.

    ``forward`` returns an ordered dict of feature maps, highest resolution first, each with
    ``out_channels`` channels (the attribute MONAI's RetinaNet reads).
    """

    def __init__(
        self,
        backbone: nn.Module,
        return_layers: dict[str, str],
        in_channels_list: list[int],
        out_channels: int,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(backbone, return_layers)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=spatial_dims,
            in_channels_list=in_channels_list,
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(spatial_dims),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def resnet_fpn_feature_extractor(
    backbone: nn.Module,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    trainable_layers: int = 5,
    out_channels: int = 256,
    spatial_dims: int = 2,
) -> ResNetFPN:
    """ResNet-FPN from a torchvision-layout ResNet (MONAI's ResNet: ``conv1, bn1, act, maxpool, layer1..4``).

    ``returned_layers`` (each in 1..4) feed the FPN; one extra max-pooled level is added, so there
    are ``len(returned_layers) + 1`` feature maps. The channel count of ``layerK`` is
    ``backbone.in_planes // 8 * 2**(K - 1)`` (``in_planes`` is the last layer's width after
    construction: 2048 for ResNet-50, 512 for ResNet-18). The first ``5 - trainable_layers`` stages
    (from the stem) are frozen.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    returned_layers = [int(k) for k in returned_layers]
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must lie in [1, 4], got {returned_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in backbone.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    stage2 = backbone.in_planes // 8
    in_channels_list = [stage2 * 2 ** (k - 1) for k in returned_layers]
    return ResNetFPN(backbone, return_layers, in_channels_list, out_channels, spatial_dims)


def install() -> None:
    """Put the replacements where MONAI's detection modules look them up (module attributes).

    Safe to call repeatedly. Done unconditionally (no attempt to import torchvision, which fails
    beside this torch build): construction and the ``isinstance`` dispatch both read these
    attributes at call time, so they stay consistent.
    """
    from monai.apps.detection.networks import retinanet_detector, retinanet_network
    from monai.networks.blocks import backbone_fpn_utils

    retinanet_detector.Matcher = Matcher
    retinanet_detector.BalancedPositiveNegativeSampler = BalancedPositiveNegativeSampler
    retinanet_network._validate_trainable_layers = validate_trainable_layers
    backbone_fpn_utils.torchvision_models = types.SimpleNamespace(
        _utils=types.SimpleNamespace(IntermediateLayerGetter=IntermediateLayerGetter)
    )
