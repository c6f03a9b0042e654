"""The explanation methods of the HAM bundle, chosen by the configured network.

The HAM bundle's ``explain.json`` is added after ``train.json`` (and ``methods/baseline.json`` for
the CAM baseline), so the method set must follow the network the configs built, not a key the
user repeats: :func:`finding_explainers` looks at the network.

* HAM (:class:`~custom_components.networks.ham.HAMNet`; Ouyang et al., IEEE TMI 2021): ``ham``,
  its own class attention map (:class:`~custom_components.explain.ham_cam.HAMAttention`: CAM of
  the fused features with the detached head weights, bilinear ``align_corners=True``, min-max),
  and ``gradcam`` / ``gradcampp`` (Grad-CAM, Selvaraju et al. ICCV 2017; Grad-CAM++,
  Chattopadhyay et al. WACV 2018; :class:`~custom_components.explain.cnn_cam.CNNGradCAM`) on the
  same fused feature layer (``cls_head``). With LSE pooling Grad-CAM's channel weights are the head
  weights over hw (spec ``ham.md`` section 3), so ``gradcam`` differs from ``ham`` only in the
  resize convention; Grad-CAM++ weighs the positions differently.
* The CAM baseline (:class:`~custom_components.networks.cam_resnet.CAMResNet`; Wang et al.,
  ChestX-ray8, CVPR 2017): ``gradcam`` / ``gradcampp`` on the last backbone stage
  (``backbone.layer4``), the comparison of HAM's localisation table. Its CAM (Zhou et al., CVPR
  2016) is not a separate method: with global average pooling and a linear head Grad-CAM's channel
  weights are the head weights over hw, so after the ReLU and the min-max Grad-CAM *is* the CAM.

Both networks output the abnormality logit first: finding c is logit 1 + c
(:func:`finding_target_offset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from custom_components.explain.cnn_cam import CNNGradCAM
from custom_components.explain.ham_cam import HAMAttention
from custom_components.io import InputDataError
from custom_components.networks.cam_resnet import CAMResNet
from custom_components.networks.ham import HAMNet

__all__ = ["finding_explainers", "finding_target_offset", "network_kind"]


def _unwrap(network: nn.Module) -> nn.Module:
    while not isinstance(network, (HAMNet, CAMResNet)) and hasattr(network, "module"):
        network = network.module
    return network


def network_kind(network: nn.Module) -> str:
    """``"ham"`` or ``"baseline"`` (the CAM ResNet); a TypeError names any other network."""
    net = _unwrap(network)
    if isinstance(net, HAMNet):
        return "ham"
    if isinstance(net, CAMResNet):
        return "baseline"
    raise TypeError(f"{type(net).__name__} is neither HAMNet nor CAMResNet: the HAM bundle's explain methods do not apply")


def finding_target_offset(network: nn.Module) -> int:
    """Logit index of finding 0: 1 for both networks (the abnormality logit comes first)."""
    network_kind(network)  # refuses other networks
    return 1


def finding_explainers(network: nn.Module, methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Method name -> explainer (``attribute(images, target, out_size)``) for the configured network.

    Args:
        network: the bundle's network (HAMNet or CAMResNet; DDP wrappers are looked through).
        methods: a subset of the names to keep, in that order (``None``: all, see the module
            docstring); a name the network does not offer is an
            :class:`~custom_components.io.InputDataError` (a ``ValueError``).
    """
    net = _unwrap(network)
    kind = network_kind(net)
    layer = "cls_head" if kind == "ham" else "backbone.layer4"
    factories = {
        "ham": lambda: HAMAttention(net),
        "gradcam": lambda: CNNGradCAM(net, layer, "gradcam"),
        "gradcampp": lambda: CNNGradCAM(net, layer, "gradcam++"),
    }
    available = list(factories) if kind == "ham" else ["gradcam", "gradcampp"]
    chosen = available if methods is None else list(methods)
    unknown = [m for m in chosen if m not in available]
    if unknown or not chosen:  # a config option (--explain_methods): one clear line, not a traceback
        raise InputDataError("explain_methods", f"{unknown or chosen} not available for the {kind} network; "
                                                f"choose from {available}")
    return {m: factories[m]() for m in chosen}
