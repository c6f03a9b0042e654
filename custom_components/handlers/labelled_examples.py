"""TensorBoard panel of labelled classification examples: each image with its true and predicted class.

After every ``interval`` epochs of the engine it is attached to (the trainer), rank 0 runs the network
in eval mode on a fixed set of examples (one per class in turn, chosen once from the dataset's labels)
and writes one image ``<tag>`` whose tiles carry a caption strip ``T:<true> P:<pred> <probability>``
(green when right, red when wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw

from custom_components.data.image_folders import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["LabelledExamplePanels", "pick_examples", "caption_tile"]


def pick_examples(labels: Sequence[int], count: int) -> list[int]:
    """Dataset indices: the first example of each class in turn (round robin), ``count`` in all."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    out: list[int] = []
    depth = 0
    while len(out) < count and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(out) < count:
                out.append(by_class[c][depth])
        depth += 1
    return out


def caption_tile(image: torch.Tensor, text: str, correct: bool, strip: int = 12) -> np.ndarray:
    """(3, H, W) ImageNet-normalised image -> (3, H + strip, W) uint8 with ``text`` on a coloured strip."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    h, w = rgb.shape[:2]
    canvas = Image.new("RGB", (w, h + strip), (0, 110, 0) if correct else (150, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, strip))
    ImageDraw.Draw(canvas).text((1, 0), text, fill=(255, 255, 255))
    return np.asarray(canvas).transpose(2, 0, 1).copy()


class LabelledExamplePanels:
    """Write ``tag`` (a batch of captioned tiles) to ``summary_writer`` every ``interval`` epochs.

    Args:
        network: the classifier (logits ``(B, C)``).
        dataset: items with ``image`` (3, H, W, ImageNet-normalised) and ``label``; its ``labels``
            attribute (or the items) choose the examples.
        summary_writer: shared ``SummaryWriter``.
        class_names: caption names of the classes.
        num_images: tiles in the panel.
    """

    def __init__(self, network: torch.nn.Module, dataset: Any, summary_writer: Any, class_names: Sequence[str],
                 num_images: int = 4, tag: str = "val_examples", interval: int = 1) -> None:
        self.network, self.dataset, self.writer = network, dataset, summary_writer
        self.class_names = list(class_names)
        self.num_images, self.tag, self.interval = int(num_images), tag, int(interval)
        self._indices: list[int] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0 or self.num_images <= 0:
            return
        if self._indices is None:
            labels = getattr(self.dataset, "labels", None)
            if labels is None:
                labels = [int(self.dataset[i]["label"]) for i in range(len(self.dataset))]
            self._indices = pick_examples(labels, self.num_images)
        if not self._indices:
            return
        items = [self.dataset[i] for i in self._indices]
        images = torch.stack([torch.as_tensor(it["image"]) for it in items])
        device = next(self.network.parameters()).device
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                probs = torch.softmax(self.network(images.to(device)).float(), 1).cpu()
        finally:
            self.network.train(was_training)
        tiles = []
        for it, image, p in zip(items, images, probs, strict=True):
            true, pred = int(it["label"]), int(p.argmax())
            text = f"T:{self.class_names[true]} P:{self.class_names[pred]} {float(p[pred]):.2f}"
            tiles.append(caption_tile(image, text, true == pred))
        self.writer.add_images(self.tag, np.stack(tiles), engine.state.epoch, dataformats="NCHW")
        self.writer.flush()
