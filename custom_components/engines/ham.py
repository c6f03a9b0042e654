"""HAM's training and evaluation iterations (spec ``specs/ham.md`` sections 4 and 6).

For MONAI's ``SupervisedTrainer(iteration_update=HAMIteration(...))``: one forward pass through
:meth:`~custom_components.networks.ham.HAMNet.forward_with_maps` gives the logits (abnormality
first), the raw maps M and the refined maps R; :class:`~custom_components.guidance.ham.HAMLoss`
turns them, the labels, the box masks, the box tags and the box-supervision flags into the
weighted objective. Every term goes into the output dict (detached) for ``StatsHandler`` and
TensorBoard. AMP as the other iterations (``torch.autocast`` + the trainer's scaler through
:func:`~custom_components.engines.guided.optimise`); the losses compute in float32.

``use_boxes=False`` zeroes the flags, so ``loss_ex_cls`` is an exact zero and no box mask is
read (the no-box training of spec section 8). :class:`HAMEvalIteration` is the matching
evaluation step: logits and the refined finding maps at the input size, for the AUROC and the
localisation metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from custom_components.engines.guided import explained_output, optimise, to_device
from custom_components.guidance.ham import HAM_LOSS_TERMS, HAMLoss

__all__ = ["HAMIteration", "HAMEvalIteration"]


def _ham(network):
    model = getattr(network, "module", network)  # DDP
    if not hasattr(model, "forward_with_maps"):
        raise TypeError(f"HAM iterations need a network with forward_with_maps (HAMNet), got {type(model).__name__}")
    return model


class HAMIteration:
    """One optimisation step of HAM.

    Args:
        loss: a :class:`HAMLoss`; ``None`` takes the trainer's ``loss_function``.
        use_boxes: read the box masks and flags (False: flags are zero, no box supervision).
        image_key, label_key, mask_key, tag_key, flag_key: batch dictionary keys.

    Output keys: ``image``, ``label``, ``pred`` (logits (B, 1 + C), detached), ``loss`` and every
    term of :data:`~custom_components.guidance.ham.HAM_LOSS_TERMS` (detached, unweighted).
    """

    def __init__(
        self,
        loss: HAMLoss | None = None,
        use_boxes: bool = True,
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "box_mask",
        tag_key: str = "tag",
        flag_key: str = "flag",
    ) -> None:
        self.loss = loss
        self.use_boxes = bool(use_boxes)
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
        self.tag_key, self.flag_key = tag_key, flag_key

    def losses(self, network, loss_fn, images, labels, masks, tags, flags) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, loss dict) of one forward pass; usable outside an engine."""
        out = network.forward_with_maps(images) if hasattr(network, "forward_with_maps") else None
        if out is None:  # DDP: run the wrapper (its hooks sync gradients) on the module's forward_with_maps
            model = _ham(network)
            forward = model.forward
            model.forward = model.forward_with_maps
            try:
                out = network(images)
            finally:
                model.forward = forward
        logits, cams, refined = out
        o_a, o_c = logits[:, :1], logits[:, 1:]
        terms = loss_fn(o_a, o_c, refined[:, :1], refined[:, 1:], cams[:, :1], cams[:, 1:], labels, masks, tags, flags)
        return logits, terms

    def __call__(self, engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        device = engine.state.device
        keys = (self.image_key, self.label_key) + ((self.mask_key, self.tag_key, self.flag_key) if self.use_boxes else ())
        tensors = to_device(batchdata, keys, device, engine.non_blocking)
        images, labels = tensors[0], tensors[1].float()
        if self.use_boxes:
            masks, tags, flags = tensors[2].float(), tensors[3].float(), tensors[4].float().reshape(-1)
        else:
            masks = torch.zeros((), device=images.device).expand(*labels.shape, *images.shape[-2:])
            tags = torch.zeros_like(labels)
            flags = torch.zeros(labels.shape[0], device=images.device)
        loss_fn = self.loss if self.loss is not None else engine.loss_function
        _ham(engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        device_type = device.type if isinstance(device, torch.device) else "cpu"
        with torch.autocast(device_type=device_type, enabled=bool(engine.amp), **(engine.amp_kwargs or {})):
            logits, terms = self.losses(engine.network, loss_fn, images, labels, masks, tags, flags)
        loss = terms["loss"]
        if not math.isfinite(loss.item()):
            detail = ", ".join(f"{k} {terms[k].item():.4g}" for k in HAM_LOSS_TERMS)
            raise FloatingPointError(
                f"non-finite loss at iteration {engine.state.iteration} ({detail}): check the inputs or lower the learning rate"
            )
        optimise(engine, loss)
        return {
            "image": images,
            "label": labels,
            "pred": logits.detach(),
            **{k: terms[k].detach() for k in ("loss", *HAM_LOSS_TERMS)},
        }


class HAMEvalIteration:
    """Evaluation step: ``pred`` (logits (B, 1 + C)), ``map`` (refined finding maps (B, C, H, W)),
    and the batch's ``label``, ``box_mask``, ``case`` when present. No gradients."""

    def __init__(self, image_key: str = "image", label_key: str = "label", mask_key: str = "box_mask",
                 meta_keys=("case",)) -> None:
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
        self.meta_keys = tuple(meta_keys)

    def __call__(self, engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        model = _ham(engine.network)
        engine.network.eval()
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=bool(engine.amp)):
            logits, _, refined = model.forward_with_maps(images)
        keys = (self.label_key, self.mask_key)
        return explained_output(engine, batchdata, images, logits, refined[:, 1:], keys, self.meta_keys)
