"""GAE: generic attention-model explainability (batched), for :class:`AttributionViT`.

Chefer, Gur, Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021; spec ``specs/explanations.md`` section 4 and the
competing methods of ``specs/lgmvit.md`` section 8.1:

    R <- I;  for l = start .. L:  A_bar_l = mean_h[(dy/dA_l * A_l)^+],  R <- R + A_bar_l R
    map = R[:, 0, 1:] -> n x n  (-> bilinear to the mask size) (-> per-sample min-max)

The batched target is ``sum_b y_{b, t_b}`` (a single-logit head: ``sum_b z_b``); samples do not
interact downstream of the attention (LayerNorm is per token), so the batched relevance equals
the per-sample one.

Gradients dy/dA are taken with ``retain_graph=True`` and, as in the references, **without**
``create_graph`` (quirk Q2): inside a training loss they are constants and the loss trains the
weights through A only. ``second_order=True`` differentiates through them as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from custom_components.capture import ViTCapture
from custom_components.explain.base import Explainer, check_map_options, resize_maps
from custom_components.networks.vit import patch_grid_side

__all__ = ["GAE", "gae_relevance", "target_scalar", "minmax_per_sample"]



def target_scalar(logits: torch.Tensor, target: torch.Tensor | int | str | None = None) -> torch.Tensor:
    """The scalar whose gradient explains every sample of the batch at once.

    Args:
        logits: (B,) or (B, C) network output.
        target: for a single-logit head (C == 1) ignored: ``sum_b z_b``. For C > 1: ``None`` or
            ``"predicted"`` uses each sample's argmax; an int uses that class for every sample;
            a tensor gives per-sample classes as indices (B,) / (B, 1) or one-hot / soft (B, C).
    """
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return logits.sum()
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B,) or (B, C), got {list(logits.shape)}")
    b, c = logits.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        index = logits.detach().argmax(dim=1)
    elif isinstance(target, int):
        index = torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor):
        t = target.to(logits.device)
        if t.dim() == 2 and t.shape[1] == c and c > 1:
            index = t.argmax(dim=1)
        else:
            index = t.reshape(b, -1)[:, 0].long()
    else:
        raise ValueError(f"unsupported target {target!r}")
    return logits.gather(1, index.view(b, 1)).sum()


def minmax_per_sample(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(m - min) / (max - min + eps) per sample over all but the first axis; a constant map gives zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).reshape(maps.shape)


def gae_relevance(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """R = prod_{l = L .. 1} (I + mean_h (grad_l * A_l)^+), batched: (B, S, S).

    ``attentions`` and ``gradients`` are (B, h, S, S) tensors in forward (block) order.
    """
    if len(attentions) == 0 or len(attentions) != len(gradients):
        raise ValueError("need one gradient per attention map and at least one block")
    first = attentions[0]
    b, _, s, _ = first.shape
    dtype = torch.promote_types(first.dtype, torch.float32)
    relevance = torch.eye(s, dtype=dtype, device=first.device).expand(b, s, s)
    for attn, grad in zip(attentions, gradients, strict=True):
        cam = (grad.to(dtype) * attn.to(dtype)).clamp(min=0).mean(dim=1)  # rule 5
        relevance = relevance + torch.bmm(cam, relevance)  # rule 6
    return relevance


class GAE(Explainer[ViTCapture]):
    """Batched GAE relevance of the CLS token over the patches.

    Args:
        model: an :class:`~custom_components.networks.AttributionViT` (DDP wrappers are looked through).
        target: ``"auto"``: single-logit head -> ``sum_b z_b``; multi-class -> ``sum_b y_{b, t_b}``
            with ``t_b`` from the ``target`` passed to :meth:`explain` (labels) or the prediction
            if none; ``"predicted"``: always the prediction; an int: that class.
        upsample: ``"bilinear"`` (``align_corners=False``) or ``"nearest"`` to ``out_size``, or
            ``"none"`` to keep the n x n token grid (RES). ``out_size=None`` also keeps the grid.
        normalize: ``"minmax"`` per sample, after upsampling (as the references), or ``"none"``.
        start_layer: first block that enters the product (0: all).
        second_order: differentiate through dy/dA too (``create_graph=True``; option of quirk Q2).
        eps: min-max epsilon.
    """

    needs_gradients = True

    def __init__(
        self,
        model: torch.nn.Module,
        target: str | int = "auto",
        upsample: str = "bilinear",
        normalize: str = "minmax",
        start_layer: int = 0,
        second_order: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(model)
        check_map_options(upsample, normalize, target)
        self.target = target
        self.upsample = upsample
        self.normalize = normalize
        self.start_layer = int(start_layer)
        self.second_order = bool(second_order)
        self.eps = float(eps)

    def capture(self, detach: bool = False) -> ViTCapture:
        # The attention must stay in the graph: GAE differentiates the logits w.r.t. it.
        return ViTCapture(self.model, blocks=None, attention=True, tokens=False, detach=False)

    def _target(self, logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if self.target == "auto":
            return target_scalar(logits, target)
        return target_scalar(logits, self.target)

    def relevance(self, logits: torch.Tensor, record: ViTCapture, target: torch.Tensor | None = None) -> torch.Tensor:
        """The full (B, S, S) relevance matrix of the forward recorded by ``record``."""
        n_blocks = len(record.vit.blocks)
        indices = list(range(n_blocks))[self.start_layer :]
        if not indices:
            raise ValueError(f"start_layer {self.start_layer} leaves no block of {n_blocks}")
        attentions = [record.attention(i) for i in indices]
        if not logits.requires_grad or not all(a.requires_grad for a in attentions):
            raise RuntimeError(
                "GAE needs the logits and attention in the autograd graph: run the forward with "
                "gradients enabled, inside GAE.capture()"
            )
        scalar = self._target(logits, target)
        grads = torch.autograd.grad(scalar, attentions, retain_graph=True, create_graph=self.second_order)
        return gae_relevance(attentions, grads)

    def explain(
        self,
        logits: torch.Tensor,
        record: ViTCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        relevance = self.relevance(logits, record, target)
        side = patch_grid_side(relevance.shape[-1] - 1)
        maps = relevance[:, 0, 1:].reshape(-1, side, side)
        if self.upsample != "none" and out_size is not None:
            maps = resize_maps(maps, out_size, mode=self.upsample)
        if self.normalize == "minmax":
            maps = minmax_per_sample(maps, self.eps)
        return maps
