"""Raw last-layer attention and attention rollout, for :class:`AttributionViT` (batched).

Spec ``specs/explanations.md`` sections 1, 2 and 9.

- Raw attention: map = E_h A_L[:, :, 0, 1:] -> n x n (-> upsample) (-> per-sample min-max).
- Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020):
  A_bar_l = fuse_h A_l (mean / max / min), optional per-sample discard of the lowest entries,
  A_hat_l = (A_bar_l + I) / rowsum(A_bar_l + I) (row sums with ``keepdim``: the correct axis,
  never vit-explain's broadcast bug), J = A_hat_L ... A_hat_start, map = J[:, 0, 1:].
  ``variant="lgmvit_reference"`` reproduces LGM-ViT: the first factor is A_bar_start *without*
  the identity (and without renormalisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from custom_components.capture import ViTCapture
from custom_components.explain.base import Explainer, check_map_options, resize_maps
from custom_components.explain.gae import minmax_per_sample
from custom_components.networks.vit import patch_grid_side

__all__ = ["RawAttention", "AttentionRollout", "attention_rollout", "fuse_heads", "discard_lowest"]

HEAD_FUSIONS = ("mean", "max", "min")
ROLLOUT_VARIANTS = ("standard", "lgmvit_reference")


def _finish(
    token_map: torch.Tensor, upsample: str, normalize: str, out_size: Sequence[int] | None, eps: float
) -> torch.Tensor:
    """(B, N) patch scores -> (B, n, n) -> optional resize -> optional per-sample min-max."""
    side = patch_grid_side(token_map.shape[-1])
    maps = token_map.reshape(-1, side, side)
    if upsample != "none" and out_size is not None:
        maps = resize_maps(maps, out_size, mode=upsample)
    if normalize == "minmax":
        maps = minmax_per_sample(maps, eps)
    return maps


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, h, S, S) -> (B, S, S) by mean / max / min over heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero, per sample, the floor(S*S*ratio) lowest entries of (B, S, S), never the CLS->CLS entry.

    As vit-explain, the lowest entries are chosen among all S*S and flat index 0 is then spared
    (so one fewer entry is zeroed when it is among them); unlike vit-explain, every sample of the
    batch is processed, not only element 0.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    b, s, _ = fused.shape
    k = int(s * s * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, s * s)
    idx = flat.topk(k, dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).reshape(b, s, s)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    variant: str = "standard",
) -> torch.Tensor:
    """Joint attention J (B, S, S) of (B, h, S, S) attention maps given in forward (block) order."""
    if variant not in ROLLOUT_VARIANTS:
        raise ValueError(f"variant must be one of {ROLLOUT_VARIANTS}, got {variant!r}")
    if len(attentions) == 0:
        raise ValueError("attention rollout needs at least one attention map")
    first = attentions[0]
    s = first.shape[-1]
    dtype = torch.promote_types(first.dtype, torch.float32)
    eye = torch.eye(s, dtype=dtype, device=first.device)
    joint = None
    for i, attn in enumerate(attentions):
        fused = fuse_heads(attn.to(dtype), head_fusion)
        fused = discard_lowest(fused, discard_ratio)
        if i == 0 and variant == "lgmvit_reference":
            joint = fused
            continue
        a = fused + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else torch.bmm(a, joint)
    return joint


class RawAttention(Explainer[ViTCapture]):
    """Head-mean CLS attention of one block (default: the last) over the patches.

    Args:
        model: an :class:`~custom_components.networks.AttributionViT`.
        block: which block's attention (-1: last).
        upsample: ``"bilinear"`` (Chefer), ``"nearest"`` (ugent-korea's Kronecker x16) or ``"none"``.
        normalize: ``"minmax"`` per sample (default: maps in [0, 1]) or ``"none"`` (EAFEM-style).
    """

    needs_gradients = False

    def __init__(
        self,
        model: torch.nn.Module,
        block: int = -1,
        upsample: str = "bilinear",
        normalize: str = "minmax",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(model)
        check_map_options(upsample, normalize)
        self.block = int(block)
        self.upsample = upsample
        self.normalize = normalize
        self.eps = float(eps)

    def capture(self, detach: bool = False) -> ViTCapture:
        return ViTCapture(self.model, blocks=(self.block,), attention=True, tokens=False, detach=detach)

    def explain(
        self,
        logits: torch.Tensor,
        record: ViTCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        attn = record.attention(self.block)
        cls_row = attn.mean(dim=1)[:, 0, 1:]
        return _finish(cls_row, self.upsample, self.normalize, out_size, self.eps)


class AttentionRollout(Explainer[ViTCapture]):
    """Attention rollout of the CLS token over the patches (batched, per-sample discard).

    Args:
        model: an :class:`~custom_components.networks.AttributionViT`.
        head_fusion: ``"mean"`` (default), ``"max"`` (vit-explain CLI default) or ``"min"``.
        discard_ratio: fraction of the lowest fused entries zeroed per sample and block
            (CLS->CLS spared); 0 (default) disables it.
        start_layer: first block in the product (Chefer's evaluations: 1).
        variant: ``"standard"`` (identity at every layer) or ``"lgmvit_reference"`` (no identity
            at the first layer of the product).
        upsample, normalize: as :class:`RawAttention`.
    """

    needs_gradients = False

    def __init__(
        self,
        model: torch.nn.Module,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        start_layer: int = 0,
        variant: str = "standard",
        upsample: str = "bilinear",
        normalize: str = "minmax",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(model)
        check_map_options(upsample, normalize)
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        if variant not in ROLLOUT_VARIANTS:
            raise ValueError(f"variant must be one of {ROLLOUT_VARIANTS}, got {variant!r}")
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)
        self.start_layer = int(start_layer)
        self.variant = variant
        self.upsample = upsample
        self.normalize = normalize
        self.eps = float(eps)

    def capture(self, detach: bool = False) -> ViTCapture:
        return ViTCapture(self.model, blocks=None, attention=True, tokens=False, detach=detach)

    def rollout(self, record: ViTCapture) -> torch.Tensor:
        """The joint attention (B, S, S) of the recorded forward."""
        n_blocks = len(record.vit.blocks)
        indices = list(range(n_blocks))[self.start_layer :]
        if not indices:
            raise ValueError(f"start_layer {self.start_layer} leaves no block of {n_blocks}")
        return attention_rollout(
            [record.attention(i) for i in indices], self.head_fusion, self.discard_ratio, self.variant
        )

    def explain(
        self,
        logits: torch.Tensor,
        record: ViTCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        joint = self.rollout(record)
        return _finish(joint[:, 0, 1:], self.upsample, self.normalize, out_size, self.eps)
