"""Vertex and edge affinities between the graphs of two views (spec §2.4–2.5).

Shapes: G graphs of N nodes; GCN outputs ``hs``, ``ht``: (G, N, F); backbone maps flattened to
cells ``ys``, ``yt``: (G, N, P, D) with cell centres ``cs``, ``ct``: (G, N, P, 2) in normalised
original-image coordinates (:func:`custom_components.ssl.views.cell_centres`).

- global: c_glo[i, a] = cos(ẑ_i^s, ẑ_a^t)
- local (VICRegL-style) c_lo(i→a) = ½ (location + feature): for every cell p of y_i^s take its nearest
  cell of y_a^t — in original-image coordinates (location) or in feature L2 distance (feature) —,
  keep the γ pairs with the smallest distance and average their feature cosines.
- c_v[i, a] = α c_glo[i, a] + (1 − α) (c_lo(i→a) + c_lo(a→i)) ∈ [−1.2, 1.2] for α = 0.8.
- edge: c_e[i, j, a, b] = cos(ẑ_i^s − ẑ_j^s, ẑ_a^t − ẑ_b^t), kept on edge pairs only.

Not from the paper: γ = 20 (VICRegL's ``--num_matches 20`` for global crops), capped at the number
of cells; coordinates normalised per original image so that pairs of different images (i ≠ a) are
defined; the pair selection (nearest cells, γ best) is not differentiated, the cosines are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["global_affinity", "location_distances", "local_terms", "local_affinity", "vertex_affinity", "edge_affinity"]


def global_affinity(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    """(G, N, F), (G, N, F) -> (G, N, N) cosine similarities."""
    return F.normalize(hs, dim=-1) @ F.normalize(ht, dim=-1).transpose(1, 2)


@torch.no_grad()
def location_distances(cs: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
    """Squared distances in original-image coordinates between every cell p of image i (view s) and
    every cell q of image a (view t): (G, N, P, 2), (G, N, Q, 2) -> (G, N, N, P, Q). The location
    term matches p to ``argmin_q``."""
    return (cs[:, :, None, :, None, :] - ct[:, None, :, None, :, :]).pow(2).sum(-1)


def _best_mean(cos: torch.Tensor, dist: torch.Tensor, gamma: int, dim: int = -1) -> torch.Tensor:
    """Cells along ``dim`` are looked up in the other image: each gets its nearest partner by ``dist``,
    the γ cells with the smallest such distance are kept, and their pairs' ``cos`` averaged.
    cos, dist: (..., P, Q); dim = -1 (cells p of s look up q in t) or -2 (cells q of t look up p in s) -> (...)."""
    if dim in (-2, cos.ndim - 2):
        cos, dist = cos.transpose(-1, -2), dist.transpose(-1, -2)
    dmin, q = dist.min(dim=-1)
    g = min(gamma, dist.shape[-2])
    keep = dmin.topk(g, dim=-1, largest=False).indices  # (..., γ)
    cos_nn = cos.gather(-1, q.unsqueeze(-1)).squeeze(-1)  # (..., P)
    return cos_nn.gather(-1, keep).mean(dim=-1)


def _cell_pairs(ys, yt, cs, ct):
    """Feature cosines, location and feature distances of all cell pairs: three (G, N, N, P, Q) tensors."""
    ns, nt = ys.norm(dim=-1), yt.norm(dim=-1)  # (G, N, P), (G, N, Q)
    cos = torch.einsum("gipd,gaqd->giapq", ys / ns.clamp(min=1e-12)[..., None], yt / nt.clamp(min=1e-12)[..., None])
    with torch.no_grad():
        dloc = location_distances(cs, ct)
        ns, nt = ns.detach()[:, :, None, :, None], nt.detach()[:, None, :, None, :]
        dfeat = ns**2 + nt**2 - 2 * cos.detach() * ns * nt  # ‖y_p − y_q‖² from the same product
    return cos, dloc, dfeat


def local_terms(ys, yt, cs, ct, gamma: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and feature terms of i→a (cells of y_i^s looked up in y_a^t): two (G, N, N) tensors."""
    cos, dloc, dfeat = _cell_pairs(ys, yt, cs, ct)
    return _best_mean(cos, dloc, gamma), _best_mean(cos, dfeat, gamma)


def local_affinity(ys, yt, cs, ct, gamma: int = 20) -> torch.Tensor:
    """c_lo(i→a) + c_lo(a→i) as a (G, N, N) tensor indexed [i, a] (each direction in [−1, 1]).

    One feature product serves both directions (a→i looks up the cells of y_a^t in y_i^s)."""
    cos, dloc, dfeat = _cell_pairs(ys, yt, cs, ct)
    st = 0.5 * (_best_mean(cos, dloc, gamma, -1) + _best_mean(cos, dfeat, gamma, -1))
    ts = 0.5 * (_best_mean(cos, dloc, gamma, -2) + _best_mean(cos, dfeat, gamma, -2))
    return st + ts


def vertex_affinity(hs, ht, ys=None, yt=None, cs=None, ct=None, alpha: float = 0.8, gamma: int = 20) -> torch.Tensor:
    """c_v = α c_glo + (1 − α)(c_lo(i→a) + c_lo(a→i)); with ``ys=None`` (no local term) c_v = c_glo."""
    c = global_affinity(hs, ht)
    if ys is None:
        return c
    return alpha * c + (1 - alpha) * local_affinity(ys, yt, cs, ct, gamma)


def edge_affinity(
    hs: torch.Tensor, ht: torch.Tensor, edges_s: torch.Tensor, edges_t: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """c_e[g, i, j, a, b] = cos(ẑ_i^s − ẑ_j^s, ẑ_a^t − ẑ_b^t) on edge pairs, 0 elsewhere: (G, N, N, N, N).

    A difference shorter than ``eps`` × the graph's mean node norm counts as zero: its cosine is set to
    0 with no gradient (*not from the paper*). The cosine of a zero vector is undefined and its gradient
    ∝ 1/|ẑ_i − ẑ_j| explodes; such pairs occur exactly, because two adjacent nodes with the same closed
    neighbourhood get identical GCN outputs. On the tiny learning check this made the edge term's
    gradient on the GCN weights ≈ 10⁴ × the vertex term's (≈ 15 × after the fix), and kept the
    matching accuracy at chance. The result is invariant to a shift of a view.
    """

    def unit_differences(h):
        d = h[:, :, None, :] - h[:, None, :, :]
        floor = (eps * h.detach().norm(dim=-1).mean(dim=1)).clamp(min=1e-30)[:, None, None, None]  # (G, 1, 1, 1)
        norm = d.norm(dim=-1, keepdim=True)
        return torch.where(norm > floor, d / torch.maximum(norm, floor), torch.zeros_like(d))

    ce = torch.einsum("gijd,gabd->gijab", unit_differences(hs), unit_differences(ht))
    mask = edges_s.to(ce.dtype)[:, :, :, None, None] * edges_t.to(ce.dtype)[:, None, None, :, :]
    return ce * mask
