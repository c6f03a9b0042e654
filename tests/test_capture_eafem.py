"""ViTCapture (hook owner) and EAFEM (LGM-ViT spec §3, §10 EAFEM limits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.capture import ViTCapture, unwrap_vit
from custom_components.explain import EAFEM, eafem_map

from conftest import tiny_vit


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class Wrapper(nn.Module):  # DDP/DataParallel-like
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


# --------------------------------------------------------------------------- ViTCapture


def test_capture_records_only_requested_blocks_and_release():
    model = tiny_vit(num_layers=3).eval()
    x = torch.randn(2, 3, 32, 32)
    cap = ViTCapture(model, blocks=(0, -1))
    assert cap.block_indices == [0, 2]
    assert [b.attn.record_attention for b in model.blocks] == [True, False, True]
    assert all_hooks(model) == 4  # attention + tokens, two blocks
    model(x)
    assert sorted(cap.attentions) == [0, 2] and sorted(cap.tokens) == [0, 2]
    assert cap.attention(-1) is cap.attentions[2] and cap.token(0) is cap.tokens[0]
    with pytest.raises(RuntimeError, match="block 1"):
        cap.attention(1)
    with pytest.raises(RuntimeError):
        cap.attention_grad(-1)
    # tokens are the block outputs (before the final norm)
    with torch.no_grad():
        t = model.embed(x)
        for blk in model.blocks:
            t = blk(t)  # blocks 0 and 2 record again here; the values are the same
    torch.testing.assert_close(cap.tokens[2], t, atol=1e-6, rtol=0)
    cap.release()
    assert all_hooks(model) == 0
    assert not any(b.attn.record_attention for b in model.blocks)
    assert cap.attentions == {} and cap.tokens == {}
    cap.release()  # twice is safe
    model(x)
    assert cap.attentions == {}


def test_capture_only_tokens_or_only_attention():
    model = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    with ViTCapture(model, blocks=None, attention=False) as cap:
        assert not any(b.attn.record_attention for b in model.blocks)
        model(x)
        assert cap.attentions == {} and sorted(cap.tokens) == [0, 1]
    with ViTCapture(model, blocks=None, tokens=False) as cap:
        model(x)
        assert sorted(cap.attentions) == [0, 1] and cap.tokens == {}
    assert all_hooks(model) == 0


def test_capture_context_manager_releases_on_exception():
    model = tiny_vit()
    with pytest.raises(KeyError), ViTCapture(model, blocks=None):
        assert all_hooks(model) == 4
        raise KeyError("boom")
    assert all_hooks(model) == 0
    assert not any(b.attn.record_attention for b in model.blocks)


def test_nested_captures_keep_each_other_working():
    model = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    with ViTCapture(model, blocks=(-1,)) as outer:
        with ViTCapture(model, blocks=(-1,)) as inner:
            model(x)
            assert torch.equal(inner.attention(), outer.attention())
        outer.clear()
        model(x)  # the inner capture's release must not switch the outer one off
        assert outer.attention().shape == (1, 4, 17, 17)
    assert all_hooks(model) == 0 and not model.blocks[-1].attn.record_attention


def test_capture_unwraps_ddp_like_wrapper():
    model = tiny_vit().eval()
    wrapped = Wrapper(Wrapper(model))
    assert unwrap_vit(wrapped) is model
    with ViTCapture(wrapped) as cap:
        assert cap.vit is model
        wrapped(torch.randn(2, 3, 32, 32))
        assert cap.attention().shape == (2, 4, 17, 17)
        assert cap.token().shape == (2, 17, 32)
    with pytest.raises(TypeError):
        ViTCapture(nn.Linear(2, 2))


def test_attention_grads_equal_autograd():
    model = tiny_vit(num_classes=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with ViTCapture(model, blocks=None, attention_grads=True) as cap:
        logits = model(x)
        target = (logits[:, 1] * torch.tensor([1.0, -2.0, 0.5])).sum()
        ref = torch.autograd.grad(target, [cap.attention(0), cap.attention(1)], retain_graph=True)
        cap.attention_grads.clear()
        target.backward()
        assert sorted(cap.attention_grads) == [0, 1]
        for i in (0, 1):
            assert not cap.attention_grad(i).requires_grad
            torch.testing.assert_close(cap.attention_grad(i), ref[i], atol=1e-7, rtol=1e-5)
            assert cap.attention_grad(i).abs().sum() > 0


def test_detach_option():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with ViTCapture(model, blocks=None, detach=True) as cap:
        model(x)
        assert all(not t.requires_grad and t.grad_fn is None for t in [*cap.attentions.values(), *cap.tokens.values()])
    with ViTCapture(model, blocks=None, detach=False) as cap:
        model(x)
        assert all(t.requires_grad and t.grad_fn is not None for t in [*cap.attentions.values(), *cap.tokens.values()])


# --------------------------------------------------------------------------- eafem_map on toy tensors

# B=1, heads=2, S=5 (CLS + 2x2 patches), D=3. Only A[:, :, 0, :] and T[:, 1:] matter.
CLS_ROWS = torch.tensor([[0.2, 0.1, 0.3, 0.15, 0.25], [0.4, 0.1, 0.05, 0.3, 0.15]])
M_ATT = torch.tensor([[0.1, 0.175], [0.225, 0.2]])  # mean over heads of CLS_ROWS[:, 1:], row-major
PATCH_TOKENS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0], [-3.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
M_EMB = torch.tensor([[2.0, 1.0], [-1.0, 4.0]])  # channel means


def toy_inputs():
    attn = torch.full((1, 2, 5, 5), 9.0)  # non-CLS rows are garbage: they must be ignored
    attn[0, :, 0, :] = CLS_ROWS
    tokens = torch.cat([torch.full((1, 1, 3), 100.0), PATCH_TOKENS[None]], dim=1)  # CLS token ignored
    return attn, tokens


def test_eafem_map_toy_values_on_patch_grid():
    attn, tokens = toy_inputs()
    out = eafem_map(attn, tokens, beta=0.85, out_size=(2, 2))
    expected = torch.tensor([[[0.385, 0.29875], [0.04125, 0.77]]])  # 0.85 * M_ATT + 0.15 * M_EMB by hand
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(eafem_map(attn, tokens, 1.0, (2, 2)), M_ATT[None], atol=1e-7, rtol=0)
    torch.testing.assert_close(eafem_map(attn, tokens, 0.0, (2, 2)), M_EMB[None], atol=1e-7, rtol=0)


def test_eafem_map_toy_upsampled_bilinear():
    attn, tokens = toy_inputs()
    small = eafem_map(attn, tokens, 0.85, (2, 2))
    big = eafem_map(attn, tokens, 0.85, (4, 4))
    ref = F.interpolate(small[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(big, ref, atol=1e-7, rtol=0)
    # closed form of 2 -> 4 bilinear (align_corners=False, edge-clamped): out = U m U^T
    u = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    torch.testing.assert_close(big[0], u @ small[0] @ u.T, atol=1e-6, rtol=0)


def test_eafem_uniform_attention_gives_one_over_tokens():
    attn = torch.full((2, 3, 10, 10), 0.1)  # N = 9 patches, 3x3 grid
    tokens = torch.randn(2, 10, 5)
    out = eafem_map(attn, tokens, 1.0, (12, 12))
    torch.testing.assert_close(out, torch.full((2, 12, 12), 0.1), atol=1e-7, rtol=0)


def test_eafem_linearity_upsample_each_then_mix():
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 4, 10, 10, generator=g), dim=-1)
    tokens = torch.randn(2, 10, 6, generator=g)
    beta = 0.85
    m_att = F.interpolate(attn[:, :, 0, 1:].mean(1).reshape(2, 1, 3, 3), size=(16, 16), mode="bilinear", align_corners=False)
    m_emb = F.interpolate(tokens[:, 1:].mean(-1).reshape(2, 1, 3, 3), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        eafem_map(attn, tokens, beta, (16, 16)), (beta * m_att + (1 - beta) * m_emb)[:, 0], atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    "attn_shape,tok_shape",
    [
        ((1, 5, 5), (1, 5, 3)),  # attention not 4-D
        ((1, 2, 5, 4), (1, 5, 3)),  # attention not square
        ((1, 2, 5, 5), (2, 5, 3)),  # batch mismatch
        ((1, 2, 5, 5), (1, 4, 3)),  # token count mismatch
        ((1, 2, 5, 5), (1, 5)),  # tokens not 3-D
        ((1, 2, 6, 6), (1, 6, 3)),  # 5 patches: no square grid
    ],
)
def test_eafem_map_bad_shapes(attn_shape, tok_shape):
    with pytest.raises(ValueError):
        eafem_map(torch.rand(attn_shape), torch.rand(tok_shape), 0.5, (4, 4))


def test_eafem_bad_beta():
    with pytest.raises(ValueError):
        EAFEM(tiny_vit(num_layers=3), beta=1.5)
    with pytest.raises(ValueError):
        EAFEM(tiny_vit(num_layers=3), beta=-0.1)


# --------------------------------------------------------------------------- EAFEM on a model


def test_model_attention_rows_are_probabilities():
    model = tiny_vit().eval()
    with torch.no_grad(), ViTCapture(model, blocks=(-1,)) as cap:
        model(torch.randn(2, 3, 32, 32))
        a = cap.attention()
    # per head, the patch part of the CLS row sums to 1 - A[0, 0]
    torch.testing.assert_close(a[:, :, 0, 1:].sum(-1), 1.0 - a[:, :, 0, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 17), atol=1e-6, rtol=0)


def test_model_with_uniform_last_attention():
    model = tiny_vit().eval()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight.zero_()
        model.blocks[-1].attn.qkv.bias.zero_()
        m = EAFEM(model, beta=1.0).attribute(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(m, torch.full((2, 32, 32), 1.0 / 17), atol=1e-7, rtol=0)


def test_eafem_attribute_equals_manual_capture():
    model = tiny_vit(num_layers=3).eval()
    x = torch.randn(2, 3, 32, 32)
    explainer = EAFEM(model, beta=0.85)
    with torch.no_grad():
        maps = explainer.attribute(x)
        grid = explainer.attribute(x, out_size=None)  # default: image size
        assert all_hooks(model) == 0
        with ViTCapture(model, blocks=(-1,)) as cap:
            model(x)
            manual = eafem_map(cap.attention(-1), cap.token(-1), 0.85, (32, 32))
            manual64 = eafem_map(cap.attention(-1), cap.token(-1), 0.85, (64, 64))
        maps64 = explainer.attribute(x, out_size=(64, 64))
        # explain() without out_size gives the patch grid
        with explainer.capture() as rec:
            logits = model(x)
            on_grid = explainer.explain(logits, rec)
            grid_ref = eafem_map(rec.attention(-1), rec.token(-1), 0.85, (4, 4))
    assert maps.shape == (2, 32, 32) and torch.equal(grid, maps)
    torch.testing.assert_close(maps, manual, atol=0, rtol=0)
    torch.testing.assert_close(maps64, manual64, atol=0, rtol=0)
    assert on_grid.shape == (2, 4, 4)
    torch.testing.assert_close(on_grid, grid_ref, atol=0, rtol=0)
    torch.testing.assert_close(
        F.interpolate(on_grid[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0], maps, atol=1e-6, rtol=0
    )


def test_eafem_is_differentiable_through_attention_and_embedding():
    model = tiny_vit(num_layers=3).eval()
    x = torch.randn(2, 3, 32, 32)
    w = torch.randn(2, 32, 32)
    last, first = model.blocks[-1], model.blocks[0]

    def grads(beta):
        maps = EAFEM(model, beta=beta).attribute(x)
        params = [last.attn.qkv.weight, first.attn.qkv.weight, first.mlp.fc1.weight, last.mlp.fc2.weight]
        return torch.autograd.grad((maps * w).sum(), params, allow_unused=True)

    g_qkv_last, g_qkv_first, g_fc1_first, g_fc2_last = grads(0.85)
    for g in (g_qkv_last, g_qkv_first, g_fc1_first, g_fc2_last):
        assert g is not None and g.abs().sum() > 0
    # the attention map of the last block does not depend on that block's MLP (it comes later)
    _, g_qkv_first_att, _, g_fc2_last_att = grads(1.0)
    assert g_fc2_last_att is None or torch.count_nonzero(g_fc2_last_att) == 0
    assert g_qkv_first_att.abs().sum() > 0
