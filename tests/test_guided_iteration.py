"""GuidedIteration in a MONAI SupervisedTrainer, resumable checkpoints and atomic writes (spec §4, §10 Masking)."""

from __future__ import annotations

import copy
import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from custom_components.capture import ViTCapture
from custom_components.engines.guided import GuidedIteration
from custom_components.explain import EAFEM, eafem_map
from custom_components.guidance import LGMViTKLLoss, gaussian_blur
from custom_components.handlers.checkpoint import BestMetricSaver, TrainingCheckpoint
from custom_components.io import atomic_save, atomic_write, load_checkpoint

# tiny_vit: no dropout / drop path / BatchNorm, so train mode computes the same function as eval mode
from conftest import tiny_vit

BETA, LAMBDA, KERNEL = 0.85, 10.0, 9


def make_batch(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    labels = torch.tensor(labels, dtype=torch.float32).view(b, 1)
    masks = torch.zeros(b, 1, 32, 32)
    for i in range(b):
        if labels[i] > 0:
            r, c = torch.randint(0, 20, (2,), generator=g).tolist()
            masks[i, 0, r : r + 10, c : c + 8] = 1
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "label": labels, "mask": masks}


def guided(model, weight=LAMBDA):
    return GuidedIteration(EAFEM(model, beta=BETA), LGMViTKLLoss(kernel_size=KERNEL), weight=weight)


def manual_total(model, batch, weight=LAMBDA):
    """BCE + weight * KL from a separate capture forward, with the reference KLDivLoss."""
    model.eval()
    with torch.no_grad(), ViTCapture(model, blocks=(-1,)) as cap:
        logits = model(batch["image"])
        maps = eafem_map(cap.attention(), cap.token(), BETA, (32, 32))
    bce = F.binary_cross_entropy_with_logits(logits, batch["label"])
    pos = batch["label"][:, 0] > 0.5
    if not pos.any():
        return bce.item()
    g = gaussian_blur(batch["mask"][pos], KERNEL)[:, 0]
    kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
        F.log_softmax(maps[pos].flatten(1), 1), F.log_softmax(g.flatten(1), 1)
    )
    return (bce + weight * kl).item()


# --------------------------------------------------------------------------- losses()


def test_losses_without_positives_is_plain_bce():
    model = tiny_vit().eval()
    it = guided(model)
    batch = make_batch([0, 0, 0])
    logits, loss_cls, loss_loc = it.losses(model, torch.nn.BCEWithLogitsLoss(), batch["image"], batch["label"], batch["mask"])
    assert loss_loc.item() == 0.0
    with torch.no_grad():
        ref_logits = model(batch["image"])
    assert torch.equal(logits.detach(), ref_logits)
    bce = F.binary_cross_entropy_with_logits(ref_logits, batch["label"])
    assert torch.equal((loss_cls + it.weight * loss_loc).detach(), bce)


def test_losses_with_positives_match_manual_computation_and_reach_first_block():
    model = tiny_vit().eval()
    it = guided(model)
    batch = make_batch([1, 0, 1, 0])
    _, loss_cls, loss_loc = it.losses(model, torch.nn.BCEWithLogitsLoss(), batch["image"], batch["label"], batch["mask"])
    assert loss_loc.item() > 0
    total = loss_cls + LAMBDA * loss_loc
    assert total.item() == pytest.approx(manual_total(model, batch), abs=1e-5, rel=1e-6)
    assert not any(b.attn.record_attention for b in model.blocks)  # capture released
    model.zero_grad()
    loss_loc.backward()
    for p in (
        model.blocks[0].attn.qkv.weight,
        model.blocks[0].mlp.fc1.weight,
        model.patch_embed.proj.weight,
        model.blocks[-1].attn.qkv.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.head.weight.grad is None or torch.count_nonzero(model.head.weight.grad) == 0  # the map ignores the head


def test_weight_zero_is_unguided():
    model = tiny_vit().eval()
    it = guided(model, weight=0.0)
    assert not it.guided
    batch = make_batch([1, 1])
    _, _, loss_loc = it.losses(model, torch.nn.BCEWithLogitsLoss(), batch["image"], batch["label"], batch["mask"])
    assert loss_loc.item() == 0.0


def test_constructor_requires_both_or_neither():
    model = tiny_vit()
    with pytest.raises(ValueError):
        GuidedIteration(explainer=EAFEM(model))
    with pytest.raises(ValueError):
        GuidedIteration(guidance=LGMViTKLLoss())
    assert not GuidedIteration().guided


# --------------------------------------------------------------------------- SupervisedTrainer


def make_trainer(model, batches, iteration, max_epochs=2, lr=0.05, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=batches,
        network=model,
        optimizer=optimizer,
        loss_function=torch.nn.BCEWithLogitsLoss(),
        iteration_update=iteration,
        decollate=False,
    )


def three_batches():
    return [make_batch([1, 0, 1], seed=1), make_batch([0, 0, 0], seed=2), make_batch([0, 1, 1], seed=3)]


def test_supervised_trainer_runs_guided_iteration():
    model = tiny_vit()
    batches = three_batches()
    expected_first = manual_total(model, batches[0])
    before = copy.deepcopy(model.state_dict())
    trainer = make_trainer(model, batches, guided(model))
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    assert trainer.state.epoch == 2 and trainer.state.iteration == 6 and len(outputs) == 6
    for out in outputs:
        assert {"loss", "loss_cls", "loss_loc", "pred", "label"} <= set(out)
        assert out["pred"].shape == (3, 1) and not out["loss"].requires_grad
        assert out["loss"].item() == pytest.approx(out["loss_cls"].item() + LAMBDA * out["loss_loc"].item(), rel=1e-6)
    assert outputs[0]["loss"].item() == pytest.approx(expected_first, abs=1e-5)
    assert outputs[0]["loss_loc"].item() > 0
    assert outputs[1]["loss_loc"].item() == 0.0  # batch without positives
    assert outputs[1]["loss"].item() == outputs[1]["loss_cls"].item()
    after = model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert not any(b.attn.record_attention for b in model.blocks)


def test_plain_iteration_is_one_sgd_step_on_bce():
    model = tiny_vit()
    twin = copy.deepcopy(model)
    batch = make_batch([1, 0, 1], seed=4)
    del batch["mask"]  # the plain step does not need masks
    trainer = make_trainer(model, [batch], GuidedIteration(), max_epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    out = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out.update(e.state.output))
    trainer.run()
    assert out["loss_loc"].item() == 0.0
    twin.train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    loss = F.binary_cross_entropy_with_logits(twin(batch["image"]), batch["label"])
    loss.backward()
    opt.step()
    assert out["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_nan_input_raises_floating_point_error():
    model = tiny_vit()
    batch = make_batch([1, 0], seed=5)
    batch["image"][0, 0, 3, 3] = float("nan")
    trainer = make_trainer(model, [batch], guided(model), max_epochs=1)
    with pytest.raises(FloatingPointError, match=r"(?i)nan|input"):
        trainer.run()


def test_missing_mask_key_is_reported():
    model = tiny_vit()
    batch = make_batch([1, 0], seed=6)
    del batch["mask"]
    trainer = make_trainer(model, [batch], guided(model), max_epochs=1)
    with pytest.raises(KeyError, match="mask"):
        trainer.run()


# --------------------------------------------------------------------------- checkpoints


def _feed_metric(saver, values):
    """Trainer handler feeding ``values[epoch - 1]`` to the saver as if from a validator."""

    def handler(engine):
        saver(SimpleNamespace(state=SimpleNamespace(metrics={"val_f1": values[engine.state.epoch - 1]})))

    return handler


def test_training_checkpoint_resume(tmp_path):
    batches = three_batches()
    values = [0.5, 0.5, float("nan"), 0.4]  # tie at epoch 2 (later wins), NaN ignored, worse ignored

    model = tiny_vit(seed=0)
    trainer = make_trainer(model, batches, guided(model), max_epochs=2)
    saver = BestMetricSaver(str(tmp_path), model, epoch_source=trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _feed_metric(saver, values))
    ckpt = TrainingCheckpoint(str(tmp_path), {"network": model, "optimizer": trainer.optimizer, "best": saver})
    ckpt.attach(trainer)
    trainer.run()
    saved = copy.deepcopy(model.state_dict())
    assert saver.best_epoch == 2 and saver.best_value == 0.5

    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(raw) == {"network", "optimizer", "best", "trainer"}
    assert raw["trainer"] == {"epoch": 2, "iteration": 6, "epoch_length": 3}
    assert raw["best"] == {"best_value": 0.5, "best_epoch": 2}
    for k, v in saved.items():
        assert torch.equal(raw["network"][k], v)
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    for k, v in saved.items():
        assert torch.equal(best[k], v)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    # a new process: fresh model, optimizer and saver
    model2 = tiny_vit(seed=123)
    assert not torch.equal(model2.head.weight, saved["head.weight"])
    trainer2 = make_trainer(model2, batches, guided(model2), max_epochs=4)
    saver2 = BestMetricSaver(str(tmp_path), model2, epoch_source=trainer2)
    trainer2.add_event_handler(Events.EPOCH_COMPLETED, _feed_metric(saver2, values))
    TrainingCheckpoint(str(tmp_path), {"network": model2, "optimizer": trainer2.optimizer, "best": saver2}).attach(trainer2)
    seen = {"iterations": 0, "epochs": []}

    def at_start(engine):
        seen["start_epoch"] = engine.state.epoch
        seen["weights"] = copy.deepcopy(model2.state_dict())
        seen["best"] = (saver2.best_value, saver2.best_epoch)
        seen["momentum"] = copy.deepcopy(trainer2.optimizer.state_dict()["state"])

    trainer2.add_event_handler(Events.STARTED, at_start)  # after the checkpoint's loader
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen["epochs"].append(e.state.epoch))
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.__setitem__("iterations", seen["iterations"] + 1))
    trainer2.run()

    assert seen["start_epoch"] == 2
    assert seen["epochs"] == [3, 4]
    assert seen["iterations"] == 6  # two epochs of three batches, not four epochs
    assert trainer2.state.iteration == 12 and trainer2.state.epoch == 4
    for k, v in saved.items():
        assert torch.equal(seen["weights"][k], v), k
    assert seen["best"] == (0.5, 2)
    assert len(seen["momentum"]) == len(raw["optimizer"]["state"]) > 0
    assert saver2.best_epoch == 2 and saver2.best_value == 0.5  # NaN and 0.4 did not win
    assert torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]["epoch"] == 4

    # a checkpoint beyond max_epochs is refused
    model3 = tiny_vit(seed=7)
    trainer3 = make_trainer(model3, batches, guided(model3), max_epochs=3)
    TrainingCheckpoint(str(tmp_path), {"network": model3}).attach(trainer3)
    with pytest.raises(ValueError, match="checkpoint is at epoch 4, beyond num_epochs 3"):
        trainer3.run()


def test_best_metric_saver_ties_nan_and_modes(tmp_path):
    net = torch.nn.Linear(2, 1)
    src = SimpleNamespace(state=SimpleNamespace(epoch=0))
    saver = BestMetricSaver(str(tmp_path), net, metric_name="m", epoch_source=src)
    weights = {}
    for epoch, value in enumerate([0.3, 0.7, 0.7, float("nan"), 0.6], start=1):
        src.state.epoch = epoch
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        weights[epoch] = net.weight.detach().clone()
        saver(SimpleNamespace(state=SimpleNamespace(metrics={"m": value})))
    assert saver.best_epoch == 3 and saver.best_value == 0.7
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], weights[3])
    restored = BestMetricSaver(str(tmp_path), net, metric_name="m")
    restored.load_state_dict(saver.state_dict())
    assert restored.state_dict() == {"best_value": 0.7, "best_epoch": 3}

    low = BestMetricSaver(str(tmp_path), net, metric_name="loss", filename="low.pt", mode="min", epoch_source=src)
    for epoch, value in enumerate([float("nan"), 2.0, 1.0, 1.0, 3.0], start=1):
        src.state.epoch = epoch
        low(SimpleNamespace(state=SimpleNamespace(metrics={"loss": value})))
    assert low.best_epoch == 4 and low.best_value == 1.0
    with pytest.raises(ValueError):
        BestMetricSaver(str(tmp_path), net, mode="mean")


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "arr.npy"
    with pytest.raises(RuntimeError), atomic_write(target, suffix=".npy") as tmp:
        seen_tmp = tmp
        assert tmp.parent == target.parent and tmp.name.endswith(".npy") and tmp != target
        np.save(tmp, np.arange(3))
        assert tmp.exists()
        raise RuntimeError("killed")
    assert not target.exists() and not seen_tmp.exists()
    assert os.listdir(target.parent) == []
    # an existing file survives a failed rewrite
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert target.read_text() == "old" and os.listdir(target.parent) == ["arr.npy"]


def test_atomic_write_success_suffix_and_permissions(tmp_path):
    old_mask = os.umask(0o022)
    try:
        target = tmp_path / "arr.npy"
        with atomic_write(target, suffix=".npy") as tmp:
            np.save(tmp, np.arange(4))  # np.save appends ".npy" unless the name already ends with it
        np.testing.assert_array_equal(np.load(target), np.arange(4))
        assert os.listdir(tmp_path) == ["arr.npy"]
        mode = stat.S_IMODE(os.stat(target).st_mode)
        assert mode != 0o600 and mode == 0o644
        pt = atomic_save({"w": torch.ones(2)}, tmp_path / "c.pt")
        assert stat.S_IMODE(os.stat(pt).st_mode) == 0o644
        assert torch.equal(load_checkpoint(pt)["w"], torch.ones(2))
    finally:
        os.umask(old_mask)
