"""Grad-CAM and Grad-CAM++ for CNNs, batched, on top of MONAI's ``monai.visualize``.

Grad-CAM (Selvaraju et al., ICCV 2017): cam = ReLU(sum_c w_c A_c), w_c = mean over positions of
dy_t/dA_c. Grad-CAM++ (Chattopadhyay et al., WACV 2018): w_c = sum over positions of
alpha * ReLU(exp(y_t) dy_t/dA), alpha = g^2 / (2 g^2 + sum(A g^3)), the exponential form that MONAI
implements. The map computation itself is MONAI's (``GradCAM.compute_map``); what this module
changes, and why:

* **Per-sample targets.** MONAI's ``ModelWithHooks.class_score`` indexes ``logits[:, class_idx]``;
  with ``class_idx=None`` (argmax) and a batch it receives a (B,) index tensor and sums a B x B
  block, mixing samples. Here the score is ``logits.gather(1, targets)`` (B,).
* **Grad-CAM++ with batch > 1.** MONAI multiplies ``score.exp()`` of shape (B,) with the gradient
  (B, C, H, W), which broadcasts along the last spatial axis instead of the batch (wrong maps, or a
  shape error when W != B). Here the score is reshaped to (B, 1, ..., 1) first.
* **Hooks are released.** MONAI registers its hooks for the lifetime of the model; here they are
  registered with handles that :meth:`CNNGradCAM.release` (or the context manager) removes. While
  they live, ``inplace`` is off in every module (an in-place op after the target layer breaks the
  full backward hook; MONAI only guards the target layer itself) and it is restored on release.
* **No inverted maps.** MONAI's default post-processing maps (min, max) to (1, 0); the maps here
  are resized (bilinear by default) and min-max normalised per sample to (0, 1), or left raw.

Side effect inherited from MONAI: each call zeroes the model's parameter gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.visualize import GradCAM, GradCAMpp, ModelWithHooks

from custom_components.explain.gae import minmax_per_sample

__all__ = ["CNNGradCAM", "BatchModelWithHooks", "BatchGradCAMpp"]


class BatchModelWithHooks(ModelWithHooks):
    """MONAI's ``ModelWithHooks`` with a per-sample target score and removable hooks."""

    def __init__(self, model: nn.Module, target_layer: str) -> None:
        super().__init__(model, target_layer, register_forward=False, register_backward=False)
        modules = dict(model.named_modules())
        if target_layer not in modules:
            raise ValueError(f"layer {target_layer!r} not found in {type(model).__name__}")
        layer = modules[target_layer]
        # A full backward hook fails when its module's output is modified in place, by the module
        # itself (MONAI switches that off) or by the next one (e.g. ReLU(inplace=True) after a conv):
        # in-place is switched off in every module while the hooks live, and restored on release.
        self._inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
        for m in self._inplace:
            m.inplace = False
        self._handles = [
            layer.register_forward_hook(self.forward_hook(target_layer)),
            layer.register_full_backward_hook(self.backward_hook(target_layer)),
        ]
        self.register_forward = self.register_backward = True

    def class_score(self, logits: torch.Tensor, class_idx: torch.Tensor | int) -> torch.Tensor:
        logits = logits.reshape(logits.shape[0], -1)
        if isinstance(class_idx, torch.Tensor):
            index = class_idx.to(logits.device).reshape(-1, 1).long()
            if index.shape[0] != logits.shape[0]:
                raise ValueError(f"{index.shape[0]} targets for a batch of {logits.shape[0]}")
            return logits.gather(1, index)[:, 0]
        return logits[:, int(class_idx)]

    def release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._inplace:
            m.inplace = True
        self._inplace = []
        self.activations.clear()
        self.gradients.clear()


class BatchGradCAMpp(GradCAMpp):
    """MONAI's Grad-CAM++ with the exponential score broadcast per sample."""

    def compute_map(  # type: ignore[override]  # GradCAMpp's signature; MONAI's own subclasses ignore it too
        self,
        x: torch.Tensor,
        class_idx: torch.Tensor | int | None = None,
        retain_graph: bool = False,
        layer_idx: int = -1,
        **kwargs: Any,
    ) -> torch.Tensor:
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        acti, grad = acti[layer_idx], grad[layer_idx]
        b, c, *spatial = grad.shape
        ones = [1] * len(spatial)
        alpha_nr = grad.pow(2)
        alpha_dr = alpha_nr.mul(2) + acti.mul(grad.pow(3)).view(b, c, -1).sum(-1).view(b, c, *ones)
        alpha_dr = torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr))
        alpha = alpha_nr.div(alpha_dr + 1e-7)
        score = self.nn_module.score.reshape(b, 1, *ones)
        relu_grad = F.relu(score.exp() * grad)
        weights = (alpha * relu_grad).view(b, c, -1).sum(-1).view(b, c, *ones)
        return F.relu((weights * acti).sum(1, keepdim=True))


class CNNGradCAM:
    """Batched Grad-CAM / Grad-CAM++ of a CNN layer, Captum-style ``attribute()``.

    Args:
        model: the CNN (2-D or 3-D); logits (B, C).
        layer: name of the target module in ``model.named_modules()`` (e.g. ``"layer4"`` for
            MONAI's ResNet).
        variant: ``"gradcam"`` or ``"gradcam++"``.
        upsample: ``"bilinear"`` (trilinear for volumes), ``"nearest"`` or ``"none"``.
        normalize: ``"minmax"`` (per sample, to [0, 1]) or ``"none"``.

    Use as a context manager, or call :meth:`release`, to remove the hooks.
    """

    def __init__(self, model: nn.Module, layer: str, variant: str = "gradcam", upsample: str = "bilinear",
                 normalize: str = "minmax") -> None:
        if variant not in ("gradcam", "gradcam++"):
            raise ValueError(f"variant must be 'gradcam' or 'gradcam++', got {variant!r}")
        if upsample not in ("bilinear", "nearest", "none"):
            raise ValueError(f"upsample must be 'bilinear', 'nearest' or 'none', got {upsample!r}")
        if normalize not in ("minmax", "none"):
            raise ValueError(f"normalize must be 'minmax' or 'none', got {normalize!r}")
        self.model = model
        self.hooked = BatchModelWithHooks(model, layer)
        cam_class = GradCAM if variant == "gradcam" else BatchGradCAMpp
        self.cam = cam_class(nn_module=self.hooked, target_layers=layer)
        self.upsample = upsample
        self.normalize = normalize

    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None,
                  out_size: Sequence[int] | None = None) -> torch.Tensor:
        """Maps (B, *spatial) for class ``target`` (int, per-sample (B,) tensor, or ``None`` = prediction)."""
        with torch.enable_grad():
            raw = self.cam.compute_map(images, class_idx=target)[:, 0]
        if self.upsample != "none":
            size = tuple(images.shape[2:]) if out_size is None else tuple(int(s) for s in out_size)
            mode = self.upsample if self.upsample == "nearest" else ("bilinear" if raw.dim() == 3 else "trilinear")
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            raw = F.interpolate(raw.unsqueeze(1), size=size, mode=mode, **kwargs)[:, 0]
        return minmax_per_sample(raw) if self.normalize == "minmax" else raw

    def release(self) -> None:
        self.hooked.release()

    def __enter__(self) -> CNNGradCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
