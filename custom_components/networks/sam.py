"""Segment Anything (Kirillov et al., ICCV 2023): ViT image encoder, prompt encoder, mask decoder.

Written from the paper (and its appendix A) for the box-prompted protocol of LVM-Med
(``../shared/specs/lvmmed.md`` section 4, "Prompt-based"). Module and parameter names follow the
released ``sam_vit_b_01ec64.pth`` layout (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``), so that file loads with the identity key map (:func:`load_sam_checkpoint`).
LVM-Med's ``lvmmed_vit.pth`` is a bare image-encoder dict (no ``image_encoder.`` prefix, no
absolute positional embedding): :func:`load_lvmmed_vit_encoder` maps it explicitly.

* :class:`SAMImageEncoder`: ViT (patch 16; ViT-B: 12 blocks, width 768, 12 heads), windowed
  attention (14 x 14) except in the global blocks (2, 5, 8, 11), decomposed relative positions,
  optional absolute positions, neck 1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d (256).
* :class:`SAMPromptEncoder`: random Fourier features of point / box-corner coordinates plus learned
  type embeddings, a "not a point" embedding for padding, the dense no-mask embedding and the
  mask down-scaling convolutions.
* :class:`SAMMaskDecoder`: two-way transformer (depth 2, 8 heads, MLP 2048, cross attention at half
  width), transposed-conv up-scaling (x4), per-mask-token hypernetwork MLPs, IoU prediction head.
* :class:`SAMBoxSegmenter`: ``forward(images, boxes)`` -> one tensor of mask logits (B, 1, H, W);
  ``image_embeddings`` / ``decode`` for caching embeddings of a frozen encoder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from custom_components.io import InputDataError, load_checkpoint, state_dict_mismatch

__all__ = [
    "LayerNorm2d",
    "SAMImageEncoder",
    "SAMPromptEncoder",
    "SAMMaskDecoder",
    "TwoWayTransformer",
    "SAMBoxSegmenter",
    "sam_box_segmenter",
    "load_sam_checkpoint",
    "load_lvmmed_vit_encoder",
    "lvmmed_vit_key_map",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between (``lin1``, ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


# ----------------------------------------------------------------------------------------------
# image encoder


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B, H, W, C


def _relative_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings of the relative offsets between q_size query and k_size key positions: (q, k, C).

    The table holds 2 * max(q, k) - 1 offsets; a table learned for another size is resized
    linearly. Coordinates of the shorter axis are stretched to the longer one.
    """
    span = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != span:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=span, mode="linear").squeeze(0).t()
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = (q_coords - k_coords) + (k_size - 1) * k_scale
    return rel_pos[offsets.long()]


class EncoderAttention(nn.Module):
    """Multi-head self attention over a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True, input_size: Sequence[int] = (14, 14)
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        else:
            self.register_parameter("rel_pos_h", None)
            self.register_parameter("rel_pos_w", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, n, c // n).permute(2, 0, 3, 1, 4).reshape(3, b * n, h * w, c // n)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_h is not None and self.rel_pos_w is not None:
            # decomposed relative positions: the (unscaled) query dotted with the row-offset and the
            # column-offset embeddings, added to the logits of every key in that row / column
            table_h = _relative_table(h, h, self.rel_pos_h)
            table_w = _relative_table(w, w, self.rel_pos_w)
            q_grid = q.reshape(b * n, h, w, c // n)
            rel_h = torch.einsum("bhwc,hkc->bhwk", q_grid, table_h)
            rel_w = torch.einsum("bhwc,wkc->bhwk", q_grid, table_w)
            attn = attn.view(b * n, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
            attn = attn.view(b * n, h * w, h * w)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).view(b, n, h, w, c // n).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out)


def _to_windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> (B * nW, window, window, C), zero-padding H and W up to multiples of window."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), hp, wp


def _from_windows(x: torch.Tensor, window: int, hp: int, wp: int, h: int, w: int) -> torch.Tensor:
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w, :].contiguous()


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window_size > 0``, global otherwise."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else tuple(input_size)
        self.attn = EncoderAttention(dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, hp, wp = _to_windows(x, self.window_size)
            x = self.attn(x)
            x = _from_windows(x, self.window_size, hp, wp, h, w)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SAMImageEncoder(nn.Module):
    """SAM's ViT image encoder: (B, 3, S, S) -> (B, out_chans, S / patch, S / patch). ViT-B by default."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        else:
            self.register_parameter("pos_embed", None)
        self.blocks = nn.ModuleList(
            EncoderBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in tuple(global_attn_indexes) else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            if x.shape[1:3] != self.pos_embed.shape[1:3]:
                raise ValueError(
                    f"image of {x.shape[1] * self.patch_size} px does not fit the absolute positions of a "
                    f"{self.img_size} px encoder"
                )
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------
# prompt encoder


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of coordinates in [0, 1]^2 (Tancik et al. 2020), Gaussian frequencies."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an h x w grid: (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encoding of (..., 2) pixel coordinates (x, y) in an image of ``image_size`` (h, w)."""
        size = torch.tensor([float(image_size[1]), float(image_size[0])], device=coords.device)
        return self._pe_encoding(coords.float() / size)


class SAMPromptEncoder(nn.Module):
    """Sparse (points, boxes) and dense (mask or "no mask") prompt embeddings."""

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0 negative point, 1 positive point, 2 box top-left corner, 3 box bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) pixel coordinates and (B, N) labels (1 foreground, 0 background, -1 padding)."""
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (labels == 0).to(emb.dtype) * self.point_embeddings[0].weight
        emb = emb + (labels == 1).to(emb.dtype) * self.point_embeddings[1].weight
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) boxes (x0, y0, x1, y1) in pixels -> (B, 2, C) corner embeddings."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_type = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_type

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N, C) and dense (B, C, h, w) embeddings of the given prompts."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            sparse = torch.cat([sparse, self.embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense


# ----------------------------------------------------------------------------------------------
# mask decoder


class DecoderAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections to ``dim // downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = attn.softmax(dim=-1) @ v
        b, heads, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, MLP on tokens, image-to-token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DecoderAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:  # the first layer's queries are the prompt tokens themselves
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder transformer updating prompt tokens and image embedding in both directions."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    """``num_layers`` linear layers (``layers.i``) with ReLU between."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class SAMMaskDecoder(nn.Module):
    """Masks (at 4x the embedding resolution) and their predicted IoU from image and prompt embeddings."""

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer if transformer is not None else TwoWayTransformer(embedding_dim=transformer_dim)
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B, M, 4h, 4w) and IoU scores (B, M); M = 3 with ``multimask_output``, else 1.

        ``image_embeddings`` has one row per prompt, or a single row shared by all prompts.
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        if multimask_output:
            return masks[:, 1:], iou[:, 1:]
        return masks[:, :1], iou[:, :1]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)
        if image_embeddings.shape[0] != n:
            if image_embeddings.shape[0] != 1:
                raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {n} prompts")
            image_embeddings = image_embeddings.expand(n, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = []
        for i, mlp in enumerate(self.output_hypernetworks_mlps):
            hyper.append(mlp(mask_tokens_out[:, i, :]))
        hyper_in = torch.stack(hyper, dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


# ----------------------------------------------------------------------------------------------
# box-prompted segmenter


class SAMBoxSegmenter(nn.Module):
    """SAM with one box prompt per image; ``forward(images, boxes)`` -> mask logits (B, 1, H, W).

    ``images``: (B, 3, S, S), S = ``img_size``, intensities on SAM's 0..255 scale (normalised
    with SAM's pixel mean / std inside when ``normalize``). ``boxes``: (B, 4) float
    (x0, y0, x1, y1) in pixels of the S x S input. The mask decoder's single-mask output
    (``multimask_output=False``), predicted at 4x the embedding grid (256 for S = 1024), is
    up-sampled bilinearly to (H, W), or to ``mask_size`` x ``mask_size`` when ``mask_size > 0``
    (``mask_size = 256`` at 1024 px input: the low-resolution logits on which the reference
    computes its loss, unresized). Parameter names are those of ``sam_vit_b_01ec64.pth``.

    Image and prompt encoders are frozen (no gradient, eval mode) unless ``train_image_encoder`` /
    ``train_prompt_encoder``: with a frozen encoder, ``image_embeddings`` can be computed once and
    ``decode`` trained on the cached embeddings (the same function as ``forward``).
    The single-mask output leaves the IoU head out of the loss (as in the reference): under DDP,
    ``find_unused_parameters=True``.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 12,
        encoder_num_heads: int = 12,
        encoder_global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        window_size: int = 14,
        use_abs_pos: bool = True,
        prompt_embed_dim: int = 256,
        mask_in_chans: int = 16,
        decoder_depth: int = 2,
        decoder_num_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        iou_head_hidden_dim: int = 256,
        normalize: bool = True,
        train_image_encoder: bool = False,
        train_prompt_encoder: bool = False,
        mask_size: int = 0,
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.img_size = img_size
        self.image_encoder = SAMImageEncoder(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            out_chans=prompt_embed_dim,
            use_abs_pos=use_abs_pos,
            window_size=window_size,
            global_attn_indexes=encoder_global_attn_indexes,
        )
        self.prompt_encoder = SAMPromptEncoder(prompt_embed_dim, (grid, grid), (img_size, img_size), mask_in_chans)
        self.mask_decoder = SAMMaskDecoder(
            prompt_embed_dim,
            TwoWayTransformer(decoder_depth, prompt_embed_dim, decoder_num_heads, decoder_mlp_dim, 2),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.normalize = normalize
        self.mask_size = int(mask_size)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), persistent=False)
        # the protocol fine-tunes the mask decoder only; frozen parts take no gradient and stay in eval mode
        self.train_image_encoder = train_image_encoder
        self.train_prompt_encoder = train_prompt_encoder
        self.image_encoder.requires_grad_(train_image_encoder)
        self.prompt_encoder.requires_grad_(train_prompt_encoder)

    def train(self, mode: bool = True) -> SAMBoxSegmenter:
        super().train(mode)
        if not self.train_image_encoder:
            self.image_encoder.eval()
        if not self.train_prompt_encoder:
            self.prompt_encoder.eval()
        return self

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, C, S / patch, S / patch) embeddings (cacheable when frozen)."""
        if self.normalize:
            images = (images - self.pixel_mean) / self.pixel_std
        return self.image_encoder(images)

    def decode_with_iou(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (B, 1, 4h, 4w) and predicted IoU (B, 1) for one box per embedding."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.to(embeddings.dtype), masks=None)
        return self.mask_decoder(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, False)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """Mask logits for one box per embedding: (B, 1, 4h, 4w), or resized to ``output_size``."""
        masks = self.decode_with_iou(embeddings, boxes)[0]
        if output_size is not None:
            masks = F.interpolate(masks, size=(int(output_size[0]), int(output_size[1])), mode="bilinear", align_corners=False)
        return masks

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if self.mask_size > 0:
            return self.decode(self.image_embeddings(images), boxes, output_size=[self.mask_size, self.mask_size])
        return self.decode(self.image_embeddings(images), boxes, output_size=[images.shape[-2], images.shape[-1]])


# ----------------------------------------------------------------------------------------------
# weights


def _state_dict_from(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    state = load_checkpoint(path)
    if not isinstance(state, Mapping):
        raise InputDataError(path, f"expected a state dict, found {type(state).__name__}")
    return state


def load_sam_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an official SAM checkpoint (``sam_vit_b_01ec64.pth`` layout) strictly: identity key map.

    ``model`` has ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` (e.g.
    :class:`SAMBoxSegmenter`). A missing, unexpected or differently shaped tensor raises
    :class:`~custom_components.io.InputDataError` naming the file and the keys.
    """
    state = _state_dict_from(path)
    problem = state_dict_mismatch(model, state)
    if problem is not None:
        raise InputDataError(path, f"not a SAM checkpoint of this architecture: {problem}")
    model.load_state_dict(state)
    return model


def lvmmed_vit_key_map(key: str) -> str:
    """Key of LVM-Med's ``lvmmed_vit.pth`` (bare encoder dict) -> key of :class:`SAMBoxSegmenter`."""
    return "image_encoder." + key


def load_lvmmed_vit_encoder(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load LVM-Med's ``lvmmed_vit.pth`` into ``model.image_encoder`` (or an encoder itself), strictly.

    The file holds the image encoder's tensors without the ``image_encoder.`` prefix and without
    ``pos_embed`` (LVM-Med builds SAM's ViT-B image encoder with ``use_abs_pos=False``, neck
    included, and loads the file strictly into it): the encoder must be built with
    ``use_abs_pos=False``. Every other encoder tensor must be present with the encoder's shape.
    """
    encoder = model.image_encoder if isinstance(getattr(model, "image_encoder", None), nn.Module) else model
    state = _state_dict_from(path)
    if "pos_embed" in state:
        raise InputDataError(path, "holds pos_embed: not LVM-Med's ViT encoder file (use the SAM checkpoint loader)")
    if getattr(encoder, "pos_embed", None) is not None:
        raise InputDataError(
            path, "LVM-Med's ViT encoder has no absolute positional embedding: build the encoder with use_abs_pos=False"
        )
    prefix = "image_encoder."
    mapped = {lvmmed_vit_key_map(k)[len(prefix) :]: v for k, v in state.items()}
    problem = state_dict_mismatch(encoder, mapped)
    if problem is not None:
        raise InputDataError(path, f"not an LVM-Med ViT encoder of this architecture: {problem}")
    encoder.load_state_dict(mapped)
    return model


def sam_box_segmenter(
    sam_checkpoint: str | os.PathLike | None = None, lvmmed_encoder: str | os.PathLike | None = None, **kwargs
) -> SAMBoxSegmenter:
    """:class:`SAMBoxSegmenter` (ViT-B by default), initialised from SAM's checkpoint and/or LVM-Med's encoder.

    With both, the SAM file initialises prompt encoder and mask decoder and LVM-Med's file then
    replaces the image encoder (``use_abs_pos=False``; the SAM file's ``pos_embed`` is dropped).
    """
    if lvmmed_encoder:
        kwargs["use_abs_pos"] = False
    model = SAMBoxSegmenter(**kwargs)
    if sam_checkpoint:
        if lvmmed_encoder:
            state = dict(_state_dict_from(sam_checkpoint))
            state.pop("image_encoder.pos_embed", None)
            problem = state_dict_mismatch(model, state)
            if problem is not None:
                raise InputDataError(sam_checkpoint, f"not a SAM checkpoint of this architecture: {problem}")
            model.load_state_dict(state)
        else:
            load_sam_checkpoint(model, sam_checkpoint)
    if lvmmed_encoder:
        load_lvmmed_vit_encoder(model, lvmmed_encoder)
    return model
