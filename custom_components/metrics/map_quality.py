"""Explanation-map quality against ground-truth masks (spec ``specs/explanations.md`` section 7).

- Pointing game: a hit iff any pixel attaining the map's global maximum lies inside the mask.
- IoU at top-k %: threshold = the value at index floor(H*W*k/100) of the map's values sorted in
  descending order; pixels >= threshold form the foreground (ties may exceed k %); the single
  rectangle enclosing all foreground pixels is compared with the mask by IoU. (The reference
  labels connected components and encloses them all; that rectangle is the bounding box of the
  foreground, computed here directly.)
Only slices whose mask is non-empty are scored.

Also (separate public functions, not part of :func:`map_quality`):
- Energy pointing game (Wang et al., "Score-CAM", CVPR-W 2020): the fraction of the map's
  non-negative mass that lies inside the mask.
- Deletion / insertion AUC (Petsiuk et al., "RISE", BMVC 2018): the most relevant pixels are
  deleted from the image (replaced by a baseline) or inserted into the baseline in ``steps`` equal
  fractions; the target probability is integrated by the trapezoid rule over the fraction axis.
"""

from __future__ import annotations

import torch

__all__ = [
    "pointing_game_hits",
    "topk_box_iou",
    "map_quality",
    "energy_pointing_game",
    "deletion_insertion_auc",
]


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
    _, h, w = maps.shape
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


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) fraction of ``sum(max(map, 0))`` inside the mask; 0 for a map without mass."""
    maps, masks = _check(maps, masks)
    pos = maps.clamp(min=0).flatten(1)
    total = pos.sum(dim=1)
    inside = (pos * masks.flatten(1)).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(pos.dtype).tiny), torch.zeros_like(total))


def _target_probability(output: torch.Tensor, target: torch.Tensor, activation: str) -> torch.Tensor:
    out = output.reshape(output.shape[0], -1).float()
    if activation == "auto":
        activation = "sigmoid" if out.shape[1] == 1 else "softmax"
    if activation == "sigmoid":
        prob = out.sigmoid()
    elif activation == "softmax":
        prob = out.softmax(dim=1)
    elif activation == "none":
        prob = out
    else:
        raise ValueError(f"activation must be auto, sigmoid, softmax or none, got {activation!r}")
    if prob.shape[1] == 1:
        return prob[:, 0]
    return prob.gather(1, target.view(-1, 1).to(prob.device)).squeeze(1)


@torch.no_grad()
def deletion_insertion_auc(
    model,
    images: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor | int | None = None,
    steps: int = 10,
    baseline: float | torch.Tensor = 0.0,
    mode: str = "deletion",
    activation: str = "auto",
    return_curves: bool = False,
):
    """Deletion (or insertion) AUC per sample, batched.

    Args:
        model: maps (B, C, H, W) images to logits (B,), (B, 1) or (B, K).
        images: (B, C, H, W). maps: (B, h, w) relevance (resized bilinearly to H x W if needed).
        target: class per sample (B,) or an int; ``None``: the prediction on ``images``. Ignored
            for a single-output model (its probability is used).
        steps: the fraction f = i / steps, i = 0 .. steps, of the most relevant pixels (all
            channels of a pixel together; ties broken by position) is deleted / inserted.
        baseline: value (or tensor broadcastable to ``images``) of deleted pixels / the start image
            of insertion.
        mode: ``"deletion"`` (image -> baseline; lower AUC is better) or ``"insertion"``
            (baseline -> image; higher is better).
        activation: ``"auto"`` (sigmoid for one output, softmax otherwise), ``"sigmoid"``,
            ``"softmax"`` or ``"none"`` (the model already outputs probabilities).
        return_curves: also return the (B, steps + 1) probability curves.
    Returns (B,) AUC by the trapezoid rule over f in [0, 1] (and the curves if asked).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {list(images.shape)}")
    b, _, h, w = images.shape
    if maps.dim() == 4:
        maps = maps[:, 0]
    maps = maps.float()
    if tuple(maps.shape[-2:]) != (h, w):
        maps = torch.nn.functional.interpolate(maps.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    base = torch.as_tensor(baseline, dtype=images.dtype, device=images.device).expand_as(images)
    if target is None:
        out = model(images).reshape(b, -1)
        target = out.argmax(dim=1) if out.shape[1] > 1 else torch.zeros(b, dtype=torch.long, device=images.device)
    elif isinstance(target, int):
        target = torch.full((b,), target, dtype=torch.long, device=images.device)
    else:
        target = torch.as_tensor(target, device=images.device).reshape(b, -1)[:, 0].long()
    order = maps.reshape(b, -1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    rank = rank.view(b, 1, h, w)
    curve = []
    for i in range(steps + 1):
        k = int(round(h * w * i / steps))
        chosen = rank < k  # the k most relevant pixels
        if mode == "deletion":
            x = torch.where(chosen, base, images)
        else:
            x = torch.where(chosen, images, base)
        curve.append(_target_probability(model(x), target, activation))
    curves = torch.stack(curve, dim=1)
    auc = ((curves[:, 1:] + curves[:, :-1]) / 2).sum(dim=1) / steps
    return (auc, curves) if return_curves else auc
