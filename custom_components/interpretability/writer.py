"""Write every explanation method's maps for a dataset split: the ``explain.json`` workflow.

Protocol of the ugent-korea study (spec ``explanations.md`` section 8): each method explains the
**target class** (1 by default, never the prediction) of a fine-tuned ViT on the test split, at
the network input resolution. One run folder per initialisation holds

* ``explanations/index.json``: dataset, initialisation, target, ``activation``, image size, split,
  methods and one item per image (``index``, ``image`` (relative path), ``case``, ``label``,
  ``prob`` (probability of the target class), ``pred``, ``positive`` (the item shows its target
  class), ``has_mask``), in the order of the arrays;
* ``explanations/images.npy``: uint8 (N, S, S, 3), the network's input crop for display;
* ``explanations/masks.npy``: uint8 (N, S, S), 0/1 ground truth (zeros without annotation);
* ``explanations/maps/<method>.npy``: (N, S, S) maps in [0, 1], float32 by default (the protocols
  are rank based: float16 would create ties at the maximum that the float32 map does not have;
  ``map_dtype="float16"`` halves the disk use, about 200 KB per image and method in float32 at 224²).

**Per-item targets** (multi-label networks, e.g. HAM's (image, finding) cases of
:class:`~custom_components.data.finding_cases.FindingCaseDataset`): when the dataset's items carry
a ``target`` (the logit index to explain) the index's ``target`` is ``"per_item"`` and each item
records its ``target``, ``target_name`` (the finding), ``label`` (0/1: whether the image has that
finding) and ``prob`` = sigmoid of the target logit with ``activation="sigmoid"`` (``pred``:
prob > 0.5). One item is then one (image, finding) case: ``image`` repeats across the findings of
an image, ``case`` does not.

The display images are de-normalised with the dataset's ``normalization`` ((mean, std) per
channel in [0, 1] image space) when it has one, else ImageNet's (``normalize="imagenet"``, the
image-folder datasets) or none.

The folder is built beside the target and renamed into place, so a reader never sees half a run;
an interrupted run leaves the previous one untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from custom_components.data.image_folders import IMAGENET_MEAN, IMAGENET_STD
from custom_components.explain.base import Explainer
from custom_components.io import InputDataError, load_network_weights

__all__ = [
    "write_explanations",
    "load_network_weights",
    "input_normalization",
    "item_is_positive",
    "item_targets",
    "EXPLANATIONS_DIR",
    "PER_ITEM",
    "ACTIVATIONS",
]

EXPLANATIONS_DIR = "explanations"
#: ``index.json``'s ``target`` when every item names its own
PER_ITEM = "per_item"
ACTIVATIONS = ("softmax", "sigmoid")


def input_normalization(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) (3, 1, 1) with which ``dataset`` normalised its [0, 1] images: network input = (x - mean) / std."""
    stats = getattr(dataset, "normalization", None)
    if stats is None:
        stats = (IMAGENET_MEAN, IMAGENET_STD) if getattr(dataset, "normalize", "imagenet") == "imagenet" else (0.0, 1.0)
    mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1).expand(3, 1, 1) for v in stats)
    return mean, std


def item_targets(index: Mapping[str, Any]) -> list[int]:
    """The class each item of an ``index.json`` explains: its own ``target``, or the run's fixed one."""
    if index["target"] == PER_ITEM:
        return [int(it["target"]) for it in index["items"]]
    return [int(index["target"])] * len(index["items"])


def item_is_positive(index: Mapping[str, Any], item: Mapping[str, Any]) -> bool:
    """Whether the item shows its target class (indexes written before ``positive`` existed: label == target)."""
    if "positive" in item:
        return bool(item["positive"])
    return index["target"] != PER_ITEM and item.get("label") == index["target"]


def _display_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) network input -> uint8 (B, S, S, 3) for display."""
    x = images.detach().float().cpu() * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder to ``final``, replacing an older run only once ``tmp`` is complete."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def _predict(network: torch.nn.Module, images: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.autocast(images.device.type, enabled=amp):
        return network(images).float()


def write_explanations(
    network: torch.nn.Module,
    dataset: Any,
    explainers: Mapping[str, Explainer],
    output_dir: str | os.PathLike,
    target: int = 1,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    checkpoint: str | os.PathLike | None = None,
    dataset_name: str = "",
    init: str = "",
    split: str = "test",
    summary_writer: Any = None,
    num_panel_images: int = 4,
    progress: bool = True,
    map_dtype: str = "float32",
    activation: str = "softmax",
) -> Path:
    """Compute and store every method's map for every item of ``dataset``.

    Args:
        network: the classifier the explainers were built on (2 logits for the study).
        dataset: items with ``image`` (3, S, S), ``label``, ``mask`` (1, S, S), ``has_mask``,
            ``image_path``, ``case`` (:class:`~custom_components.data.image_folders.ImageFolderDataset`
            with ``always_mask=True``); optionally ``target`` (logit index) and ``target_name`` per
            item (then ``target`` below is not used; see the module docstring).
        explainers: method name -> explainer (``attribute(images, target, out_size)``); each
            explains class ``target`` of every image (or each item's own).
        activation: ``"softmax"`` (one class per image) or ``"sigmoid"`` (multi-label logits) for
            the recorded probabilities and deletion / insertion.
        output_dir: run folder; maps go to ``<output_dir>/explanations``.
        checkpoint: weights to load into ``network`` first (``None``: use it as it is).
        summary_writer: optional TensorBoard writer; gets image / mask / each method's map for the
            first ``num_panel_images`` annotated (else positive) images.
    Returns the explanations folder.
    """
    if not explainers:
        raise ValueError("no explanation method configured")
    if map_dtype not in ("float32", "float16"):
        raise ValueError(f"map_dtype must be 'float32' or 'float16', got {map_dtype!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    bad = [m for m in explainers if not m or "/" in m or m.startswith(".")]
    if bad:
        raise ValueError(f"method names must be plain file names, got {bad}")
    n = len(dataset)
    if n == 0:
        raise InputDataError(getattr(dataset, "source", "datalist"), f"the {split!r} split has no images")
    device = torch.device(device)
    if checkpoint is not None:
        load_network_weights(network, checkpoint)
    network = network.to(device)
    was_training = network.training
    network.eval()
    mean, std = input_normalization(dataset)
    per_item = None  # known from the first batch
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EXPLANATIONS_DIR}.", suffix=".tmp", dir=out))
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        size = None
        arrays: dict[str, np.ndarray] = {}
        items: list[dict] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="explanations", unit="img")
        start = 0
        for batch in loader:
            images = batch["image"].to(device)
            b = images.shape[0]
            if size is None:
                size = int(images.shape[-1])
                (tmp / "maps").mkdir()
                arrays["images"] = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, 3))
                arrays["masks"] = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
                for name in explainers:
                    arrays[name] = np.lib.format.open_memmap(tmp / "maps" / f"{name}.npy", "w+", map_dtype, (n, size, size))
            if per_item is None:
                per_item = "target" in batch
            if per_item != ("target" in batch):
                raise InputDataError(getattr(dataset, "source", "dataset"), "some items have a 'target' and some do not")
            if per_item:
                target_t = torch.as_tensor(batch["target"]).reshape(b).long().to(device)
            else:
                target_t = torch.full((b,), int(target), dtype=torch.long, device=device)
            logits = _predict(network, images, amp)
            prob = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)
            for name, explainer in explainers.items():
                with (torch.set_grad_enabled(getattr(explainer, "needs_gradients", True)),
                      torch.autocast(device.type, enabled=amp)):
                    maps = explainer.attribute(images, target=target_t, out_size=(size, size))
                maps = maps.detach().float()
                if not torch.isfinite(maps).all():
                    raise FloatingPointError(f"method {name!r} produced non-finite maps for batch starting at item {start}")
                arrays[name][start:start + b] = maps.clamp(0, 1).cpu().numpy().astype(map_dtype)
            arrays["images"][start:start + b] = _display_images(batch["image"], mean, std)
            arrays["masks"][start:start + b] = (batch["mask"][:, 0] > 0.5).to(torch.uint8).numpy()
            for i in range(b):
                t = int(target_t[i])
                label = int(batch["label"][i].reshape(-1)[0])
                p = float(prob[i, t])
                item = {
                    "index": start + i,
                    "image": str(batch["image_path"][i]),
                    "case": str(batch["case"][i]),
                    "label": label,
                    "prob": round(p, 6),
                    "pred": int(p > 0.5) if activation == "sigmoid" else int(prob[i].argmax()),
                    "positive": bool(label == 1) if per_item else bool(label == t),
                    "has_mask": bool(batch["has_mask"][i]),
                }
                if per_item:
                    item["target"] = t
                    item["target_name"] = str(batch["target_name"][i]) if "target_name" in batch else str(t)
                items.append(item)
            start += b
            if bar is not None:
                bar.update(b)
        if bar is not None:
            bar.close()
        for arr in arrays.values():
            arr.flush()
        del arrays
        index = {
            "dataset": dataset_name,
            "init": init,
            "target": PER_ITEM if per_item else int(target),
            "activation": activation,
            "image_size": size,
            "split": split,
            "methods": list(explainers),
            "n_images": n,
            "n_annotated": sum(it["has_mask"] for it in items),
            "items": items,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        final = out / EXPLANATIONS_DIR
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        network.train(was_training)
    if summary_writer is not None:
        _write_panels(final, summary_writer, num_panel_images)
    return final


def _write_panels(folder: Path, writer: Any, count: int) -> None:
    """TensorBoard panels: image, mask and each method's map for a few annotated (else positive) images."""
    index = json.loads((folder / "index.json").read_text())
    items = index["items"]
    chosen = [it["index"] for it in items if it["has_mask"]] or [it["index"] for it in items if item_is_positive(index, it)]
    chosen = (chosen or [it["index"] for it in items])[:count]
    if not chosen:
        return
    images = np.load(folder / "images.npy", mmap_mode="r")[chosen]
    masks = np.load(folder / "masks.npy", mmap_mode="r")[chosen]
    writer.add_images("explain/image", torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), 0)
    writer.add_images("explain/mask", torch.from_numpy(masks.astype(np.float32))[:, None], 0)
    for method in index["methods"]:
        maps = np.load(folder / "maps" / f"{method}.npy", mmap_mode="r")[chosen].astype(np.float32)
        writer.add_images(f"explain/{method}", torch.from_numpy(maps)[:, None], 0)
    writer.flush()
