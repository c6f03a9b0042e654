"""AttributionViT (LGM-ViT spec §2, §9 Q1, §10 Shapes/Q1) and local checkpoint loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.capture import ViTCapture
from custom_components.io import InputDataError
from custom_components.networks.vit import (
    AttributionViT,
    attribution_vit,
    lgmvit_reference_pos_embed,
    sincos_2d_pos_embed,
)

from conftest import TINY_VIT, tiny_vit


def _set_record(model: AttributionViT, flag: bool) -> None:
    for blk in model.blocks:
        blk.attn.record_attention = flag


# --------------------------------------------------------------------------- shapes


def test_vit_b16_shapes_at_256():
    torch.manual_seed(0)
    model = AttributionViT(faithful=True).eval()
    assert sum(p.numel() for p in model.blocks.parameters()) > 80e6  # really ViT-B
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad(), ViTCapture(model, blocks=(-1,)) as cap:
        logits = model(x)
        assert isinstance(logits, torch.Tensor)
        assert logits.shape == (2, 1)
        assert cap.attention(-1).shape == (2, 12, 257, 257)
        assert cap.token(-1).shape == (2, 257, 768)
        assert list(cap.attentions) == [11] and list(cap.tokens) == [11]


# --------------------------------------------------------------------------- forward paths


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(faithful=True), dict(pos_embed="learnable"), dict(pos_embed="none", num_classes=3)],
    ids=["default", "faithful", "learnable", "none"],
)
def test_forward_tensor_sdpa_equals_explicit_and_torchscript(kw):
    model = tiny_vit(seed=1, **kw).eval()
    if model.pos_embed is not None:
        with torch.no_grad():
            model.pos_embed.normal_(std=0.5)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        assert isinstance(fused, torch.Tensor) and fused.shape == (3, model.num_classes)
        _set_record(model, True)
        explicit = model(x)
        _set_record(model, False)
        torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), fused, atol=1e-5, rtol=0)
        # the capture (explicit path + hooks) also gives the same logits
        with ViTCapture(model, blocks=None):
            torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=0)
    assert not any(b.attn.record_attention for b in model.blocks)


def test_explicit_path_attention_is_softmax_of_scaled_scores():
    model = tiny_vit(seed=2, num_layers=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ViTCapture(model, blocks=(0,)) as cap:
        model(x)
        h = model.blocks[0].norm1(model.embed(x))
        qkv = F.linear(h, model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias)
        q, k, _ = qkv.reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        torch.testing.assert_close(cap.attention(0), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- Q1 / sin-cos


def _q1_numpy(grid: int, dim: int) -> np.ndarray:
    """Spec §2 Q1 written independently: token (r, c) -> e_k = sin/cos(k * 10000^(-2 floor(c/2) / (dim/2)))."""
    out = np.zeros((grid, grid, dim))
    k = np.arange(dim, dtype=np.float64)
    for r in range(grid):
        for c in range(grid):
            omega = 10000.0 ** (-2.0 * (c // 2) / (dim / 2))
            out[r, c] = np.sin(k * omega) if c % 2 == 0 else np.cos(k * omega)
    return out.reshape(grid * grid, dim)


def test_q1_reference_pos_embed():
    pe = lgmvit_reference_pos_embed(16, 768)
    assert pe.shape == (256, 768)
    assert torch.unique(pe, dim=0).shape[0] == 16
    grid = pe.reshape(16, 16, 768)
    for r in range(1, 16):  # all rows equal
        assert torch.equal(grid[r], grid[0])
    np.testing.assert_allclose(pe.numpy(), _q1_numpy(16, 768), atol=1e-6, rtol=0)
    k = torch.arange(768, dtype=torch.float64)
    row = grid[0].double()
    for j in range(8):
        omega = 10000.0 ** (-2.0 * j / 384)
        # columns 2j and 2j+1 share omega_j; even = sin, odd = cos
        torch.testing.assert_close(row[2 * j], torch.sin(k * omega), atol=1e-6, rtol=0)
        torch.testing.assert_close(row[2 * j + 1], torch.cos(k * omega), atol=1e-6, rtol=0)
    # column 0 has omega_0 = 1 exactly: sin(k)
    torch.testing.assert_close(row[0], torch.sin(k), atol=1e-6, rtol=0)
    # column 1 is cos(k), so its k = 0 entry is 1 and column 0's is 0
    assert row[1, 0].item() == 1.0 and row[0, 0].item() == 0.0


def test_clean_sincos_pos_embed():
    pe = sincos_2d_pos_embed(16, 768)
    assert pe.shape == (256, 768)
    assert torch.unique(pe, dim=0).shape[0] == 256
    # independent closed form: first half encodes the row, second half the column
    q = 768 // 4
    omega = 10000.0 ** (-np.arange(q) / q)
    ref = np.zeros((16, 16, 768))
    for r in range(16):
        for c in range(16):
            ref[r, c] = np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)])
    np.testing.assert_allclose(pe.numpy(), ref.reshape(256, 768), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        sincos_2d_pos_embed(4, 30)


@pytest.mark.parametrize("kind", ["sincos", "lgmvit_reference"])
def test_cls_gets_no_fixed_encoding(kind):
    model = tiny_vit(seed=3, pos_embed=kind).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.cls_token.normal_()
        emb = model.embed(torch.randn(2, 3, 32, 32))
    fn = sincos_2d_pos_embed if kind == "sincos" else lgmvit_reference_pos_embed
    assert torch.equal(emb[:, 0], model.cls_token[0].expand(2, -1))  # CLS untouched
    torch.testing.assert_close(emb[0, 1:], fn(4, 32), atol=0, rtol=0)  # patches = encoding only
    assert model.pos_embed is None and "pos_embed" not in model.state_dict()


# --------------------------------------------------------------------------- faithful


def test_faithful_backbone():
    m = tiny_vit(faithful=True)
    assert isinstance(m.patch_embed.norm, nn.BatchNorm2d) and m.patch_embed.norm.num_features == 32
    assert m.patch_embed.proj.bias is not None
    assert m.pos_embed_type == "lgmvit_reference"
    assert isinstance(m.norm, nn.Identity)
    assert isinstance(m.head_norm, nn.LayerNorm) and m.head_norm.eps == 1e-5
    assert m.head.out_features == 1
    assert torch.count_nonzero(m.cls_token) == 0
    for blk in m.blocks:
        assert blk.attn.qkv.bias is None
        assert blk.norm1.eps == 1e-5 and blk.norm2.eps == 1e-5
        assert blk.drop_path1.drop_prob == 0.1 and blk.drop_path2.drop_prob == 0.1
        assert blk.mlp.drop1.p == 0.1 and blk.mlp.drop2.p == 0.1
        assert blk.attn.attn_drop_p == 0.0 and blk.attn.proj_drop.p == 0.0
    # faithful overrides contrary arguments
    m2 = tiny_vit(faithful=True, qkv_bias=True, final_norm=True, pos_embed="learnable")
    assert m2.blocks[0].attn.qkv.bias is None and isinstance(m2.norm, nn.Identity) and m2.pos_embed is None
    # the default (timm-like) variant: linear ramp of drop path, final norm, eps 1e-6
    d = tiny_vit(drop_path_rate=0.1, num_layers=3)
    assert [b.drop_path1.drop_prob for b in d.blocks] == pytest.approx([0.0, 0.05, 0.1])
    assert isinstance(d.norm, nn.LayerNorm) and d.norm.eps == 1e-6 and d.blocks[0].attn.qkv.bias is not None


def test_bad_arguments():
    with pytest.raises(ValueError):
        tiny_vit(pos_embed="rope")
    with pytest.raises(ValueError):
        tiny_vit(img_size=30)
    with pytest.raises(ValueError):
        tiny_vit(num_heads=5)
    with pytest.raises(ValueError):
        tiny_vit().embed(torch.zeros(1, 3, 16, 16))


# --------------------------------------------------------------------------- timm equivalence


def _timm_state_dict(dim=32, depth=2, mlp=64, grid=4, patch=8, classes=3, in_ch=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {
        "cls_token": r(1, 1, dim, std=0.5),
        "pos_embed": r(1, 1 + grid * grid, dim, std=0.5),
        "patch_embed.proj.weight": r(dim, in_ch, patch, patch, std=0.05),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": r(dim, mean=1.0),
                p + "norm1.bias": r(dim),
                p + "attn.qkv.weight": r(3 * dim, dim, std=0.2),
                p + "attn.qkv.bias": r(3 * dim),
                p + "attn.proj.weight": r(dim, dim, std=0.2),
                p + "attn.proj.bias": r(dim),
                p + "norm2.weight": r(dim, mean=1.0),
                p + "norm2.bias": r(dim),
                p + "mlp.fc1.weight": r(mlp, dim, std=0.2),
                p + "mlp.fc1.bias": r(mlp),
                p + "mlp.fc2.weight": r(dim, mlp, std=0.2),
                p + "mlp.fc2.bias": r(dim),
            }
        )
    sd.update({"norm.weight": r(dim, mean=1.0), "norm.bias": r(dim), "head.weight": r(classes, dim), "head.bias": r(classes)})
    return sd


def _timm_reference_forward(sd, x, depth=2, heads=4, patch=8, eps=1e-6):
    """timm VisionTransformer (class token, learnable pos_embed over CLS + patches, token pool)."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    b, n, d = t.shape
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1) + sd["pos_embed"]
    hd = d // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n + 1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, n + 1, d)
        t = t + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        hidden = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        h = F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + h
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])


def _dino_head(dim=32):
    return {
        "head.mlp.0.weight": torch.randn(64, dim),
        "head.mlp.0.bias": torch.randn(64),
        "head.last_layer.weight_v": torch.randn(16, 64),
    }


@pytest.mark.parametrize(
    "wrap",
    ["plain", "model", "state_dict_module", "dino_teacher", "dino_teacher_with_head", "dino_student"],
)
def test_timm_checkpoint_gives_timm_logits(tmp_path, wrap):
    sd = _timm_state_dict()
    if wrap == "plain":
        ckpt = sd
    elif wrap == "model":
        ckpt = {"model": sd, "epoch": 3}
    elif wrap == "state_dict_module":
        ckpt = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    elif wrap == "dino_teacher":
        ckpt = {"teacher": {"backbone." + k: v for k, v in sd.items()}}
    elif wrap == "dino_teacher_with_head":  # real DINO checkpoints also hold the projection head
        backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
        ckpt = {"teacher": {**{"backbone." + k: v for k, v in backbone.items()}, **_dino_head()}}
        sd = dict(backbone, **{"head.weight": None})
    else:
        backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
        student = {"module.backbone." + k: v for k, v in backbone.items()}
        student.update({"module." + k: v for k, v in _dino_head().items()})
        ckpt = {"student": student}
        sd = dict(backbone, **{"head.weight": None})
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    model = tiny_vit(seed=5, pos_embed="learnable", num_classes=3, pretrained_path=str(path)).eval()
    if sd["head.weight"] is None:  # headless backbone: the model keeps its own head
        sd["head.weight"], sd["head.bias"] = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _timm_reference_forward(sd, x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        with ViTCapture(model, blocks=None):
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_mae_checkpoint_drops_decoder_and_mask_token(tmp_path):
    sd = _timm_state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    decoder = {"decoder_embed.weight": torch.zeros(16, 32), "decoder_pos_embed": torch.zeros(1, 17, 16)}
    ckpt = {"model": dict(sd, mask_token=torch.zeros(1, 1, 32), **decoder)}
    torch.save(ckpt, tmp_path / "mae.pth")
    model = tiny_vit(pos_embed="learnable", num_classes=3, pretrained_path=str(tmp_path / "mae.pth")).eval()
    sd.update({"head.weight": model.head.weight.detach(), "head.bias": model.head.bias.detach()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _timm_reference_forward(sd, x), atol=1e-5, rtol=0)


def test_head_of_other_size_is_skipped(tmp_path):
    sd = _timm_state_dict(classes=1000)
    torch.save({"model": sd}, tmp_path / "in1k.pth")
    model = tiny_vit(seed=6, pos_embed="learnable", num_classes=1)
    head_before = model.head.weight.detach().clone()
    from custom_components.networks.pretrained import load_pretrained_vit

    result = load_pretrained_vit(model, tmp_path / "in1k.pth")
    assert set(result["missing_keys"]) == {"head.weight", "head.bias"}
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.cls_token, sd["cls_token"])


def test_pos_embed_224_grid_resampled_into_256_model(tmp_path):
    dim = 16
    sd = _timm_state_dict(dim=dim, depth=1, mlp=32, grid=14, patch=16, classes=1)
    torch.save(sd, tmp_path / "vit224.pth")
    model = AttributionViT(
        img_size=256, patch_size=16, hidden_size=dim, num_layers=1, num_heads=4, mlp_dim=32, pos_embed="learnable"
    )
    from custom_components.networks.pretrained import load_pretrained_vit

    load_pretrained_vit(model, tmp_path / "vit224.pth")
    assert model.pos_embed.shape == (1, 257, dim)
    assert torch.equal(model.pos_embed[:, 0], sd["pos_embed"][:, 0])  # CLS position kept
    # a constant patch grid stays constant after resampling (interpolation reproduces constants)
    const = dict(sd)
    const["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.full((1, 196, dim), 0.25)], dim=1)
    torch.save(const, tmp_path / "const.pth")
    load_pretrained_vit(model, tmp_path / "const.pth")
    torch.testing.assert_close(model.pos_embed[0, 1:], torch.full((256, dim), 0.25), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1)


def test_factory_builds_the_plain_module_and_loads_only_when_given_a_path():
    import inspect

    assert "pretrained_path" not in inspect.signature(AttributionViT).parameters  # loading lives in the factory
    torch.manual_seed(0)
    built = attribution_vit(pretrained_path=None, **TINY_VIT)
    torch.manual_seed(0)
    plain = AttributionViT(**TINY_VIT)
    assert type(built) is AttributionViT
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), plain.state_dict().values(), strict=True))


def test_missing_block_key_raises_input_error(tmp_path):
    sd = _timm_state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(InputDataError) as err:
        tiny_vit(pos_embed="learnable", num_classes=3, pretrained_path=str(path))
    assert str(path) in str(err.value) and "blocks.1.attn.qkv.weight" in str(err.value)


def test_wrong_shape_and_corrupt_and_absent_files_raise_input_error(tmp_path):
    sd = _timm_state_dict(dim=48, mlp=64)
    torch.save(sd, tmp_path / "wide.pth")
    with pytest.raises(InputDataError, match=r"wide.pth"):
        tiny_vit(pos_embed="learnable", num_classes=3, pretrained_path=str(tmp_path / "wide.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(InputDataError) as err:
        tiny_vit(pos_embed="learnable", pretrained_path=str(bad))
    assert str(bad) in str(err.value)
    # truncated real checkpoint
    torch.save(_timm_state_dict(), tmp_path / "full.pth")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:500])
    with pytest.raises(InputDataError, match=r"trunc.pth"):
        tiny_vit(pos_embed="learnable", pretrained_path=str(tmp_path / "trunc.pth"))
    with pytest.raises(InputDataError, match=r"absent.pth"):
        tiny_vit(pos_embed="learnable", pretrained_path=str(tmp_path / "absent.pth"))
