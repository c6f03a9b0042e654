"""Training iteration for MedViT with the Patch Moment Changer (spec ``specs/medvit.md`` section 3).

For MONAI ``SupervisedTrainer(iteration_update=PMCIteration())``. When the network mixed the
batch's feature moments in its forward (``model.pmc_applied``), the loss is
``lam * crit(logits, y) + (1 - lam) * crit(logits, y[perm])`` via ``model.pmc_loss``; otherwise
(PMC off, not drawn this batch, or a network without PMC) it is the plain ``crit(logits, y)``.
DDP wrappers are unwrapped to reach the PMC state.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from custom_components.engines.guided import optimise, to_device

__all__ = ["PMCIteration"]


class PMCIteration:
    def __init__(self, image_key: str = "image", label_key: str = "label") -> None:
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        images, labels = to_device(batchdata, (self.image_key, self.label_key), engine.state.device, engine.non_blocking)
        model = getattr(engine.network, "module", engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        device_type = engine.state.device.type if isinstance(engine.state.device, torch.device) else "cpu"
        with torch.autocast(device_type=device_type, enabled=bool(engine.amp), **(engine.amp_kwargs or {})):
            logits = engine.network(images)
            if hasattr(model, "pmc_loss"):
                loss = model.pmc_loss(logits, labels, engine.loss_function)
            else:
                loss = engine.loss_function(logits, labels)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"non-finite loss at iteration {engine.state.iteration}: check the inputs or lower the learning rate"
            )
        optimise(engine, loss)
        return {"image": images, "label": labels, "pred": logits.detach(), "loss": loss.detach()}
