"""Grad-CAM for a CLS-readout ViT (Selvaraju et al., ICCV 2017), batched.

Spec ``specs/explanations.md`` section 6, with the definitions of ``jacobgil/pytorch-grad-cam``
(``BaseCAM``, ``get_2d_projection``): the target layer is ``blocks[-1].norm1`` (its output,
B x S x D; in a CLS-readout ViT the patch outputs of the last block never reach the head, so
their gradients vanish); CLS dropped; w_c = mean over patches of dy/dact_c;
cam = ReLU(sum_c w_c act_c) -> n x n -> upsample -> per-sample min-max.

``eigen_smooth``: the weighted activations (patches x channels, centred over patches) are
projected on their first right singular vector instead of summed over channels. The SVD sign is
arbitrary: ``eigen_sign="correlate"`` (default) flips it, per sample, so that the projection
correlates positively with the plain weighted sum; ``"raw"`` keeps torch's sign.

``aug_smooth`` (test-time augmentation, as ``BaseCAM.forward_augmentation_smoothing`` with
``ttach``): six passes over horizontal flip {off, on} x multiply {0.9, 1.0, 1.1} of the input;
each pass is post-processed as the library's ``scale_cam_image`` (ReLU -> per-sample
(m - min) / (max(m - min) + 1e-7) on the patch grid -> resize), flipped back, and the six maps
are averaged; the project's per-sample min-max is applied to the average (``normalize``). It needs
six forwards of augmented images, so it is available through :meth:`ViTGradCAM.attribute` only;
:meth:`ViTGradCAM.explain` on one recorded forward raises. When the target is the prediction, it is
taken from the un-augmented pass and held for all six (the library re-predicts on every augmented
copy, which can mix classes in one map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from custom_components.capture import ViTCapture
from custom_components.explain.base import Explainer, check_map_options, resize_maps
from custom_components.explain.gae import minmax_per_sample, target_scalar
from custom_components.explain.lrp import target_index
from custom_components.networks.vit import patch_grid_side

__all__ = ["ViTGradCAM", "GradCAMCapture", "eigen_projection", "scale_cam", "AUG_SMOOTH_PASSES"]

#: the six (horizontal flip, intensity factor) passes of aug_smooth (ttach HorizontalFlip x Multiply)
AUG_SMOOTH_PASSES: tuple[tuple[bool, float], ...] = tuple((f, m) for f in (False, True) for m in (0.9, 1.0, 1.1))
#: epsilon of pytorch-grad-cam's scale_cam_image
SCALE_CAM_EPS = 1e-7


def eigen_projection(weighted: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, N): centred rows projected on the first right singular vector (get_2d_projection)."""
    centred = weighted - weighted.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return torch.einsum("bnc,bc->bn", centred, vh[:, 0, :])


def scale_cam(cam: torch.Tensor, eps: float = SCALE_CAM_EPS) -> torch.Tensor:
    """Per-sample (m - min) / (max(m - min) + eps) over all but the first axis (``scale_cam_image``).

    Unlike :func:`~custom_components.explain.gae.minmax_per_sample` the epsilon is added to the
    range itself; a constant map gives zeros either way.
    """
    flat = cam.reshape(cam.shape[0], -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (flat.max(dim=1, keepdim=True).values + eps)).reshape(cam.shape)


class GradCAMCapture(ViTCapture):
    """Records the (non-detached) output of a layer of the ViT (default ``blocks[-1].norm1``)."""

    def __init__(self, model: nn.Module, layer: str = "blocks.-1.norm1", detach: bool = False) -> None:
        super().__init__(model, blocks=(), attention=False, tokens=False, detach=detach)
        self.activation: torch.Tensor | None = None
        module = self.vit
        for part in layer.split("."):
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module, args, output):
        self.activation = output

    def clear(self) -> None:
        super().clear()
        self.activation = None


class ViTGradCAM(Explainer[GradCAMCapture]):
    """Grad-CAM on the patch tokens of a ViT layer output.

    Args:
        model: an :class:`~custom_components.networks.AttributionViT`.
        layer: dotted path of the target module inside the ViT (default ``"blocks.-1.norm1"``);
            its output must be (B, 1 + N, D) with CLS first.
        target: ``"auto"``, ``"predicted"`` or a class index (as :class:`GAE`).
        eigen_smooth: first-principal-component projection instead of the channel sum.
        eigen_sign: ``"correlate"`` (sign fixed against the plain CAM) or ``"raw"``.
        aug_smooth: average six flip x multiply passes (see the module docstring); only through
            :meth:`attribute`, each pass a batched forward (run one after another: the batch
            already fills the device, and six stacked copies would hold six times the graph).
            The averaged map is detached unless ``create_graph`` (which then keeps six graphs).
        upsample: ``"bilinear"``, ``"nearest"`` or ``"none"``. normalize: ``"minmax"`` or ``"none"``
            (``"none"``: the ReLU'd weighted sum at token resolution, as Captum's ``LayerGradCam``).
        create_graph: keep the map differentiable w.r.t. the weights (double backprop).
    """

    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        layer: str = "blocks.-1.norm1",
        target: str | int = "auto",
        eigen_smooth: bool = False,
        eigen_sign: str = "correlate",
        aug_smooth: bool = False,
        upsample: str = "bilinear",
        normalize: str = "minmax",
        create_graph: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(model)
        check_map_options(upsample, normalize, target)
        if eigen_sign not in ("correlate", "raw"):
            raise ValueError(f"eigen_sign must be 'correlate' or 'raw', got {eigen_sign!r}")
        self.layer = layer
        self.target = target
        self.eigen_smooth = bool(eigen_smooth)
        self.eigen_sign = eigen_sign
        self.aug_smooth = bool(aug_smooth)
        self.upsample = upsample
        self.normalize = normalize
        self.create_graph = bool(create_graph)
        self.eps = float(eps)

    def capture(self, detach: bool = False) -> GradCAMCapture:
        return GradCAMCapture(self.model, self.layer, detach=False)

    def cam(self, logits: torch.Tensor, record: GradCAMCapture, target: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) Grad-CAM scores before ReLU, resizing and normalisation."""
        return self._cam(logits, record, target if self.target == "auto" else self.target)

    def _cam(self, logits: torch.Tensor, record: GradCAMCapture, target: torch.Tensor | int | str | None) -> torch.Tensor:
        act = record.activation
        if act is None or not act.requires_grad or not logits.requires_grad:
            raise RuntimeError("ViTGradCAM needs a forward with gradients enabled inside ViTGradCAM.capture()")
        scalar = target_scalar(logits, target)
        (grad,) = torch.autograd.grad(scalar, act, retain_graph=True, create_graph=self.create_graph)
        act, grad = act[:, 1:], grad[:, 1:]
        weights = grad.mean(dim=1, keepdim=True)  # (B, 1, D)
        weighted = weights * act
        plain = weighted.sum(dim=-1)
        if not self.eigen_smooth:
            return plain
        proj = eigen_projection(weighted)
        if self.eigen_sign == "correlate":
            corr = ((proj - proj.mean(1, keepdim=True)) * (plain - plain.mean(1, keepdim=True))).sum(1, keepdim=True)
            proj = torch.where(corr < 0, -proj, proj)
        return proj

    def explain(
        self,
        logits: torch.Tensor,
        record: GradCAMCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        if self.aug_smooth:
            raise RuntimeError(
                "ViTGradCAM(aug_smooth=True) needs six forwards of augmented images, not one recorded "
                "forward: call attribute(images) (or use aug_smooth=False here)"
            )
        cam = self.cam(logits, record, target).clamp(min=0)
        maps = self._grid(cam)
        if self.upsample != "none" and out_size is not None:
            maps = resize_maps(maps, out_size, mode=self.upsample)
        if self.normalize == "minmax":
            maps = minmax_per_sample(maps, self.eps)
        return maps

    @staticmethod
    def _grid(cam: torch.Tensor) -> torch.Tensor:
        side = patch_grid_side(cam.shape[-1])
        return cam.reshape(-1, side, side)

    def attribute(
        self, images: torch.Tensor, target: torch.Tensor | None = None, out_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """One map per image, (B, H, W); with ``aug_smooth`` the average of the six augmented passes."""
        if not self.aug_smooth:
            return super().attribute(images, target=target, out_size=out_size)
        out_size = tuple(images.shape[-2:]) if out_size is None else out_size
        passes = sorted(AUG_SMOOTH_PASSES, key=lambda p: (p[0], p[1] != 1.0))  # un-augmented pass first
        total, index = None, None
        for flip, factor in passes:
            maps, index = self._aug_pass(images, flip, factor, target, index, out_size)
            total = maps if total is None else total + maps
        maps = total / len(passes)
        if self.normalize == "minmax":
            maps = minmax_per_sample(maps, self.eps)
        return maps

    def _aug_pass(
        self,
        images: torch.Tensor,
        flip: bool,
        factor: float,
        target: torch.Tensor | None,
        index: torch.Tensor | None,
        out_size: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One de-augmented, scaled pass map (B, H, W) and the target index (resolved on the first pass)."""
        augmented = images.flip(-1) if flip else images
        if factor != 1.0:
            augmented = augmented * factor
        with self.capture() as record:
            logits = self.model(augmented)
            if index is None:  # resolve the target once, on the un-augmented images
                tgt = target if self.target == "auto" else self.target
                index = target_index(logits.reshape(logits.shape[0], -1), tgt)
            cam = self._cam(logits, record, index)
        if not self.create_graph:
            # a pass map references its whole forward graph: six of them would hold six graphs
            cam = cam.detach()
        maps = scale_cam(self._grid(cam.clamp(min=0)))
        if self.upsample != "none":
            maps = resize_maps(maps, out_size, mode=self.upsample)
        if flip:  # de-augment: flip the map back (the resize commutes with the flip)
            maps = maps.flip(-1)
        return maps, index
