"""Per-volume 3-D Dice / IoU of slice-wise segmentations (LVM-Med MM-WHS protocol, spec lvmmed.md section 4).

A 2-D network segments the slices of a volume; the predicted class maps of a volume's slices are
stacked back in slice order and compared with the stacked label slices as one 3-D array, per
structure, with MONAI's ``compute_dice`` / ``compute_iou`` (``ignore_empty=False``: a structure
absent from both scores 1, absent from the label only 0). The paper's number is the 3-D IoU of
class 2 (label 420, left-atrium blood cavity) per volume, averaged over the volumes.

:class:`VolumeSegmentationMetric` is an Ignite metric that collects ``(case, slice)`` of each batch
item from ``engine.state.batch`` and the argmax of ``engine.state.output["pred"]``, and at the end
of the epoch computes the per-volume scores (``per_volume``) and puts the mean over volumes into
``engine.state.metrics``: ``<prefix>iou_<target>`` is the metric's value (the key metric for
model selection), plus ``<prefix>dice_<target>``, ``<prefix>mean_dice`` / ``<prefix>mean_iou``
(mean over the foreground structures) and ``<prefix>dice_<structure>`` / ``<prefix>iou_<structure>``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.metrics import compute_dice, compute_iou

__all__ = ["VolumeSegmentationMetric", "stack_slices", "volume_scores"]


def stack_slices(slices: Mapping[int, np.ndarray]) -> np.ndarray:
    """``{slice index: (H, W) map}`` -> ``(S, H, W)`` in slice order."""
    return np.stack([np.asarray(slices[k]) for k in sorted(slices)])


def volume_scores(pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """3-D Dice and IoU of each foreground class 1..num_classes-1 of one volume of class indices.

    ``pred`` and ``label`` are arrays of the same shape (any number of dims). Returns
    ``{"dice": (num_classes - 1,), "iou": (num_classes - 1,)}`` from MONAI's ``compute_dice`` /
    ``compute_iou`` on the binary masks of each class (one class at a time, so a real CT volume
    never needs a full one-hot copy).
    """
    p = torch.as_tensor(np.asarray(pred)).long()
    y = torch.as_tensor(np.asarray(label)).long()
    if p.shape != y.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from label shape {tuple(y.shape)}")
    dice, iou = [], []
    for c in range(1, int(num_classes)):
        pc = (p == c)[None, None].float()
        yc = (y == c)[None, None].float()
        dice.append(float(compute_dice(pc, yc, include_background=True, ignore_empty=False)[0, 0]))
        iou.append(float(compute_iou(pc, yc, include_background=True, ignore_empty=False)[0, 0]))
    return {"dice": np.asarray(dice), "iou": np.asarray(iou)}


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)


class VolumeSegmentationMetric(Metric):
    """Per-volume 3-D Dice / IoU per structure over stacked slice predictions (see the module docstring).

    Args:
        structures: names of the classes, index 0 the background (``num_classes = len(structures)``).
        target_class: the class whose mean 3-D IoU is the metric's value.
        prefix: prefix of the names put into ``engine.state.metrics`` (``"val_"`` in training).
        pred_key / label_key: keys of the engine output; ``case_key`` / ``slice_key``: of the batch.
    """

    def __init__(self, structures: Sequence[str], target_class: int = 2, prefix: str = "",
                 pred_key: str = "pred", label_key: str = "label", case_key: str = "case",
                 slice_key: str = "slice") -> None:
        self.structures = list(structures)
        self.num_classes = len(self.structures)
        if not 0 < int(target_class) < self.num_classes:
            raise ValueError(f"target_class must be in 1..{self.num_classes - 1}, got {target_class}")
        self.target_class = int(target_class)
        self.prefix = prefix
        self.keys = (pred_key, label_key, case_key, slice_key)
        self.per_volume: list[dict[str, Any]] = []
        super().__init__()

    def reset(self) -> None:
        self._pred: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self._label: dict[str, dict[int, np.ndarray]] = defaultdict(dict)

    def iteration_completed(self, engine: Engine) -> None:
        pred_key, label_key, case_key, slice_key = self.keys
        out, batch = engine.state.output, engine.state.batch
        self.update((out[pred_key], out[label_key], batch[case_key], batch[slice_key]))

    def update(self, output: tuple) -> None:
        logits, label, cases, slices = output
        pred = torch.as_tensor(logits).argmax(1).to(torch.uint8).cpu().numpy()
        lab = torch.as_tensor(label).round().reshape(pred.shape).to(torch.uint8).cpu().numpy()
        for i, (case, index) in enumerate(zip(_as_list(cases), _as_list(slices), strict=True)):
            self._pred[str(case)][int(index)] = pred[i]
            self._label[str(case)][int(index)] = lab[i]

    def compute(self) -> float:
        if not self._pred:
            raise RuntimeError("VolumeSegmentationMetric needs at least one batch before compute()")
        rows = []
        for case in self._pred:
            scores = volume_scores(stack_slices(self._pred[case]), stack_slices(self._label[case]), self.num_classes)
            row: dict[str, Any] = {"case": case, "n_slices": len(self._pred[case])}
            for kind in ("dice", "iou"):
                for name, v in zip(self.structures[1:], scores[kind], strict=True):
                    row[f"{kind}_{name}"] = float(v)
            row["mean_dice"], row["mean_iou"] = float(scores["dice"].mean()), float(scores["iou"].mean())
            rows.append(row)
        self.per_volume = rows
        return self.summary()[f"iou_{self.structures[self.target_class]}"]

    def summary(self) -> dict[str, float]:
        """Mean over volumes of every per-volume score of the last :meth:`compute`."""
        keys = [k for k in self.per_volume[0] if k not in ("case", "n_slices")]
        return {k: float(np.mean([r[k] for r in self.per_volume])) for k in keys}

    def completed(self, engine: Engine, name: str) -> None:
        value = self.compute()
        target = self.structures[self.target_class]
        for key, v in self.summary().items():
            engine.state.metrics[f"{self.prefix}{key}"] = v
        engine.state.metrics[f"{self.prefix}dice"] = engine.state.metrics[f"{self.prefix}dice_{target}"]
        engine.state.metrics[name] = value
