"""Linear probe on cached encoder features (LVM-Med classification, spec ``lvmmed.md`` section 4).

With a frozen encoder in eval mode and a deterministic transform, the encoder's pooled features of
an image never change during a linear-probe training: :class:`CachedFeatureDataset` computes them
once per dataset split and the head is trained on them (an epoch then costs a pass through the head
only, see ``scripts/bench_linear_probe.py``).

The cache is one file per split, ``<cache_dir>/<name>_<fingerprint[:16]>.pt``, written atomically
(temporary file, then rename). The fingerprint (:func:`feature_fingerprint`) hashes

* every tensor of the encoder's state dict (weights and BN buffers) with its name,
* the dataset's entries (image path, label) and each file's size and modification time,
* the transform: the dataset's class, root, image size, resize mode and normalisation.

A changed encoder (another initialisation, a fine-tuned checkpoint), data list, image file or
transform gives another fingerprint, so the features are recomputed; the files of older
fingerprints of the same split are removed. A dataset with a random transform, an encoder that is
not frozen, or the ``frozen_bn_train`` reproduction (BN statistics change every batch) cannot be
cached: one clear error says so.

Items are ``{"image": features (D,), "label": int64, "image_path": str}`` so that MONAI's
``SupervisedTrainer`` / ``SupervisedEvaluator`` run the head on them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from custom_components.io import InputDataError, atomic_save, load_checkpoint

__all__ = ["feature_fingerprint", "compute_features", "CachedFeatureDataset"]

logger = logging.getLogger(__name__)


def _transform_description(dataset: Any) -> dict[str, Any]:
    if getattr(dataset, "transform", None) is not None:
        raise ValueError(
            f"{type(dataset).__name__} has a transform ({type(dataset.transform).__name__}): cached features need a "
            "deterministic dataset without random augmentation (give the image dataset no transform; FGADR bundle: add "
            "configs/dataset/fgadr_linear_probe.json)"
        )
    keys = ("image_size", "resize_mode", "resize_short", "normalize", "label_dtype")
    return {"class": type(dataset).__name__, "root": str(getattr(dataset, "root", "")),
            **{k: getattr(dataset, k, None) for k in keys}}


def feature_fingerprint(encoder: torch.nn.Module, dataset: Any) -> str:
    """SHA-256 of the encoder's tensors, the dataset's entries and files, and its transform (module docstring)."""
    h = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(_transform_description(dataset), sort_keys=True).encode())
    root = Path(getattr(dataset, "root", "."))
    for e in getattr(dataset, "entries", ()):
        st = (root / e["image"]).stat()
        h.update(f"{e['image']}|{int(e['label'])}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def compute_features(network: torch.nn.Module, dataset: Dataset, batch_size: int = 64,
                     device: str | torch.device = "cpu", num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Pooled encoder features ``(N, D)`` float32 (CPU), labels ``(N,)`` int64 and image paths, in dataset order."""
    was_training = network.encoder.training
    network.encoder.eval()
    feats, labels, ids = [], [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            feats.append(network.features(batch["image"].to(device)).float().cpu())
            labels.append(torch.as_tensor(batch["label"]).reshape(-1).long())
            ids.extend(str(i) for i in batch.get("image_path", [""] * len(labels[-1])))
    finally:
        network.encoder.train(was_training)
    if not feats:
        raise ValueError("cannot cache the features of an empty dataset")
    return torch.cat(feats), torch.cat(labels), ids


class CachedFeatureDataset(Dataset):
    """The encoder features of ``dataset``, from the cache file or computed once and cached.

    Args:
        network: an :class:`~custom_components.networks.lvmmed_classifier.LVMMedClassifier` (or any
            module with ``encoder``, ``features(x)``, ``frozen`` and ``frozen_bn_train``), frozen.
        dataset: the image dataset (``entries``, ``root``, no random ``transform``).
        cache_dir: folder of the cache files (under the bundle root).
        name: the split's file stem (``training``, ``validation``, ``test``).
        batch_size, device, num_workers: of the one feature pass.
    """

    def __init__(self, network: torch.nn.Module, dataset: Any, cache_dir: str | os.PathLike, name: str,
                 batch_size: int = 64, device: str | torch.device = "cpu", num_workers: int = 0) -> None:
        if not getattr(network, "frozen", False):
            raise ValueError("cached features need a frozen encoder (frozen: true)")
        if getattr(network, "frozen_bn_train", False):
            raise ValueError("frozen_bn_train keeps the encoder's BN statistics changing every batch: its features "
                             "cannot be cached (train the probe without the cache, i.e. with train.json)")
        self.split = getattr(dataset, "split", name)
        self.fingerprint = feature_fingerprint(network.encoder, dataset)
        folder = Path(cache_dir)
        self.path = folder / f"{name}_{self.fingerprint[:16]}.pt"
        try:
            cached = load_checkpoint(self.path) if self.path.is_file() else None
        except InputDataError as e:  # a damaged cache file only costs a recomputation
            logger.warning("%s; recomputing the features", e)
            cached = None
        if isinstance(cached, dict) and cached.get("fingerprint") == self.fingerprint:
            self.features, self.labels, self.ids = cached["features"], cached["labels"], list(cached["ids"])
            self.computed = False
            logger.info("features of %s: %d x %d from %s", name, *self.features.shape, self.path)
        else:
            self.features, self.labels, self.ids = compute_features(network, dataset, batch_size, device, num_workers)
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob(f"{name}_*.pt"):
                old.unlink(missing_ok=True)
            atomic_save({"fingerprint": self.fingerprint, "features": self.features, "labels": self.labels,
                         "ids": self.ids}, self.path)
            self.computed = True
            logger.info("features of %s: %d x %d computed, cached in %s", name, *self.features.shape, self.path)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.features[index], "label": self.labels[index], "image_path": self.ids[index]}
