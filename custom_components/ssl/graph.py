"""Graphs over the images of a view and the shared message-passing network (spec §2.2–2.3).

Project defaults (*not from the paper*, which leaves them open): k-NN by cosine similarity of the
projected embeddings z, symmetrised A ← max(A, Aᵀ), no self loops; ReLU between the two GCN layers
and none after the last; GCN layers without bias (the paper's formula has none). The graph is built
from detached embeddings (the k-NN selection is discrete; gradients flow through the GCN features).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["knn_graph", "gcn_operator", "GCN"]


@torch.no_grad()
def knn_graph(z: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(G, N, D) node features -> (G, N, N) boolean adjacency: each node to its k most cosine-similar
    other nodes, symmetrised (every degree ≥ k), no self loops."""
    g, n, _ = z.shape
    if not 0 < k < n:
        raise ValueError(f"k-NN graph needs 0 < k < number of nodes, got k={k} with {n} nodes")
    zn = nn.functional.normalize(z.detach().float(), dim=-1)
    sim = zn @ zn.transpose(1, 2)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    idx = sim.topk(k, dim=-1).indices
    adj = torch.zeros(g, n, n, dtype=torch.bool, device=z.device)
    adj.scatter_(2, idx, True)
    return (adj | adj.transpose(1, 2)) & ~eye


def gcn_operator(adj: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D̃^{−1/2} (A + I) D̃^{−1/2} with D̃_ii = Σ_j (A + I)_ij: (G, N, N) -> (G, N, N), symmetric, spectrum in (−1, 1]."""
    a = adj.to(dtype) + torch.eye(adj.shape[-1], dtype=dtype, device=adj.device)
    d = a.sum(-1).rsqrt()
    return d[..., :, None] * a * d[..., None, :]


class GCN(nn.Module):
    """Two-layer graph convolution H_{k+1} = σ(Â H_k W_k), width ``width``; ReLU between layers only."""

    def __init__(self, in_features: int = 128, width: int = 128, layers: int = 2):
        super().__init__()
        dims = [in_features] + [width] * layers
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=False) for i in range(layers))

    def forward(self, x: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
        """x: (G, N, F), operator: (G, N, N) from :func:`gcn_operator` -> (G, N, width)."""
        for i, layer in enumerate(self.layers):
            x = operator @ layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
