"""Transforms for MONAI's ``ClassificationSaver`` on MedMNIST inference (rows named by split and index).

MedMNIST samples have no file names, so each row of ``predictions.csv`` is named ``<split>_<index>``
in dataset order, and the saved values are the class probabilities the MedMNIST evaluator uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from custom_components.metrics.medmnist_metrics import logits_to_scores

__all__ = ["IndexedSampleNames", "MedMNISTScores"]


class IndexedSampleNames:
    """``batch_transform``: ``[{"filename_or_obj": "<prefix>_<i>"}, ...]`` numbering samples across batches."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count = 0

    def __call__(self, batch: Any) -> list[dict[str, str]]:
        n = len(batch["image"]) if isinstance(batch, dict) else len(batch)
        names = [{"filename_or_obj": f"{self.prefix}_{self.count + i}"} for i in range(n)]
        self.count += n
        return names


class MedMNISTScores:
    """``output_transform``: per-sample class probabilities (sigmoid or softmax as the task needs)."""

    def __init__(self, task: str) -> None:
        self.task = task

    def __call__(self, output: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        return list(logits_to_scores(torch.stack([o["pred"] for o in output]), self.task).float())
