"""Datalists of the LVM-Med classification datasets (spec ``lvmmed.md`` sections 4 and 6).

Both builders return ``{"training": [...], "validation": [...], "test": [...]}`` with entries
``{"image": REL, "label": int, "case": ID}`` (paths relative to ``root``), read by
:class:`~custom_components.data.image_folders.ImageFolderDataset` (``label_dtype="long"``).

* **Brain Tumor MRI** (Kaggle "Brain Tumor MRI Dataset", Nickparvar 2021; :func:`brain_tumor_datalist`):
  ``<root>/Training/<class>/*.jpg`` and ``<root>/Testing/<class>/*.jpg`` with the class folders
  ``glioma``, ``meningioma``, ``notumor``, ``pituitary`` (labels 0..3 in that order; the folder
  names, e.g. the older ``glioma_tumor`` / ``no_tumor`` release, and the split folder names are
  arguments). ``Testing`` is the test split; ``validation`` is a seeded random 30 % of ``Training``
  (seed 42, as the reference), not stratified unless ``stratify=True``. Every class folder must
  exist in both splits and hold at least one image; a folder that is not a known class, or a file
  in a class folder that is not an image, is an error (one line naming the path).
* **FGADR** (Seg-set, Zhou et al. 2020; :func:`fgadr_datalist`): the public layout
  ``<root>/Original_Images/<name>.png`` with the grading file ``<root>/DR_Seg_Grading_Label.csv``
  (two columns: image file name, DR grade 0..4; an optional header row). The reference's
  train/test lists (``fgadr_pkl_file.pkl``, 1500/341) are not public: ``test_fraction`` (0.185, about
  341 of 1841) of the images form a seeded stratified test split, and ``validation`` is 20 % of the
  remaining train images (spec section 6: the reference validated on the test list; here the
  validation comes from train only). Every image in the CSV must exist; an image of the folder that
  the CSV does not grade is an error too.

:func:`prepare_class_datalist` builds one of them, decodes every image once (remembered beside the
datalist, :func:`~custom_components.data.image_folders.check_datalist_images`) and writes the
datalist atomically.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom_components.data.image_folders import check_datalist_images, write_datalist
from custom_components.io import InputDataError

__all__ = [
    "BRAIN_TUMOR_CLASSES",
    "FGADR_GRADES",
    "brain_tumor_datalist",
    "fgadr_datalist",
    "prepare_class_datalist",
    "random_split",
    "CLASS_DATALIST_BUILDERS",
]

BRAIN_TUMOR_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
FGADR_GRADES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "PDR")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_IGNORED = ("Thumbs.db", "desktop.ini")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def random_split(n: int, fraction: float, seed: int, labels: Sequence[int] | None = None) -> list[int]:
    """Indices (sorted) of a seeded random ``fraction`` of ``range(n)``; per label when ``labels`` is given."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    if labels is None:
        return sorted(int(i) for i in rng.permutation(n)[: int(round(n * fraction))])
    chosen: list[int] = []
    for label in sorted(set(labels)):
        idx = [i for i in range(n) if labels[i] == label]
        order = rng.permutation(len(idx))[: int(round(len(idx) * fraction))]
        chosen.extend(idx[int(k)] for k in order)
    return sorted(chosen)


def _class_images(folder: Path) -> list[Path]:
    images = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name in _IGNORED:
            continue
        if p.is_dir():
            raise InputDataError(p, "unexpected folder inside a class folder")
        if p.suffix.lower() not in _IMAGE_EXTS:
            raise InputDataError(p, f"not an image file ({'/'.join(_IMAGE_EXTS)}) in a class folder")
        images.append(p)
    if not images:
        raise InputDataError(folder, "class folder is empty (no image)")
    return images


def _split_folder(root: Path, name: str, classes: Sequence[str]) -> list[dict[str, Any]]:
    folder = root / name
    if not folder.is_dir():
        raise InputDataError(folder, f"split folder missing (expected {root}/{name}/<class>/*.jpg)")
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in present if c not in classes]
    if unknown:
        raise InputDataError(folder / unknown[0], f"unknown class folder (classes: {', '.join(classes)})")
    entries = []
    for label, cls in enumerate(classes):
        cdir = folder / cls
        if not cdir.is_dir():
            raise InputDataError(cdir, "class folder missing")
        for p in _class_images(cdir):
            entries.append({"image": _rel(p, root), "label": label, "case": f"{name}/{cls}/{p.stem}"})
    return entries


def brain_tumor_datalist(
    root: str | os.PathLike,
    classes: Sequence[str] = BRAIN_TUMOR_CLASSES,
    train_dir: str = "Training",
    test_dir: str = "Testing",
    val_fraction: float = 0.3,
    seed: int = 42,
    stratify: bool = False,
) -> dict[str, list[dict]]:
    """Brain Tumor MRI datalist (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    classes = tuple(classes)
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes must be at least two distinct folder names, got {classes}")
    train = _split_folder(root, train_dir, classes)
    test = _split_folder(root, test_dir, classes)
    val_idx = set(random_split(len(train), val_fraction, seed, [e["label"] for e in train] if stratify else None))
    return {
        "training": [e for i, e in enumerate(train) if i not in val_idx],
        "validation": [e for i, e in enumerate(train) if i in val_idx],
        "test": test,
    }


def _read_grades(csv_path: Path, num_grades: int) -> dict[str, int]:
    if not csv_path.is_file():
        raise InputDataError(csv_path, "grading CSV missing (expected <image name>,<grade> rows)")
    grades: dict[str, int] = {}
    with open(csv_path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            if len(cells) < 2:
                raise InputDataError(csv_path, f"row {i + 1}: expected '<image name>,<grade>', got {row!r}")
            try:
                grade = int(float(cells[1]))
            except (ValueError, OverflowError):  # not a number, or inf
                if i == 0:
                    continue  # header
                raise InputDataError(csv_path, f"row {i + 1}: grade {cells[1]!r} is not a number") from None
            if not 0 <= grade < num_grades or float(cells[1]) != grade:
                raise InputDataError(csv_path, f"row {i + 1}: grade {cells[1]} is not one of 0..{num_grades - 1}")
            if cells[0] in grades:
                raise InputDataError(csv_path, f"row {i + 1}: image {cells[0]} graded twice")
            grades[cells[0]] = grade
    if not grades:
        raise InputDataError(csv_path, "grading CSV lists no image")
    return grades


def fgadr_datalist(
    root: str | os.PathLike,
    images_dir: str = "Original_Images",
    grades_csv: str = "DR_Seg_Grading_Label.csv",
    test_fraction: float = 0.185,
    val_fraction: float = 0.2,
    seed: int = 42,
    num_grades: int = 5,
) -> dict[str, list[dict]]:
    """FGADR Seg-set grading datalist (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    folder = root / images_dir
    if not folder.is_dir():
        raise InputDataError(folder, "image folder missing")
    grades = _read_grades(root / grades_csv, num_grades)
    on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS
               and not p.name.startswith(".")}
    for name in grades:
        if name not in on_disk:
            raise InputDataError(folder / name, f"image graded in {grades_csv} but missing")
    ungraded = sorted(on_disk - set(grades))
    if ungraded:
        raise InputDataError(folder / ungraded[0], f"image not graded in {grades_csv}")
    names = sorted(grades)
    entries = [{"image": _rel(folder / n, root), "label": grades[n], "case": Path(n).stem} for n in names]
    labels = [e["label"] for e in entries]
    test_idx = set(random_split(len(entries), test_fraction, seed, labels))
    rest = [e for i, e in enumerate(entries) if i not in test_idx]
    val_idx = set(random_split(len(rest), val_fraction, seed + 1, [e["label"] for e in rest]))
    return {
        "training": [e for i, e in enumerate(rest) if i not in val_idx],
        "validation": [e for i, e in enumerate(rest) if i in val_idx],
        "test": [e for i, e in enumerate(entries) if i in test_idx],
    }


CLASS_DATALIST_BUILDERS = {"brain_tumor": brain_tumor_datalist, "fgadr": fgadr_datalist}


def prepare_class_datalist(dataset: str, root: str | os.PathLike, out: str | os.PathLike, check_images: bool = True,
                           **kwargs: Any) -> Path:
    """Build the datalist of ``dataset`` (``brain_tumor`` or ``fgadr``), decode every image once, write ``out``.

    Keyword arguments go to the builder (``None`` values are left at the builder's default). The
    images that decoded are remembered in ``<out stem>.checked.json`` (size and modification time),
    so a re-run only decodes new or changed files.
    """
    if dataset not in CLASS_DATALIST_BUILDERS:
        raise ValueError(f"dataset must be one of {sorted(CLASS_DATALIST_BUILDERS)}, got {dataset!r}")
    datalist = CLASS_DATALIST_BUILDERS[dataset](root, **{k: v for k, v in kwargs.items() if v is not None})
    if not datalist["training"]:
        raise InputDataError(root, f"no {dataset} training images left after the validation split")
    if check_images:
        out = Path(out)
        check_datalist_images(datalist, root, out.with_name(out.stem + ".checked.json"))
    return write_datalist(datalist, out)


class FundusTrainAugment:
    """FGADR training augmentation of the reference on an ImageNet-normalised item: random crop, flip, autocontrast.

    ``item["image"]`` (3, H, W) -> a random ``crop`` x ``crop`` window, horizontally flipped with
    probability ``flip_prob``, and with probability ``autocontrast_prob`` each channel stretched to the
    full [0, 1] range (torchvision's ``RandomAutocontrast``: computed on the un-normalised values, then
    normalised again). Random numbers from ``torch``'s global generator (seeded by the bundle).
    """

    def __init__(self, crop: int = 480, flip_prob: float = 0.5, autocontrast_prob: float = 0.2) -> None:
        self.crop, self.flip_prob, self.autocontrast_prob = int(crop), float(flip_prob), float(autocontrast_prob)

    def __call__(self, item: dict) -> dict:
        import torch

        from custom_components.data.image_folders import IMAGENET_MEAN, IMAGENET_STD

        image = item["image"]
        h, w = image.shape[-2:]
        if h < self.crop or w < self.crop:
            raise ValueError(f"image {h}x{w} is smaller than the crop {self.crop}")
        top = int(torch.randint(0, h - self.crop + 1, (1,)))
        left = int(torch.randint(0, w - self.crop + 1, (1,)))
        image = image[..., top:top + self.crop, left:left + self.crop]
        if float(torch.rand(())) < self.flip_prob:
            image = image.flip(-1)
        if float(torch.rand(())) < self.autocontrast_prob:
            mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
            x = image * std + mean
            lo = x.amin(dim=(-2, -1), keepdim=True)
            hi = x.amax(dim=(-2, -1), keepdim=True)
            x = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)
            image = (x - mean) / std
        return {**item, "image": image.contiguous()}


__all__ += ["FundusTrainAugment"]
