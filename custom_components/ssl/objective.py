"""LVM-Med's self-supervised objective: second-order graph matching of two views (spec §2).

Per step: pooled backbone maps -> projector -> one k-NN graph per view per chunk of ``graph_size``
images -> shared GCN -> vertex (global + local) and edge affinities -> Lawler QAP solved with IMLE
gradients -> Hamming loss to the identity matching (the gold matching: item i of view s belongs
with item i of view t).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
from torch import nn

from custom_components.ssl.affinity import edge_affinity, vertex_affinity
from custom_components.ssl.graph import GCN, gcn_operator, knn_graph
from custom_components.ssl.imle import NOISES, imle_match
from custom_components.ssl.matching import METHODS, hamming
from custom_components.ssl.views import cell_centres

__all__ = ["SSLOutput", "GraphMatchingObjective"]


class SSLOutput(NamedTuple):
    loss: torch.Tensor  #: scalar, mean Hamming loss over the graphs of the step
    matching_accuracy: torch.Tensor  #: fraction of nodes matched to their true partner (noisy forward solve)
    solver_seconds: float  #: wall time of the forward combinatorial solves
    graph_seconds: float  #: wall time of the forward graph-matching part (projector … IMLE forward)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GraphMatchingObjective(nn.Module):
    """The LVM-Med loss on the backbone feature maps of two views of a batch.

    Args (paper values as defaults):
        in_channels: D, channels of the backbone maps (2048 for ResNet-50, 768 for ViT-B).
        projector_dim: output of the projector h_φ, one Linear D→128 (the paper's "2048×128", read
            literally; depth and activation are not established).
        graph_size: nodes per graph (16). The batch is split into consecutive chunks of this many
            items, the same indices in both views (*not from the paper*).
        k: k of the k-NN graphs (5); cosine similarity on the projected z, symmetrised, no self loops
            (*not from the paper*).
        gcn_width: width of the shared two-layer GCN (128); ReLU between layers, none after the last,
            no bias (*not from the paper*).
        alpha: weight of the global term in the vertex affinity (0.8).
        num_matches: γ, cell pairs kept by the local location/feature terms (20, VICRegL's value;
            *not from the paper*).
        lam: IMLE λ (80).
        solver: matching method (see :mod:`custom_components.ssl.matching`): ``"ipfp"`` (project
            default: Hungarian init + pygmtools IPFP; the paper used the LPMP dual-ascent solver),
            ``"rrwm"``, ``"sm"``, ``"hungarian"`` (first order), ``"brute"`` (tiny graphs only).
        solver_options: extra keyword options for :func:`~custom_components.ssl.matching.solve`
            (``max_iter``, ``keep_best``, …).
        noise: IMLE perturbation, ``"gumbel"`` (paper), ``"constant"`` (the "w/o Gumbel" ablation) or
            ``"none"``.
        local_term: include the VICRegL-style local term in c_v (False = "w/o local similarity").
        second_order: include edge affinities (False = "w/o second-order": c_e is not built and the
            solver is the first-order Hungarian on c_v regardless of ``solver``).
        message_passing: run the GCN (False = "w/o message passing": ẑ = z). *Not from the paper* as
            an option name; the paper reports the ablation.
        edge_weight: scale of c_e in the QAP (*not from the paper*; 1.0 = paper). With k = 5 a node
            has ≥ 5 edges, so edge terms can outweigh the vertex affinities (bounded by 1.2); small
            demos learn better with a smaller weight.
        noise_temperature: scale of the IMLE noise (*not from the paper*; 1.0 = paper). Gumbel(0,1)
            noise (std 1.28) can swamp affinities in [−1.2, 1.2] on tiny data.
        scale_edge_noise: the edge noise ε′ is also multiplied by ``edge_weight``, so ``edge_weight``
            weights the whole perturbed edge term w·(c_e + ε′) of the QAP (*not from the paper*; no
            effect at the paper's edge_weight 1). Without it, Gumbel noise with its positive mean
            0.577 on every edge pair rewards matchings that preserve many edges regardless of c_e,
            and small edge weights leave that noise term dominant.
        normalize_imle_grad: see :mod:`custom_components.ssl.imle` (*not from the paper*; keeps λ
            acting on the per-graph Hamming gradient when the loss is the mean over graphs).
        center_nodes: subtract each graph's mean node feature from ẑ before the affinities
            (*not from the paper*; default False = paper). The GCN averages over ≥ 6 neighbours and
            its ReLU adds a positive component shared by all nodes, so at initialisation all ẑ of a
            graph are nearly parallel (cosines ≈ 0.99 in the tiny test) and the global affinity
            barely separates nodes; centring removes that shared component (edge affinities, built
            on differences, are unchanged by it).
        edge_gradient: let the IMLE gradient (ẽ − e_λ)/λ flow through c_e into the GCN and projector
            (*not from the paper* as an option; default True = paper). False keeps c_e in the
            second-order solve but trains only through c_v (an ablation / fallback).
        seed: optional seed of a private generator for the IMLE noise (None = torch's global RNG).

    ``forward(maps_s, maps_t, geom_s, geom_t)`` with maps (B, D, R, S) and geometry (B, 5) as made by
    :class:`custom_components.ssl.views.TwoViews` returns an :class:`SSLOutput`. The wall time of the
    backward solve happens outside ``forward``; it is accumulated in ``self.timer["backward_solver_seconds"]``
    (and the forward solves in ``self.timer["forward_solver_seconds"]``); callers may reset ``timer``.
    """

    def __init__(
        self,
        in_channels: int,
        projector_dim: int = 128,
        graph_size: int = 16,
        k: int = 5,
        gcn_width: int = 128,
        alpha: float = 0.8,
        num_matches: int = 20,
        lam: float = 80.0,
        solver: str = "ipfp",
        solver_options: dict[str, Any] | None = None,
        noise: str = "gumbel",
        local_term: bool = True,
        second_order: bool = True,
        message_passing: bool = True,
        edge_weight: float = 1.0,
        noise_temperature: float = 1.0,
        normalize_imle_grad: bool = True,
        scale_edge_noise: bool = True,
        center_nodes: bool = False,
        edge_gradient: bool = True,
        seed: int | None = None,
    ):
        super().__init__()
        if solver not in METHODS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(METHODS)}")
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")
        if not 0 < k < graph_size:
            raise ValueError(f"k-NN needs 0 < k < graph_size, got k={k}, graph_size={graph_size}")
        self.projector = nn.Linear(in_channels, projector_dim)
        self.gcn = GCN(projector_dim, gcn_width, layers=2)
        self.graph_size, self.k, self.alpha, self.num_matches, self.lam = graph_size, k, alpha, num_matches, lam
        self.solver, self.solver_options, self.noise = solver, dict(solver_options or {}), noise
        self.local_term, self.second_order, self.message_passing = local_term, second_order, message_passing
        self.edge_weight, self.noise_temperature, self.normalize_imle_grad = edge_weight, noise_temperature, normalize_imle_grad
        self.scale_edge_noise, self.center_nodes, self.edge_gradient = scale_edge_noise, center_nodes, edge_gradient
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.timer: dict[str, float] = {}

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def forward(self, maps_s: torch.Tensor, maps_t: torch.Tensor, geom_s: torch.Tensor, geom_t: torch.Tensor) -> SSLOutput:
        if maps_s.ndim != 4 or maps_s.shape != maps_t.shape:
            raise ValueError(f"maps_s and maps_t must both be (B, D, R, S), got {tuple(maps_s.shape)} and {tuple(maps_t.shape)}")
        b, d, r, s = maps_s.shape
        n = self.graph_size
        if b % n != 0:
            raise ValueError(
                f"the batch size ({b}) must be a multiple of graph_size ({n}): each graph is a chunk of {n} images"
            )
        g = b // n
        device = maps_s.device
        _sync(device)
        start = time.perf_counter()
        zs = self.projector(maps_s.mean(dim=(2, 3))).view(g, n, -1)
        zt = self.projector(maps_t.mean(dim=(2, 3))).view(g, n, -1)
        adj_s, adj_t = knn_graph(zs, self.k), knn_graph(zt, self.k)
        if self.message_passing:
            hs = self.gcn(zs, gcn_operator(adj_s, zs.dtype))
            ht = self.gcn(zt, gcn_operator(adj_t, zt.dtype))
        else:
            hs, ht = zs, zt
        if self.center_nodes:
            hs, ht = hs - hs.mean(dim=1, keepdim=True), ht - ht.mean(dim=1, keepdim=True)
        if self.local_term:
            ys = maps_s.flatten(2).transpose(1, 2).reshape(g, n, r * s, d)
            yt = maps_t.flatten(2).transpose(1, 2).reshape(g, n, r * s, d)
            cs = cell_centres(geom_s.to(device, maps_s.dtype), (r, s)).view(g, n, r * s, 2)
            ct = cell_centres(geom_t.to(device, maps_t.dtype), (r, s)).view(g, n, r * s, 2)
            cost_v = vertex_affinity(hs, ht, ys, yt, cs, ct, self.alpha, self.num_matches)
        else:
            cost_v = vertex_affinity(hs, ht)
        cost_e, method = None, self.solver
        # a first-order solver ignores c^e: building it would send an edge gradient that never shaped the matching
        if self.second_order and self.solver != "hungarian":
            cost_e = self.edge_weight * edge_affinity(hs, ht, adj_s, adj_t)
            if not self.edge_gradient:
                cost_e = cost_e.detach()
        else:
            method = "hungarian"
        before = self.timer.get("forward_solver_seconds", 0.0)
        v = imle_match(
            cost_v,
            cost_e,
            adj_s,
            adj_t,
            lam=self.lam,
            method=method,
            noise=self.noise,
            temperature=self.noise_temperature,
            edge_temperature=self.noise_temperature * (self.edge_weight if self.scale_edge_noise else 1.0),
            options=self.solver_options,
            normalize_grad=self.normalize_imle_grad,
            generator=self._gen(device),
            timer=self.timer,
        )
        solver_seconds = self.timer["forward_solver_seconds"] - before
        gold = torch.eye(n, dtype=v.dtype, device=device).expand(g, n, n)
        loss = hamming(v, gold).mean()
        accuracy = torch.diagonal(v.detach(), dim1=1, dim2=2).mean()
        _sync(device)
        return SSLOutput(loss, accuracy, solver_seconds, time.perf_counter() - start)
