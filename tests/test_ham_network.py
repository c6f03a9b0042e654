"""HAM network (spec ``specs/ham.md`` sections 2, 3 and 11): output strides, LSE pooling, refinement,
foreground attention, the one-tensor forward and the maps of one pass, TorchScript, ImageNet weights."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import resnet50
from monai.networks.nets.resnet import ResNetBlock

from custom_components.io import InputDataError, atomic_save
from custom_components.networks import FABlock, HAMNet, ham_network, lse_pool, minmax_cams, refine_cams
from custom_components.networks.ham import OUTPUT_STRIDES, DilatedResNet
from custom_components.networks.pretrained import map_resnet_state_dict

#: torchvision's ResNet-50 (25,557,032 parameters) without its fc (2048 x 1000 + 1000)
TORCHVISION_RESNET50_WITHOUT_FC = 25_557_032 - 2_049_000


def tiny_ham(seed: int = 0, **kw) -> HAMNet:
    torch.manual_seed(seed)
    return HAMNet(**{"arch": "resnet18", "num_classes": 3, **kw}).eval()


# ---------------------------------------------------------------- output stride


@pytest.mark.parametrize("pooling", [True, False])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_resnet50_features_at_512_follow_the_output_stride(output_stride, pooling):
    # meta tensors: the convolutions' shape rules without the arithmetic of a 512² ResNet-50
    with torch.device("meta"):
        net = HAMNet(output_stride=output_stride, pooling=pooling)
        e4 = net.backbone(torch.empty(2, 3, 512, 512))
        feats = net.features(torch.empty(2, 3, 512, 512))
    side = 512 // output_stride  # 64, 32, 16
    assert tuple(e4.shape) == (2, 2048, side, side)
    assert tuple(feats.shape) == (2, 512, side, side)


@pytest.mark.parametrize("key", sorted(OUTPUT_STRIDES))
def test_layer_strides_and_dilations_follow_the_table(key):
    output_stride, pooling = key
    strides, dilations = OUTPUT_STRIDES[key]
    for arch in ("resnet18", "resnet50"):
        with torch.device("meta"):
            net = DilatedResNet(arch, output_stride, pooling)
        assert net.no_max_pool is not pooling
        for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            for j, block in enumerate(layer):
                conv = block.conv1 if isinstance(block, ResNetBlock) else block.conv2
                assert conv.kernel_size == (3, 3)
                assert conv.stride == ((strides[i],) * 2 if j == 0 else (1, 1)), (arch, i, j)
                assert conv.dilation == conv.padding == (dilations[i],) * 2, (arch, i, j)  # every block
                if isinstance(block, ResNetBlock):
                    assert block.conv2.dilation == (1, 1)  # the basic block's second 3x3, as the reference
            shortcut = layer[0].downsample
            if shortcut is not None:
                assert shortcut[0].stride == (strides[i],) * 2
            else:  # only a basic block at stride 1 with unchanged width goes without one
                assert arch == "resnet18" and i == 0 and strides[0] == 1
        # stem 2 x pool 2 x layer strides
        assert 2 * (2 if pooling else 1) * math.prod(strides) == output_stride


@pytest.mark.parametrize("pooling", [True, False])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_real_forward_sizes_resnet18_at_64(output_stride, pooling):
    net = tiny_ham(output_stride=output_stride, pooling=pooling)
    with torch.no_grad():
        feats = net.features(torch.randn(1, 3, 64, 64))
        logits = net(torch.randn(2, 3, 64, 64))
    assert tuple(feats.shape) == (1, 512, 64 // output_stride, 64 // output_stride)
    assert tuple(logits.shape) == (2, 4)


def test_no_dilation_keeps_the_strides():
    with torch.device("meta"):
        net = DilatedResNet("resnet50", 8, True, dilation=False)
        e4 = net(torch.empty(1, 3, 256, 256))
    assert all(b.conv2.dilation == (1, 1) for layer in (net.layer3, net.layer4) for b in layer)
    assert tuple(e4.shape[-2:]) == (32, 32)


def test_resnet50_backbone_equals_monai_resnet50_without_fc():
    with torch.device("meta"):
        ours = DilatedResNet("resnet50").state_dict()
        monai = resnet50(
            spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
            bias_downsample=False, feed_forward=False,
        ).state_dict()  # fmt: skip
    assert list(ours) == list(monai)
    assert all(ours[k].shape == monai[k].shape for k in ours)
    count = sum(v.numel() for k, v in ours.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert count == TORCHVISION_RESNET50_WITHOUT_FC == 23_508_032


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="output_stride"):
        HAMNet(arch="resnet18", output_stride=4)
    with pytest.raises(ValueError, match="arch"):
        HAMNet(arch="resnext50_32x4d")


# ---------------------------------------------------------------- LSE pooling


@pytest.mark.parametrize("r", [1e-3, 6.0, 50.0])
def test_lse_of_a_constant_map_is_the_constant(r):
    x = torch.full((2, 3, 5, 7), -1.25, dtype=torch.float64)
    torch.testing.assert_close(lse_pool(x, r), torch.full((2, 3), -1.25, dtype=torch.float64))


def test_lse_tends_to_the_mean_and_to_the_max():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    flat = x.flatten(2)
    mean, top, n = flat.mean(-1), flat.max(-1).values, flat.shape[-1]
    # r -> 0: s = mean + r var / 2 + O(r^2)
    torch.testing.assert_close(lse_pool(x, 1e-3), mean, atol=2e-3, rtol=0)
    for r in (1.0, 6.0, 50.0):
        s = lse_pool(x, r)
        # mean <= s (Jensen) and max - log(N) / r <= s <= max
        assert (s >= mean - 1e-12).all() and (s <= top + 1e-12).all()
        assert (s >= top - math.log(n) / r - 1e-12).all()
    # the definition, written out
    r = 6.0
    torch.testing.assert_close(lse_pool(x, r), torch.log(torch.exp(r * flat).mean(-1)) / r)


def test_lse_gradient_is_a_softmax_over_positions():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(lse_pool(x, 6.0).sum(), x)
    torch.testing.assert_close(grad.sum(dim=(2, 3)), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.softmax(6.0 * x.detach().flatten(2), -1).reshape(x.shape))


def test_gradcam_channel_weights_equal_the_head_weights():
    # spec section 3: sum_p d o_t / d F_k(p) = W_{t,k}, so Grad-CAM's weights are the CAM weights
    net = tiny_ham(num_classes=4).double()
    with torch.no_grad():
        feats = net.features(torch.randn(3, 3, 32, 32, dtype=torch.float64))
    feats.requires_grad_(True)
    logits = net.logits_from_features(feats)
    assert tuple(logits.shape) == (3, 5)
    for t in range(5):
        (grad,) = torch.autograd.grad(logits[:, t].sum(), feats, retain_graph=True)
        torch.testing.assert_close(grad.sum(dim=(2, 3)), net.head_weight[t].detach().expand(3, -1))


# ---------------------------------------------------------------- refinement


def test_refinement_is_one_half_at_sigma():
    cams = torch.tensor([[[[0.0, 0.4], [1.0, 0.9]]]], dtype=torch.float64)  # min 0, max 1
    refined = refine_cams(cams, (2, 2))
    assert refined[0, 0, 0, 1].item() == 0.5
    torch.testing.assert_close(refined, torch.sigmoid(100 * (cams - 0.4)))


def test_refinement_threshold_0999_is_minmax_0469():
    m_hat = torch.linspace(0, 1, 100_001, dtype=torch.float64).reshape(1, 1, 1, -1)
    refined = refine_cams(m_hat, m_hat.shape[-2:])
    threshold = 0.4 + math.log(999) / 100
    assert abs(threshold - 0.4691) < 1e-4
    away = (m_hat - threshold).abs() > 1e-9
    assert torch.equal((refined >= 0.999)[away], (m_hat >= threshold)[away])


def test_minmax_of_a_constant_map_is_zero_without_nan():
    cams = torch.stack([torch.full((4, 4), 3.0), torch.zeros(4, 4), torch.arange(16.0).reshape(4, 4)])[None]
    cams.requires_grad_(True)
    m_hat = refine_cams(cams, (4, 4), use_sigmoid=False)
    assert torch.equal(m_hat[0, :2], torch.zeros(2, 4, 4))
    torch.testing.assert_close(m_hat[0, 2], torch.arange(16.0).reshape(4, 4) / 15)  # channels min-maxed apart
    refined = refine_cams(cams, (4, 4))
    refined.sum().backward()
    assert torch.isfinite(refined).all() and torch.isfinite(cams.grad).all()
    assert refined[0, :2].max() < 1e-17  # sigmoid(-40)


def test_refinement_upsamples_with_aligned_corners():
    cams = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    expected = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]) / 3  # corners kept
    torch.testing.assert_close(refine_cams(cams, (3, 3), use_sigmoid=False)[0, 0], expected)
    torch.testing.assert_close(minmax_cams(cams), cams / 3)


# ---------------------------------------------------------------- foreground attention


def test_fablock_is_the_identity_at_initialisation():
    torch.manual_seed(0)
    block = FABlock(16)
    x = torch.randn(2, 16, 5, 6)
    assert block.gamma.item() == 0.0
    assert torch.equal(block(x), x)
    assert torch.equal(block.eval()(x), x)


def test_fablock_hand_made_case():
    # conv1 reads channel 0 -> alpha = softmax_p(x_0); the MLP passes g_0 to every gate:
    # c = sigmoid(ReLU(g_0)); conv2 = I; conv3 = channel mean; conv4 = 0 and BN bias 0.3 -> z = sigmoid(0.3)
    c, gamma = 8, 2.0
    block = FABlock(c, reduction=8).eval().double()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv1.weight[0, 0] = 1.0
        block.channel_fc[0].weight.zero_()
        block.channel_fc[0].weight[0, 0] = 1.0
        block.channel_fc[2].weight.fill_(1.0)
        block.conv2.weight.copy_(torch.eye(c, dtype=torch.float64)[:, :, None, None])
        block.conv3.weight.fill_(1.0 / c)
        block.conv4.weight.zero_()
        block.bn4.bias.fill_(0.3)
        block.gamma.fill_(gamma)
    torch.manual_seed(3)
    x = torch.randn(2, c, 3, 4, dtype=torch.float64)
    alpha = torch.softmax(x[:, 0].flatten(1), dim=1)
    g0 = (alpha * x[:, 0].flatten(1)).sum(1)
    gate = torch.sigmoid(g0.clamp(min=0))[:, None, None, None]
    u = gate * x.mean(dim=1, keepdim=True)
    expected = x + gamma * u * torch.sigmoid(torch.tensor(0.3, dtype=torch.float64))
    torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------- network


def test_forward_returns_one_tensor_abnormality_first_and_maps_of_the_same_pass():
    net = tiny_ham(num_classes=5).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logits = net(x)
    out = net.forward_with_maps(x)
    assert isinstance(logits, torch.Tensor) and tuple(logits.shape) == (2, 6)
    torch.testing.assert_close(out.logits, logits)
    feats = net.features(x)
    pooled = lse_pool(feats, 6.0)
    torch.testing.assert_close(logits[:, :1], pooled @ net.anomaly_fc.weight.T)
    torch.testing.assert_close(logits[:, 1:], pooled @ net.cls_fc.weight.T)
    hand = torch.einsum("tk,bkhw->bthw", net.head_weight, feats).clamp(min=0)
    assert tuple(out.cams.shape) == (2, 6, 4, 4)  # 32 / 8
    torch.testing.assert_close(out.cams, hand)
    assert tuple(out.refined.shape) == (2, 6, 32, 32)
    torch.testing.assert_close(out.refined, refine_cams(hand, (32, 32)))
    torch.testing.assert_close(net.class_attention(x, refine=False), hand)
    torch.testing.assert_close(net.class_attention(x), out.refined)
    assert net.forward_with_maps(x, refine=False).refined is None


def test_maps_train_the_features_not_the_heads():
    net = tiny_ham()
    out = net.forward_with_maps(torch.randn(2, 3, 32, 32))
    (out.cams.sum() + out.refined.sum()).backward()
    assert net.anomaly_fc.weight.grad is None and net.cls_fc.weight.grad is None
    assert net.cls_head[0].weight.grad.abs().sum() > 0 and net.backbone.conv1.weight.grad.abs().sum() > 0


def test_torchscript_forward_equals_eager():
    net = tiny_ham()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=0)


# ---------------------------------------------------------------- ImageNet weights


def _bn(state: dict, prefix: str, c: int, g: torch.Generator, counters: bool) -> None:
    state[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
    state[f"{prefix}.bias"] = torch.randn(c, generator=g)
    state[f"{prefix}.running_mean"] = torch.randn(c, generator=g)
    state[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
    if counters:
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)


def torchvision_state(arch: str = "resnet18", counters: bool = True, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict in torchvision's ResNet layout, written from torchvision's naming rules."""
    blocks = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[arch]
    bottleneck = arch == "resnet50"
    expansion = 4 if bottleneck else 1
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, *shape: int) -> None:
        state[name] = torch.randn(*shape, generator=g) if device == "cpu" else torch.empty(*shape, device=device)

    conv("conv1.weight", 64, 3, 7, 7)
    _bn(state, "bn1", 64, g, counters)
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        for j in range(n):
            p, cin = f"layer{i}.{j}", inplanes if j == 0 else planes * expansion
            if bottleneck:
                conv(f"{p}.conv1.weight", planes, cin, 1, 1)
                conv(f"{p}.conv2.weight", planes, planes, 3, 3)
                conv(f"{p}.conv3.weight", planes * 4, planes, 1, 1)
                for k, c in ((1, planes), (2, planes), (3, planes * 4)):
                    _bn(state, f"{p}.bn{k}", c, g, counters)
            else:
                conv(f"{p}.conv1.weight", planes, cin, 3, 3)
                conv(f"{p}.conv2.weight", planes, planes, 3, 3)
                _bn(state, f"{p}.bn1", planes, g, counters)
                _bn(state, f"{p}.bn2", planes, g, counters)
            if j == 0 and (i > 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0.weight", planes * expansion, inplanes, 1, 1)
                _bn(state, f"{p}.downsample.1", planes * expansion, g, counters)
        inplanes = planes * expansion
    conv("fc.weight", 1000, 512 * expansion)
    conv("fc.bias", 1000)
    return state


def test_imagenet_resnet18_weights_load_into_the_backbone(tmp_path):
    state = torchvision_state("resnet18", counters=False)  # the pre-0.4.1 files have no counters
    path = atomic_save(state, tmp_path / "resnet18.pth")
    torch.manual_seed(5)
    net = ham_network(pretrained_path=path, arch="resnet18", num_classes=3)
    torch.manual_seed(5)
    fresh = HAMNet(arch="resnet18", num_classes=3)
    loaded = net.backbone.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert len([k for k in state if not k.startswith("fc.")]) == len([k for k in loaded if "num_batches" not in k])
    # the attention and head modules keep their initialisation
    head = {k: v for k, v in fresh.state_dict().items() if not k.startswith("backbone.")}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in head.items())
    assert not torch.equal(net.backbone.conv1.weight, fresh.backbone.conv1.weight)
    assert ham_network(pretrained_path="", arch="resnet18").backbone.conv1.weight.shape == (64, 3, 7, 7)


def test_wrapped_and_prefixed_checkpoints_load(tmp_path):
    state = torchvision_state("resnet18")
    path = atomic_save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    net = ham_network(pretrained_path=path, arch="resnet18")
    assert torch.equal(net.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_resnet50_key_mapping_matches_the_backbone():
    with torch.device("meta"):
        backbone = DilatedResNet("resnet50")
    mapped = map_resnet_state_dict(torchvision_state("resnet50", device="meta"), backbone)
    target = backbone.state_dict()
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)


def test_strided_basic_layer1_keeps_its_extra_shortcut_at_init(tmp_path):
    path = atomic_save(torchvision_state("resnet18"), tmp_path / "resnet18.pth")
    net = ham_network(pretrained_path=path, arch="resnet18", output_stride=32, pooling=False)
    assert net.backbone.layer1[0].downsample is not None  # layer1 strided: a shortcut torchvision lacks


def test_grey_stem_sums_the_rgb_filters(tmp_path):
    state = torchvision_state("resnet18")
    path = atomic_save(state, tmp_path / "resnet18.pth")
    net = ham_network(pretrained_path=path, arch="resnet18", in_channels=1)
    torch.testing.assert_close(net.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_bad_checkpoints_raise_one_line_naming_the_file(tmp_path):
    state = torchvision_state("resnet18")
    cases = {
        "shape": {**state, "layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)},
        "missing": {k: v for k, v in state.items() if k != "layer3.1.bn1.weight"},
        "unexpected": {**state, "layer5.0.conv1.weight": torch.zeros(1)},
    }
    for name, bad in cases.items():
        path = atomic_save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(InputDataError) as err:
            ham_network(pretrained_path=path, arch="resnet18")
        message = str(err.value)
        assert message.startswith(str(path)) and "\n" not in message
        assert {"shape": "layer2.0.conv1.weight", "missing": "layer3.1.bn1.weight", "unexpected": "layer5"}[name] in message
    # a tensor instead of a state dict, no file at all
    tensor_path = atomic_save(torch.zeros(3), tmp_path / "tensor.pth")
    for path in (tensor_path, tmp_path / "absent.pth"):
        with pytest.raises(InputDataError, match=str(path)):
            ham_network(pretrained_path=path, arch="resnet18")

