"""(image, finding) cases of a multi-label box datalist: the unit of HAM's localisation scores.

Ouyang et al., "Learning Hierarchical Attention for Weakly-supervised Chest X-Ray Abnormality
Localization and Diagnosis", IEEE TMI 2021; spec ``specs/ham.md`` section 6: every (image, finding)
pair with a ground-truth box is one case, evaluated whatever the classifier predicts; its mask is
the union of that finding's boxes. :class:`FindingCaseDataset` expands a split of the prepared NIH
ChestX-ray14 datalist (:mod:`custom_components.data.nihcxr14`) into those cases, in datalist order
and, within an image, in :data:`~custom_components.data.nihcxr14.FINDINGS` order, so that the
explanation workflows (:mod:`custom_components.interpretability`) explain and score each case
against its own finding.

The images go through the bundle's own preprocessing (``transform``: the HAM bundle passes its
``load_transforms``, which load the prepared PNG, scale it to [-1, 1] and draw the box masks with
:class:`~custom_components.data.nihcxr14.BoxMasksd`); nothing here resizes or normalises.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import load_decathlon_datalist
from monai.utils import convert_to_tensor

from custom_components.data.nihcxr14 import FINDINGS
from custom_components.io import InputDataError

__all__ = ["FindingCaseDataset"]


class FindingCaseDataset(torch.utils.data.Dataset):
    """One item per (image, finding with a box) of a datalist split.

    Args:
        datalist: Decathlon-style JSON with ``image``, ``case``, a multi-hot ``label`` over
            ``findings`` and ``boxes`` {finding: [[x, y, w, h]]} (prepared-image pixels).
        split: the datalist key (``"test"``).
        root: folder the relative image paths are relative to (the prepared store).
        transform: the preprocessing of the network's input; it must give ``image`` (3, S, S)
            and ``mask_key`` (len(findings), S, S) box masks.
        findings: the class names, in the order of ``label`` and of the mask channels.
        target_offset: logit index of finding 0 (1 for HAM and its baseline: the abnormality
            logit comes first; see :func:`custom_components.explain.ham_methods.finding_target_offset`).
        normalization: (mean, std) of the preprocessing in [0, 1] image space (network input =
            (x - mean) / std; the HAM bundle's [-1, 1] scaling is mean = std = 0.5), for the
            display images and the black baseline of deletion / insertion.

    Items: ``image`` (3, S, S), ``mask`` (1, S, S) (the finding's box union), ``has_mask`` (True),
    ``label`` (1 if the image is labelled with the finding, else 0), ``target`` (logit index),
    ``target_name`` (the finding), ``finding`` (its index), ``case`` (``<image case>/<finding>``)
    and ``image_path`` (relative to ``root``).
    """

    def __init__(
        self,
        datalist: str | os.PathLike,
        split: str = "test",
        root: str | os.PathLike | None = None,
        transform: Callable[[dict], dict] | None = None,
        findings: Sequence[str] = FINDINGS,
        target_offset: int = 1,
        mask_key: str = "box_mask",
        normalization: tuple[float, float] = (0.5, 0.5),
    ) -> None:
        self.source = Path(datalist)
        self.root = Path(root) if root is not None else self.source.parent
        self.findings = tuple(findings)
        self.target_offset = int(target_offset)
        self.transform = transform
        self.mask_key = mask_key
        self.normalization = normalization
        try:
            entries = load_decathlon_datalist(self.source, True, split, self.root)
        except (OSError, ValueError, KeyError) as e:
            raise InputDataError(self.source, f"cannot read split {split!r} ({type(e).__name__}: {e})") from e
        position = {f: c for c, f in enumerate(self.findings)}
        self.entries: list[dict] = entries
        self.cases: list[tuple[int, int]] = []
        for i, e in enumerate(entries):
            boxes = e.get("boxes") or {}
            unknown = sorted(set(boxes) - set(position))
            if unknown:
                raise InputDataError(self.source, f"{split}[{i}] ({e.get('case', e['image'])}): unknown finding(s) "
                                                  f"{unknown} in 'boxes'")
            if len(e.get("label", ())) != len(self.findings):
                raise InputDataError(self.source, f"{split}[{i}]: 'label' must have {len(self.findings)} entries")
            self.cases += [(i, position[f]) for f in self.findings if boxes.get(f)]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, c = self.cases[index]
        entry = self.entries[i]
        data = self.transform(dict(entry)) if self.transform is not None else dict(entry)
        finding = self.findings[c]
        return {
            "image": convert_to_tensor(data["image"], track_meta=False),
            "mask": convert_to_tensor(data[self.mask_key], track_meta=False)[c:c + 1].float(),
            "has_mask": True,
            "label": int(float(entry["label"][c]) > 0.5),
            "target": self.target_offset + c,
            "target_name": finding,
            "finding": c,
            "case": f"{entry.get('case', Path(entry['image']).stem)}/{finding}",
            "image_path": os.path.relpath(entry["image"], self.root),
        }
