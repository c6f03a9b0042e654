"""HAM: hierarchical attention network for chest X-ray abnormality localisation and diagnosis.

Ouyang et al., "Learning Hierarchical Attention for Weakly-supervised Chest X-Ray Abnormality
Localization and Diagnosis", IEEE TMI 40(10):2698-2710, 2021 (arXiv 2112.12349); spec ``specs/ham.md``
sections 2-3:

    e4 = ResNet(x)  (output stride 8 by default)
    F  = Dropout2d(ReLU(BN(Conv3x3(concat(e4, FA(e4))))))           fused features (B, 512, h, w)
    s  = LSE_r(F)                                                    (B, 512), r = 6
    o_a = w_a s,  o_c = W s                                          bias-free heads
    M  = ReLU(sum_k w_k F_k)  with detached head weights            raw class attention maps
    R  = sigmoid(cam_w (minmax(up(M)) - cam_sigma))                  refined maps at the input size

The network's ``forward`` returns the logits only, abnormality first: (B, 1 + num_classes). The maps
come from :meth:`HAMNet.class_attention` and, together with the logits of the same forward pass,
from :meth:`HAMNet.forward_with_maps` (what the HAM losses read).

Parameter names: the backbone uses torchvision's (MONAI's ResNet has the same ones) under
``backbone.``; the attention and head modules use the reference implementation's names
(``fa_layer``, ``cls_head``, ``anomaly_fc``, ``cls_fc``), so its released checkpoints map by prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck, get_inplanes

from custom_components.networks.pretrained import load_pretrained_resnet

__all__ = [
    "HAMNet",
    "HAMOutput",
    "DilatedResNet",
    "FABlock",
    "FAModule",
    "lse_pool",
    "minmax_cams",
    "refine_cams",
    "ham_network",
    "layer_config",
    "RESNET_ARCHS",
    "OUTPUT_STRIDES",
]

#: torchvision ResNet depths: block kind and blocks per layer (ResNeXt needs grouped blocks MONAI lacks)
RESNET_ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

#: (output stride, max-pooling) -> (stride of layer1..4, dilation of layer1..4): spec section 2 table,
#: reference ``build_model``; the dilations apply when ``dilation=True``, otherwise all are 1.
OUTPUT_STRIDES: dict[tuple[int, bool], tuple[tuple[int, ...], tuple[int, ...]]] = {
    (32, True): ((1, 2, 2, 2), (1, 1, 1, 2)),
    (16, True): ((1, 2, 2, 1), (1, 1, 1, 2)),
    (8, True): ((1, 2, 1, 1), (1, 1, 2, 4)),
    (32, False): ((2, 2, 2, 2), (1, 1, 1, 2)),
    (16, False): ((1, 2, 2, 2), (1, 1, 2, 4)),
    (8, False): ((1, 2, 2, 1), (1, 2, 4, 6)),
}


def layer_config(output_stride: int, pooling: bool = True, dilation: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Layer strides and dilations for an output stride (8, 16, 32) with or without the stem max-pool."""
    key = (int(output_stride), bool(pooling))
    if key not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    strides, dilations = OUTPUT_STRIDES[key]
    return strides, (dilations if dilation else (1, 1, 1, 1))


class DilatedResNet(ResNet):
    """2-D ImageNet-layout ResNet (MONAI's :class:`~monai.networks.nets.ResNet`) returning the last feature map.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, as torchvision lays it out
    (7x7 stride-2 stem, optional 3x3 stride-2 max-pool, 1x1-conv + BN shortcuts without bias, the
    stride on the bottleneck's 3x3 conv), with HAM's output-stride control (:data:`OUTPUT_STRIDES`):
    each layer gets its stride on its first block and its dilation on the 3x3 conv of **every** block
    (a basic block's first 3x3 only, as the reference's torchvision-derived block does).

    Args:
        arch: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"`` or ``"resnet152"``.
        output_stride: 8, 16 or 32 (input size / feature size).
        pooling: keep the stem max-pool (the layer strides compensate when it is off).
        dilation: dilate the later layers as the table says (else all dilations are 1).
        in_channels: input channels (3 for ImageNet weights; HAM repeats the grey channel).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        output_stride: int = 8,
        pooling: bool = True,
        dilation: bool = True,
        in_channels: int = 3,
    ) -> None:
        if arch not in RESNET_ARCHS:
            raise ValueError(f"arch must be one of {sorted(RESNET_ARCHS)}, got {arch!r}")
        kind, layers = RESNET_ARCHS[arch]
        # _make_layer reads these while ResNet.__init__ builds the layers (plain tuples may be set
        # before nn.Module.__init__)
        self.layer_strides, self.layer_dilations = layer_config(output_stride, pooling, dilation)
        super().__init__(
            block=kind,
            layers=list(layers),
            block_inplanes=get_inplanes(),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=not pooling,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
        self.arch = arch
        self.output_stride = int(output_stride)
        block = ResNetBlock if kind == "basic" else ResNetBottleneck
        self.out_channels = get_inplanes()[-1] * block.expansion

    def _make_layer(
        self,
        block: type[ResNetBlock | ResNetBottleneck],
        planes: int,
        blocks: int,
        spatial_dims: int,
        shortcut_type: str,
        stride: int = 1,
        norm: str | tuple = "batch",
    ) -> nn.Sequential:
        # ResNet.__init__ asks for strides (1, 2, 2, 2); the layer's own stride replaces it, so MONAI
        # creates the shortcut exactly when the stride or the width changes (as torchvision does).
        index = get_inplanes().index(planes)
        layer = super()._make_layer(
            block, planes, blocks, spatial_dims, shortcut_type, stride=self.layer_strides[index], norm=norm
        )
        d = self.layer_dilations[index]
        for b in layer:
            conv = b.conv1 if isinstance(b, ResNetBlock) else b.conv2
            conv.dilation, conv.padding = (d, d), (d, d)  # a dilated 3x3 keeps the size with padding = dilation
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class FABlock(nn.Module):
    """Foreground attention block of HAM (spec section 2), the identity at initialisation.

    Context: alpha = softmax_p(Conv1x1(x)), g = sum_p alpha(p) x(p), c = sigmoid(FC(ReLU(FC(g))));
    channel gating x1 = Conv1x1(x) * c; spatial gate u = Conv1x1_{C->1}(x1),
    z = sigmoid(BN(Conv3x3(u))); out = x + gamma * u * z (broadcast over channels), gamma = 0 at init.

    Args:
        channels: input (and output) channels.
        reduction: squeeze factor of the channel MLP.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(f"channels ({channels}) must be at least the reduction ({reduction})")
        self.conv1 = _conv1x1(channels, 1)
        self.channel_fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels, bias=False),
        )
        self.conv2 = _conv1x1(channels, channels)
        self.conv3 = _conv1x1(channels, 1)
        self.conv4 = _conv3x3(1, 1)
        self.bn4 = nn.BatchNorm2d(1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(self.conv1(x).flatten(2), dim=-1)  # (B, 1, N)
        context = torch.bmm(x.flatten(2), alpha.transpose(1, 2)).flatten(1)  # (B, C)
        gate = torch.sigmoid(self.channel_fc(context))
        u = self.conv3(self.conv2(x) * gate[:, :, None, None])  # (B, 1, H, W)
        z = torch.sigmoid(self.bn4(self.conv4(u)))
        return x + self.gamma * (u * z)


class FAModule(nn.Module):
    """Conv3x3 + BN -> :class:`FABlock` -> Conv3x3 + BN (no ReLUs), HAM's foreground attention branch.

    Args:
        in_channels: backbone channels (2048 for ResNet-50).
        out_channels: branch width (512 for ResNet-50: a quarter of the backbone's).
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.conva = nn.Sequential(_conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels))
        self.fa = FABlock(out_channels, reduction)
        self.convb = nn.Sequential(_conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convb(self.fa(self.conva(x)))


def lse_pool(x: torch.Tensor, r: float = 6.0) -> torch.Tensor:
    """Log-sum-exp pooling over all spatial positions: (B, C, *spatial) -> (B, C).

    s = (1/r) (log sum_p exp(r x(p)) - log N): the mean as r -> 0, the max as r -> inf, c for a
    constant map c; ds/dx(p) = softmax_p(r x)(p), which sums to 1 over p.
    """
    flat = x.flatten(2)
    return (torch.logsumexp(r * flat, dim=2) - math.log(float(flat.shape[2]))) / r


def minmax_cams(cams: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel min-max of (B, C, H, W) maps to [0, 1]; a constant map gives zeros.

    The reference's normalisation: (m - min) / (max - min), with a zero range replaced by 1e-5.
    """
    flat = cams.flatten(2)
    low = flat.min(dim=2, keepdim=True).values
    span = flat.max(dim=2, keepdim=True).values - low
    span = torch.where(span == 0, torch.full_like(span, 1e-5), span)
    return ((flat - low) / span).reshape(cams.shape)


def refine_cams(
    cams: torch.Tensor, size: Sequence[int], use_sigmoid: bool = True, w: float = 100.0, sigma: float = 0.4
) -> torch.Tensor:
    """HAM's refined attention maps R = sigmoid(w (minmax(up(M)) - sigma)), (B, C, h, w) -> (B, C, *size).

    ``up`` is bilinear with ``align_corners=True`` (skipped when the size already matches) and the
    min-max is :func:`minmax_cams`. With the defaults R >= 0.999 exactly where the min-maxed map is
    at least 0.4 + ln(999) / 100 (about 0.4691), HAM's localisation threshold. ``use_sigmoid=False``
    returns the min-maxed map itself.
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must be (B, C, h, w), got {list(cams.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(cams.shape[-2:]) != size:
        cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=True)
    cams = minmax_cams(cams)
    return torch.sigmoid(w * (cams - sigma)) if use_sigmoid else cams


class HAMOutput(NamedTuple):
    """Everything the HAM losses read, from one forward pass.

    ``logits`` (B, 1 + C) and the maps' channels are ordered alike: abnormality first, then the C
    findings. ``cams`` are the raw maps M (B, 1 + C, h, w) at the feature resolution (ReLU'd CAMs
    with detached head weights); ``refined`` are R (B, 1 + C, H, W) at the input size, or ``None``
    when not requested.
    """

    logits: torch.Tensor
    cams: torch.Tensor
    refined: torch.Tensor | None


class HAMNet(nn.Module):
    """HAM classifier with foreground attention, LSE pooling and class attention maps.

    Ouyang et al., IEEE TMI 2021 (see the module docstring); defaults of spec section 9
    (ResNet-50, output stride 8 with pooling and dilation, r = 6, cam_w = 100, cam_sigma = 0.4).

    Args:
        arch: backbone depth, see :data:`RESNET_ARCHS`.
        num_classes: findings of the disease head (14 for NIH ChestX-ray14).
        output_stride: 8, 16 or 32.
        pooling: the stem max-pool (``Using_pooling``).
        dilation: the dilated later layers (``Using_dilation``).
        in_channels: input channels.
        fusion_channels: width of the fused features F (512).
        dropout: Dropout2d rate on F (0.1).
        lse_r: LSE pooling sharpness r (6).
        cam_w, cam_sigma: slope and centre of the refinement sigmoid (100, 0.4).

    ``forward(x)`` returns the logits (B, 1 + num_classes): the abnormality logit o_a first, then the
    disease logits o_c.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 14,
        output_stride: int = 8,
        pooling: bool = True,
        dilation: bool = True,
        in_channels: int = 3,
        fusion_channels: int = 512,
        dropout: float = 0.1,
        lse_r: float = 6.0,
        cam_w: float = 100.0,
        cam_sigma: float = 0.4,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if lse_r <= 0:
            raise ValueError(f"lse_r must be positive, got {lse_r}")
        self.num_classes = int(num_classes)
        self.lse_r = float(lse_r)
        self.cam_w = float(cam_w)
        self.cam_sigma = float(cam_sigma)
        self.backbone = DilatedResNet(arch, output_stride, pooling, dilation, in_channels)
        channels = self.backbone.out_channels
        self.fa_layer = FAModule(channels, channels // 4)
        self.cls_head = nn.Sequential(
            _conv3x3(channels + channels // 4, fusion_channels),
            nn.BatchNorm2d(fusion_channels),
            nn.ReLU(),
            nn.Dropout2d(dropout),
        )
        self.anomaly_fc = nn.Linear(fusion_channels, 1, bias=False)
        self.cls_fc = nn.Linear(fusion_channels, num_classes, bias=False)
        # the reference's initialisation of every conv and norm outside the backbone (the backbone
        # already has it from MONAI); the linear heads keep PyTorch's default, as there
        for m in (*self.fa_layer.modules(), *self.cls_head.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def head_weight(self) -> torch.Tensor:
        """(1 + num_classes, fusion_channels): the abnormality head's row, then the disease head's."""
        return torch.cat([self.anomaly_fc.weight, self.cls_fc.weight], dim=0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused features F (B, fusion_channels, h, w) on which pooling and the maps are computed."""
        e4 = self.backbone(x)
        return self.cls_head(torch.cat([e4, self.fa_layer(e4)], dim=1))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """LSE pooling and the two bias-free heads: (B, 1 + num_classes)."""
        pooled = lse_pool(features, self.lse_r)
        return torch.cat([self.anomaly_fc(pooled), self.cls_fc(pooled)], dim=1)

    def cams_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Raw maps M (B, 1 + num_classes, h, w) = ReLU(head weights as 1x1 convolutions over F).

        The weights are detached, so a loss on the maps trains the features, not the heads.
        """
        weight = self.head_weight.detach()
        return F.relu(F.conv2d(features, weight[:, :, None, None]))

    def class_attention(self, x: torch.Tensor, refine: bool = True) -> torch.Tensor:
        """Maps of the abnormality and every finding, (B, 1 + num_classes, ...).

        ``refine=True``: R at the input size (:func:`refine_cams`); ``False``: raw M at the feature size.
        """
        cams = self.cams_from_features(self.features(x))
        return refine_cams(cams, x.shape[-2:], True, self.cam_w, self.cam_sigma) if refine else cams

    def forward_with_maps(self, x: torch.Tensor, refine: bool = True) -> HAMOutput:
        """Logits, raw maps and (if ``refine``) refined maps of one forward pass (:class:`HAMOutput`)."""
        features = self.features(x)
        cams = self.cams_from_features(features)
        refined = refine_cams(cams, x.shape[-2:], True, self.cam_w, self.cam_sigma) if refine else None
        return HAMOutput(self.logits_from_features(features), cams, refined)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def ham_network(pretrained_path: str | Path | None = None, **kwargs: Any) -> HAMNet:
    """Build a :class:`HAMNet` from ``kwargs``, then load ImageNet ResNet weights into its backbone.

    The bundles' ``network_def``. ``pretrained_path`` is a local torchvision-layout ResNet state dict
    (e.g. ``resnet50-19c8e357.pth``), loaded by
    :func:`~custom_components.networks.pretrained.load_pretrained_resnet` (every backbone weight must
    fit; ``fc.*`` is ignored); ``None`` or ``""`` keeps the module's own initialisation.
    """
    model = HAMNet(**kwargs)
    if pretrained_path:
        load_pretrained_resnet(model.backbone, pretrained_path)
    return model
