"""Encoder initialisation of the LVM-Med downstream bundles: strict ResNet loading into MONAI networks."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.nets import FlexibleUNet, ResNet

from custom_components.io import InputDataError
from custom_components.networks.encoder_init import init_encoder, lvmmed_unet, resnet_encoder


def _torchvision_layout_resnet(block="bottleneck", layers=(1, 1, 1, 1), in_channels=3, classes=5) -> ResNet:
    """A MONAI ResNet with torchvision's key names (no shortcut bias), as ``lvmmed_resnet.torch``."""
    return ResNet(
        block=block, layers=list(layers), block_inplanes=[64, 128, 256, 512], spatial_dims=2,
        n_input_channels=in_channels, num_classes=classes, bias_downsample=False,
    )


def _unet(backbone="resnet18", in_channels=3) -> FlexibleUNet:
    return lvmmed_unet("scratch", None, backbone=backbone, in_channels=in_channels, decoder_channels=(32, 16, 16, 8, 8))


@pytest.fixture()
def r18_file(tmp_path):
    torch.manual_seed(0)
    src = ResNet(
        block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512], spatial_dims=2,
        n_input_channels=3, num_classes=1000, shortcut_type="A", bias_downsample=False,
    )  # MONAI's resnet18 (parameter-free "A" shortcuts, as FlexibleUNet's encoder)
    path = tmp_path / "r18.pt"
    torch.save(src.state_dict(), path)
    return src, path


def test_flexible_unet_loads_every_encoder_tensor(r18_file, caplog):
    src, path = r18_file
    net = _unet()
    with caplog.at_level(logging.INFO, logger="custom_components.networks.encoder_init"):
        n = init_encoder(net, "lvmmed", path)
    expected = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    assert n == len(net.encoder.state_dict()) == len(expected)
    assert f"loaded {n} tensors from {path}" in caplog.text
    for key, value in net.encoder.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_resnet50_file_into_flexible_unet_encoder(tmp_path):
    """The published ``lvmmed_resnet.torch`` layout (torchvision ResNet-50) fits FlexibleUNet's resnet50."""
    torch.manual_seed(3)
    src = _torchvision_layout_resnet(layers=(3, 4, 6, 3), classes=1000)
    path = tmp_path / "r50.torch"
    torch.save(src.state_dict(), path)
    net = lvmmed_unet("lvmmed", path, backbone="resnet50")
    assert len(net.encoder.state_dict()) == len(src.state_dict()) - 2
    torch.testing.assert_close(net.encoder.layer3[5].conv2.weight, src.layer3[5].conv2.weight, rtol=0, atol=0)
    torch.testing.assert_close(net.encoder.layer4[0].downsample[1].running_var, src.layer4[0].downsample[1].running_var)


def test_torchvision_resnet18_does_not_fit_monai_resnet18(tmp_path):
    """MONAI's resnet18 encoder has parameter-free shortcuts: torchvision's downsample convs are extra keys."""
    src = _torchvision_layout_resnet(block="basic", layers=(2, 2, 2, 2))
    torch.save(src.state_dict(), tmp_path / "tv18.pt")
    with pytest.raises(InputDataError, match=r"unexpected.*layer2\.0\.downsample"):
        init_encoder(_unet(), "imagenet", tmp_path / "tv18.pt")


def test_bare_resnet_keeps_its_head(tmp_path):
    torch.manual_seed(1)
    src = _torchvision_layout_resnet(classes=1000)
    path = tmp_path / "r.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = _torchvision_layout_resnet(classes=4)
    head = dst.fc.weight.detach().clone()
    n = init_encoder(dst, "imagenet", path)
    assert n == len(src.state_dict()) - 2  # all but fc.weight / fc.bias
    assert dst.fc.out_features == 4 and torch.equal(dst.fc.weight, head)
    torch.testing.assert_close(dst.layer4[0].conv3.weight, src.layer4[0].conv3.weight, rtol=0, atol=0)


def test_logits_unchanged_by_loading_own_weights(tmp_path):
    torch.manual_seed(2)
    net = _unet().eval()
    path = tmp_path / "enc.pt"
    torch.save(net.encoder.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
    other = _unet().eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in other.encoder.parameters():
            p.add_(1.0)  # perturb, then restore from the file
    init_encoder(other, "lvmmed", path)
    with torch.no_grad():
        torch.testing.assert_close(other(x), before, rtol=0, atol=0)


def test_one_channel_stem_sums_rgb_filters(r18_file):
    src, path = r18_file
    net = _unet(in_channels=1)
    init_encoder(net, "lvmmed", path)
    torch.testing.assert_close(net.encoder.conv1.weight, src.conv1.weight.sum(1, keepdim=True))


def test_wrong_shape_errors(tmp_path):
    src = _torchvision_layout_resnet()
    state = src.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 64, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(InputDataError, match=r"shape mismatch.*layer1\.0\.conv1\.weight"):
        init_encoder(_torchvision_layout_resnet(), "lvmmed", path)


def test_extra_and_missing_keys_error(tmp_path):
    state = _torchvision_layout_resnet().state_dict()
    extra = dict(state, **{"layer9.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(InputDataError, match=r"unexpected.*layer9\.weight"):
        init_encoder(_torchvision_layout_resnet(), "lvmmed", tmp_path / "extra.pt")
    missing = {k: v for k, v in state.items() if k != "layer2.0.conv2.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(InputDataError, match=r"missing.*layer2\.0\.conv2\.weight"):
        init_encoder(_torchvision_layout_resnet(), "imagenet", tmp_path / "missing.pt")


def test_other_depth_is_an_error(r18_file):
    _, path = r18_file  # a ResNet-18 file into a ResNet-50 encoder
    with pytest.raises(InputDataError, match="not this ResNet"):
        init_encoder(_unet("resnet50"), "lvmmed", path)


def test_init_arguments(tmp_path, r18_file):
    _, path = r18_file
    net = _unet()
    with pytest.raises(ValueError, match="scratch"):
        init_encoder(net, "scratch", path)
    with pytest.raises(InputDataError, match="pretrained_path"):
        init_encoder(net, "lvmmed", None)
    with pytest.raises(InputDataError, match="does not exist"):
        init_encoder(net, "imagenet", tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="init must be one of"):
        init_encoder(net, "dino", path)
    assert init_encoder(net, "scratch", None) == 0
    assert resnet_encoder(net) is net.encoder


def test_unet_forward_is_one_tensor():
    out = _unet().eval()(torch.zeros(1, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 32, 32)


def test_scriptable_shortcuts_compute_what_monai_computes():
    from monai.networks.nets import FlexibleUNet

    from custom_components.networks.encoder_init import ZeroPadShortcut

    torch.manual_seed(4)
    ref = FlexibleUNet(3, 2, "resnet18", decoder_channels=(32, 16, 16, 8, 8)).eval()
    net = _unet().eval()
    net.load_state_dict(ref.state_dict())
    assert sum(isinstance(m, ZeroPadShortcut) for m in net.modules()) == 3  # layers 2-4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
    # TorchScript compiles the module (MONAI's functools.partial it cannot): the shortcut alone here,
    # the whole network in the bundle test's ckpt_export
    scripted = torch.jit.script(ZeroPadShortcut(8, 2))
    y = torch.randn(1, 4, 6, 6)
    expected = torch.cat([y[:, :, ::2, ::2], torch.zeros(1, 4, 3, 3)], 1)
    torch.testing.assert_close(scripted(y), expected, rtol=0, atol=0)
