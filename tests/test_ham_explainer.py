"""HAMAttention: HAM's class attention maps behind the Explainer interface (spec ``specs/ham.md`` 2-3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM

from custom_components.explain import HAMAttention, ham_target_index
from custom_components.networks import HAMNet


@pytest.fixture(scope="module")
def net() -> HAMNet:
    torch.manual_seed(0)
    return HAMNet(arch="resnet18", num_classes=3).eval().double()  # 32² inputs -> 4x4 features


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32, dtype=torch.float64)


def hand_cams(net: HAMNet, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k w_{t,k} F_k) per image, from the fused features and the head weights."""
    with torch.no_grad():
        feats = net.features(images)
        weights = torch.cat([net.anomaly_fc.weight, net.cls_fc.weight])
    maps = []
    for b in range(images.shape[0]):
        m = sum(weights[int(target[b]), k] * feats[b, k] for k in range(feats.shape[1]))
        maps.append(m.clamp(min=0))
    return torch.stack(maps)


def test_raw_map_equals_the_hand_computed_cam(net, images):
    target = torch.tensor([0, 1, 3, 2])
    with torch.no_grad():
        maps = HAMAttention(net, upsample="none", normalize="none").attribute(images, target)
    expected = hand_cams(net, images, target)
    assert tuple(maps.shape) == (4, 4, 4)
    assert (expected > 0).any() and (expected == 0).any()  # the ReLU matters in this case
    torch.testing.assert_close(maps, expected)


def test_upsampled_minmax_and_refined_maps(net, images):
    target = torch.tensor([2, 0, 1, 3])
    raw = hand_cams(net, images, target)
    up = F.interpolate(raw[:, None], size=(32, 32), mode="bilinear", align_corners=True)[:, 0]
    with torch.no_grad():
        upsampled = HAMAttention(net, normalize="none").attribute(images, target)
        m_hat = HAMAttention(net).attribute(images, target)
        refined = HAMAttention(net, refine=True).attribute(images, target)
        nearest = HAMAttention(net, upsample="nearest", normalize="none").attribute(images, target)
        out = net.forward_with_maps(images)
    torch.testing.assert_close(upsampled, up)
    low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(m_hat, (up - low) / (high - low))
    # the refined map is HAM's own R for that class, and thresholding the min-maxed map is the same mask
    torch.testing.assert_close(refined, torch.sigmoid(100 * (m_hat - 0.4)))
    torch.testing.assert_close(refined, out.refined[torch.arange(4), target])
    away = (m_hat - (0.4 + math.log(999) / 100)).abs() > 1e-9
    assert torch.equal((refined >= 0.999)[away], (m_hat >= 0.4 + math.log(999) / 100)[away])
    torch.testing.assert_close(nearest, raw.repeat_interleave(8, 1).repeat_interleave(8, 2))


def test_map_is_monai_gradcam_of_the_fused_features_times_hw(net, images):
    # LSE pooling makes Grad-CAM's channel weights mean_p dy/dF = W / (h w) (spec section 3)
    gradcam = GradCAM(nn_module=copy.deepcopy(net), target_layers="cls_head")  # MONAI's hooks stay on its copy
    with torch.no_grad():
        ours = HAMAttention(net, target=2, upsample="none", normalize="none").attribute(images)
    theirs = gradcam.compute_map(images, class_idx=2)[:, 0]
    torch.testing.assert_close(ours, theirs * 16)


def test_batch_equals_per_image(net, images):
    target = torch.tensor([1, 0, 2, 3])
    explainer = HAMAttention(net)
    with torch.no_grad():
        batched = explainer.attribute(images, target)
        singles = torch.cat([explainer.attribute(images[i : i + 1], target[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles)


def test_target_selection(net, images):
    with torch.no_grad():
        logits = net(images)
    findings = logits[:, 1:]
    # predicted: the most probable finding, never the abnormality head
    torch.testing.assert_close(ham_target_index(logits, "predicted"), 1 + findings.argmax(1))
    torch.testing.assert_close(ham_target_index(logits, None), 1 + findings.argmax(1))
    assert ham_target_index(logits, 0).tolist() == [0, 0, 0, 0]
    assert ham_target_index(logits, torch.tensor([[3], [0], [1], [2]])).tolist() == [3, 0, 1, 2]
    # multi-hot finding labels: the positive finding with the highest logit; no finding -> abnormality
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    best_of_two = 1 + int(findings[0, :2].argmax())
    assert ham_target_index(logits, labels).tolist() == [best_of_two, 0, 3, 1 + int(findings[3].argmax())]
    # scores over the logit layout (B, 1 + C): argmax
    assert ham_target_index(logits, F.one_hot(torch.tensor([0, 3, 2, 1]), 4).double()).tolist() == [0, 3, 2, 1]
    for bad in (4, -1, torch.tensor([0, 1, 2, 9]), torch.zeros(4, 5), torch.zeros(3)):
        with pytest.raises(ValueError):
            ham_target_index(logits, bad)
    # the explainer: a fixed class, the labels it is given ("auto"), or the prediction without labels
    with torch.no_grad():
        fixed = HAMAttention(net, target=3, normalize="none").attribute(images)
        auto = HAMAttention(net, normalize="none").attribute(images, labels)
        predicted = HAMAttention(net, normalize="none").attribute(images)
        by_index = HAMAttention(net, normalize="none")
        expected_auto = by_index.attribute(images, ham_target_index(logits, labels))
        expected_predicted = by_index.attribute(images, 1 + findings.argmax(1))
    torch.testing.assert_close(fixed, by_index.attribute(images, torch.full((4,), 3)))
    torch.testing.assert_close(auto, expected_auto)
    torch.testing.assert_close(predicted, expected_predicted)


def test_guided_use_trains_the_features_not_the_heads_and_hooks_are_released():
    torch.manual_seed(2)
    net = HAMNet(arch="resnet18", num_classes=2).eval()  # eval: the second pass has no other dropout mask
    explainer = HAMAttention(net, refine=True)
    x = torch.randn(2, 3, 32, 32)
    with explainer.capture() as record:
        logits = net(x)
        maps = explainer.explain(logits, record, target=torch.tensor([[1.0, 0.0], [0.0, 0.0]]), out_size=(32, 32))
    assert tuple(maps.shape) == (2, 32, 32)
    assert not net.cls_head._forward_hooks
    maps.sum().backward()
    assert net.cls_fc.weight.grad is None and net.anomaly_fc.weight.grad is None
    assert net.cls_head[0].weight.grad.abs().sum() > 0
    # detached capture (explanation at inference) gives the same maps without a graph
    with torch.no_grad(), explainer.capture(detach=True) as record:
        same = explainer.explain(net(x), record, target=torch.tensor([1, 0]), out_size=(32, 32))
    torch.testing.assert_close(same, maps.detach())


def test_options_are_checked():
    torch.manual_seed(0)
    net = HAMNet(arch="resnet18", num_classes=2)
    with pytest.raises(ValueError, match="refine"):
        HAMAttention(net, refine=True, upsample="nearest")
    with pytest.raises(ValueError, match="refine"):
        HAMAttention(net, refine=True, normalize="none")
    with pytest.raises(ValueError, match="normalize"):
        HAMAttention(net, normalize="softmax")
    with pytest.raises(ValueError, match="target"):
        HAMAttention(net, target="largest")
    with pytest.raises(TypeError, match="HAM"):
        HAMAttention(torch.nn.Linear(2, 2))
    explainer = HAMAttention(torch.nn.DataParallel(net))  # wrappers are looked through
    with explainer.capture() as record, pytest.raises(RuntimeError, match="capture"):
        explainer.explain(torch.zeros(1, 3), record)
