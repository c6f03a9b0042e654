"""MedViT 2-D (spec ``specs/medvit.md`` sections 2, 3, 8, 9): parameter counts, shapes, PMC, TorchScript."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from custom_components.networks.medvit import (
    EMHSA,
    LTB,
    MedViT,
    medvit_l,
    medvit_s,
    medvit_t,
    moment_exchange,
    pono,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the CI machine's cores are shared: intra-op threads spin against other jobs (40x slower)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_t() -> MedViT:
    torch.manual_seed(0)
    return medvit_t(num_classes=9).eval()


@pytest.mark.parametrize("factory, expected", [(medvit_t, 32.16e6), (medvit_s, 45.43e6), (medvit_l, 58.70e6)])
def test_parameter_counts_match_released_code(factory, expected):
    # spec section 9: 32.16 / 45.43 / 58.70 M at 1000 classes (+-0.01 M; the brief asks 0.5 %);
    # instantiated on the meta device (no memory, no init cost)
    with torch.device("meta"):
        model = factory()
    assert abs(n_params(model) - expected) <= 0.01e6


def test_t_with_9_classes_and_block_layout(model_t):
    model = model_t
    assert abs(n_params(model) - 31.15e6) <= 0.01e6
    ltbs = [m for m in model.modules() if isinstance(m, LTB)]
    assert [(b.mhsa_out_channels, b.mhca_out_channels) for b in ltbs] == [(192, 64), (384, 128), (384, 128), (768, 256)]
    assert [b.e_mhsa.num_heads for b in ltbs] == [6, 12, 12, 24]
    # SE bottleneck: r units (3 in ECB, 2 in LTB)
    assert model.stage1[0].conv.conv[6].fc[0].out_features == 3
    assert ltbs[0].conv.conv[6].fc[0].out_features == 2
    # drop path linear 0 -> 0.1 over 20 blocks
    assert model.stage1[0].attention_path_dropout.drop_prob == 0.0
    assert model.stage4[-1].mhsa_path_dropout.drop_prob == pytest.approx(0.1 * 0.75)


def test_forward_shapes_small_input_and_64(model_t):
    torch.manual_seed(0)
    small = medvit_t(num_classes=2, in_channels=1, stem_stride=1).eval()
    with torch.no_grad():
        out = small(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 2) and torch.isfinite(out).all()

    model = model_t
    shapes = []
    hooks = [getattr(model, f"stage{i}").register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for i in range(1, 5)]
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 9)
    assert shapes == [(2, 96, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 1024, 2, 2)]


def test_raster_and_2d_kv_pooling():
    torch.manual_seed(0)
    x = torch.randn(1, 14 * 14, 64)
    for kind in ("1d", "2d"):
        attn = EMHSA(64, sr_ratio=2, kv_pool=kind).eval()
        kv = attn.reduce_kv(x, 14, 14) * (1 + 1e-5) ** 0.5  # undo eval-mode BN scaling
        if kind == "1d":
            assert kv.shape[1] == 49
            torch.testing.assert_close(kv[0, 0], x[0, :4].mean(0), rtol=1e-5, atol=1e-5)
        else:
            grid = x[0].reshape(14, 14, 64)
            torch.testing.assert_close(kv[0, 0], grid[:2, :2].reshape(4, 64).mean(0), rtol=1e-5, atol=1e-5)


def test_pmc_off_is_deterministic_in_train_mode(tiny_medvit_model):
    model = tiny_medvit_model.train()
    model.pmc.prob = 0.0
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not model.pmc_applied
    assert model.pmc_lam == 1.0 and model.pmc_perm.tolist() == [0, 1, 2, 3]


def test_pmc_on_mixes_and_exposes_perm_and_lambda(tiny_medvit_model):
    model = tiny_medvit_model.train()
    model.pmc.prob, model.pmc.lam = 1.0, 0.7
    torch.manual_seed(1)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        assert model.pmc_applied and model.pmc_lam == pytest.approx(0.7)
        perm = model.pmc_perm.clone()
        assert sorted(perm.tolist()) == [0, 1, 2, 3]
        y = torch.tensor([0, 1, 2, 0])
        expected = 0.7 * F.cross_entropy(out, y) + 0.3 * F.cross_entropy(out, y[perm])
        torch.testing.assert_close(model.pmc_loss(out, y, F.cross_entropy), expected)
        model.pmc.prob = 0.0
        plain = model(x)
    if perm.tolist() != [0, 1, 2, 3]:
        assert not torch.allclose(out, plain)
    # not mixed -> plain loss
    torch.testing.assert_close(model.pmc_loss(plain, y, F.cross_entropy), F.cross_entropy(plain, y))
    model.pmc.prob = 1.0
    model.eval()
    with torch.no_grad():
        model(x)
    assert not model.pmc_applied  # inference is never mixed
    model.pmc.prob = 0.0


def test_moment_exchange_properties():
    torch.manual_seed(0)
    h = torch.randn(3, 16, 5, 5) * 3 + 1
    torch.testing.assert_close(moment_exchange(h, torch.arange(3)), h, rtol=1e-5, atol=1e-5)
    normed, _, _ = pono(h)
    torch.testing.assert_close(normed.mean(1), torch.zeros(3, 5, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(1, unbiased=False), torch.ones(3, 5, 5), atol=1e-3, rtol=0)
    perm = torch.tensor([2, 0, 1])
    mixed = moment_exchange(h, perm)
    torch.testing.assert_close(mixed.mean(1), h.mean(1)[perm], atol=1e-4, rtol=1e-4)


def test_torchscript_matches_eager(tiny_medvit_model):
    model = tiny_medvit_model.eval()
    scripted = torch.jit.script(model)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_t_at_224_stage_shapes_and_kv_length(model_t):
    shapes, kv = [], []
    hooks = [getattr(model_t, f"stage{i}").register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for i in range(1, 5)]
    hooks += [b.e_mhsa.k.register_forward_hook(lambda m, i, o: kv.append(i[0].shape[1]))
              for b in model_t.modules() if isinstance(b, LTB)]
    hooks.append(model_t.stem.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))))
    with torch.no_grad():
        out = model_t(torch.rand(2, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 9)
    assert shapes == [(2, 64, 56, 56), (2, 96, 56, 56), (2, 256, 28, 28), (2, 512, 14, 14), (2, 1024, 7, 7)]
    assert kv == [49, 49, 49, 49]


# --------------------------------------------------------------------------- 3-D variant (spec section 7)


def test_medvit3d_parameter_count_pinned():
    from custom_components.networks.medvit3d import medvit3d_t

    with torch.device("meta"):
        model = medvit3d_t(num_classes=2)
    assert n_params(model) == 35_149_562


@pytest.mark.parametrize("size", [28, 64])
def test_medvit3d_forward_and_kv_length(size):
    from custom_components.networks.medvit3d import LTB3d, medvit3d_t

    torch.manual_seed(0)
    model = medvit3d_t(input_size=size, num_classes=11).eval()
    kv = []
    hooks = [b.e_mhsa.k.register_forward_hook(lambda m, i, o: kv.append(i[0].shape[1]))
             for b in model.modules() if isinstance(b, LTB3d)]
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size, size))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 11) and torch.isfinite(out).all()
    assert len(kv) == 4 and max(kv) <= 64


def test_medvit3d_scriptable_and_pmc():
    from custom_components.networks.medvit3d import MedViT3D

    torch.manual_seed(0)
    model = MedViT3D(depths=(1, 1, 5, 1), num_classes=2, path_dropout=0.0, pmc_prob=1.0, pmc_lambda=0.5)
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        model.train()(x)
        assert model.pmc_applied and model.pmc_lam == 0.5
        model.eval()
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), model(x))


def test_one_implementation_for_2d_and_3d():
    from custom_components.networks.medvit3d import LTB3d, MedViT3D

    kw = dict(depths=(1, 1, 5, 1), num_classes=2, in_channels=1, path_dropout=0.0, stem_stride=2)
    torch.manual_seed(0)
    generic = MedViT(spatial_dims=3, **kw).eval()
    torch.manual_seed(0)
    named = MedViT3D(**kw).eval()
    assert isinstance(named, MedViT) and all(isinstance(b, LTB) for b in named.modules() if isinstance(b, LTB3d))
    assert {k: v.shape for k, v in generic.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}
    x = torch.rand(2, 1, 12, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(generic(x), named(x), rtol=0, atol=0)
    convs = {type(m) for m in named.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))}
    assert convs == {torch.nn.Conv3d}
    with pytest.raises(ValueError, match="spatial_dims"):
        MedViT(spatial_dims=1, **kw)
    # grid pooling is dimension-free: 3-D "2d"/"grid" with sr 2 averages the 2x2x2 corner block
    attn = EMHSA(64, sr_ratio=2, kv_pool="grid").eval()
    tokens = torch.randn(1, 4 * 4 * 4, 64)
    kv = attn.reduce_kv(tokens, 4, 4, 4) * (1 + 1e-5) ** 0.5
    assert kv.shape[1] == 8
    torch.testing.assert_close(kv[0, 0], tokens[0].reshape(4, 4, 4, 64)[:2, :2, :2].reshape(8, 64).mean(0),
                               rtol=1e-5, atol=1e-5)
