"""Mask blur and the LGM-ViT KL localization loss (spec §4, §10 Blur / KL loss / Masking)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ndimage = pytest.importorskip("scipy.ndimage")
windows = pytest.importorskip("scipy.signal.windows")

from custom_components.guidance import LGMViTKLLoss, gaussian_blur, gaussian_kernel1d, positive_selection  # noqa: E402
from custom_components.guidance.blur import default_sigma  # noqa: E402

# --------------------------------------------------------------------------- blur


def test_kernel_sigma_and_values():
    assert default_sigma(51) == pytest.approx(8.0, abs=1e-12)
    k = gaussian_kernel1d(51, dtype=torch.float64)
    assert k.shape == (51,)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)
    ref = windows.gaussian(51, 8.0)
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), atol=1e-12, rtol=0)
    # explicit sigma and the closed form exp(-x^2 / 2 sigma^2)
    k3 = gaussian_kernel1d(5, sigma=1.5, dtype=torch.float64).numpy()
    x = np.arange(-2, 3)
    e = np.exp(-(x**2) / (2 * 1.5**2))
    np.testing.assert_allclose(k3, e / e.sum(), atol=1e-12, rtol=0)
    assert torch.equal(gaussian_kernel1d(1), torch.ones(1))
    for bad in (0, 4, -3):
        with pytest.raises(ValueError):
            gaussian_kernel1d(bad)


def test_blur_equals_scipy_mirror_convolution():
    rng = np.random.default_rng(0)
    mask = (rng.random((64, 64)) > 0.7).astype(np.float64)
    k = windows.gaussian(51, 8.0)
    k /= k.sum()
    ref = ndimage.convolve1d(ndimage.convolve1d(mask, k, axis=1, mode="mirror"), k, axis=0, mode="mirror")
    out = gaussian_blur(torch.from_numpy(mask).float()[None])  # (1, H, W)
    assert out.shape == (1, 64, 64) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-6, rtol=0)
    # (B, 1, H, W) keeps its shape and gives the same values
    out4 = gaussian_blur(torch.from_numpy(mask).float()[None, None])
    assert out4.shape == (1, 1, 64, 64)
    torch.testing.assert_close(out4[:, 0], out, atol=0, rtol=0)
    # a non-square mask and an explicit sigma
    rect = (rng.random((40, 70)) > 0.5).astype(np.float64)
    k2 = windows.gaussian(9, 2.0)
    k2 /= k2.sum()
    ref2 = ndimage.convolve1d(ndimage.convolve1d(rect, k2, axis=1, mode="mirror"), k2, axis=0, mode="mirror")
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(rect)[None], 9, 2.0)[0].numpy(), ref2, atol=1e-6, rtol=0)


def test_blur_constants_and_bad_shapes():
    ones = torch.ones(2, 64, 64)
    torch.testing.assert_close(gaussian_blur(ones), ones, atol=1e-6, rtol=0)
    assert torch.equal(gaussian_blur(torch.zeros(2, 64, 64)), torch.zeros(2, 64, 64))
    x = torch.rand(3, 16, 16)
    assert torch.equal(gaussian_blur(x, kernel_size=1), x)  # kernel 1 is the identity
    blurred = gaussian_blur((torch.rand(2, 64, 64) > 0.5).float())
    assert blurred.min() >= 0 and blurred.max() <= 1 + 1e-6
    with pytest.raises(ValueError):
        gaussian_blur(torch.zeros(2, 3, 64, 64))  # channel dim != 1
    with pytest.raises(ValueError):
        gaussian_blur(torch.zeros(64, 64))
    with pytest.raises(ValueError):
        gaussian_blur(torch.zeros(1, 20, 20))  # reflect padding of 25 impossible


# --------------------------------------------------------------------------- KL loss


def make_batch(b=5, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(b, h, h, generator=g)
    masks = (torch.rand(b, 1, h, h, generator=g) > 0.8).float()
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])[:b]
    return maps, masks, labels


def reference_kl(maps, masks, labels, kernel_size=51):
    pos = labels[:, 1] > 0.5 if labels.dim() == 2 and labels.shape[1] == 2 else labels.reshape(-1) > 0.5
    g = gaussian_blur(masks[pos][:, 0], kernel_size)
    crit = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    return crit(F.log_softmax(maps[pos].flatten(1), 1), F.log_softmax(g.flatten(1), 1))


def test_kl_equals_reference_formula():
    maps, masks, labels = make_batch()
    loss = LGMViTKLLoss()(maps, masks, labels)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, reference_kl(maps, masks, labels), atol=1e-6, rtol=1e-6)
    # independent blur (scipy) and an explicit per-slice sum
    k = windows.gaussian(51, 8.0)
    k /= k.sum()
    total = 0.0
    for b in (0, 2, 3):
        rows_blurred = ndimage.convolve1d(masks[b, 0].double().numpy(), k, axis=1, mode="mirror")
        gb = ndimage.convolve1d(rows_blurred, k, axis=0, mode="mirror")
        log_q = torch.log_softmax(torch.from_numpy(gb).flatten(), 0)
        log_p = torch.log_softmax(maps[b].double().flatten(), 0)
        total += float((log_q.exp() * (log_q - log_p)).sum())
    assert loss.item() == pytest.approx(total / 3, rel=1e-5, abs=1e-7)


def test_kl_zero_when_map_is_shifted_blurred_mask_and_shift_invariant():
    maps, masks, labels = make_batch()
    crit = LGMViTKLLoss()
    g = gaussian_blur(masks)[:, 0]
    shifts = torch.tensor([3.0, -100.0, -7.5, 0.0, 42.0]).view(-1, 1, 1)
    assert crit(g + shifts, masks, labels).item() == pytest.approx(0.0, abs=1e-6)
    base = crit(maps, masks, labels)
    assert base.item() > 0
    torch.testing.assert_close(crit(maps + shifts, masks, labels), base, atol=1e-6, rtol=1e-6)
    # but not invariant to a scale
    assert abs(crit(2 * maps, masks, labels).item() - base.item()) > 1e-3


def test_kl_gradient_closed_form():
    maps, masks, labels = make_batch()
    maps = maps.clone().requires_grad_(True)
    LGMViTKLLoss()(maps, masks, labels).backward()
    pos = labels > 0.5
    n_pos = int(pos.sum())
    p = torch.softmax(maps.detach().flatten(1), 1).view_as(maps)
    q = torch.softmax(gaussian_blur(masks)[:, 0].flatten(1), 1).view_as(maps)
    torch.testing.assert_close(maps.grad[pos], ((p - q) / n_pos)[pos], atol=1e-9, rtol=1e-5)
    assert torch.count_nonzero(maps.grad[~pos]) == 0


def test_binary_mask_foreground_mass_closed_form():
    h = 20
    masks = torch.zeros(2, h, h)
    masks[0, 2:7, 3:8] = 1  # 25 px
    masks[1, :10, :] = 1  # 200 px
    labels = torch.ones(2)
    maps = torch.zeros(2, h, h, requires_grad=True)  # P uniform
    crit = LGMViTKLLoss(kernel_size=1)  # no blur: G binary
    loss = crit(maps, masks, labels)
    loss.backward()
    n = h * h
    q = 1.0 / n - 2 * maps.grad  # grad = (P - Q) / B_pos with P = 1/n
    expected_loss = 0.0
    for b in range(2):
        n_fg = int(masks[b].sum())
        f = n_fg / n
        mass = float(q[b][masks[b] > 0].sum())
        assert mass == pytest.approx(f * math.e / (f * math.e + 1 - f), abs=1e-6)
        z = n_fg * math.e + (n - n_fg)
        expected_loss += math.log(n) - math.log(z) + n_fg * math.e / z  # KL(Q || uniform)
    assert loss.item() == pytest.approx(expected_loss / 2, abs=1e-6)
    # the spec's example: f = 5 % holds about 12.5 % of Q
    assert 0.05 * math.e / (0.05 * math.e + 0.95) == pytest.approx(0.125, abs=1e-3)


def test_all_negative_batch_is_exact_zero_with_backward():
    maps, masks, _ = make_batch()
    maps = maps.clone().requires_grad_(True)
    loss = LGMViTKLLoss()(maps, masks, torch.zeros(5))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(maps.grad, torch.zeros_like(maps))


def test_negative_slices_do_not_matter():
    maps, masks, labels = make_batch()
    crit = LGMViTKLLoss()
    base = crit(maps, masks, labels)
    neg = labels < 0.5
    maps2, masks2 = maps.clone(), masks.clone()
    maps2[neg] = torch.randn_like(maps2[neg]) * 50
    masks2[neg] = 1 - masks2[neg]
    assert torch.equal(crit(maps2, masks2, labels), base)
    # a negative slice may even hold NaN maps
    maps2[neg] = float("nan")
    assert torch.equal(crit(maps2, masks2, labels), base)


def test_label_layouts_and_mask_layouts():
    maps, masks, labels = make_batch()
    crit = LGMViTKLLoss()
    base = crit(maps, masks, labels)
    one_hot = torch.stack([1 - labels, labels], dim=1)
    for lab in (labels[:, None], one_hot, labels.long()):
        assert torch.equal(crit(maps, masks, lab), base)
    assert torch.equal(positive_selection(one_hot), labels > 0.5)
    torch.testing.assert_close(crit(maps, masks[:, 0], labels), base, atol=0, rtol=0)  # (B, H, W) masks
    torch.testing.assert_close(base, reference_kl(maps, masks, one_hot), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        crit(maps[:, :16, :16], masks, labels)
