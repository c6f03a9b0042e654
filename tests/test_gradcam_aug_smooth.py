"""Grad-CAM ``aug_smooth`` (flip x multiply test-time augmentation, pytorch-grad-cam 1.5.0 / ttach).

Toy networks with a closed-form Grad-CAM (spec section 10): y_k = mean_p <u_k, a_p> with
a = norm1(patch tokens), so w = u_k / N and cam_p = <u_k, a_p> / N exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.explain import ViTGradCAM
from custom_components.explain.gae import minmax_per_sample
from custom_components.explain.gradcam import AUG_SMOOTH_PASSES, scale_cam

from conftest import scrambled_vit

PATCH, CHANNELS, DIM, CLASSES = 4, 2, 3, 2


class _Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


class _ToyCAMNet(nn.Module):
    """Patch conv -> [CLS, tokens] -> blocks[0].norm1 -> y_k = mean_p <u_k, a_p> (hookable like a ViT).

    ``symmetric``: horizontally symmetric conv kernels, so the tokens of a flipped image are the
    flipped token grid. ``squash``: norm1 = tanh, so scaling the image changes the (normalised) CAM.
    """

    def __init__(self, symmetric: bool, squash: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(CHANNELS, DIM, PATCH, PATCH, bias=False)
        with torch.no_grad():  # unit-scale tokens: tanh is far from linear on them
            self.embed.weight.copy_(torch.randn_like(self.embed.weight) * 0.5)
            if symmetric:
                self.embed.weight.copy_(self.embed.weight + self.embed.weight.flip(-1))
        block = nn.Module()
        block.norm1 = _Tanh() if squash else nn.Identity()
        self.blocks = nn.ModuleList([block])
        self.register_buffer("u", torch.randn(CLASSES, DIM))
        self.inputs: list[torch.Tensor] = []
        self.double()

    def tokens(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        t = self.tokens(x)
        a = self.blocks[0].norm1(torch.cat([torch.zeros_like(t[:, :1]), t], dim=1))
        return (a[:, 1:] @ self.u.T).mean(1)  # (B, K): y_k = mean_p <u_k, a_p>


def _images(b=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, CHANNELS, size, size, generator=g, dtype=torch.float64)


def _manual_aug_map(net: _ToyCAMNet, x: torch.Tensor, target: torch.Tensor, factors=(0.9, 1.0, 1.1)) -> torch.Tensor:
    """The six de-augmented per-pass maps averaged, then min-maxed, from the closed-form CAM."""
    maps = []
    for flip in (False, True):
        for factor in factors:
            xa = (x.flip(-1) if flip else x) * factor
            with torch.no_grad():
                t = net.tokens(xa)
                a = net.blocks[0].norm1(t)
                cam = (a @ net.u.T)[torch.arange(x.shape[0]), :, target] / t.shape[1]  # (B, N)
            cam = cam.clamp(min=0)
            lo = cam.min(1, keepdim=True).values
            cam = (cam - lo) / ((cam - lo).max(1, keepdim=True).values + 1e-7)
            side = int(cam.shape[1] ** 0.5)
            m = F.interpolate(cam.reshape(-1, 1, side, side), size=x.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(m[:, 0].flip(-1) if flip else m[:, 0])
    avg = torch.stack(maps).mean(0)
    lo = avg.flatten(1).min(1).values.view(-1, 1, 1)
    hi = avg.flatten(1).max(1).values.view(-1, 1, 1)
    return (avg - lo) / (hi - lo + 1e-8)


def test_aug_smooth_of_flip_equivariant_scale_invariant_map_is_the_plain_map():
    net, x = _ToyCAMNet(symmetric=True, squash=False), _images()
    t = torch.tensor([0, 1, 0])
    plain = ViTGradCAM(net).attribute(x, target=t)
    smooth = ViTGradCAM(net, aug_smooth=True).attribute(x, target=t)
    assert plain.shape == smooth.shape == (3, 16, 16)
    assert (plain.flatten(1).std(1) > 0.1).all()  # a non-trivial map
    torch.testing.assert_close(smooth, plain, atol=1e-6, rtol=0)


def test_aug_smooth_closed_form_and_augmented_inputs():
    net, x = _ToyCAMNet(symmetric=False, squash=True), _images()
    t = torch.tensor([1, 0, 1])
    net.inputs.clear()
    got = ViTGradCAM(net, aug_smooth=True).attribute(x, target=t)
    torch.testing.assert_close(got, _manual_aug_map(net, x, t), atol=1e-10, rtol=0)
    # the six forwards saw exactly the flip x multiply copies of the batch
    seen = net.inputs
    assert len(seen) == len(AUG_SMOOTH_PASSES) == 6
    for flip, factor in AUG_SMOOTH_PASSES:
        want = (x.flip(-1) if flip else x) * factor
        assert sum(bool(torch.equal(s, want)) for s in seen) == 1, (flip, factor)
    # the multiply factors matter here (tanh): without them the closed form is off by far more
    # than the 1e-10 it matches to (+-10 % intensity moves a tanh map by ~1e-3)
    flips_only = _manual_aug_map(net, x, t, factors=(1.0, 1.0, 1.0))
    assert (got - flips_only).abs().max() > 1e-4
    # and the flips matter (asymmetric kernels)
    plain = ViTGradCAM(net).attribute(x, target=t)
    assert (got - plain).abs().max() > 1e-2


def test_aug_smooth_target_from_unaugmented_pass():
    net, x = _ToyCAMNet(symmetric=False, squash=True, seed=3), _images(b=4, seed=5)
    with torch.no_grad():
        pred = net(x).argmax(1)
    auto = ViTGradCAM(net, aug_smooth=True).attribute(x)
    torch.testing.assert_close(auto, _manual_aug_map(net, x, pred), atol=1e-10, rtol=0)
    torch.testing.assert_close(ViTGradCAM(net, target="predicted", aug_smooth=True).attribute(x), auto)
    fixed = ViTGradCAM(net, target=1, aug_smooth=True).attribute(x, target=pred)  # int target wins
    torch.testing.assert_close(fixed, _manual_aug_map(net, x, torch.ones(4, dtype=torch.long)), atol=1e-10, rtol=0)


def test_aug_smooth_batched_equals_per_sample_on_a_vit():
    m = scrambled_vit(layers=2, classes=3)  # float64, eval
    x = _images(b=3, size=8, seed=2)
    t = torch.tensor([2, 0, 1])
    for kwargs in ({}, {"eigen_smooth": True}, {"upsample": "none", "normalize": "none"}):
        e = ViTGradCAM(m, aug_smooth=True, **kwargs)
        batched = e.attribute(x, target=t)
        loop = torch.cat([e.attribute(x[i : i + 1], target=t[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, loop, atol=1e-10, rtol=0)
        assert torch.isfinite(batched).all() and batched.min() >= 0
    assert batched.shape == (3, 2, 2) and batched.max() <= 1  # per-pass scaled maps: the mean stays in [0, 1]


def test_aug_smooth_is_not_available_on_one_recorded_forward():
    net, x = _ToyCAMNet(symmetric=True, squash=False), _images()
    e = ViTGradCAM(net, aug_smooth=True)
    with e.capture() as record:
        logits = net(x)
        with pytest.raises(RuntimeError, match="attribute"):
            e.explain(logits, record)


def test_scale_cam_matches_scale_cam_image():
    cam = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]], dtype=torch.float64)
    got = scale_cam(cam)
    torch.testing.assert_close(got[0], (cam[0] - 1) / (4 + 1e-7))
    assert (got[1] == 0).all()
    torch.testing.assert_close(minmax_per_sample(got), minmax_per_sample(cam))


def test_aug_smooth_keeps_no_graph_unless_create_graph():
    net, x = _ToyCAMNet(symmetric=False, squash=True), _images(b=2)
    t = torch.tensor([0, 1])
    detached = ViTGradCAM(net, aug_smooth=True).attribute(x, target=t)
    assert not detached.requires_grad  # six passes would otherwise keep six forward graphs alive
    smooth = ViTGradCAM(net, aug_smooth=True, create_graph=True).attribute(x, target=t)
    torch.testing.assert_close(smooth.detach(), detached, atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(smooth.sum(), [net.embed.weight])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
