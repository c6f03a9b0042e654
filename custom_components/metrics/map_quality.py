"""Explanation-map quality against ground-truth masks (spec ``specs/explanations.md`` section 7).

- Pointing game: a hit iff any pixel attaining the map's global maximum lies inside the mask.
- IoU at top-k %: threshold = the value at index floor(H*W*k/100) of the map's values sorted in
  descending order; pixels >= threshold form the foreground (ties may exceed k %); the single
  rectangle enclosing all foreground pixels is compared with the mask by IoU. (The reference
  labels connected components and encloses them all; that rectangle is the bounding box of the
  foreground, computed here directly.)
Only slices whose mask is non-empty are scored.
"""

from __future__ import annotations

import torch

__all__ = ["pointing_game_hits", "topk_box_iou", "map_quality"]


def _check(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if masks.dim() == maps.dim() + 1:
        masks = masks[:, 0]
    if maps.dim() != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {list(maps.shape)} and masks {list(masks.shape)} must both be (B, H, W)")
    return maps.float(), masks > 0.5


def pointing_game_hits(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Boolean (B,): does any arg-max pixel of each map fall inside its mask."""
    maps, masks = _check(maps, masks)
    peak = maps.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return ((maps == peak) & masks).flatten(1).any(dim=1)


def topk_box_iou(maps: torch.Tensor, masks: torch.Tensor, k: float = 10.0) -> torch.Tensor:
    """IoU (B,) between the bounding box of each map's top-k % pixels and its mask."""
    if not 0.0 < k < 100.0:
        raise ValueError(f"k must be in (0, 100), got {k}")
    maps, masks = _check(maps, masks)
    b, h, w = maps.shape
    index = int(h * w * k / 100.0)
    threshold = maps.flatten(1).sort(dim=1, descending=True).values[:, index].view(-1, 1, 1)
    fg = maps >= threshold
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # (B, H), (B, W)
    ar_h = torch.arange(h, device=maps.device)
    ar_w = torch.arange(w, device=maps.device)
    big = torch.iinfo(torch.long).max
    r0 = torch.where(rows, ar_h, big).min(dim=1).values
    r1 = torch.where(rows, ar_h, -1).max(dim=1).values
    c0 = torch.where(cols, ar_w, big).min(dim=1).values
    c1 = torch.where(cols, ar_w, -1).max(dim=1).values
    in_rows = (ar_h.view(1, -1) >= r0.view(-1, 1)) & (ar_h.view(1, -1) <= r1.view(-1, 1))
    in_cols = (ar_w.view(1, -1) >= c0.view(-1, 1)) & (ar_w.view(1, -1) <= c1.view(-1, 1))
    box = in_rows.unsqueeze(2) & in_cols.unsqueeze(1)
    inter = (box & masks).flatten(1).sum(1).float()
    union = (box | masks).flatten(1).sum(1).float()
    return inter / union.clamp_min(1.0)


def map_quality(maps: torch.Tensor, masks: torch.Tensor, ks: tuple[float, ...] = (10.0,)) -> dict[str, list[float]]:
    """Per-slice scores of the slices with a non-empty mask: ``pointing_game`` and ``iou_top{k}``."""
    maps, masks_b = _check(maps, masks)
    keep = masks_b.flatten(1).any(dim=1)
    maps, masks_b = maps[keep], masks_b[keep]
    out = {"pointing_game": pointing_game_hits(maps, masks_b).float().tolist()}
    for k in ks:
        out[f"iou_top{k:g}"] = topk_box_iou(maps, masks_b, k).tolist()
    return out
