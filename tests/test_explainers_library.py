"""Raw attention, rollout, LRP transformer attribution, ViT Grad-CAM and extra map metrics (CPU, tiny)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from custom_components.capture import ViTCapture
from custom_components.explain import AttentionRollout, RawAttention, TransformerAttribution, ViTGradCAM
from custom_components.explain.attention import attention_rollout, discard_lowest
from custom_components.explain.gae import minmax_per_sample
from custom_components.explain.gradcam import eigen_projection
from custom_components.explain.lrp import lrp_linear, lrp_matmul, lrp_residual_add, safe_divide
from custom_components.metrics.map_quality import deletion_insertion_auc, energy_pointing_game, map_quality

from conftest import scrambled_vit


def images(b=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, 8, 8, generator=g, dtype=dtype)


def softmax_attn(b, h, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, s, generator=g, dtype=torch.float64).mul(2).softmax(-1)


def recorded_attentions(model, x):
    with ViTCapture(model, blocks=None, attention=True, tokens=False, detach=True) as rec, torch.no_grad():
        model(x)
        return [rec.attention(i) for i in range(len(model.blocks))]


# --------------------------------------------------------------------------- raw attention / rollout


def test_raw_attention_equals_hand_computed_cls_row():
    m, x = scrambled_vit(), images()
    with torch.no_grad():
        tok = m.embed(x)
        blk = m.blocks[0]
        h1 = blk.norm1(tok)
        qkv = h1 @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k = qkv[..., :8], qkv[..., 8:16]
        heads = []
        for hd in range(2):
            qh, kh = q[..., hd * 4 : (hd + 1) * 4], k[..., hd * 4 : (hd + 1) * 4]
            heads.append(torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1))  # scale = 4 ** -0.5
        expected = torch.stack(heads, 1).mean(1)[:, 0, 1:].reshape(3, 2, 2)
    got = RawAttention(m, upsample="none", normalize="none").attribute(x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    # per head, the patch part of the CLS row sums to 1 - A[0, 0]
    a = torch.stack(heads, 1)
    torch.testing.assert_close(a[:, :, 0, 1:].sum(-1), 1 - a[:, :, 0, 0])
    # default: min-max in [0, 1] at the image size
    d = RawAttention(m).attribute(x)
    assert d.shape == (3, 8, 8) and d.min() >= 0 and d.max() <= 1
    n = RawAttention(m, upsample="nearest", normalize="none").attribute(x)
    torch.testing.assert_close(n, expected.repeat_interleave(4, 1).repeat_interleave(4, 2))


def test_rollout_one_and_two_blocks_closed_form():
    m1, x = scrambled_vit(1), images()
    (a1,) = recorded_attentions(m1, x)
    eye = torch.eye(5, dtype=torch.float64)
    got = AttentionRollout(m1, upsample="none", normalize="none").attribute(x)
    torch.testing.assert_close(got.reshape(3, 4), (0.5 * a1.mean(1) + 0.5 * eye)[:, 0, 1:])

    m2 = scrambled_vit(2)
    a1, a2 = recorded_attentions(m2, x)
    hat = [0.5 * a.mean(1) + 0.5 * eye for a in (a1, a2)]
    got = AttentionRollout(m2, upsample="none", normalize="none").attribute(x)
    torch.testing.assert_close(got.reshape(3, 4), (hat[1] @ hat[0])[:, 0, 1:])
    # start_layer = 1: only the last factor
    got = AttentionRollout(m2, start_layer=1, upsample="none", normalize="none").attribute(x)
    torch.testing.assert_close(got.reshape(3, 4), hat[1][:, 0, 1:])
    # lgmvit_reference: no identity at the first layer of the product
    got = AttentionRollout(m2, variant="lgmvit_reference", upsample="none", normalize="none").attribute(x)
    torch.testing.assert_close(got.reshape(3, 4), (hat[1] @ a1.mean(1))[:, 0, 1:])
    torch.testing.assert_close(attention_rollout([a1], variant="lgmvit_reference"), a1.mean(1))


def test_rollout_uniform_identity_and_keepdim_axis():
    s, layers = 5, 3
    uniform = torch.full((2, 2, s, s), 1.0 / s, dtype=torch.float64)
    j = attention_rollout([uniform] * layers)
    u = torch.full((s, s), 1.0 / s, dtype=torch.float64)
    torch.testing.assert_close(j[0], 2.0**-layers * torch.eye(s, dtype=torch.float64) + (1 - 2.0**-layers) * u)
    eye = torch.eye(s, dtype=torch.float64).expand(2, 2, s, s)
    ident = attention_rollout([eye, eye])
    zero = minmax_per_sample(ident[:, 0, 1:])
    assert torch.isfinite(zero).all() and (zero == 0).all()
    # non-symmetric fused attention (max fusion): keepdim rows sum to 1; vit-explain's form does not
    a = softmax_attn(1, 2, s)
    j = attention_rollout([a], head_fusion="max")
    torch.testing.assert_close(j.sum(-1), torch.ones(1, s, dtype=torch.float64))
    fused = a.amax(1) + torch.eye(s, dtype=torch.float64)
    buggy = fused / fused.sum(dim=-1)
    assert not torch.allclose(buggy.sum(-1), torch.ones(1, s, dtype=torch.float64))


def test_discard_ratio_is_per_sample():
    a = softmax_attn(3, 2, 5, seed=3)
    fused = a.mean(1)
    d = discard_lowest(fused, 0.4)  # floor(25 * 0.4) = 10 entries per sample
    for b in range(3):
        assert int((d[b] == 0).sum()) >= 9  # every sample, not only element 0
        assert d[b, 0, 0] == fused[b, 0, 0]
    batched = attention_rollout([a, a.flip(0)], discard_ratio=0.4, head_fusion="min")
    loop = torch.cat(
        [attention_rollout([a[i : i + 1], a.flip(0)[i : i + 1]], head_fusion="min", discard_ratio=0.4) for i in range(3)]
    )
    torch.testing.assert_close(batched, loop)
    m, x = scrambled_vit(2), images()
    e = AttentionRollout(m, discard_ratio=0.5)
    torch.testing.assert_close(e.attribute(x), torch.cat([e.attribute(x[i : i + 1]) for i in range(3)]))


# --------------------------------------------------------------------------- LRP rules


def test_lrp_linear_rule_conserves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    r = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    rin = lrp_linear(x, w, r)
    torch.testing.assert_close(rin.sum(-1), r.sum(-1), atol=1e-7, rtol=1e-7)
    # alpha1-beta0: a positive input with a negative weight gets nothing
    rin = lrp_linear(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(rin, torch.tensor([[1.0, 0.0]]))
    assert safe_divide(torch.ones(2), torch.tensor([0.0, -2.0])).tolist() == [0.0, -0.5]


def test_lrp_residual_and_matmul_rules_conserve_per_sample():
    g = torch.Generator().manual_seed(1)
    a, b, r = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ra, rb = lrp_residual_add(a, b, r)
    torch.testing.assert_close((ra + rb).sum((1, 2)), r.sum((1, 2)))
    loop = [lrp_residual_add(a[i : i + 1], b[i : i + 1], r[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(ra, torch.cat([p[0] for p in loop]))
    torch.testing.assert_close(rb, torch.cat([p[1] for p in loop]))
    u = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 4, 6, generator=g, dtype=torch.float64)
    rr = torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64)
    ru, rv = lrp_matmul(u, v, rr)
    torch.testing.assert_close(ru.sum((1, 2, 3)), rr.sum((1, 2, 3)) / 2)
    torch.testing.assert_close(rv.sum((1, 2, 3)), rr.sum((1, 2, 3)) / 2)


@pytest.mark.parametrize("faithful", [False, True])
def test_lrp_network_conservation_and_batch_invariance(faithful):
    # hidden 16: a linear output whose sign-consistent pre-activation is exactly 0 (all input signs
    # opposite to the weight signs, probability 2^-fan_in) drops its relevance; rare at this width
    m = scrambled_vit(2, classes=3, faithful=faithful, hidden=16)
    x = images()
    e = TransformerAttribution(m, upsample="none", normalize="none")
    with e.capture() as rec:
        logits = m(x)
        r_attn, r_in = e.propagate(logits, rec)
    if not faithful:  # the faithful CLS is exactly zero at block 0 (zero-denominator entries drop out)
        for r in r_in:
            torch.testing.assert_close(r.sum((1, 2)), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert len(r_attn) == 2 and r_attn[0].shape == (3, 2, 5, 5)
    t = torch.tensor([0, 2, 1])
    for start in (0, 1):
        e = TransformerAttribution(m, start_layer=start)
        batched = e.attribute(x, target=t)
        loop = torch.cat([e.attribute(x[i : i + 1], target=t[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
        assert batched.shape == (3, 8, 8) and batched.min() >= 0 and batched.max() <= 1


def test_lrp_float32_batch_invariance_and_closed_form_one_block():
    m, x = scrambled_vit(1, dtype=torch.float32), images(dtype=torch.float32)
    e = TransformerAttribution(m, upsample="none", normalize="none")
    batched = e.attribute(x)
    loop = torch.cat([e.attribute(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)
    # one block: C = I + E_h[(grad * R^A)^+]
    with e.capture() as rec:
        logits = m(x)
        (grad,) = torch.autograd.grad(logits.sum(), [rec.attention(0)], retain_graph=True)
        (ra,), _ = e.propagate(logits, rec)
        c = e.relevance(logits, rec)
    torch.testing.assert_close(c, torch.eye(5) + (grad * ra).clamp(min=0).mean(1))


# --------------------------------------------------------------------------- Grad-CAM


class _ToGrid(nn.Module):
    def forward(self, tokens):  # (B, N, D) -> (B, D, n, n)
        b, n, d = tokens.shape
        side = int(n**0.5)
        return tokens.transpose(1, 2).reshape(b, d, side, side)


class _GridNorm(nn.Module):
    """norm1 whose patch part passes through a (B, D, n, n) layer that Captum can hook."""

    def __init__(self, norm):
        super().__init__()
        self.norm, self.to_grid = norm, _ToGrid()

    def forward(self, x):
        y = self.norm(x)
        grid = self.to_grid(y[:, 1:])
        return torch.cat([y[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def test_gradcam_matches_captum_layer_gradcam():
    captum_attr = pytest.importorskip("captum.attr")
    m, x = scrambled_vit(2, classes=3), images()
    t = torch.tensor([2, 0, 1])
    ours = ViTGradCAM(m, upsample="none", normalize="none").attribute(x, target=t)
    wrapped = copy.deepcopy(m)
    wrapped.blocks[-1].norm1 = _GridNorm(wrapped.blocks[-1].norm1)
    torch.testing.assert_close(wrapped(x), m(x))
    ref = captum_attr.LayerGradCam(wrapped, wrapped.blocks[-1].norm1.to_grid).attribute(
        x, target=t, relu_attributions=True
    )
    assert (ours - ref[:, 0]).abs().max() < 1e-5
    assert (ours > 0).any()


def test_gradcam_layer_choice_hand_weights_and_eigen():
    m, x = scrambled_vit(2, classes=1), images()
    with ViTCapture(m, blocks=(-1,), attention=False, tokens=True) as rec:  # block output: zero patch grads
        out = m(x)
        (g,) = torch.autograd.grad(out.sum(), [rec.token(-1)])
    assert (g[:, 1:] == 0).all() and (g[:, 0] != 0).any()
    # hand computation at blocks[-1].norm1
    e = ViTGradCAM(m, upsample="none", normalize="none")
    with e.capture() as rec:
        out = m(x)
        act = rec.activation
        (ga,) = torch.autograd.grad(out.sum(), [act], retain_graph=True)
        cam = e.cam(out, rec)
    assert (ga[:, 1:] != 0).any()
    expected = (ga[:, 1:].mean(1, keepdim=True) * act[:, 1:]).sum(-1)
    torch.testing.assert_close(cam, expected.detach())
    # eigen projection of a rank-1 weighted activation f (x) c is proportional to +-(f - mean f)
    f = torch.tensor([[1.0, 3.0, -2.0, 0.5]], dtype=torch.float64)
    c = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    proj = eigen_projection(f.unsqueeze(-1) * c)
    fc = f - f.mean()
    ratio = proj / fc
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    torch.testing.assert_close(ratio.abs(), torch.full_like(ratio, float(c.norm())))
    em = ViTGradCAM(m, eigen_smooth=True, upsample="none", normalize="none")
    with em.capture() as rec:
        out = m(x)
        proj = em.cam(out, rec)
    corr = ((proj - proj.mean(1, keepdim=True)) * (expected - expected.mean(1, keepdim=True)).detach()).sum(1)
    assert (corr >= 0).all()
    d = ViTGradCAM(m, eigen_smooth=True).attribute(x)
    assert d.shape == (3, 8, 8) and d.min() >= 0 and d.max() <= 1


# --------------------------------------------------------------------------- metrics


def test_energy_pointing_game_hand_case():
    maps = torch.tensor([[[1.0, 3.0], [-5.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    masks = torch.tensor([[[0, 1], [1, 1]], [[1, 1], [1, 1]], [[1, 0], [0, 0]]])
    torch.testing.assert_close(energy_pointing_game(maps, masks), torch.tensor([0.75, 0.0, 0.25]))
    before = map_quality(maps, masks)
    assert set(before) == {"pointing_game", "iou_top10"}


class _MeanProb(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def test_deletion_insertion_auc_closed_form():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0]) / 10.0  # pixel values in map order
    img = values.view(1, 1, 2, 2)
    maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    auc, curves = deletion_insertion_auc(_MeanProb(), img, maps, steps=4, activation="none", return_curves=True)
    total = values.sum() / 4
    remaining = torch.tensor([total, total - 0.1, total - 0.175, total - 0.225, 0.0])
    torch.testing.assert_close(curves[0], remaining)
    torch.testing.assert_close(auc, ((remaining[1:] + remaining[:-1]) / 2).sum().view(1) / 4)
    ins = deletion_insertion_auc(_MeanProb(), img, maps, steps=4, activation="none", mode="insertion")
    torch.testing.assert_close(ins + auc, torch.full((1,), float(total)))  # curves add up to the full mean
    # batched == per sample, reversed map = worse deletion
    imgs = torch.cat([img, img])
    both = deletion_insertion_auc(_MeanProb(), imgs, torch.cat([maps, -maps]), steps=4, activation="none")
    assert both[0] < both[1]
    torch.testing.assert_close(both[:1], auc)
    # uniform image: deletion AUC = 0.5 with a baseline of 0, and the baseline value is used
    flat = torch.ones(2, 1, 4, 4)
    rnd = torch.rand(2, 4, 4)
    torch.testing.assert_close(deletion_insertion_auc(_MeanProb(), flat, rnd, activation="none"), torch.full((2,), 0.5))
    torch.testing.assert_close(
        deletion_insertion_auc(_MeanProb(), flat, rnd, activation="none", baseline=1.0), torch.ones(2)
    )
