"""HAMIteration / HAMEvalIteration in MONAI engines (spec ``specs/ham.md`` sections 4 and 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from custom_components.engines.ham import HAMEvalIteration, HAMIteration
from custom_components.guidance.ham import HAM_LOSS_TERMS, HAMLoss
from custom_components.networks.ham import HAMNet

C = 14


def tiny_ham(seed=0):
    torch.manual_seed(seed)
    return HAMNet(arch="resnet18", num_classes=C, fusion_channels=16, dropout=0.0)


def batch(b=4, size=32, seed=0, flags=(1, 0, 1, 0)):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(b, C, generator=g) > 0.7).float()
    labels[0, :2] = 1
    masks = torch.zeros(b, C, size, size)
    masks[0, 0, 4:20, 6:18] = 1
    masks[2, 1, 10:30, 2:12] = 1
    tags = labels.clone()
    return {"image": torch.randn(b, 3, size, size, generator=g), "label": labels, "box_mask": masks, "tag": tags,
            "flag": torch.tensor(flags[:b], dtype=torch.float32)}


def trainer(net, data, iteration, lr=0.0):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                             optimizer=opt, loss_function=HAMLoss(), iteration_update=iteration, decollate=False)


def test_losses_equal_hamloss_on_forward_with_maps():
    net, b = tiny_ham(), batch()
    net.eval()
    logits, terms = HAMIteration().losses(net, HAMLoss(), b["image"], b["label"], b["box_mask"], b["tag"], b["flag"])
    lg, cams, refined = net.forward_with_maps(b["image"])
    ref = HAMLoss()(lg[:, :1], lg[:, 1:], refined[:, :1], refined[:, 1:], cams[:, :1], cams[:, 1:], b["label"],
                    b["box_mask"], b["tag"], b["flag"])
    torch.testing.assert_close(logits, lg)
    for k in ("loss", *HAM_LOSS_TERMS):
        torch.testing.assert_close(terms[k], ref[k])
    assert terms["loss_ex_cls"] > 0


def test_trainer_outputs_every_term_and_steps():
    net, b = tiny_ham(), batch()
    before = copy.deepcopy(net.state_dict())
    t = trainer(net, [b], HAMIteration(), lr=0.1)
    t.run()
    out = t.state.output
    assert set(out) >= {"image", "label", "pred", "loss", *HAM_LOSS_TERMS}
    assert out["pred"].shape == (4, 1 + C) and not out["loss"].requires_grad
    assert all(torch.isfinite(out[k]) for k in HAM_LOSS_TERMS)
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("fa_layer") or k.startswith("cls_fc"))


def test_use_boxes_false_needs_no_masks_and_zeroes_box_term():
    net, b = tiny_ham(), batch()
    b = {k: v for k, v in b.items() if k in ("image", "label")}
    t = trainer(net, [b], HAMIteration(use_boxes=False))
    t.run()
    assert float(t.state.output["loss_ex_cls"]) == 0.0


def test_missing_key_is_reported():
    net, b = tiny_ham(), batch()
    del b["box_mask"]
    with pytest.raises(KeyError, match="box_mask"):
        trainer(net, [b], HAMIteration()).run()


def test_nan_input_raises_floating_point_error():
    net, b = tiny_ham(), batch()
    b["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss_cls"):
        trainer(net, [b], HAMIteration()).run()


def test_non_ham_network_is_refused():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 15))
    with pytest.raises(TypeError, match="forward_with_maps"):
        trainer(net, [batch()], HAMIteration()).run()


def test_eval_iteration_gives_logits_and_refined_maps():
    net, b = tiny_ham(), batch()
    ev = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[b], network=net,
                             iteration_update=HAMEvalIteration(), decollate=False)
    ev.run()
    out = ev.state.output
    assert out["pred"].shape == (4, 1 + C) and out["map"].shape == (4, C, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(out["pred"], net(b["image"]))
    assert out["box_mask"].shape == (4, C, 32, 32) and out["map"].min() >= 0 and out["map"].max() <= 1


def test_cam_baseline_runs_through_the_same_iterations():
    from custom_components.networks.cam_resnet import CAMResNet

    torch.manual_seed(0)
    net, b = CAMResNet(arch="resnet18", num_classes=C), batch()
    t = trainer(net, [b], HAMIteration(HAMLoss(weight_ex_cls=0, weight_bound=0, weight_union=0), use_boxes=False), lr=0.1)
    t.run()
    assert t.state.output["pred"].shape == (4, 1 + C) and float(t.state.output["loss_ex_cls"]) == 0.0
    net.eval()
    with torch.no_grad():
        out = net.forward_with_maps(b["image"])
        torch.testing.assert_close(out.logits, net(b["image"]))
        # CAM: the pooled map of a class equals its logit minus the bias where no ReLU clips
        e4 = net.backbone(b["image"])
        raw = torch.einsum("bkhw,ck->bchw", e4, net.fc.weight)
        torch.testing.assert_close(raw.mean((2, 3)) + net.fc.bias, out.logits, rtol=1e-4, atol=1e-5)
    assert out.refined.shape == (4, 1 + C, 32, 32)


def test_amp_step_on_cpu_autocast():
    # CPU autocast (bfloat16): the losses compute in float32 and every term stays finite
    net, b = tiny_ham(), batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    t = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[b], network=net, optimizer=opt,
                          loss_function=HAMLoss(), iteration_update=HAMIteration(), decollate=False, amp=True)
    t.run()
    out = t.state.output
    assert all(out[k].dtype == torch.float32 and torch.isfinite(out[k]) for k in ("loss", *HAM_LOSS_TERMS))
