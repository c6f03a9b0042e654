"""L-infinity adversarial attacks for classifiers: FGSM and PGD.

* **FGSM** (fast gradient sign method): Goodfellow, Shlens, Szegedy, "Explaining and Harnessing
  Adversarial Examples", ICLR 2015: ``x' = clip(x + eps * sign(grad_x L(f(x), y)))``.
* **PGD** (projected gradient descent): Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep
  Learning Models Resistant to Adversarial Attacks", ICLR 2018: a uniform random start in the eps
  ball, then ``steps`` iterations of ``x <- proj_{B_inf(x0, eps)}(x + alpha * sign(grad_x L))``,
  each followed by clipping to the valid pixel range.

Written for this project (not copied). Conventions:

* ``model`` maps a batch of images in **pixel units** (``clip_min``..``clip_max``, e.g. [0, 1]) to
  logits; an intensity normalisation belongs inside it (:class:`PixelSpaceModel`), so ``eps`` is
  in pixel units as in the papers (e.g. 8/255).
* The loss is the training loss of the task (:func:`attack_loss`): cross-entropy for single-label
  tasks with C >= 2 logits (binary, multi-class, ordinal), binary cross-entropy with logits for
  multi-label targets (float 0/1, (B, C)) and for a single binary logit. Summed over the batch, so
  each sample's gradient is its own (the attacks are batched, not batch-coupled).
* The model is attacked in its current mode (call ``model.eval()`` first for an evaluation); its
  train/eval mode is not changed and no gradient is left on its parameters (gradients are taken
  with respect to the input only, via :func:`torch.autograd.grad`). Works inside ``torch.no_grad``.
* ``eps = 0`` returns the input unchanged (no attack step is run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["attack_loss", "fgsm", "pgd", "PixelSpaceModel", "ATTACKS"]

Model = Callable[[torch.Tensor], torch.Tensor]


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """Summed training loss of the task: CE over class indices, or BCE-with-logits for 0/1 targets.

    ``multi_label`` (or a single output logit) selects BCE-with-logits with ``labels`` shaped like
    ``logits`` ((B, C) float 0/1; (B,) or (B, 1) for one logit); otherwise ``labels`` are class
    indices (B,) or (B, 1).
    """
    if multi_label or logits.shape[-1] == 1:
        target = labels.to(logits.dtype).reshape(logits.shape)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return F.cross_entropy(logits, labels.reshape(-1).long(), reduction="sum")


def _check(eps: float, clip_min: float, clip_max: float) -> None:
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not clip_min < clip_max:
        raise ValueError(f"need clip_min < clip_max, got {clip_min}, {clip_max}")


def _input_gradient(model: Model, x: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = attack_loss(model(x), labels, multi_label)
        (grad,) = torch.autograd.grad(loss, [x])
    return grad


def fgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, eps: float, clip_min: float = 0.0,
         clip_max: float = 1.0, multi_label: bool = False) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): ``clip(x + eps * sign(grad_x loss), clip_min, clip_max)``, batched."""
    _check(eps, clip_min, clip_max)
    x = images.detach()
    if eps == 0.0:
        return x.clone()
    grad = _input_gradient(model, x, labels, multi_label)
    return (x + eps * grad.sign()).clamp_(clip_min, clip_max)


def pgd(model: Model, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, clip_min: float = 0.0, clip_max: float = 1.0,
        multi_label: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """L-infinity PGD (Madry et al. 2018), batched.

    Args:
        eps: radius of the L-infinity ball around ``images`` (pixel units).
        steps: gradient-sign steps (10).
        step_size: alpha; default ``2.5 * eps / steps`` (Madry et al.'s choice).
        random_start: start from a uniform point of the ball (clipped to the valid range).
        generator: random generator of the start (reproducible runs); on the images' device.

    Every iterate stays within ``eps`` of ``images`` and within ``[clip_min, clip_max]``.
    """
    _check(eps, clip_min, clip_max)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x0 = images.detach()
    if eps == 0.0:
        return x0.clone()
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    lower = (x0 - eps).clamp(min=clip_min)
    upper = (x0 + eps).clamp(max=clip_max)
    x = x0.clone()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = x0 + (2.0 * noise - 1.0) * eps
    x = torch.max(torch.min(x, upper), lower)
    for _ in range(int(steps)):
        grad = _input_gradient(model, x, labels, multi_label)
        x = torch.max(torch.min(x + alpha * grad.sign(), upper), lower)
    return x.detach()


#: attack name -> function (the names used in the robustness report)
ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd}


class PixelSpaceModel(nn.Module):
    """``network((x - mean) / std)``: a classifier on pixel-unit images, for the attacks above.

    The wrapper owns no parameters and follows the wrapped network's mode.
    """

    def __init__(self, network: nn.Module, mean: float = 0.5, std: float = 0.5):
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.network = network
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x - self.mean) / self.std)
