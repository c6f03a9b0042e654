"""Graph matching solvers for the LVM-Med objective (Lawler QAP over permutation matrices).

The problem (spec §2.6) for one pair of graphs with N nodes each::

    GM(c_v, c_e) = argmax_{v ∈ Π}  Σ_ia c_v[i,a] v[i,a]  +  Σ_{(i,j)∈E_s, (a,b)∈E_t} c_e[i,j,a,b] v[i,a] v[j,b]

Representation used throughout :mod:`custom_components.ssl`:

- ``cost_v``: (G, N, N), row i = node of the source graph s, column a = node of the target graph t.
- ``edges_s`` / ``edges_t``: (G, N, N) boolean adjacency matrices (symmetric, no self loops), the
  edge sets E_s, E_t as *ordered* pairs (both (i, j) and (j, i) for an undirected edge).
- ``cost_e``: dense (G, N, N, N, N) tensor indexed ``[g, i, j, a, b]``; only entries with
  ``edges_s[g, i, j] and edges_t[g, a, b]`` enter the objective (others are ignored / masked).

The dense layout keeps every step batched over the G graphs of a training step (N = 16 gives
65,536 numbers per graph, the size of the Lawler affinity matrix K itself).

Solvers (``method``):

- ``"hungarian"``: first order, :func:`scipy.optimize.linear_sum_assignment` on ``cost_v`` alone
  (the paper's "w/o second-order" ablation); ``cost_e`` is ignored.
- ``"ipfp"`` (project default, spec §2.6): Hungarian on ``cost_v`` as the initial solution, then
  pygmtools' IPFP (integer projected fixed point, Hungarian projections) on the Lawler matrix K.
- ``"rrwm"``, ``"sm"``: pygmtools' reweighted random walks / spectral matching, projected to a
  permutation by pygmtools' Hungarian.
- ``"brute"``: exhaustive search over all N! permutations (tests; N ≤ 8).

For the pygmtools solvers, ``keep_best=True`` (default; *not from the paper*) returns whichever
of {solver output, Hungarian initialisation} has the larger QAP objective, so a second-order
solve never scores below the first-order one (pygmtools' IPFP starts its best-objective tracker at
-1, which is not a safe bound when affinities are negative or noisy).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["METHODS", "solve", "hamming", "qap_objective", "lawler_matrix", "edge_indicator", "hungarian"]

METHODS = ("hungarian", "ipfp", "rrwm", "sm", "brute")


def hamming(v: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
    """Hamming loss Σ [v (1 − v*) + v* (1 − v)] per graph over the last two dims: (..., N, N) -> (...).

    For permutation matrices it equals 2 × the number of rows matched to a wrong column.
    """
    return (v * (1 - v_star) + v_star * (1 - v)).sum(dim=(-2, -1))


def edge_indicator(v: torch.Tensor, edges_s: torch.Tensor, edges_t: torch.Tensor) -> torch.Tensor:
    """e[g, i, j, a, b] = v[g, i, a] · v[g, j, b] on edge pairs ((i,j) ∈ E_s, (a,b) ∈ E_t), 0 elsewhere."""
    e = torch.einsum("gia,gjb->gijab", v, v)
    return e * _pair_mask(edges_s, edges_t, v.dtype)


def _pair_mask(edges_s: torch.Tensor, edges_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return edges_s.to(dtype)[:, :, :, None, None] * edges_t.to(dtype)[:, None, None, :, :]


def qap_objective(
    v: torch.Tensor, cost_v: torch.Tensor, cost_e: torch.Tensor | None, edges_s=None, edges_t=None
) -> torch.Tensor:
    """Σ c_v v + Σ_edge-pairs c_e v_ia v_jb per graph: (G,)."""
    obj = (cost_v * v).sum(dim=(-2, -1))
    if cost_e is not None:
        obj = obj + (cost_e * edge_indicator(v, edges_s, edges_t)).sum(dim=(1, 2, 3, 4))
    return obj


def lawler_matrix(cost_v: torch.Tensor, cost_e: torch.Tensor | None, edges_s=None, edges_t=None) -> torch.Tensor:
    """The (G, N², N²) Lawler affinity matrix K in pygmtools' column-major vectorisation.

    ``vec(v)[a·N + i] = v[i, a]``; ``K[a·N+i, b·N+j] = c_e[i, j, a, b]`` on edge pairs and
    ``K[a·N+i, a·N+i] = c_v[i, a]``, so ``vec(v)ᵀ K vec(v)`` is the QAP objective. K is symmetrised
    ((K + Kᵀ)/2, which leaves the objective unchanged) because independent noise on the ordered
    pairs (i,j,a,b) and (j,i,b,a) would otherwise make it asymmetric, which IPFP/RRWM/SM assume it is not.
    """
    g, n, _ = cost_v.shape
    if cost_e is None:
        k = torch.zeros(g, n * n, n * n, dtype=cost_v.dtype, device=cost_v.device)
    else:
        ce = cost_e * _pair_mask(edges_s, edges_t, cost_e.dtype)
        # [g, i, j, a, b] -> [g, a, i, b, j] -> rows (a, i), columns (b, j)
        k = ce.permute(0, 3, 1, 4, 2).reshape(g, n * n, n * n)
        k = 0.5 * (k + k.transpose(1, 2))
    diag = cost_v.transpose(1, 2).reshape(g, n * n)
    return k + torch.diag_embed(diag - torch.diagonal(k, dim1=1, dim2=2))


def hungarian(cost_v: torch.Tensor) -> torch.Tensor:
    """Maximum-weight perfect matching per graph with scipy's ``linear_sum_assignment``: (G,N,N) -> 0/1."""
    scores = cost_v.detach().to("cpu", torch.float64).numpy()
    out = np.zeros(scores.shape, dtype=np.float32)
    for g in range(scores.shape[0]):
        rows, cols = linear_sum_assignment(scores[g], maximize=True)
        out[g, rows, cols] = 1.0
    return torch.from_numpy(out).to(device=cost_v.device, dtype=cost_v.dtype)


def _brute(cost_v, cost_e, edges_s, edges_t) -> torch.Tensor:
    n = cost_v.shape[1]
    if n > 8:
        raise ValueError(f"brute-force matching enumerates N! permutations; N={n} > 8 is too large")
    perms = torch.tensor(list(itertools.permutations(range(n))), device=cost_v.device)  # (P, N): i -> perm[i]
    rows = torch.arange(n, device=cost_v.device)
    obj = cost_v[:, rows[None, :], perms].sum(-1)  # (G, P)
    if cost_e is not None:
        ce = cost_e * _pair_mask(edges_s, edges_t, cost_e.dtype)
        i, j = rows[None, :, None], rows[None, None, :]
        obj = obj + ce[:, i, j, perms[:, :, None], perms[:, None, :]].sum((-2, -1))  # (G, P)
    best = perms[obj.argmax(dim=1)]  # (G, N)
    return torch.nn.functional.one_hot(best, n).to(cost_v.dtype)


def _pygm(method: str, k: torch.Tensor, n: int, x0: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    import pygmtools as pygm

    g = k.shape[0]
    ns = torch.full((g,), n, dtype=torch.long, device=k.device)
    if method == "ipfp":
        x = pygm.ipfp(k, ns, ns, x0=x0, max_iter=options.get("max_iter", 50), backend="pytorch")
    elif method == "rrwm":
        kw = {key: options[key] for key in ("max_iter", "sk_iter", "alpha", "beta") if key in options}
        x = pygm.rrwm(k, ns, ns, **kw, backend="pytorch")
    else:
        x = pygm.sm(k, ns, ns, max_iter=options.get("max_iter", 50), backend="pytorch")
    if method != "ipfp":  # RRWM/SM return soft assignments
        x = pygm.hungarian(x, ns, ns, backend="pytorch")
    return x.to(k.dtype)


@torch.no_grad()
def solve(
    cost_v: torch.Tensor,
    cost_e: torch.Tensor | None,
    edges_s: torch.Tensor | None,
    edges_t: torch.Tensor | None,
    method: str = "ipfp",
    **options: Any,
) -> torch.Tensor:
    """Solve G graph matching problems at once (maximisation); returns (G, N, N) permutation matrices.

    Options: ``max_iter`` (IPFP/SM/RRWM iterations, pygmtools default 50), ``sk_iter``, ``alpha``,
    ``beta`` (RRWM), ``keep_best`` (see module docstring). The result is on ``cost_v``'s device
    and dtype. All G problems go to pygmtools in one batched call.
    """
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}; choose one of {', '.join(METHODS)}")
    if cost_v.ndim != 3 or cost_v.shape[1] != cost_v.shape[2]:
        raise ValueError(f"cost_v must have shape (G, N, N), got {tuple(cost_v.shape)}")
    if cost_e is not None and (edges_s is None or edges_t is None):
        raise ValueError("cost_e needs edges_s and edges_t")
    cost_v = cost_v.detach()
    cost_e = None if cost_e is None else cost_e.detach()
    if method == "brute":
        return _brute(cost_v, cost_e, edges_s, edges_t)
    x0 = hungarian(cost_v)
    if method == "hungarian" or cost_e is None:
        return x0
    n = cost_v.shape[1]
    k = lawler_matrix(cost_v, cost_e, edges_s, edges_t)
    x = _pygm(method, k, n, x0, options)
    if options.get("keep_best", True):
        better = qap_objective(x, cost_v, cost_e, edges_s, edges_t) >= qap_objective(x0, cost_v, cost_e, edges_s, edges_t)
        x = torch.where(better[:, None, None], x, x0)
    return x
