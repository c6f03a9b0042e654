"""The guided training iteration: task loss + weight * guidance(explanation, mask).

Plugs into MONAI's ``SupervisedTrainer`` as ``iteration_update``. With ``explainer`` or
``guidance`` unset it is the plain classification step (the ``baseline`` method), so every
method runs through the same code path (quirk Q6 of ``specs/lgmvit.md``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from custom_components.explain.base import Explainer, resize_maps
from custom_components.guidance.base import GuidanceLoss, positive_selection

__all__ = ["GuidedIteration", "ExplainIteration", "explained_output", "to_device", "optimise"]


def to_device(batch: dict, keys: tuple[str, ...], device: torch.device, non_blocking: bool = False) -> list:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch has no {missing}; it has {sorted(batch)}")
    return [batch[k].to(device, non_blocking=non_blocking) for k in keys]


def optimise(engine: SupervisedTrainer, loss: torch.Tensor) -> None:
    """Backward and optimizer step of a trainer iteration (with AMP's scaler when enabled),
    firing MONAI's iteration events in the order of ``SupervisedTrainer._iteration``."""
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    if engine.amp and engine.scaler is not None:
        engine.scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)


def explained_output(
    engine: Any,
    batchdata: dict,
    images: torch.Tensor,
    logits: torch.Tensor,
    maps: torch.Tensor,
    tensor_keys: tuple[str, ...],
    meta_keys: tuple[str, ...],
) -> dict[str, Any]:
    """The output of an explaining evaluator step: images, logits (``pred``) and maps, the batch's
    ``tensor_keys`` (labels, masks) on the images' device and its ``meta_keys`` as they are; fires
    the iteration events a MONAI evaluator step fires."""
    out = {"image": images, "pred": logits.detach().float(), "map": maps.detach().float()}
    for key in tensor_keys:
        if key in batchdata:
            out[key] = batchdata[key].to(images.device)
    for key in meta_keys:
        if key in batchdata:
            out[key] = batchdata[key]
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return out


class GuidedIteration:
    """One optimisation step of an explanation-guided classifier.

    Args:
        explainer: produces maps inside the step's own forward pass (e.g. :class:`~custom_components.explain.EAFEM`).
        guidance: compares maps with masks (e.g. :class:`~custom_components.guidance.LGMViTKLLoss`).
        weight: lambda of ``loss = task + lambda * guidance`` (1000 BraTS20, 250 LiTS17 for LGM-ViT).
        image_key, label_key, mask_key: batch dictionary keys.

    The explanation is computed only when the batch holds a positive slice: the guidance term of a
    batch without one is exactly zero, so the step is then the plain classification step. The
    output dict carries ``loss``, ``loss_cls`` and ``loss_loc`` (detached) for the loggers, and
    ``pred``/``label`` for training metrics.
    """

    def __init__(
        self,
        explainer: Explainer | None = None,
        guidance: GuidanceLoss | None = None,
        weight: float = 1.0,
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "mask",
    ) -> None:
        if (explainer is None) != (guidance is None):
            raise ValueError("explainer and guidance are set together (guided) or both left unset (baseline)")
        self.explainer = explainer
        self.guidance = guidance
        self.weight = float(weight)
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key

    @property
    def guided(self) -> bool:
        return self.explainer is not None and self.weight != 0.0

    def losses(self, network, loss_function, images, labels, masks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, task loss, guidance loss) of one forward pass; usable outside an engine."""
        if self.guided and bool(positive_selection(labels).any()):
            with self.explainer.capture() as record:
                logits = network(images)
                maps = self.explainer.explain(logits, record, target=labels, out_size=masks.shape[-2:])
                if self.guidance.needs_images:  # e.g. RES-L's learned mask imputation
                    loss_loc = self.guidance(maps, masks, labels, images=images)
                else:
                    loss_loc = self.guidance(maps, masks, labels)
        else:
            logits = network(images)
            loss_loc = torch.zeros((), device=logits.device)
        return logits, loss_function(logits, labels), loss_loc

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        keys = (self.image_key, self.label_key) + ((self.mask_key,) if self.guided else ())
        tensors = to_device(batchdata, keys, engine.state.device, engine.non_blocking)
        images, labels = tensors[0], tensors[1]
        masks = tensors[2] if self.guided else None

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        device_type = engine.state.device.type if isinstance(engine.state.device, torch.device) else "cpu"
        with torch.autocast(device_type=device_type, enabled=bool(engine.amp), **(engine.amp_kwargs or {})):
            logits, loss_cls, loss_loc = self.losses(engine.network, engine.loss_function, images, labels, masks)
            loss = loss_cls + self.weight * loss_loc.float()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"non-finite loss at iteration {engine.state.iteration} (task {loss_cls.item()}, guidance "
                f"{loss_loc.item()}): check the inputs for NaNs or lower the learning rate"
            )
        optimise(engine, loss)
        return {
            "image": images,
            "label": labels,
            "pred": logits.detach(),
            "loss": loss.detach(),
            "loss_cls": loss_cls.detach(),
            "loss_loc": loss_loc.detach(),
        }


class ExplainIteration:
    """Evaluation iteration returning predictions and explanation maps (no gradients needed).

    For ``SupervisedEvaluator(iteration_update=...)``: output keys ``pred`` (logits), ``map``
    (B, H, W at the image size), and the batch's ``label``, ``mask``, ``case``, ``slice`` if present.
    Autograd stays off unless the explainer ``needs_gradients`` (GAE, Grad-CAM).
    """

    def __init__(
        self,
        explainer: Explainer,
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "mask",
        meta_keys=("case", "slice"),
    ):
        self.explainer = explainer
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
        self.meta_keys = tuple(meta_keys)

    def __call__(self, engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        engine.network.eval()
        device_type = images.device.type
        grads = self.explainer.needs_gradients
        with (
            torch.set_grad_enabled(grads),
            torch.autocast(device_type=device_type, enabled=bool(engine.amp)),
            self.explainer.capture(detach=not grads) as record,
        ):
            logits = engine.network(images)
            maps = self.explainer.explain(logits, record, out_size=images.shape[-2:])
        # Methods whose maps live on the token grid (RES) are shown and scored at the image size.
        maps = resize_maps(maps.detach().float(), images.shape[-2:])
        return explained_output(engine, batchdata, images, logits, maps, (self.label_key, self.mask_key), self.meta_keys)
