"""LVM-Med backbone: torchvision / LVM-Med key layout, exported weights, strict loading."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.nets import ResNet

from custom_components.handlers.backbone_export import BackboneExport
from custom_components.io import InputDataError
from custom_components.networks.lvmmed_backbone import LVMMedResNet, backbone_state_dict, load_backbone_weights, lvmmed_resnet
from custom_components.networks.pretrained import load_pretrained_resnet

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(blocks: tuple[int, ...], bottleneck: bool) -> set[str]:
    """The state-dict keys of torchvision's ResNet without ``fc``, written out from its naming rules."""
    keys = {"conv1.weight", *(f"bn1.{b}" for b in BN)}
    convs = 3 if bottleneck else 2
    for layer, n in enumerate(blocks, start=1):
        for i in range(n):
            p = f"layer{layer}.{i}"
            for c in range(1, convs + 1):
                keys |= {f"{p}.conv{c}.weight", *(f"{p}.bn{c}.{b}" for b in BN)}
            if i == 0 and (layer > 1 or bottleneck):  # stride 2 or a width change: a projection shortcut
                keys |= {f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{b}" for b in BN)}
    return keys


@pytest.mark.parametrize(("arch", "blocks", "bottleneck", "n_params"), [
    ("resnet18", (2, 2, 2, 2), False, 11_689_512 - 513_000),  # torchvision's count minus fc (512 x 1000 + 1000)
    ("resnet50", (3, 4, 6, 3), True, 25_557_032 - 2_049_000),  # minus fc (2048 x 1000 + 1000)
])  # fmt: skip
def test_key_layout_and_size_are_torchvision_without_fc(arch, blocks, bottleneck, n_params):
    model = LVMMedResNet(arch)
    assert set(model.state_dict()) == torchvision_keys(blocks, bottleneck)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_forward_is_the_last_feature_map_and_scripts():
    model = LVMMedResNet("resnet18", in_channels=1).eval()
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 512, 2, 3)
        torch.testing.assert_close(torch.jit.script(model)(x), out)


def _fresh_monai_resnet18() -> ResNet:
    return ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3, conv1_t_size=7,
                  conv1_t_stride=2, feed_forward=False, bias_downsample=False)  # fmt: skip


def test_exported_weights_load_into_a_fresh_monai_resnet(tmp_path):
    torch.manual_seed(0)
    model = LVMMedResNet("resnet18")
    with torch.no_grad():  # non-trivial BN statistics
        model.train()(torch.rand(4, 3, 64, 64))
    wrapped = torch.nn.Module()
    wrapped.module = model  # as DDP holds it
    paths = BackboneExport(str(tmp_path), wrapped, filenames=("backbone.pt", "model.pt")).save()
    assert [p.name for p in paths] == ["backbone.pt", "model.pt"]
    state = torch.load(paths[0], weights_only=True)
    assert state.keys() == model.state_dict().keys()
    fresh = _fresh_monai_resnet18()
    result = load_pretrained_resnet(fresh, paths[0])
    assert result == {"missing_keys": [], "unexpected_keys": []}
    fresh.load_state_dict(state, strict=True)  # exactly the same keys
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # MONAI's forward pools: the mean of the backbone's map
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x).mean(dim=(2, 3)))


def test_torchvision_file_with_fc_and_prefix_loads_and_counts(tmp_path, caplog):
    source = LVMMedResNet("resnet18")
    state = {"module." + k: v for k, v in backbone_state_dict(source).items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "lvmmed_resnet.torch"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="custom_components.networks.lvmmed_backbone"):
        target = lvmmed_resnet("resnet18", pretrained_path=path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    assert f"loaded {len(target.state_dict())} backbone tensors" in caplog.text


def test_rgb_file_into_a_grey_backbone_sums_the_stem_filters(tmp_path):
    rgb = LVMMedResNet("resnet18").eval()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    grey = LVMMedResNet("resnet18", in_channels=1).eval()
    load_backbone_weights(grey, tmp_path / "rgb.pt")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_wrong_shape_or_architecture_is_one_error_naming_the_file(tmp_path):
    state = LVMMedResNet("resnet18").state_dict()
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(InputDataError, match=r"bad\.pt: .*layer3\.0\.conv1\.weight"):
        load_backbone_weights(LVMMedResNet("resnet18"), tmp_path / "bad.pt")
    torch.save(LVMMedResNet("resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(InputDataError, match=r"r18\.pt: not this ResNet"):
        load_backbone_weights(LVMMedResNet("resnet50"), tmp_path / "r18.pt")


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        LVMMedResNet("resnet101")
    with pytest.raises(ValueError, match="in_channels"):
        LVMMedResNet("resnet18", in_channels=2)


def test_vit_feature_map_is_the_patch_tokens_on_their_grid():
    from custom_components.networks.lvmmed_backbone import ViTFeatureMap

    torch.manual_seed(0)
    vit = ViTFeatureMap(img_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = vit(x)
        tokens = vit.forward_features(x)
    assert out.shape == (2, 16, 4, 4) and vit.out_channels == 16
    # cell (r, c) is patch token 1 + r * 4 + c (row-major patches after the CLS token)
    torch.testing.assert_close(out[:, :, 2, 3], tokens[:, 1 + 2 * 4 + 3])
