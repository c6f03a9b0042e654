"""The torchvision replacements for MONAI's RetinaNet: hand-made cases with hand-written answers,
and MONAI's detector training one step / predicting with them."""

from __future__ import annotations

import pytest
import torch

from custom_components.detection import torchvision_parts as tp


def test_matcher_thresholds():
    # 2 ground truths x 4 predictions
    q = torch.tensor([[0.9, 0.45, 0.1, 0.3], [0.2, 0.6, 0.35, 0.7]])
    m = tp.Matcher(0.5, 0.4, allow_low_quality_matches=False)
    # col0: best 0.9 gt0 -> 0; col1: best 0.6 gt1 -> 1; col2: 0.35 < 0.4 -> -1; col3: 0.7 gt1 -> 1
    assert m(q).tolist() == [0, 1, -1, 1]
    m2 = tp.Matcher(0.65, 0.4)
    # col1 best 0.6 in [0.4, 0.65) -> -2
    assert m2(q).tolist() == [0, -2, -1, 1]
    assert tp.Matcher.BELOW_LOW_THRESHOLD == -1 and tp.Matcher.BETWEEN_THRESHOLDS == -2


def test_matcher_low_quality_matches_and_ties():
    # gt0's best is 0.3 (cols 1 and 2 tie), below every threshold; gt1 is matched by col 0 normally
    q = torch.tensor([[0.1, 0.3, 0.3, 0.0], [0.8, 0.2, 0.25, 0.05]])
    plain = tp.Matcher(0.5, 0.4, allow_low_quality_matches=False)(q)
    assert plain.tolist() == [1, -1, -1, -1]
    low = tp.Matcher(0.5, 0.4, allow_low_quality_matches=True)(q)
    # cols 1 and 2 both reach gt0's maximum -> restored to their best gt (gt0 for both)
    assert low.tolist() == [1, 0, 0, -1]
    # a prediction that is some gt's best but whose own best is another gt keeps its own best gt
    q2 = torch.tensor([[0.3, 0.1], [0.35, 0.0]])  # gt0's best col0, but col0's best is gt1
    assert tp.Matcher(0.5, 0.4, True)(q2).tolist() == [1, -1]


def test_matcher_empty_raises():
    with pytest.raises(ValueError, match="ground-truth"):
        tp.Matcher(0.5, 0.4)(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="proposal"):
        tp.Matcher(0.5, 0.4)(torch.zeros(2, 0))
    with pytest.raises(ValueError):
        tp.Matcher(0.3, 0.4)


def test_balanced_sampler_counts_and_masks():
    torch.manual_seed(0)
    labels = torch.tensor([1, 2, 0, 0, 0, 0, -1, 3, 0, -1])  # 3 positives, 5 negatives, 2 ignored
    s = tp.BalancedPositiveNegativeSampler(batch_size_per_image=4, positive_fraction=0.25)
    pos, neg = s([labels, torch.tensor([0, 0, -1])])
    assert pos[0].dtype == torch.uint8 and pos[0].shape == labels.shape
    # 1 positive (int(4 * 0.25)), 3 negatives
    assert int(pos[0].sum()) == 1 and int(neg[0].sum()) == 3
    assert bool((labels[pos[0].bool()] >= 1).all()) and bool((labels[neg[0].bool()] == 0).all())
    # image 2: no positive, 2 negatives available for a budget of 4
    assert int(pos[1].sum()) == 0 and int(neg[1].sum()) == 2 and neg[1].tolist() == [1, 1, 0]
    # few positives: negatives fill the rest of the budget
    pos, neg = tp.BalancedPositiveNegativeSampler(6, 0.5)([labels])
    assert int(pos[0].sum()) == 3 and int(neg[0].sum()) == 3
    # more than enough of both: exactly the budget
    pos, neg = tp.BalancedPositiveNegativeSampler(100, 0.5)([labels])
    assert int(pos[0].sum()) == 3 and int(neg[0].sum()) == 5


def test_intermediate_layer_getter():
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.Linear(2, 3))
    model.add_module("b", torch.nn.ReLU())
    model.add_module("c", torch.nn.Linear(3, 1))
    model.add_module("d", torch.nn.Linear(1, 5))
    g = tp.IntermediateLayerGetter(model, {"a": "first", "c": "third"})
    assert list(g.keys()) == ["a", "b", "c"]  # "d" dropped: after the last requested child
    x = torch.randn(4, 2)
    out = g(x)
    assert list(out) == ["first", "third"]
    torch.testing.assert_close(out["first"], model.a(x))
    torch.testing.assert_close(out["third"], model.c(torch.relu(model.a(x))))
    with pytest.raises(ValueError, match="not present"):
        tp.IntermediateLayerGetter(model, {"zz": "0"})


def test_validate_trainable_layers():
    assert tp.validate_trainable_layers(False, None, 5, 3) == 5
    with pytest.warns(UserWarning):
        assert tp.validate_trainable_layers(False, 2, 5, 3) == 5
    assert tp.validate_trainable_layers(True, None, 5, 3) == 3
    assert tp.validate_trainable_layers(True, 0, 5, 3) == 0
    with pytest.raises(ValueError):
        tp.validate_trainable_layers(True, 6, 5, 3)


def _tiny_backbone():
    from custom_components.networks.ham import DilatedResNet

    return DilatedResNet("resnet18", output_stride=32, dilation=False)


def test_resnet_fpn_shapes_and_freezing():
    torch.manual_seed(0)
    fe = tp.resnet_fpn_feature_extractor(_tiny_backbone(), returned_layers=(1, 2, 3, 4), out_channels=16)
    feats = fe(torch.randn(1, 3, 64, 64))
    # strides 4, 8, 16, 32 and the extra max-pooled level at 64
    shapes = [tuple(f.shape) for f in feats.values()]
    assert shapes == [(1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2), (1, 16, 1, 1)]
    frozen = tp.resnet_fpn_feature_extractor(_tiny_backbone(), returned_layers=(2, 3), trainable_layers=2, out_channels=8)
    grads = {n.split(".")[0]: p.requires_grad for n, p in frozen.body.named_parameters()}
    assert grads["layer3"] and not grads["layer2"] and not grads["conv1"]
    assert "layer4" not in frozen.body  # dropped after layer3


def test_install_puts_parts_where_monai_looks():
    from monai.apps.detection.networks import retinanet_detector, retinanet_network

    tp.install()
    tp.install()  # idempotent
    assert retinanet_detector.Matcher is tp.Matcher
    assert retinanet_detector.BalancedPositiveNegativeSampler is tp.BalancedPositiveNegativeSampler
    assert retinanet_network._validate_trainable_layers is tp.validate_trainable_layers
    from monai.networks.blocks import backbone_fpn_utils

    assert backbone_fpn_utils.torchvision_models._utils.IntermediateLayerGetter is tp.IntermediateLayerGetter
    # MONAI's own BackboneWithFPN / resnet_fpn_feature_extractor now build without torchvision
    fe = retinanet_network.resnet_fpn_feature_extractor(_tiny_backbone(), 2, False, [1, 2], None)
    assert isinstance(fe.body, tp.IntermediateLayerGetter)
    assert len(fe(torch.randn(1, 3, 32, 32))) == 3


def _detector(seed=0):
    from custom_components.detection.retinanet import build_detector, detection_network

    torch.manual_seed(seed)
    net = detection_network(num_classes=3, arch="resnet18", fpn_channels=16, returned_layers=(1, 2))
    det = build_detector(net, base_anchor_shapes=((8, 8), (6, 12), (12, 6)), fg_iou=0.5, bg_iou=0.4,
                         batch_size_per_image=64, positive_fraction=0.5)
    return net, det


def test_monai_detector_trains_one_step_and_predicts():
    torch.set_num_threads(1)
    net, det = _detector()
    images = [torch.randn(3, 64, 64) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 30.0, 28.0], [36.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # a "No finding" image
    ]
    det.train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    losses = det(images, targets)
    loss = losses[det.cls_key] + losses[det.box_reg_key]
    assert torch.isfinite(loss)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss.backward()
    opt.step()
    changed = [n for n, p in net.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any(n.startswith("retinanet.classification_head") for n in changed)
    assert any(n.startswith("retinanet.regression_head") for n in changed)
    assert any(n.startswith("retinanet.feature_extractor.body.layer1") for n in changed)
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2
    for d in out:
        assert d["boxes"].shape[1] == 4 and d["labels"].shape == d["labels_scores"].shape
        assert d["boxes"].shape[0] == d["labels"].shape[0]
        if len(d["labels"]):
            assert int(d["labels"].max()) < 3 and float(d["labels_scores"].min()) >= 0.0


def test_flat_forward_matches_detector_layout():
    net, det = _detector()
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        flat = net(x)
        raw = net(x, raw=True)
    cls = det._reshape_maps(raw[det.cls_key])
    box = det._reshape_maps(raw[det.box_reg_key])
    assert flat.shape == (2, 3 + 4, cls.shape[1])  # channel first: (B, classes + 4, anchors)
    torch.testing.assert_close(flat[:, :3].transpose(1, 2), cls)
    torch.testing.assert_close(flat[:, 3:].transpose(1, 2), box)


def test_pretrained_init_loads_every_backbone_tensor(tmp_path, caplog):
    import logging

    from custom_components.detection.retinanet import detection_network
    from custom_components.io import InputDataError
    from custom_components.networks.ham import DilatedResNet

    torch.manual_seed(1)
    source = DilatedResNet("resnet18", output_stride=32, dilation=False)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DDP-saved file
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "lvmmed_resnet18.torch"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="custom_components.detection.retinanet"):
        net = detection_network(3, arch="resnet18", init="lvmmed", pretrained_path=path, returned_layers=(1, 2, 3, 4))
    body = net.retinanet.feature_extractor.body
    torch.testing.assert_close(body.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    n_tensors = sum(1 for k in source.state_dict() if not k.endswith("num_batches_tracked"))
    assert f"loaded {n_tensors} backbone tensors" in caplog.text
    with pytest.raises(InputDataError, match="not this ResNet"):
        detection_network(3, arch="resnet50", init="lvmmed", pretrained_path=path)
    with pytest.raises(InputDataError, match="needs an existing local ResNet checkpoint"):
        detection_network(3, arch="resnet18", init="imagenet", pretrained_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="scratch"):
        detection_network(3, arch="resnet18", init="scratch", pretrained_path=path)


def test_non_consecutive_fpn_layers_are_refused():
    from custom_components.detection.retinanet import DetectionNetwork

    # the anchor scales assume one stride-2 step between pyramid levels
    with pytest.raises(ValueError, match="consecutive"):
        DetectionNetwork(num_classes=3, arch="resnet18", returned_layers=(1, 3), fpn_channels=8)
