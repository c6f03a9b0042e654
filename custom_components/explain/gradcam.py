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

Not implemented: ``aug_smooth`` (flip x multiply test-time augmentation).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from custom_components.capture import ViTCapture
from custom_components.explain.base import Explainer, check_map_options, resize_maps
from custom_components.explain.gae import minmax_per_sample, target_scalar
from custom_components.networks.vit import patch_grid_side

__all__ = ["ViTGradCAM", "GradCAMCapture", "eigen_projection"]


def eigen_projection(weighted: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, N): centred rows projected on the first right singular vector (get_2d_projection)."""
    centred = weighted - weighted.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return torch.einsum("bnc,bc->bn", centred, vh[:, 0, :])


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


class ViTGradCAM(Explainer):
    """Grad-CAM on the patch tokens of a ViT layer output.

    Args:
        model: an :class:`~custom_components.networks.AttributionViT`.
        layer: dotted path of the target module inside the ViT (default ``"blocks.-1.norm1"``);
            its output must be (B, 1 + N, D) with CLS first.
        target: ``"auto"``, ``"predicted"`` or a class index (as :class:`GAE`).
        eigen_smooth: first-principal-component projection instead of the channel sum.
        eigen_sign: ``"correlate"`` (sign fixed against the plain CAM) or ``"raw"``.
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
        self.upsample = upsample
        self.normalize = normalize
        self.create_graph = bool(create_graph)
        self.eps = float(eps)

    def capture(self, detach: bool = False) -> GradCAMCapture:
        return GradCAMCapture(self.model, self.layer, detach=False)

    def cam(self, logits: torch.Tensor, record: GradCAMCapture, target=None) -> torch.Tensor:
        """(B, N) Grad-CAM scores before ReLU, resizing and normalisation."""
        act = record.activation
        if act is None or not act.requires_grad or not logits.requires_grad:
            raise RuntimeError("ViTGradCAM needs a forward with gradients enabled inside ViTGradCAM.capture()")
        scalar = target_scalar(logits, target if self.target == "auto" else self.target)
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

    def explain(self, logits, record, target=None, out_size=None):
        cam = self.cam(logits, record, target).clamp(min=0)
        side = patch_grid_side(cam.shape[-1])
        maps = cam.reshape(-1, side, side)
        if self.upsample != "none" and out_size is not None:
            maps = resize_maps(maps, out_size, mode=self.upsample)
        if self.normalize == "minmax":
            maps = minmax_per_sample(maps, self.eps)
        return maps
