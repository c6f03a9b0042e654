"""Attribution-ready Vision Transformer.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021; with the LGM-ViT backbone options of Ben Itzhak et al., "Localization-Guided Supervision
for Robust Medical Image Classification by Vision Transformers", ECCV 2024 Workshops
(spec: ``specs/lgmvit.md`` section 2).

``forward`` returns the logits only (one tensor), so MONAI's verify/export tools, Ignite trainers
and losses see an ordinary classifier. Attention probabilities, tokens and their gradients are
recorded by :class:`custom_components.capture.ViTCapture`, which hooks the ``attn_probs``
identity of each :class:`Attention` module.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.attn.qkv`` ...), so timm / DINO / MAE checkpoints load through
:func:`custom_components.networks.pretrained.load_pretrained_vit` and give timm's logits;
:func:`attribution_vit` (the bundles' ``network_def``) builds the module and loads such a checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pretrained import load_pretrained_vit

__all__ = ["AttributionViT", "attribution_vit", "Attention", "Block", "sincos_2d_pos_embed", "lgmvit_reference_pos_embed"]

POS_EMBED_TYPES = ("learnable", "sincos", "lgmvit_reference", "none")


def sincos_2d_pos_embed(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine encoding of shape (grid_size**2, dim), row-major over patches.

    The first ``dim/2`` channels encode the row, the last ``dim/2`` the column; each half is
    ``[sin(p * w_j), cos(p * w_j)]`` with ``w_j = temperature ** (-j / (dim/4))``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos position embedding needs hidden_size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def lgmvit_reference_pos_embed(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The reference LGM-ViT positional encoding, quirk Q1 of ``specs/lgmvit.md`` (shape (N, dim)).

    The reference sine module reads a (B, D, gh, gw) tensor as if it were (B, x, y, ch): the patch at
    (row r, column c) receives ``e_k = sin(k * w_{c//2})`` for even c and ``cos(k * w_{c//2})`` for
    odd c, k = 0 .. dim-1, with ``w_j = temperature ** (-2j / (dim/2))``. Only ``grid_size``
    distinct vectors exist and rows are not encoded. Kept only to reproduce published numbers.
    """
    half = dim // 2
    k = torch.arange(dim, dtype=torch.float64)
    cols = []
    for c in range(grid_size):
        w = temperature ** (-2.0 * (c // 2) / half)
        cols.append(torch.sin(k * w) if c % 2 == 0 else torch.cos(k * w))
    per_column = torch.stack(cols)  # (gw, dim)
    return per_column.repeat(grid_size, 1).float()  # row-major: identical for every row


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., ECCV 2016)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention whose probabilities pass through the ``attn_probs`` identity.

    When no capture records this block, the fused ``scaled_dot_product_attention`` kernel runs;
    :class:`~custom_components.capture.ViTCapture` sets ``record_attention`` so that the explicit
    softmax path runs and its forward hook on ``attn_probs`` sees the (B, heads, S, S) probabilities.
    Both paths compute the same function.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop_p = float(attn_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_probs = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record_attention = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.record_attention:
            attn = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
            attn = self.attn_probs(attn)
            out = torch.matmul(self.attn_drop(attn), v)
        else:
            p = self.attn_drop_p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, s, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (timm layout: ``norm1, attn, norm2, mlp``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool,
        norm_eps: float,
        dropout_rate: float,
        attn_dropout: float,
        drop_path: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_dropout)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=dropout_rate)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; ``patch_norm`` adds the reference's BatchNorm2d."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, patch_norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.BatchNorm2d(dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)).flatten(2).transpose(1, 2)


class AttributionViT(nn.Module):
    """ViT slice classifier whose forward returns logits and whose internals are hookable.

    Args:
        in_channels: image channels (3 for the LGM-ViT T1/T2/FLAIR stack).
        img_size: square input size; the patch grid is ``img_size // patch_size``.
        patch_size: patch side (16 for ViT-B/16).
        num_classes: number of logits (1: binary with BCE, as LGM-ViT).
        hidden_size, num_layers, num_heads, mlp_dim: transformer size (ViT-B: 768, 12, 12, 3072).
        qkv_bias: bias in the qkv projection (timm: True; reference LGM-ViT: False).
        norm_eps: LayerNorm epsilon (timm: 1e-6; reference: 1e-5).
        pos_embed: ``"learnable"`` (timm: over CLS + patches), ``"sincos"`` (fixed 2-D, patches
            only; the project's clean default), ``"lgmvit_reference"`` (quirk Q1), ``"none"``.
        patch_norm: BatchNorm2d after the patch projection (reference LGM-ViT).
        final_norm: LayerNorm over the token sequence after the last block (timm: True).
        head_norm: LayerNorm on the CLS token before the linear head (reference: True).
        dropout_rate: dropout after each MLP linear layer. attn_dropout: on attention probabilities.
        drop_path_rate: stochastic depth; ``drop_path_uniform`` uses the same rate in every block
            (reference) instead of timm's linear ramp.
        faithful: reproduce the reference LGM-ViT backbone (``sagibe/LGMViT``,
            ``models/lgmvit.py``): patch BatchNorm, no qkv bias, eps 1e-5, Q1 positional encoding,
            no final norm, LayerNorm + Linear head, dropout 0.1, uniform drop path 0.1, zero CLS
            init and PyTorch default init. It overrides the corresponding arguments.

    Pretrained weights: :func:`attribution_vit` (``pretrained_path``) or
    :func:`~custom_components.networks.pretrained.load_pretrained_vit` on a built module.
    """

    def __init__(
        self,
        in_channels: int = 3,
        img_size: int = 256,
        patch_size: int = 16,
        num_classes: int = 1,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        pos_embed: str = "sincos",
        patch_norm: bool = False,
        final_norm: bool = True,
        head_norm: bool = False,
        dropout_rate: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        faithful: bool = False,
    ) -> None:
        super().__init__()
        if faithful:
            qkv_bias, norm_eps, pos_embed = False, 1e-5, "lgmvit_reference"
            patch_norm, final_norm, head_norm = True, False, True
            dropout_rate, drop_path_rate, drop_path_uniform = 0.1, 0.1, True
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_TYPES}, got {pos_embed!r}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_channels = in_channels
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.pos_embed_type = pos_embed
        self.faithful = faithful

        self.patch_embed = PatchEmbed(in_channels, hidden_size, patch_size, patch_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        # Exactly one of the two is used; both exist so TorchScript sees fixed attributes.
        if pos_embed == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, hidden_size))
        else:
            self.register_parameter("pos_embed", None)
        if pos_embed == "sincos":
            fixed = sincos_2d_pos_embed(self.grid_size, hidden_size)
        elif pos_embed == "lgmvit_reference":
            fixed = lgmvit_reference_pos_embed(self.grid_size, hidden_size)
        else:
            fixed = torch.zeros(self.num_patches, hidden_size)
        self.register_buffer("patch_pos_embed", fixed.unsqueeze(0), persistent=False)

        if drop_path_uniform:
            rates = [drop_path_rate] * num_layers
        else:
            rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.blocks = nn.ModuleList(
            [
                Block(hidden_size, num_heads, mlp_dim, qkv_bias, norm_eps, dropout_rate, attn_dropout, rates[i])
                for i in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps) if final_norm else nn.Identity()
        self.head_norm = nn.LayerNorm(hidden_size, eps=norm_eps) if head_norm else nn.Identity()
        self.head = nn.Linear(hidden_size, num_classes)

        if not faithful:
            self._init_weights()

    def _init_weights(self) -> None:
        """timm-style init: truncated normal (std 0.02) linears and learnable position embedding."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with CLS prepended and position encoding added: (B, 1 + N, D)."""
        if x.shape[-2] != self.img_size or x.shape[-1] != self.img_size:
            raise ValueError(f"expected {self.img_size}x{self.img_size} input, got {list(x.shape)}")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        if self.pos_embed is not None:  # learnable, timm-style: covers CLS + patches
            return torch.cat([cls, tokens], dim=1) + self.pos_embed
        return torch.cat([cls, tokens + self.patch_pos_embed.to(tokens.dtype)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence after the last block and the final norm: (B, 1 + N, D)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(tokens[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def attribution_vit(pretrained_path: str | Path | None = None, **kwargs: Any) -> AttributionViT:
    """Build an :class:`AttributionViT` from ``kwargs``, then load ``pretrained_path`` into it.

    The bundles' ``network_def``. ``pretrained_path`` is a local timm / DINO / MAE / project
    checkpoint, loaded by :func:`~custom_components.networks.pretrained.load_pretrained_vit` (every
    backbone weight must fit; a head of another size is skipped); ``None`` or ``""`` keeps the
    module's own initialisation.
    """
    model = AttributionViT(**kwargs)
    if pretrained_path:
        load_pretrained_vit(model, pretrained_path)
    return model


def patch_grid_side(num_patches: int) -> int:
    """Side of a square patch grid, with a clear error for non-square token counts."""
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side
