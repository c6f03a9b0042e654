"""LVM-Med objective (spec §2, §7): IMLE identities, Gumbel sampler, k-NN graph and GCN operator,
affinity invariants and bounds, the objective's contract, and a small learning check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from custom_components.ssl import GraphMatchingObjective, SSLOutput, TwoViews
from custom_components.ssl.affinity import edge_affinity, local_terms, location_distances, vertex_affinity
from custom_components.ssl.graph import GCN, gcn_operator, knn_graph
from custom_components.ssl.imle import EULER_GAMMA, imle_match, sample_gumbel
from custom_components.ssl.matching import edge_indicator, hamming, solve
from custom_components.ssl.views import cell_centres

# ---------------------------------------------------------------------------------------------- IMLE


def _edges(n: int, g: int = 1, seed: int = 0, k: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return knn_graph(torch.randn(g, n, 3, generator=gen), k), knn_graph(torch.randn(g, n, 3, generator=gen), k)


def _grads(cost_v, cost_e, es, et, reduce="sum", **kw):
    cost_v = cost_v.clone().requires_grad_()
    cost_e = None if cost_e is None else cost_e.clone().requires_grad_()
    v = imle_match(cost_v, cost_e, es, et, **kw)
    loss = hamming(v, torch.eye(v.shape[-1]).expand_as(v))
    (loss.sum() if reduce == "sum" else loss.mean()).backward()
    return v, cost_v.grad, None if cost_e is None else cost_e.grad


@pytest.mark.parametrize("noise", ["none", "gumbel", "constant"])
def test_imle_gradient_is_zero_at_the_gold_matching(noise):
    n = 6
    es, et = _edges(n, g=2)
    gen = torch.Generator().manual_seed(1)
    cost_v = torch.rand(2, n, n, generator=gen) * 2 - 1 + 50 * torch.eye(n)  # gold wins even under noise
    cost_e = torch.rand(2, n, n, n, n, generator=gen) * 2 - 1
    v, gv, ge = _grads(cost_v, cost_e, es, et, noise=noise)
    assert torch.equal(v, torch.eye(n).expand(2, n, n))
    assert torch.count_nonzero(gv) == 0 and torch.count_nonzero(ge) == 0


@pytest.mark.parametrize("method", ["ipfp", "rrwm", "hungarian"])
def test_imle_without_noise_returns_exactly_the_mismatch_over_lambda(method):
    # |c| ≤ 1, λ = 80: the target solve returns v* (a mismatch of m rows loses ≥ 160m on vertices and
    # gains < 160m on edges), so ∂ℓ/∂c_v = (ṽ − v*)/λ and ∂ℓ/∂c_e = (ẽ − e*)/λ exactly
    n, g, lam = 6, 4, 80.0
    es, et = _edges(n, g=g, seed=2)
    gen = torch.Generator().manual_seed(3)
    cost_v = torch.rand(g, n, n, generator=gen) * 2 - 1
    cost_e = torch.rand(g, n, n, n, n, generator=gen) * 2 - 1
    v, gv, ge = _grads(cost_v, cost_e, es, et, lam=lam, noise="none", method=method)
    eye = torch.eye(n).expand(g, n, n)
    assert torch.equal(v, solve(cost_v, cost_e, es, et, method))  # forward = the plain solve
    assert hamming(v, eye).sum() > 0  # a non-trivial instance
    assert torch.equal(gv, (v - eye) / lam)
    assert torch.allclose(ge, (edge_indicator(v, es, et) - edge_indicator(eye, es, et)) / lam)
    # the mean over graphs scales the gradient by 1/G, λ still acts on the per-graph 1 − 2v*
    _, gv_mean, _ = _grads(cost_v, cost_e, es, et, reduce="mean", lam=lam, noise="none", method=method)
    assert torch.allclose(gv_mean, (v - eye) / (lam * g))


def test_imle_first_order_without_edges():
    gen = torch.Generator().manual_seed(4)
    cost_v = torch.rand(3, 5, 5, generator=gen) * 2 - 1
    v, gv, _ = _grads(cost_v, None, None, None, noise="none")
    assert torch.equal(gv, (v - torch.eye(5)) / 80.0)


def _loss(cost_v, cost_e=None, es=None, et=None, seed=None, draws=1, temperature=0.0):
    """Hamming loss of the (perturbed) solve, averaged over ``draws`` common-random-number draws."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    total = 0.0
    for _ in range(draws):
        noise = "gumbel" if temperature > 0 else "none"
        v = imle_match(cost_v, cost_e, es, et, noise=noise, temperature=temperature, generator=gen)
        total += hamming(v, torch.eye(3).expand_as(v)).sum().item()
    return total / draws


def test_imle_finite_difference_sign_on_a_three_node_toy():
    # rows 0 and 1 prefer each other's partner: the solve swaps them (Hamming 4)
    cost_v = torch.tensor([[[0.1, 0.6, 0.0], [0.6, 0.1, 0.0], [0.0, 0.0, 0.5]]])
    es = et = torch.tensor([[[0, 1, 1], [1, 0, 1], [1, 1, 0]]], dtype=torch.bool)  # a triangle
    cost_e = torch.zeros(1, 3, 3, 3, 3)
    _, gv, ge = _grads(cost_v, cost_e, es, et, noise="none")
    assert gv[0, 0, 1] > 0 and gv[0, 0, 0] < 0 and gv[0, 2, 2] == 0
    base = _loss(cost_v, cost_e, es, et)
    assert base == 4.0
    for h in (5.0, 20.0, 40.0):  # finite steps along ∓ the IMLE gradient (λ = 80: entries are ±1/80)
        assert _loss(cost_v - h * gv, cost_e - h * ge, es, et) <= base
        assert _loss(cost_v + h * gv, cost_e + h * ge, es, et) >= base
    assert _loss(cost_v - 40.0 * gv, cost_e - 40.0 * ge, es, et) == 0.0  # the step fixes the swap
    # the Gumbel-smoothed loss (common random numbers) goes down along −g and up along +g
    kw = dict(es=es, et=et, seed=0, draws=300, temperature=0.3)
    smooth = _loss(cost_v, cost_e, **kw)
    assert _loss(cost_v - 10.0 * gv, cost_e - 10.0 * ge, **kw) < smooth < _loss(cost_v + 10.0 * gv, cost_e + 10.0 * ge, **kw)


def test_gumbel_sampler_moments():
    x = sample_gumbel((400_000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(x.mean().item() - EULER_GAMMA) < 0.01
    assert abs(x.var().item() - math.pi**2 / 6) < 0.03
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------------- graph and GCN


def test_knn_graph_degree_symmetry_and_no_self_loops():
    z = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(5))
    adj = knn_graph(z, 5)
    assert adj.dtype == torch.bool and torch.equal(adj, adj.transpose(1, 2))
    assert not adj.diagonal(dim1=1, dim2=2).any()
    assert (adj.sum(-1) >= 5).all()
    # each node's 5 most cosine-similar others are among its neighbours
    zn = nn.functional.normalize(z, dim=-1)
    sim = (zn @ zn.transpose(1, 2)).masked_fill(torch.eye(16, dtype=torch.bool), -2)
    top = sim.topk(5, dim=-1).indices
    assert adj.gather(2, top).all()
    with pytest.raises(ValueError, match="k-NN"):
        knn_graph(z, 16)


def test_gcn_operator_is_symmetric_with_spectrum_in_minus_one_one():
    adj = knn_graph(torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(6)), 5)
    op = gcn_operator(adj, torch.float64)
    assert torch.allclose(op, op.transpose(1, 2))
    eig = torch.linalg.eigvalsh(op)
    assert (eig > -1).all() and (eig <= 1 + 1e-9).all()
    assert torch.allclose(eig[:, -1], torch.ones(3, dtype=torch.float64))  # connected graph: top eigenvalue 1
    a = adj[0].double() + torch.eye(16, dtype=torch.float64)
    d = a.sum(1)
    assert torch.allclose(op[0], a / torch.sqrt(d[:, None] * d[None, :]))


def test_gcn_two_layers_relu_between():
    gcn = GCN(4, 3)
    op = gcn_operator(knn_graph(torch.randn(1, 6, 4), 2))
    x = torch.randn(1, 6, 4)
    w0, w1 = gcn.layers[0].weight, gcn.layers[1].weight
    assert torch.allclose(gcn(x, op), op @ (torch.relu(op @ x @ w0.T) @ w1.T), atol=1e-6)


# ------------------------------------------------------------------------------------- affinities


def test_edge_affinity_invariant_to_a_shift_of_a_view():
    gen = torch.Generator().manual_seed(7)
    hs, ht = torch.randn(2, 8, 5, generator=gen), torch.randn(2, 8, 5, generator=gen)
    es, et = _edges(8, g=2, seed=8)
    ce = edge_affinity(hs, ht, es, et)
    shifted = edge_affinity(hs + torch.randn(5, generator=gen), ht - 3 * torch.randn(5, generator=gen), es, et)
    assert torch.allclose(ce, shifted, atol=1e-5)
    assert torch.count_nonzero(ce[~(es[:, :, :, None, None] & et[:, None, None])]) == 0
    i, j, a, b = 1, int(es[0, 1].nonzero()[0]), 2, int(et[0, 2].nonzero()[0])
    assert torch.isclose(ce[0, i, j, a, b], nn.functional.cosine_similarity(hs[0, i] - hs[0, j], ht[0, a] - ht[0, b], dim=0))


def test_edge_affinity_of_identical_nodes_is_zero_with_a_bounded_gradient():
    # adjacent nodes with the same closed neighbourhood get identical GCN outputs: their difference
    # is the zero vector, whose cosine counts as 0 and must not blow up the gradient
    gen = torch.Generator().manual_seed(11)
    hs = torch.randn(1, 6, 4, generator=gen)
    hs[0, 1] = hs[0, 0]
    hs.requires_grad_()
    ht = torch.randn(1, 6, 4, generator=gen)
    es = torch.ones(1, 6, 6, dtype=torch.bool) & ~torch.eye(6, dtype=torch.bool)
    ce = edge_affinity(hs, ht, es, es)
    assert torch.count_nonzero(ce[0, 0, 1]) == 0 and torch.count_nonzero(ce[0, 1, 0]) == 0
    ce.sum().backward()
    assert torch.isfinite(hs.grad).all() and hs.grad.abs().max() < 100


def test_vertex_affinity_bounds_and_combination():
    gen = torch.Generator().manual_seed(9)
    g, n, p, d = 2, 6, 9, 7
    hs, ht = torch.randn(g, n, 5, generator=gen), torch.randn(g, n, 5, generator=gen)
    ys, yt = torch.randn(g, n, p, d, generator=gen), torch.randn(g, n, p, d, generator=gen)
    geom = torch.rand(g * n, 5, generator=gen)
    cs = cell_centres(geom, (3, 3)).view(g, n, p, 2)
    ct = cell_centres(geom.flip(0), (3, 3)).view(g, n, p, 2)
    cv = vertex_affinity(hs, ht, ys, yt, cs, ct, alpha=0.8, gamma=4)
    assert cv.shape == (g, n, n) and cv.abs().max() <= 1.2 + 1e-6
    # extremes: identical positive features everywhere reach the upper bound 0.8 + 0.2·2
    ones, h1 = torch.ones(g, n, p, d), torch.ones(g, n, 5)
    assert torch.allclose(vertex_affinity(h1, h1, ones, ones, cs, ct), torch.full((g, n, n), 1.2))
    assert torch.allclose(vertex_affinity(h1, -h1, ones, -ones, cs, ct), torch.full((g, n, n), -1.2))
    # the local part is ½(loc + feat) of both directions
    loc_st, feat_st = local_terms(ys, yt, cs, ct, 4)
    loc_ts, feat_ts = local_terms(yt, ys, ct, cs, 4)
    glob = vertex_affinity(hs, ht)
    expected = 0.8 * glob + 0.2 * (0.5 * (loc_st + feat_st) + 0.5 * (loc_ts + feat_ts).transpose(1, 2))
    assert torch.allclose(cv, expected, atol=1e-6)


def test_location_matching_of_identical_views():
    g, n, r, s, d = 1, 4, 3, 4, 6
    geom = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(n, 1)
    c = cell_centres(geom, (r, s)).view(g, n, r * s, 2)
    nearest = location_distances(c, c).argmin(-1)  # (G, N, N, P)
    assert torch.equal(nearest, torch.arange(r * s).expand_as(nearest))  # each cell matches itself
    y = torch.randn(g, n, r * s, d, generator=torch.Generator().manual_seed(10))
    loc, feat = local_terms(y, y, c, c, gamma=5)
    assert torch.allclose(loc.diagonal(dim1=1, dim2=2), torch.ones(g, n))
    assert torch.allclose(feat.diagonal(dim1=1, dim2=2), torch.ones(g, n))
    # a view that is the horizontal mirror: cell (r, c) lies on cell (r, S−1−c) of the other view
    flipped = cell_centres(geom.clone().index_fill_(1, torch.tensor([4]), 1.0), (r, s)).view(g, n, r * s, 2)
    nearest = location_distances(c, flipped).argmin(-1)[0, 0, 0]
    rows, cols = torch.arange(r * s) // s, torch.arange(r * s) % s
    assert torch.equal(nearest, rows * s + (s - 1 - cols))
    y_mirror = y.view(g, n, r, s, d).flip(3).reshape(g, n, r * s, d)  # the features follow the pixels
    loc, _ = local_terms(y, y_mirror, c, flipped, gamma=r * s)
    assert torch.allclose(loc.diagonal(dim1=1, dim2=2), torch.ones(g, n))


# -------------------------------------------------------------------------------------- objective

FULL = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])


def test_objective_contract_and_gradients():
    torch.manual_seed(0)
    b, d = 32, 12
    obj = GraphMatchingObjective(d, projector_dim=16, gcn_width=16, seed=0)
    ms = torch.randn(b, d, 3, 3, requires_grad=True)
    mt = (ms.detach() + 0.3 * torch.randn(b, d, 3, 3)).requires_grad_()
    geom = FULL.repeat(b, 1)
    out = obj(ms, mt, geom, geom)
    assert isinstance(out, SSLOutput) and out._fields == ("loss", "matching_accuracy", "solver_seconds", "graph_seconds")
    assert out.loss.ndim == 0 and 0 <= out.matching_accuracy.item() <= 1
    assert 0 <= out.solver_seconds <= out.graph_seconds
    # loss = mean Hamming = 2 (1 − accuracy) N
    assert torch.isclose(out.loss, 2 * (1 - out.matching_accuracy) * 16)
    out.loss.backward()
    if out.matching_accuracy < 1:
        for t in (ms.grad, mt.grad, obj.projector.weight.grad, obj.gcn.layers[0].weight.grad, obj.gcn.layers[1].weight.grad):
            assert t is not None and torch.count_nonzero(t) > 0
    assert "backward_solver_seconds" in obj.timer
    with pytest.raises(ValueError, match="multiple of graph_size"):
        obj(ms[:20], mt[:20], geom[:20], geom[:20])
    with pytest.raises(ValueError, match="unknown solver"):
        GraphMatchingObjective(d, solver="lpmp")


ABLATIONS = [{}, {"second_order": False}, {"local_term": False}, {"message_passing": False}, {"solver": "rrwm"}]


@pytest.mark.parametrize("kw", ABLATIONS)
def test_identical_views_match_perfectly_without_noise(kw):
    torch.manual_seed(1)
    obj = GraphMatchingObjective(8, projector_dim=8, gcn_width=8, noise="none", **kw)
    m = torch.randn(32, 8, 2, 2)
    geom = FULL.repeat(32, 1)
    out = obj(m, m.clone(), geom, geom)
    assert out.matching_accuracy.item() == 1.0 and out.loss.item() == 0.0


def test_hungarian_solver_is_the_first_order_ablation():
    # Hungarian ignores c^e, so no edge gradient may reach the GCN: the same loss and gradients as second_order=False
    m = torch.randn(16, 8, 2, 2, generator=torch.Generator().manual_seed(6))
    geom = FULL.repeat(16, 1)
    grads = []
    for kw in ({"solver": "hungarian"}, {"second_order": False}):
        torch.manual_seed(7)
        obj = GraphMatchingObjective(8, projector_dim=8, gcn_width=8, seed=9, **kw)
        obj(m, m + 0.3 * torch.randn(m.shape, generator=torch.Generator().manual_seed(8)), geom, geom).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in obj.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_objective_is_reproducible_with_a_seed():
    m = torch.randn(16, 8, 2, 2, generator=torch.Generator().manual_seed(2))
    geom = FULL.repeat(16, 1)
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        obj = GraphMatchingObjective(8, projector_dim=8, gcn_width=8, seed=5)
        losses.append([obj(m, m + 0.1, geom, geom).loss.item() for _ in range(3)])
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------------ learning check

#: Settings of the learning check, which the bundle's demo copies. *Not from the paper* (see the
#: GraphMatchingObjective docstring): edge weight 0.1 instead of 1, Gumbel noise at temperature 0.1
#: instead of 1, IPFP capped at 10 iterations; everything else (GCN, k = 5, α = 0.8, γ = 20, λ = 80,
#: Hungarian + IPFP second-order solve, IMLE gradients into vertex and edge affinities) as in the paper.
LEARNING_OBJECTIVE = dict(edge_weight=0.1, noise_temperature=0.1, solver_options={"max_iter": 10})
LEARNING_RUN = dict(lr=3e-3, steps=200, items=32, draws=6)
#: Measured when the test was written (1 torch thread, ~13 s per run on a shared 2-core machine):
#: mean matching accuracy of the first 20 -> last 30 steps, chance = 1/16 = 0.0625.
LEARNING_RESULTS = {0: (0.173, 0.305), 1: (0.173, 0.312), 2: (0.141, 0.264)}
# Other settings, same runs (seeds 0, 1, 2; first 20 -> last 30):
#   edge_weight 1.0 (paper), temperature 0.1: (0.125, 0.221), (0.113, 0.184), (0.142, 0.192) - too slow for the test
#   edge_gradient=False (edge weight 0.1, temperature 0.1): (0.166, 0.365), (0.181, 0.341), (0.175, 0.318)
#   before zero node differences got a zero edge cosine, edge_gradient=True stayed at chance: 0.066-0.072


def _blobs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n RGB images of three Gaussian blobs each (random centres, radii and colours)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    imgs = torch.zeros(n, 3, size, size)
    for i in range(n):
        for _ in range(3):
            c = torch.rand(2, generator=gen) * size
            r = 1.5 + 2.5 * torch.rand(1, generator=gen)
            imgs[i] += torch.rand(3, 1, 1, generator=gen) * torch.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * r**2))
    return imgs.clamp(0, 1)


def _learn(seed: int, lr: float, steps: int, items: int, draws: int, **objective_kw) -> tuple[float, float]:
    """Train a 2-layer conv net + the objective on ``items`` blob images; returns the mean matching
    accuracy of the first 20 and the last 30 steps. Each item has a pool of ``draws`` TwoViews pairs
    (made once, for speed); every step uses a random pair of each item, in a random order."""
    torch.manual_seed(seed)
    imgs = _blobs(items, seed=seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1))  # 16x16 -> 32x4x4
    obj = GraphMatchingObjective(32, projector_dim=32, gcn_width=32, seed=seed, **objective_kw)
    opt = torch.optim.Adam([*net.parameters(), *obj.parameters()], lr=lr)
    views = TwoViews(16, blur_prob=0.0, solarize_prob=0.0)
    views.set_random_state(seed)
    pool = [[views({"image": im}) for _ in range(draws)] for im in imgs]
    keys = ("view_s", "view_t", "geom_s", "geom_t")
    pool = {k: torch.stack([torch.stack([d[k] for d in item]) for item in pool]) for k in keys}
    acc = []
    for _ in range(steps):
        order, draw = torch.randperm(items), torch.randint(draws, (items,))
        batch = {k: v[order, draw[order]] for k, v in pool.items()}
        out = obj(net(batch["view_s"]), net(batch["view_t"]), batch["geom_s"], batch["geom_t"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        acc.append(out.matching_accuracy.item())
    return float(np.mean(acc[:20])), float(np.mean(acc[-30:]))


def test_matching_accuracy_rises_well_above_chance():
    # seeds 0, 1, 2 all pass with these settings (LEARNING_RESULTS); the test runs seed 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first, last = _learn(0, **LEARNING_RUN, **LEARNING_OBJECTIVE)
    finally:
        torch.set_num_threads(threads)
    chance = 1 / 16
    assert last > 3 * chance and last > first + 0.08, (first, last)
