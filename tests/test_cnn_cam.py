"""Grad-CAM / Grad-CAM++ for CNNs on MONAI's compute_map: Captum agreement, batch invariance, hooks released."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.visualize import GradCAMpp

from custom_components.explain.cnn_cam import CNNGradCAM


def small_cnn(spatial_dims: int = 2, inplace: bool = True) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
    torch.manual_seed(0)
    return nn.Sequential(conv(2, 6, 3, padding=1), nn.ReLU(), conv(6, 5, 3, padding=1), nn.ReLU(inplace=inplace),
                         pool, nn.Flatten(), nn.Linear(5, 3)).eval()  # fmt: skip


def test_gradcam_equals_captum_layer_gradcam_per_sample_targets():
    from captum.attr import LayerGradCam

    model = small_cnn()
    x = torch.randn(4, 2, 12, 12)
    target = torch.tensor([0, 2, 1, 2])
    with CNNGradCAM(model, "2", upsample="none", normalize="none") as cam:
        ours = cam.attribute(x, target=target)
    ref = LayerGradCam(model, model[2]).attribute(x, target=target, relu_attributions=True)[:, 0]
    assert ours.shape == (4, 12, 12)
    assert (ours - ref).abs().max() < 1e-5


def test_gradcampp_batched_equals_monai_one_image_at_a_time():
    model = small_cnn()
    x = torch.randn(3, 2, 10, 10)
    target = torch.tensor([1, 0, 2])
    with CNNGradCAM(model, "2", variant="gradcam++", upsample="none", normalize="none") as cam:
        batched = cam.attribute(x, target=target)
    # MONAI is right for batch 1 (its hooks need the in-place ReLU after the layer switched off)
    monai_cam = GradCAMpp(nn_module=small_cnn(inplace=False), target_layers="2")
    singles = torch.stack([monai_cam.compute_map(x[i:i + 1], class_idx=int(target[i]))[0, 0] for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)
    # MONAI's own batched call broadcasts exp(score) (B,) along the last axis (W = 10 != B = 3): it fails
    with pytest.raises(RuntimeError):
        GradCAMpp(nn_module=small_cnn(inplace=False), target_layers="2").compute_map(x, class_idx=1)


def test_predicted_target_minmax_and_3d():
    model = small_cnn(3)
    x = torch.randn(2, 2, 6, 6, 6)
    with CNNGradCAM(model, "2", upsample="none") as cam:
        maps = cam.attribute(x).detach()
        per_sample = torch.cat([cam.attribute(x[i:i + 1]) for i in range(2)]).detach()
    with CNNGradCAM(model, "2", upsample="none", normalize="none") as cam:
        raw = cam.attribute(x).detach()
    assert maps.shape == (2, 6, 6, 6) and maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps, per_sample, rtol=1e-5, atol=1e-6)
    # the maximum stays where the evidence is: not inverted as MONAI's default post-processing does
    assert torch.equal(maps.flatten(1).argmax(1), raw.flatten(1).argmax(1))
    assert torch.allclose(maps.flatten(1).max(1).values, torch.ones(2), atol=1e-4)


def test_hooks_are_released_and_bad_arguments():
    model = small_cnn()
    layer = model[2]
    cam = CNNGradCAM(model, "2")
    assert len(layer._forward_hooks) == 1 and len(layer._backward_hooks) == 1
    assert model[3].inplace is False  # in-place ReLU after the target layer is switched off ...
    cam.release()
    assert not layer._forward_hooks and not layer._backward_hooks
    assert model[3].inplace is True  # ... and restored
    with pytest.raises(ValueError, match="not found"):
        CNNGradCAM(model, "nope")
    with pytest.raises(ValueError, match="variant"):
        CNNGradCAM(model, "2", variant="scorecam")
