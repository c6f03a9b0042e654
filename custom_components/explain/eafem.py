"""EAFEM: the embedding-attention fused explanation map of LGM-ViT.

Ben Itzhak et al., "Localization-Guided Supervision for Robust Medical Image Classification by
Vision Transformers", ECCV 2024 Workshops; spec ``specs/lgmvit.md`` section 3:

    M_att = up(mean_h A[:, :, 0, 1:]),  M_emb = up(mean_D T[:, 1:, :]),  E = beta M_att + (1 - beta) M_emb

with A the last block's post-softmax attention, T its output tokens (no norm), ``up`` bilinear
upsampling with ``align_corners=False``, and no normalisation of either map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from custom_components.capture import ViTCapture
from custom_components.explain.base import Explainer, resize_maps
from custom_components.networks.vit import patch_grid_side

__all__ = ["eafem_map", "EAFEM"]


def eafem_map(attn: torch.Tensor, tokens: torch.Tensor, beta: float, out_size: Sequence[int]) -> torch.Tensor:
    """Fuse the CLS attention row and the token channel-mean of one block into (B, H, W) maps.

    Args:
        attn: post-softmax attention (B, heads, 1 + N, 1 + N), CLS first.
        tokens: the same block's output tokens (B, 1 + N, D), CLS first.
        beta: weight of the attention map (0.85 BraTS20, 0.95 LiTS17).
        out_size: (H, W) of the returned maps.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, heads, S, S), got {list(attn.shape)}")
    if tokens.dim() != 3 or tokens.shape[:2] != (attn.shape[0], attn.shape[-1]):
        raise ValueError(f"tokens {list(tokens.shape)} do not match attention {list(attn.shape)}")
    side = patch_grid_side(attn.shape[-1] - 1)
    attention_map = attn[:, :, 0, 1:].mean(dim=1)
    embedding_map = tokens[:, 1:, :].mean(dim=-1)
    # Bilinear upsampling is linear, so fusing on the patch grid and upsampling once is exact.
    fused = beta * attention_map + (1.0 - beta) * embedding_map
    return resize_maps(fused.reshape(-1, side, side), out_size, mode="bilinear")


class EAFEM(Explainer[ViTCapture]):
    """EAFEM explainer of the last transformer block (class-agnostic: ``target`` is ignored).

    Args:
        model: an :class:`~custom_components.networks.AttributionViT`.
        beta: attention weight of the fusion.
        block: which block's attention and tokens to fuse (the reference uses the last, -1).
    """

    def __init__(self, model: torch.nn.Module, beta: float = 0.85, block: int = -1) -> None:
        super().__init__(model)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.block = block

    def capture(self, detach: bool = False) -> ViTCapture:
        return ViTCapture(self.model, blocks=(self.block,), attention=True, tokens=True, detach=detach)

    def explain(
        self,
        logits: torch.Tensor,
        record: ViTCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        attn, tokens = record.attention(self.block), record.token(self.block)
        if out_size is None:  # the patch grid itself
            out_size = (patch_grid_side(attn.shape[-1] - 1),) * 2
        return eafem_map(attn, tokens, self.beta, out_size)
