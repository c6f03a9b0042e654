"""Transformer attribution by relevance propagation (Chefer et al., CVPR 2021), batched.

Chefer, Gur, Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021;
spec ``specs/explanations.md`` section 5. The rules are re-implemented functionally on the
activations recorded by :class:`LRPCapture` during an ordinary forward of
:class:`~custom_components.networks.AttributionViT` (no monkey-patching):

- linear layers (head, fc1, fc2, proj, qkv): LRP-alpha-beta with alpha = 1, beta = 0, bias ignored;
- LayerNorm, GELU, softmax, dropout, drop path: identity; CLS pooling: all relevance to CLS;
- clone (skip branch point): sum of the branches;
- residual add: gradient x input, each part rescaled so that the total is conserved, with
  **per-sample** sums (the upstream code sums over the whole tensor, batch included: batch 1 only);
- matmuls Q K^T and A V: gradient x input with R / f as the signal, each operand's relevance halved.

R^{A_l} (relevance of A at A V, halved) is kept per block; A_bar_l = E_h[(dy/dA_l * R^{A_l})^+];
C = (I + A_bar_L) ... (I + A_bar_start) (no row normalisation); map = C[:, 0, 1:].

Supported: every :class:`AttributionViT` configuration in eval mode (``faithful`` included: its
head LayerNorm is an identity rule, biases are ignored, the patch BatchNorm lies below the blocks).
Dropout and drop path are treated as identities (use the model in eval mode). The relevance pass
is computed on detached activations: the map is not differentiable (not a training loss).
Relevance below ``start_layer`` is not propagated (it does not enter the map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from custom_components.capture import ViTCapture
from custom_components.explain.base import Explainer, check_map_options, resize_maps
from custom_components.explain.gae import minmax_per_sample, target_scalar
from custom_components.networks.vit import patch_grid_side

__all__ = [
    "TransformerAttribution",
    "LRPCapture",
    "safe_divide",
    "lrp_linear",
    "lrp_matmul",
    "lrp_residual_add",
    "target_index",
]

LRP_EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = LRP_EPS) -> torch.Tensor:
    """a / (b + eps * sign(b)), and 0 where b == 0 exactly (sign-preserving stabiliser)."""
    # copysign + in-place fill: 4 passes over the (often B x h x S x S) operands instead of ~10
    # sign/ones/zeros temporaries; bit-identical (b == 0, the only case where the signs differ, is zeroed)
    den = b + torch.copysign(torch.tensor(eps, dtype=b.dtype, device=b.device), b)
    return (a / den).masked_fill_(b == 0, 0.0)


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor, eps: float = LRP_EPS) -> torch.Tensor:
    """LRP-alpha1-beta0 through ``y = x W^T`` (bias ignored).

    Args:
        x: (..., in) layer input. weight: (out, in). relevance: (..., out) relevance of the output.
    Returns (..., in): R_j = sum_i (x_j^+ w_ij^+ + x_j^- w_ij^-) / sum_j' (...) * R_i.
    """
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    # in-place accumulation on the fresh matmul products: same values, no extra full-size temporaries
    z = torch.matmul(px, pw.T).add_(torch.matmul(nx, nw.T))  # >= 0: the sign-consistent pre-activation
    s = safe_divide(relevance, z, eps)
    return torch.matmul(s, pw).mul_(px).add_(torch.matmul(s, nw).mul_(nx))


def lrp_matmul(
    u: torch.Tensor, v: torch.Tensor, relevance: torch.Tensor, halve: bool = True, eps: float = LRP_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-operand rule through ``f = u @ v`` (batched over leading axes).

    R^u = u * ((R / f) @ v^T), R^v = v * (u^T @ (R / f)); each sums to sum(R) where f != 0, so
    halving (default) conserves the total.
    """
    s = safe_divide(relevance, u @ v, eps)
    ru = torch.matmul(s, v.transpose(-2, -1)).mul_(u)
    rv = torch.matmul(u.transpose(-2, -1), s).mul_(v)
    if halve:  # in place: fresh products, and no autograd through the relevance pass
        ru, rv = ru.div_(2), rv.div_(2)
    return ru, rv


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1).view(-1, *([1] * (t.dim() - 1)))


def lrp_residual_add(
    a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor, eps: float = LRP_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conserving rule through ``f = a + b`` with per-sample (first axis) sums.

    R^a = a * R / f, R^b = b * R / f, then R^a <- R^a * |sum R^a| / (|sum R^a| + |sum R^b|) *
    sum R / sum R^a (same for b): per sample, sum R^a + sum R^b = sum R.
    """
    s = safe_divide(relevance, a + b, eps)
    ra, rb = a * s, b * s
    sa, sb, sr = _per_sample_sum(ra), _per_sample_sum(rb), _per_sample_sum(relevance)
    total = sa.abs() + sb.abs()
    fa = safe_divide(sa.abs(), total, eps) * sr
    fb = safe_divide(sb.abs(), total, eps) * sr
    return ra.mul_(safe_divide(fa, sa, eps)), rb.mul_(safe_divide(fb, sb, eps))


def target_index(logits: torch.Tensor, target: torch.Tensor | int | str | None = None) -> torch.Tensor:
    """Per-sample class index (B,) selected as :func:`~custom_components.explain.gae.target_scalar` does."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    b, c = logits.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        return logits.detach().argmax(dim=1)
    if isinstance(target, int):
        return torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    if isinstance(target, torch.Tensor):
        t = target.to(logits.device)
        if t.dim() == 2 and t.shape[1] == c and c > 1:
            return t.argmax(dim=1)
        return t.reshape(b, -1)[:, 0].long()
    raise ValueError(f"unsupported target {target!r}")


class LRPCapture(ViTCapture):
    """Records (detached) the activations the relevance pass needs, plus the non-detached attention.

    Per block i: ``x_in`` (block input), ``h1`` (norm1 output = qkv input), ``qkv`` (qkv output),
    ``o`` (proj input = A V merged over heads), ``attn_out`` (proj output), ``x_mid`` (norm2 input),
    ``h2`` (fc1 input), ``g`` (fc2 input), ``mlp_out`` (fc2 output); and ``head_in`` (head input).
    """

    KEYS = ("x_in", "h1", "qkv", "o", "attn_out", "x_mid", "h2", "g", "mlp_out")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, blocks=None, attention=True, tokens=False, detach=False)
        self.acts: dict[int, dict[str, torch.Tensor]] = {}
        self.head_in: torch.Tensor | None = None
        for i, blk in enumerate(self.vit.blocks):
            self._handles += [
                blk.register_forward_pre_hook(self._pre(i, "x_in")),
                blk.attn.qkv.register_forward_hook(self._io(i, "h1", "qkv")),
                blk.attn.proj.register_forward_hook(self._io(i, "o", "attn_out")),
                blk.norm2.register_forward_pre_hook(self._pre(i, "x_mid")),
                blk.mlp.fc1.register_forward_hook(self._io(i, "h2", None)),
                blk.mlp.fc2.register_forward_hook(self._io(i, "g", "mlp_out")),
            ]
        self._handles.append(self.vit.head.register_forward_hook(self._head_hook))

    def _store(self, i: int, key: str, t: torch.Tensor) -> None:
        self.acts.setdefault(i, {})[key] = t.detach()

    def _pre(self, i: int, key: str):
        def hook(module, args):
            self._store(i, key, args[0])

        return hook

    def _io(self, i: int, key_in: str, key_out: str | None):
        def hook(module, args, output):
            self._store(i, key_in, args[0])
            if key_out is not None:
                self._store(i, key_out, output)

        return hook

    def _head_hook(self, module, args, output):
        self.head_in = args[0].detach()

    def clear(self) -> None:
        super().clear()
        if "acts" in self.__dict__:
            self.acts.clear()
            self.head_in = None


def _block_relprop(blk: nn.Module, acts: dict, attn: torch.Tensor, relevance: torch.Tensor, eps: float):
    """Relevance (B, S, D) at the block input from the relevance at its output; also R^A (B, h, S, S)."""
    # x_out = x_mid + mlp(norm2(x_mid))
    r_skip, r_mlp = lrp_residual_add(acts["x_mid"], acts["mlp_out"], relevance, eps)
    r_g = lrp_linear(acts["g"], blk.mlp.fc2.weight.detach(), r_mlp, eps)  # fc2; GELU/dropout: identity
    r_h2 = lrp_linear(acts["h2"], blk.mlp.fc1.weight.detach(), r_g, eps)  # fc1; norm2: identity
    relevance = r_skip.add_(r_h2)  # clone
    # x_mid = x_in + proj(attn(norm1(x_in)))
    r_skip, r_attn = lrp_residual_add(acts["x_in"], acts["attn_out"], relevance, eps)
    r_o = lrp_linear(acts["o"], blk.attn.proj.weight.detach(), r_attn, eps)
    b, s, d = r_o.shape
    h = blk.attn.num_heads
    hd = d // h
    r_o = r_o.reshape(b, s, h, hd).transpose(1, 2)  # (B, h, S, hd)
    qkv = acts["qkv"].reshape(b, s, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    r_a, r_v = lrp_matmul(attn, v, r_o, halve=True, eps=eps)  # A V
    # softmax (and the scale): identity; Q K^T
    r_q, r_kt = lrp_matmul(q, k.transpose(-2, -1), r_a, halve=True, eps=eps)
    r_k = r_kt.transpose(-2, -1)
    r_qkv = torch.stack([r_q, r_k, r_v], dim=0).permute(1, 3, 0, 2, 4).reshape(b, s, 3 * d)
    r_h1 = lrp_linear(acts["h1"], blk.attn.qkv.weight.detach(), r_qkv, eps)  # qkv; norm1: identity
    return r_skip.add_(r_h1), r_a


class TransformerAttribution(Explainer[LRPCapture]):
    """Chefer's LRP-based transformer attribution, batched (batched maps equal per-sample maps).

    Args:
        model: an :class:`~custom_components.networks.AttributionViT` (in eval mode).
        target: ``"auto"`` (single logit: the logit; multi-class: the labels passed to
            :meth:`explain`, else the prediction), ``"predicted"`` or a class index.
        start_layer: first block in the product (0: notebook / ugent-korea; 1: Chefer's scripts).
        upsample: ``"bilinear"`` (reference), ``"nearest"`` or ``"none"``.
        normalize: ``"minmax"`` per sample (reference) or ``"none"``.
    """

    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        target: str | int = "auto",
        start_layer: int = 0,
        upsample: str = "bilinear",
        normalize: str = "minmax",
        eps: float = 1e-8,
        lrp_eps: float = LRP_EPS,
    ) -> None:
        super().__init__(model)
        check_map_options(upsample, normalize, target)
        self.target = target
        self.start_layer = int(start_layer)
        self.upsample = upsample
        self.normalize = normalize
        self.eps = float(eps)
        self.lrp_eps = float(lrp_eps)

    def capture(self, detach: bool = False) -> LRPCapture:
        return LRPCapture(self.model)

    def propagate(
        self, logits: torch.Tensor, record: LRPCapture, target: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Relevance pass: (list of R^{A_l} for l >= start_layer, list of relevance at each block input).

        Both lists are in forward (block) order; the relevance of a one-hot target sums to ~1 per
        sample at every level.
        """
        vit = record.vit
        n_blocks = len(vit.blocks)
        if not 0 <= self.start_layer < n_blocks:
            raise ValueError(f"start_layer {self.start_layer} leaves no block of {n_blocks}")
        if record.head_in is None:
            raise RuntimeError("no forward recorded: run the model inside TransformerAttribution.capture()")
        tgt = target if self.target == "auto" else self.target
        logits2 = logits.reshape(logits.shape[0], -1)
        index = target_index(logits2, tgt)
        z = record.head_in
        dtype = torch.promote_types(z.dtype, torch.float32)
        one_hot = torch.zeros(logits2.shape, dtype=dtype, device=z.device)
        one_hot.scatter_(1, index.view(-1, 1), 1.0)
        r_cls = lrp_linear(z.to(dtype), vit.head.weight.detach().to(dtype), one_hot, self.lrp_eps)
        x_last = record.acts[n_blocks - 1]["x_mid"]
        relevance = torch.zeros(x_last.shape, dtype=dtype, device=z.device)
        relevance[:, 0] = r_cls  # CLS pooling; head_norm / final norm: identity
        r_attn, r_inputs = [None] * n_blocks, [None] * n_blocks
        for i in range(n_blocks - 1, self.start_layer - 1, -1):
            acts = {k: t.to(dtype) for k, t in record.acts[i].items()}
            attn = record.attention(i).detach().to(dtype)
            relevance, r_attn[i] = _block_relprop(vit.blocks[i], acts, attn, relevance, self.lrp_eps)
            r_inputs[i] = relevance
        return r_attn[self.start_layer :], r_inputs[self.start_layer :]

    def relevance(self, logits: torch.Tensor, record: LRPCapture, target: torch.Tensor | None = None) -> torch.Tensor:
        """C = (I + A_bar_L) ... (I + A_bar_start): (B, S, S)."""
        n_blocks = len(record.vit.blocks)
        indices = list(range(n_blocks))[self.start_layer :]
        attentions = [record.attention(i) for i in indices]
        if not logits.requires_grad or not all(a.requires_grad for a in attentions):
            raise RuntimeError(
                "TransformerAttribution needs the logits and attention in the autograd graph: run the "
                "forward with gradients enabled, inside TransformerAttribution.capture()"
            )
        tgt = target if self.target == "auto" else self.target
        grads = torch.autograd.grad(target_scalar(logits, tgt), attentions, retain_graph=True)
        r_attn, _ = self.propagate(logits, record, target)
        s = r_attn[0].shape[-1]
        dtype = r_attn[0].dtype
        joint = torch.eye(s, dtype=dtype, device=r_attn[0].device).expand(r_attn[0].shape[0], s, s)
        for grad, rel in zip(grads, r_attn, strict=True):
            cam = (grad.detach().to(dtype) * rel).clamp(min=0).mean(dim=1)
            joint = joint + torch.bmm(cam, joint)
        return joint

    def explain(
        self,
        logits: torch.Tensor,
        record: LRPCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        joint = self.relevance(logits, record, target)
        side = patch_grid_side(joint.shape[-1] - 1)
        maps = joint[:, 0, 1:].reshape(-1, side, side)
        if self.upsample != "none" and out_size is not None:
            maps = resize_maps(maps, out_size, mode=self.upsample)
        if self.normalize == "minmax":
            maps = minmax_per_sample(maps, self.eps)
        return maps
