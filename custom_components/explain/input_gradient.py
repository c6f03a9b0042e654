"""Input-gradient saliency with double backprop, for the original GradMask.

Simpson et al., "GradMask: Reduce Overfitting by Regularizing Saliency", MIDL 2019 (spec
``specs/lgmvit.md`` section 8.2): the saliency g = d(target)/dx is computed with
``create_graph=True`` so that a loss on it trains the weights. RobustViT's GradMask baseline omits
``create_graph`` and its penalty never reaches the weights (quirk Q3); here the map is
``sum_c |g_c|`` (B, H, W) and stays differentiable w.r.t. every parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from custom_components.capture import ViTCapture
from custom_components.explain.base import Explainer, resize_maps
from custom_components.explain.gae import minmax_per_sample, target_scalar

__all__ = ["InputGradient", "InputCapture"]


class InputCapture(ViTCapture):
    """Records the network input (made a gradient-requiring leaf if it is not) at the patch embedding.

    All blocks run their explicit-softmax attention (the fused SDPA kernels have no double
    backward); nothing is stored for them (``detach=True`` keeps only views).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, blocks=None, attention=True, tokens=False, detach=True)
        self.inputs: torch.Tensor | None = None
        self._handles.append(self.vit.patch_embed.register_forward_pre_hook(self._input_hook))

    def _input_hook(self, module, args):
        x = args[0]
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)
            self.inputs = x
            return (x, *args[1:])
        self.inputs = x
        return None

    def clear(self) -> None:
        super().clear()
        self.inputs = None


class InputGradient(Explainer[InputCapture]):
    """Saliency ``sum_c |d(target)/dx_c|`` with the graph kept for double backprop.

    Args:
        model: an :class:`~custom_components.networks.AttributionViT`.
        target: ``"auto"`` (single logit: ``sum_b z_b``; multi-class: labels passed to
            :meth:`explain`, else the prediction), ``"predicted"`` or a class index.
        normalize: ``"none"`` (default: the raw magnitude, as GradMask) or per-sample ``"minmax"``.
        upsample: resize mode when ``out_size`` differs from the input size.
        create_graph: keep the saliency differentiable (True; False reproduces quirk Q3).
    """

    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        target: str | int = "auto",
        normalize: str = "none",
        upsample: str = "bilinear",
        create_graph: bool = True,
    ) -> None:
        super().__init__(model)
        if normalize not in ("none", "minmax"):
            raise ValueError(f"normalize must be 'none' or 'minmax', got {normalize!r}")
        self.target = target
        self.normalize = normalize
        self.upsample = upsample
        self.create_graph = bool(create_graph)

    def capture(self, detach: bool = False) -> InputCapture:
        return InputCapture(self.model)

    def explain(
        self,
        logits: torch.Tensor,
        record: InputCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        x = getattr(record, "inputs", None)
        if x is None or not x.requires_grad or not logits.requires_grad:
            raise RuntimeError("InputGradient needs a forward with gradients enabled inside InputGradient.capture()")
        scalar = target_scalar(logits, target if self.target == "auto" else self.target)
        (grad,) = torch.autograd.grad(scalar, x, retain_graph=True, create_graph=self.create_graph)
        maps = grad.abs().sum(dim=1)
        if out_size is not None:
            maps = resize_maps(maps, out_size, mode=self.upsample)
        if self.normalize == "minmax":
            maps = minmax_per_sample(maps)
        return maps
