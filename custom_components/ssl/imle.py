"""Implicit maximum-likelihood estimation (IMLE) through the graph-matching solver (spec §2.8).

Niepert et al., NeurIPS 2021. Forward: ε ~ Gumbel(0,1) like c_v, ε′ like c_e;
ṽ = GM(c_v + ε, c_e + ε′). Backward, with the upstream gradient ∇ = ∂ℓ/∂ṽ (1 − 2v* for the Hamming
loss): target costs c_v,λ = c_v + ε − λ∇, c_e,λ = c_e + ε′; v_λ = GM(c_v,λ, c_e,λ);
∂ℓ/∂c_v = (ṽ − v_λ)/λ and ∂ℓ/∂c_e = (ẽ − e_λ)/λ with e[i,j,a,b] = v[i,a]·v[j,b] on edge pairs.

Not from the paper:

- ``normalize_grad`` (default True): the upstream gradient of each graph is divided by its max-abs
  before it enters the target costs, and the returned gradients are multiplied back by it. For the
  per-graph Hamming loss (∇ = 1 − 2v*) this is the identity; for the mean over G graphs (∇ =
  (1 − 2v*)/G) it keeps λ acting on 1 − 2v* as the paper's derivation assumes, instead of an
  effective λ/G that would shrink with the batch, and the gradient is that of the mean.
- ``noise``: ``"gumbel"`` (paper), ``"none"`` (ε = ε′ = 0), ``"constant"`` (ε = ε′ = the Gumbel mean
  0.5772, the paper's "w/o Gumbel" ablation read as a constant perturbation; a constant added to
  every c_v entry does not change the optimal permutation, edge entries get it only on edge pairs).
- ``temperature``: scale of the noise (1.0 = paper). Smaller values help tiny demos where Gumbel(0,1)
  noise swamps affinities bounded by 1.2.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from custom_components.ssl.matching import _pair_mask, edge_indicator, solve

__all__ = ["EULER_GAMMA", "NOISES", "sample_gumbel", "make_noise", "IMLEMatching", "imle_match"]

EULER_GAMMA = 0.5772156649015329
NOISES = ("gumbel", "none", "constant")


def sample_gumbel(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples −log(−log U), U ~ Uniform(0, 1) (mean γ_E ≈ 0.5772, variance π²/6)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - torch.finfo(dtype).eps)))


def make_noise(
    like: torch.Tensor, noise: str = "gumbel", temperature: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    if noise not in NOISES:
        raise ValueError(f"unknown IMLE noise {noise!r}; choose one of {', '.join(NOISES)}")
    if noise == "none" or temperature == 0:
        return torch.zeros_like(like)
    if noise == "constant":
        return torch.full_like(like, EULER_GAMMA * temperature)
    return temperature * sample_gumbel(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class IMLEMatching(torch.autograd.Function):
    """ṽ = GM(c_v + ε, c_e + ε′) with IMLE gradients for c_v and c_e (see the module docstring).

    ``apply(cost_v, cost_e, noise_v, noise_e, edges_s, edges_t, lam, method, options, normalize_grad, timer)``;
    ``cost_e``/``noise_e`` may be None (first-order matching). ``timer`` is an optional dict whose
    ``"forward_solver_seconds"`` / ``"backward_solver_seconds"`` entries are incremented by the wall
    time of the forward / backward solve.
    """

    @staticmethod
    def forward(ctx, cost_v, cost_e, noise_v, noise_e, edges_s, edges_t, lam, method, options, normalize_grad, timer):
        pv = cost_v.detach() + noise_v
        pe = None if cost_e is None else cost_e.detach() + noise_e
        start = time.perf_counter()
        v = solve(pv, pe, edges_s, edges_t, method, **options)
        if timer is not None:
            timer["forward_solver_seconds"] = timer.get("forward_solver_seconds", 0.0) + time.perf_counter() - start
        ctx.save_for_backward(v, pv, *(() if pe is None else (pe, edges_s, edges_t)))
        ctx.lam, ctx.method, ctx.options, ctx.normalize_grad, ctx.timer = lam, method, options, normalize_grad, timer
        ctx.has_edges = pe is not None
        return v

    @staticmethod
    def backward(ctx, grad_v):
        if ctx.has_edges:
            v, pv, pe, edges_s, edges_t = ctx.saved_tensors
        else:
            (v, pv), pe, edges_s, edges_t = ctx.saved_tensors, None, None, None
        lam = ctx.lam
        if ctx.normalize_grad:
            scale = grad_v.abs().amax(dim=(1, 2))
            unit = torch.where(scale[:, None, None] > 0, grad_v / scale.clamp(min=1e-30)[:, None, None], torch.zeros_like(grad_v))
        else:
            scale, unit = torch.ones(grad_v.shape[0], dtype=grad_v.dtype, device=grad_v.device), grad_v
        start = time.perf_counter()
        v_lam = solve(pv - lam * unit, pe, edges_s, edges_t, ctx.method, **ctx.options)
        if ctx.timer is not None:
            ctx.timer["backward_solver_seconds"] = ctx.timer.get("backward_solver_seconds", 0.0) + time.perf_counter() - start
        s = scale[:, None, None]
        grad_cv = s * (v - v_lam) / lam
        grad_ce = None
        if ctx.has_edges and ctx.needs_input_grad[1]:
            s5 = scale[:, None, None, None, None]
            grad_ce = s5 * (edge_indicator(v, edges_s, edges_t) - edge_indicator(v_lam, edges_s, edges_t)) / lam
        return grad_cv, grad_ce, None, None, None, None, None, None, None, None, None


def imle_match(
    cost_v: torch.Tensor,
    cost_e: torch.Tensor | None = None,
    edges_s: torch.Tensor | None = None,
    edges_t: torch.Tensor | None = None,
    lam: float = 80.0,
    method: str = "ipfp",
    noise: str = "gumbel",
    temperature: float = 1.0,
    edge_temperature: float | None = None,
    options: dict[str, Any] | None = None,
    normalize_grad: bool = True,
    generator: torch.Generator | None = None,
    timer: dict | None = None,
) -> torch.Tensor:
    """Differentiable matching: (G, N, N) permutation matrices with IMLE gradients into the costs.

    ``temperature`` scales the vertex noise ε, ``edge_temperature`` (default: ``temperature``) the edge
    noise ε′ (non-zero on edge pairs only).
    """
    noise_v = make_noise(cost_v, noise, temperature, generator)
    noise_e = None
    if cost_e is not None:
        t_e = temperature if edge_temperature is None else edge_temperature
        noise_e = make_noise(cost_e, noise, t_e, generator) * _pair_mask(edges_s, edges_t, cost_e.dtype)
    return IMLEMatching.apply(
        cost_v, cost_e, noise_v, noise_e, edges_s, edges_t, float(lam), method, dict(options or {}), normalize_grad, timer
    )
