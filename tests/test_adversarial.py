"""FGSM / PGD (custom_components.evaluation.adversarial) and the robustness report, on toy models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from custom_components.data.medmnist import medmnist_metrics
from custom_components.evaluation.adversarial import PixelSpaceModel, attack_loss, fgsm, pgd
from custom_components.evaluation.robustness import RobustnessEvaluation
from custom_components.metrics.medmnist_metrics import logits_to_scores


def linear_model(n_in: int, n_out: int, seed: int = 0) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        model.weight.copy_(torch.randn(n_out, n_in, generator=g))
        model.bias.copy_(torch.randn(n_out, generator=g))
    return model


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))  # fmt: skip


def test_fgsm_on_a_linear_model_is_the_closed_form_step():
    model = linear_model(5, 3)
    w, b = model.weight.detach(), model.bias.detach()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 5, generator=g)
    x[0, 0], x[1, 1] = 0.999, 0.001  # near the edges: the clip must act
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    eps = 0.05
    # d CE / d x = (softmax(Wx + b) - onehot(y)) W, per sample
    grad = (torch.softmax(x @ w.T + b, 1) - F.one_hot(y, 3).float()) @ w
    expected = (x + eps * grad.sign()).clamp(0.0, 1.0)
    out = fgsm(model, x, y, eps)
    assert torch.equal(out, expected)
    assert out.min() >= 0.0 and out.max() <= 1.0 and (out != x + eps * grad.sign()).any()

    # multi-label (BCE-with-logits): d / d x = (sigmoid(Wx + b) - y) W
    y_ml = (torch.rand(8, 3, generator=g) > 0.5).float()
    grad_ml = (torch.sigmoid(x @ w.T + b) - y_ml) @ w
    torch.testing.assert_close(fgsm(model, x, y_ml, eps, multi_label=True), (x + eps * grad_ml.sign()).clamp(0, 1),
                               rtol=0, atol=0)  # fmt: skip


def test_attacks_are_per_sample_and_leave_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    model.eval()
    x = torch.rand(5, 6)
    y = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():  # works inside no_grad (as in an evaluator)
        batched = fgsm(model, x, y, 0.1)
    single = torch.cat([fgsm(model, x[i : i + 1], y[i : i + 1], 0.1) for i in range(5)])
    assert torch.equal(batched, single)
    for mode in (False, True):
        model.train(mode)
        fgsm(model, x, y, 0.1)
        pgd(model, x, y, 0.1, steps=3)
        assert model.training is mode
        assert all(p.grad is None for p in model.parameters())


def test_pgd_stays_in_the_ball_and_the_valid_range():
    model = mlp()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, 6, generator=g)
    x[:8] = 0.0  # at the lower edge of the range
    y = torch.randint(0, 3, (64,), generator=g)
    for eps in (2 / 255, 8 / 255, 0.3):
        out = pgd(model, x, y, eps, steps=7, generator=torch.Generator().manual_seed(0))
        assert (out - x).abs().max() <= eps + 1e-6
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert (out - x).abs().max() > 0.5 * eps  # it moved
    # without random start and with one full-size step, PGD is FGSM
    torch.testing.assert_close(pgd(model, x, y, 0.1, steps=1, step_size=0.1, random_start=False), fgsm(model, x, y, 0.1))


def test_eps_zero_returns_the_clean_images():
    model = mlp()
    x, y = torch.rand(10, 6), torch.randint(0, 3, (10,))
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    assert torch.equal(pgd(model, x, y, 0.0), x)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -0.1)


def test_pgd_reaches_a_higher_loss_than_fgsm():
    model = mlp(seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(128, 6, generator=g)
    y = torch.randint(0, 3, (128,), generator=g)
    eps = 0.25
    with torch.no_grad():
        clean = attack_loss(model(x), y).item()
        loss_fgsm = attack_loss(model(fgsm(model, x, y, eps)), y).item()
        loss_pgd = attack_loss(model(pgd(model, x, y, eps, steps=20, generator=torch.Generator().manual_seed(0))), y).item()
    assert clean < loss_fgsm <= loss_pgd


class _Loader(list):
    """A list of batches with a length (like a DataLoader)."""


@pytest.mark.parametrize("task, n_out", [("multi-class", 3), ("binary", 2), ("multi-label", 3)])
def test_robustness_report(tmp_path, task, n_out):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, n_out))
    g = torch.Generator().manual_seed(5)
    batches = _Loader()
    for _ in range(3):
        images = torch.rand(6, 1, 4, 4, generator=g)
        if task == "multi-label":
            labels = (torch.rand(6, n_out, generator=g) > 0.5).float()
        else:
            labels = torch.randint(0, n_out, (6, 1), generator=g)
        batches.append({"image": images, "label": labels})
    net.train()
    ev = RobustnessEvaluation(net, batches, task, tmp_path, epsilons=[0.0, 4 / 255, 0.5], pgd_steps=3, progress=False)
    report = ev.run()
    assert net.training  # mode restored
    assert all(p.grad is None for p in net.parameters())
    # clean accuracy computed independently (normalised inputs, MedMNIST semantics)
    with torch.no_grad():
        net.eval()
        logits = torch.cat([net((b["image"] - 0.5) / 0.5) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    want = medmnist_metrics(task, logits_to_scores(logits, task), labels)["ACC"]
    assert report["clean"]["ACC"] == pytest.approx(want)
    for attack in ("fgsm", "pgd"):
        rows = report["attacks"][attack]
        assert [r["eps"] for r in rows] == [0.0, 4 / 255, 0.5]
        assert rows[0]["ACC"] == pytest.approx(want)  # eps 0 = clean
        assert rows[2]["ACC"] <= rows[0]["ACC"]
    assert json.loads(ev.json_path.read_text())["n_samples"] == 18
    md = ev.markdown_path.read_text()
    assert "| eps | eps x 255 | FGSM ACC | PGD ACC |" in md and md.count("\n| ") == 4


def test_pixel_space_model_normalises():
    net = torch.nn.Identity()
    torch.testing.assert_close(PixelSpaceModel(net, 0.5, 0.25)(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-2.0, 0.0, 2.0]))
