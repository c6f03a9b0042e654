"""Segmentation components: input scaling, per-image Dice/IoU (empty/empty = 1), overlays, gradient clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_components.data.seg2d import IMAGENET_MEAN, IMAGENET_STD, ScaleInputd, scale_input
from custom_components.handlers.segmentation import GT_COLOUR, GradientClipping, overlay
from custom_components.metrics.segmentation import onehot_output, per_image_scores


def test_input_scalings():
    img = torch.tensor([[[10.0, 250.0]], [[0.0, 255.0]], [[100.0, 200.0]]])  # (3, 1, 2)
    x = scale_input(img, "imagenet")
    back = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(back * 255.0, img)
    torch.testing.assert_close(scale_input(img, "unit"), img / 255.0)
    ref = scale_input(img, "reference_0_255")  # the reference: per-image min-max to [0, 255]
    assert float(ref.min()) == 0.0 and float(ref.max()) == 255.0
    torch.testing.assert_close(ref, img)  # this image already spans 0..255
    torch.testing.assert_close(scale_input(img / 2 + 10, "reference_0_255"), ref)
    with pytest.raises(ValueError, match="input_scaling"):
        ScaleInputd("image", "zscore")
    assert ScaleInputd("image", "unit")({"image": img, "label": 1})["label"] == 1


def _output(pred_masks: list[np.ndarray], labels: list[np.ndarray]) -> dict:
    pred = torch.tensor(np.stack(pred_masks)).long()
    logits = torch.stack([1 - pred, pred], 1).float()  # argmax = pred
    return {"pred": logits, "label": torch.tensor(np.stack(labels))[:, None].float()}


def test_per_image_dice_iou_closed_forms_and_empty_cases():
    a = np.zeros((4, 4), np.int64)
    a[:2, :2] = 1  # 4 pixels
    b = np.zeros((4, 4), np.int64)
    b[:2, :3] = 1  # 6 pixels, 4 shared
    empty = np.zeros((4, 4), np.int64)
    out = _output([a, empty, a, empty], [b, empty, empty, a])
    scores = per_image_scores(out)
    torch.testing.assert_close(scores["dice"], torch.tensor([2 * 4 / 10, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(scores["iou"], torch.tensor([4 / 6, 1.0, 0.0, 0.0]))
    pred, label = onehot_output(out)
    assert pred.shape == label.shape == (4, 2, 4, 4) and torch.equal(pred[:, 1].long(), out["pred"].argmax(1))


def test_overlay_colours():
    image = np.zeros((6, 6, 3), np.uint8)
    image[..., 0] = 200  # min-max per image: red 255, green / blue 0
    pred = np.zeros((6, 6), bool)
    pred[1:3, 1:3] = True
    label = np.zeros((6, 6), bool)
    label[2:5, 2:5] = True
    out = overlay(image, pred, label)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 0, 0)  # red tint of red stays red
    assert tuple(out[2, 4]) == GT_COLOUR and tuple(out[3, 3]) == (255, 0, 0)  # outline; its inside untouched
    grey = overlay(np.stack([np.arange(36).reshape(6, 6)] * 3, -1).astype(np.uint8), pred)
    assert grey[1, 1, 0] > grey[1, 1, 1] == grey[1, 1, 2]  # the prediction is tinted red


def test_gradient_clipping_runs_before_the_optimizer_step():
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []
    original = opt.step

    def step(*args, **kwargs):
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))))
        return original(*args, **kwargs)

    opt.step = step
    data = [{"image": torch.randn(2, 3, 4, 4), "label": torch.zeros(2, 1, 4, 4)}]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=opt, loss_function=lambda p, y: 1000.0 * (p**2).mean(),
                                train_handlers=[GradientClipping(net, max_norm=1.0)], decollate=False)  # fmt: skip
    trainer.run()
    assert trainer.state.grad_norm > 1.0  # the norm before clipping
    assert seen == [pytest.approx(1.0, rel=1e-4)]  # what the optimizer saw
