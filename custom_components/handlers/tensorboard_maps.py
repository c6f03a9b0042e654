"""TensorBoard image panels of slice / mask / explanation map, written every epoch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from custom_components.explain.base import Explainer, resize_maps

__all__ = [
    "ExplanationPanels",
    "AttentionMapPanels",
    "normalize_per_image",
    "select_positive_examples",
    "rank_zero_summary_writer",
    "mark_restart",
]


def normalize_per_image(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max each image of a (N, ...) tensor to [0, 1] for display (constant -> 0)."""
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).reshape(x.shape)


def select_positive_examples(dataset: Sequence[dict], count: int, label_key: str = "label") -> list[dict]:
    """The ``count`` positive items with the largest masks, using the dataset's cheap label index if any.

    Falls back to the first items when the dataset has no positive slice.
    """
    labels = getattr(dataset, "labels", None)
    indices = [i for i in range(len(dataset)) if labels is None or labels[i] > 0.5]
    if labels is None:
        indices = [i for i in indices if float(dataset[i][label_key].reshape(-1)[0]) > 0.5]
    indices = indices or list(range(min(count, len(dataset))))
    # Spread the picks over the positive slices rather than taking one scan's first slices.
    step = max(len(indices) // max(count, 1), 1)
    return [dataset[i] for i in indices[::step][:count]]


class ExplanationPanels:
    """Write ``<tag>/image``, ``<tag>/mask`` and ``<tag>/map`` panels after every ``interval`` epochs.

    Args:
        explainer: explanation method (its model is the trained network).
        dataset: items with ``image`` (C, H, W) and ``mask`` (1, H, W); positive items are chosen once.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (shared with the stats handler).
        num_images: number of slices in each panel.
        display_channel: image channel shown (-1: FLAIR of the T1/T2/FLAIR stack).
    """

    def __init__(
        self,
        explainer: Explainer,
        dataset: Sequence[dict],
        summary_writer: Any,
        tag: str = "explanation",
        num_images: int = 4,
        display_channel: int = -1,
        interval: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        self.explainer = explainer
        self.dataset = dataset
        self.writer = summary_writer
        self.tag = tag
        self.num_images = num_images
        self.display_channel = display_channel
        self.interval = interval
        self.device = device
        self._items: list[dict] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if self._items is None:
            self._items = select_positive_examples(self.dataset, self.num_images)
        device = self.device or getattr(engine.state, "device", None) or "cpu"
        images = torch.stack([it["image"] for it in self._items]).to(device)
        masks = torch.stack([it["mask"] for it in self._items]).float()
        model = self.explainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.set_grad_enabled(self.explainer.needs_gradients):
                maps = resize_maps(self.explainer.attribute(images).detach().float(), images.shape[-2:]).cpu()
        finally:
            model.train(was_training)
        step = engine.state.epoch
        shown = images[:, self.display_channel : self.display_channel + 1 or None].float().cpu()
        self.writer.add_images(f"{self.tag}/image", normalize_per_image(shown), step)
        self.writer.add_images(f"{self.tag}/mask", masks.reshape(masks.shape[0], 1, *masks.shape[-2:]), step)
        self.writer.add_images(f"{self.tag}/map", normalize_per_image(maps.unsqueeze(1)), step)
        self.writer.flush()


class AttentionMapPanels:
    """HAM's attention in TensorBoard: image, abnormality map, top finding's map and its box mask.

    Attach to the validation evaluator: after every validation run (each validation epoch; the
    step is the evaluator's epoch, the trainer's under MONAI's ``ValidationHandler``) the same
    ``num_images`` validation images, those with boxes first (the entries' ``has_boxes``), go through
    ``network.forward_with_maps`` (:class:`~custom_components.networks.ham.HAMNet`, or the CAM
    baseline) in eval mode and give ``<tag>/image``, ``<tag>/abnormal_map`` (refined map of the
    abnormality head), ``<tag>/finding_map`` and ``<tag>/box_mask`` (the finding with a box and the
    highest probability, else the most probable finding) and ``<tag>/findings`` (text: which finding
    each row shows). Rank 0 only; a DDP network is unwrapped, so no collective is called.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset: Sequence[dict],
        summary_writer: Any,
        class_names: Sequence[str] = (),
        tag: str = "attention",
        num_images: int = 4,
        image_key: str = "image",
        mask_key: str = "box_mask",
        has_boxes_key: str = "has_boxes",
        device: str | torch.device | None = None,
    ) -> None:
        self.network, self.dataset, self.writer = network, dataset, summary_writer
        self.class_names = tuple(class_names)
        self.tag, self.num_images = tag, int(num_images)
        self.image_key, self.mask_key, self.has_boxes_key = image_key, mask_key, has_boxes_key
        self.device = device
        self._items: list[dict] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def _select(self) -> list[dict]:
        entries = getattr(self.dataset, "data", None)
        order = list(range(len(self.dataset)))
        if entries is not None:  # the datalist: no image is loaded to choose
            order.sort(key=lambda i: not entries[i].get(self.has_boxes_key, 0))
        return [self.dataset[i] for i in order[: self.num_images]]

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if self._items is None:
            self._items = self._select()
        if not self._items:
            return
        device = self.device or getattr(engine.state, "device", None) or "cpu"
        images = torch.stack([torch.as_tensor(it[self.image_key]) for it in self._items]).float().to(device)
        model = getattr(self.network, "module", self.network)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits, _, refined = model.forward_with_maps(images)
        finally:
            model.train(was_training)
        refined, probs = refined.float().cpu(), torch.sigmoid(logits[:, 1:].float().cpu())
        has_mask = self.mask_key in self._items[0]
        masks = torch.stack([torch.as_tensor(it[self.mask_key]) for it in self._items]).float() if has_mask else None
        with_box = masks.flatten(2).amax(-1) > 0.5 if masks is not None else torch.zeros_like(probs, dtype=torch.bool)
        # the most probable finding among those with a box, else among all
        top = torch.where(with_box.any(1), probs.masked_fill(~with_box, -1.0).argmax(1), probs.argmax(1))
        rows = torch.arange(len(top))
        step = engine.state.epoch
        self.writer.add_images(f"{self.tag}/image", normalize_per_image(images[:, :1].cpu()), step)
        self.writer.add_images(f"{self.tag}/abnormal_map", refined[:, :1], step)
        self.writer.add_images(f"{self.tag}/finding_map", refined[rows, 1 + top].unsqueeze(1), step)
        if masks is not None:
            self.writer.add_images(f"{self.tag}/box_mask", masks[rows, top].unsqueeze(1), step)
        names = [self.class_names[i] if i < len(self.class_names) else str(i) for i in top.tolist()]
        self.writer.add_text(
            f"{self.tag}/findings",
            ", ".join(f"{n} (p={p:.2f}{', box' if b else ''})" for n, p, b in
                      zip(names, probs[rows, top].tolist(), with_box[rows, top].tolist(), strict=True)),
            step,
        )
        self.writer.flush()


class _NullWriter:
    """Stands in for a SummaryWriter on ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def rank_zero_summary_writer(log_dir: str, **kwargs: Any) -> Any:
    """A ``SummaryWriter`` on rank 0 (or without distributed training), a no-op writer elsewhere.

    Lets one config serve single- and multi-process runs without event files from every rank.
    """
    if idist.get_rank() != 0:
        return _NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir, **kwargs)


def mark_restart(writer: Any, step: int) -> None:
    """Tell TensorBoard that the run restarts at ``step``: events logged earlier at ``step`` or later are hidden.

    A resumed run repeats the iterations of the epoch that was interrupted; without this marker
    TensorBoard shows them twice. It is the ``SessionLog.START`` event that ``SummaryWriter``'s
    ``purge_step`` writes, emitted once the resumed step is known (after the checkpoint is read).
    """
    get_writer = getattr(writer, "_get_file_writer", None)
    if get_writer is None:  # the no-op writer of non-zero ranks
        return
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    get_writer().add_event(Event(step=int(step), wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
