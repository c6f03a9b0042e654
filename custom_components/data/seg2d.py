"""2-D segmentation datasets of the LVM-Med downstream protocol (spec lvmmed.md section 4): Kvasir-SEG, BUSI, ISIC.

Layouts read (``dataset_dir``):

- ``kvasir``: ``images/<id>.jpg`` + ``masks/<id>.jpg`` (the Kvasir-SEG release; masks are JPEG,
  so their values spread around 0 and 255).
- ``busi``: ``<class>/<name>.png`` + ``<class>/<name>_mask.png`` (Dataset_BUSI_with_GT; classes
  ``benign``, ``malignant``, ``normal``). Extra masks ``<name>_mask_1.png``, ``_mask_2.png`` ... are
  summed (union) with the first, as the reference does. The reference (and the default here) uses
  benign + malignant only (``busi_classes``).
- ``isic``: ``ISIC_<id>.jpg`` images and ``ISIC_<id>_segmentation.png`` masks, in any folders
  under ``dataset_dir`` (ISIC 2018 task 1 keeps them in separate input / ground-truth folders).

Mask values. PNG masks must hold exactly two values, 0 and 255 (or 0 and 1): anything else is an
error naming the file. JPEG masks (Kvasir) are binarised as the reference does, < 50 -> 0 and
> 200 -> 1; the reference leaves the values in between unchanged (a label 50..200 that its loss
would then see as a class index). Here they are counted and split at 128; a mask with more than
``max_mid_fraction`` (default 1 %) of such pixels is not a JPEG-compressed binary mask and is an
error. (The real Kvasir-SEG sample has none; JPEG ringing gives a few per edge pixel.)

Preparation (:func:`prepare_seg2d`) resizes every image and mask to ``image_size``² once (nearest,
as the reference) into ``<output_dir>/images/<case>.png`` (RGB uint8) and ``masks/<case>.png``
(uint8 0/1), each written atomically, the image last, so an interrupted run resumes where it
stopped; ``prepare.json`` records the settings and ``datalist.json`` the split
(``training``/``validation``/``test`` with ``image``, ``label``, ``case``, ``source``). The split is a
seeded random split in the reference's proportions 0.64 / 0.16 / 0.2 (Kvasir 640 / 160 / 200, BUSI
413 / 104 / 130), or the reference's split file (``{"train": [...], "val": [...], "test": [...]}`` of
image file names, e.g. LVM-Med's ``files_split/Kvasir.json``) given as ``split_file``.

Bad inputs stop with one :class:`~custom_components.io.InputDataError` line naming the file: an
unreadable image or mask, an image without a mask (or a mask without an image), a mask whose size
differs from its image, mask values other than the layout's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from custom_components.data.splits import random_split
from custom_components.io import InputDataError, atomic_save_json, atomic_write

__all__ = [
    "LAYOUTS",
    "SEG2D_RATIOS",
    "Seg2DCase",
    "find_cases",
    "read_image",
    "read_mask",
    "prepare_seg2d",
    "INPUT_SCALINGS",
    "scale_input",
    "ScaleInputd",
]

LAYOUTS = ("kvasir", "busi", "isic")
#: the reference's split proportions (Kvasir 640/160/200, BUSI 413/104/130)
SEG2D_RATIOS = (0.64, 0.16, 0.2)
JPEG_LOW, JPEG_HIGH = 50, 200
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_PREPARE_VERSION = 1


@dataclass
class Seg2DCase:
    case: str  # file-name-safe id, unique in the dataset
    image: Path
    masks: list[Path] = field(default_factory=list)
    group: str = ""  # BUSI class


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _kvasir_cases(root: Path) -> list[Seg2DCase]:
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise InputDataError(d, "Kvasir-SEG layout needs images/ and masks/ folders")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in _IMAGE_EXT}
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in _IMAGE_EXT}
    for stem in sorted(set(images) - set(masks)):
        raise InputDataError(images[stem], f"image without a mask (expected masks/{stem}.jpg)")
    for stem in sorted(set(masks) - set(images)):
        raise InputDataError(masks[stem], "mask without an image in images/")
    return [Seg2DCase(_safe(s), images[s], [masks[s]]) for s in sorted(images)]


_BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(_(?P<k>\d+))?$")


def _busi_cases(root: Path, classes: Sequence[str] | None) -> list[Seg2DCase]:
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if classes is not None:
        missing = [c for c in classes if not (root / c).is_dir()]
        if missing:
            raise InputDataError(root / missing[0], "BUSI class folder does not exist")
        folders = [root / c for c in classes]
    cases: list[Seg2DCase] = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
        images = {p.stem: p for p in files if not _BUSI_MASK.match(p.stem)}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for p in files:
            m = _BUSI_MASK.match(p.stem)
            if m:
                masks.setdefault(m["stem"], []).append((int(m["k"] or 0), p))
        if not images:
            raise InputDataError(folder, "BUSI class folder holds no image")
        for stem in sorted(set(masks) - set(images)):
            raise InputDataError(masks[stem][0][1], "mask without an image")
        for stem, path in images.items():
            if stem not in masks:
                raise InputDataError(path, f"image without a mask (expected {stem}_mask.png)")
            case = stem if stem.lower().startswith(folder.name.lower()) else f"{folder.name}_{stem}"
            cases.append(Seg2DCase(_safe(case), path, [p for _, p in sorted(masks[stem])], folder.name))
    return cases


def _isic_cases(root: Path) -> list[Seg2DCase]:
    images = {p.stem: p for p in root.rglob("ISIC_*.jpg")}
    masks = {p.stem[: -len("_segmentation")]: p for p in root.rglob("ISIC_*_segmentation.png")}
    if not images:
        raise InputDataError(root, "no ISIC_*.jpg image found (ISIC layout)")
    for stem in sorted(set(images) - set(masks)):
        raise InputDataError(images[stem], f"image without a mask (expected {stem}_segmentation.png)")
    for stem in sorted(set(masks) - set(images)):
        raise InputDataError(masks[stem], "mask without an image")
    return [Seg2DCase(_safe(s), images[s], [masks[s]]) for s in sorted(images)]


def find_cases(dataset_dir: str | os.PathLike, layout: str = "kvasir",
               busi_classes: Sequence[str] | None = ("benign", "malignant")) -> list[Seg2DCase]:
    """The (image, masks) pairs of ``dataset_dir`` in ``layout``; unpaired files are errors."""
    root = Path(dataset_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    if layout == "kvasir":
        cases = _kvasir_cases(root)
    elif layout == "busi":
        cases = _busi_cases(root, busi_classes)
    else:
        cases = _isic_cases(root)
    if not cases:
        raise InputDataError(root, f"no image found ({layout} layout)")
    seen: dict[str, Path] = {}
    for c in cases:
        if c.case in seen:
            raise InputDataError(c.image, f"same case id {c.case!r} as {seen[c.case]}")
        seen[c.case] = c.image
    return cases


def _open(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
        return im
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputDataError(path, f"unreadable {what}: {e}") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) (grey images are repeated to 3 channels)."""
    return np.asarray(_open(Path(path), "image").convert("RGB"))


def _grey(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float32).mean(-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return np.asarray(arr)


def read_mask(path: str | os.PathLike, jpeg: bool, max_mid_fraction: float = 0.01,
              shape: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """A binary uint8 (H, W) mask and the number of pixels that were neither near 0 nor near 255.

    ``jpeg``: values < 50 -> 0, > 200 -> 1, values between split at 128 and counted (more than
    ``max_mid_fraction`` of the pixels is an error). Otherwise exactly {0, 255} or {0, 1}.
    ``shape``: the image's (H, W), checked first.
    """
    path = Path(path)
    arr = _grey(np.asarray(_open(path, "mask")), path)
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise InputDataError(
            path, f"mask size {arr.shape[1]}x{arr.shape[0]} differs from its image {shape[1]}x{shape[0]}"
        )
    if jpeg:
        mid = int(((arr >= JPEG_LOW) & (arr <= JPEG_HIGH)).sum())
        if mid > max_mid_fraction * arr.size:
            raise InputDataError(
                path, f"not a binary mask: {100.0 * mid / arr.size:.1f}% of pixels between {JPEG_LOW} and {JPEG_HIGH}"
            )
        return (arr >= 128).astype(np.uint8), mid
    values = np.unique(arr)
    if set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8), 0
    if set(values.tolist()) <= {0, 1}:
        return arr.astype(np.uint8), 0
    shown = ", ".join(str(int(v) if float(v).is_integer() else float(v)) for v in values[:6])
    raise InputDataError(path, f"mask values other than 0 and 255: {shown}{' ...' if len(values) > 6 else ''}")


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST))


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_write(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _prepare_case(case: Seg2DCase, out: Path, size: int, jpeg: bool, max_mid_fraction: float) -> int:
    image = read_image(case.image)
    mask = np.zeros(image.shape[:2], np.uint8)
    mid = 0
    for mpath in case.masks:
        m, n = read_mask(mpath, jpeg, max_mid_fraction, shape=image.shape[:2])
        mask |= m
        mid += n
    _save_png(_resize(mask, size), out / "masks" / f"{case.case}.png")
    _save_png(_resize(image, size), out / "images" / f"{case.case}.png")  # written last: the case marker
    return mid


def _reference_split(path: str | os.PathLike, cases: Sequence[Seg2DCase]) -> dict[str, list[str]]:
    """Map a reference split file (lists of image file names under train/val/test) onto case ids."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(path, f"unreadable split file: {e}") from None
    keys = {"training": ("train", "training"), "validation": ("val", "valid", "validation"), "test": ("test",)}
    by_name = {}
    for c in cases:
        by_name[c.image.name] = c.case
        by_name[c.image.stem] = c.case
    out: dict[str, list[str]] = {}
    for key, names in keys.items():
        listed = next((raw[k] for k in names if k in raw), [])
        unknown = [n for n in listed if Path(n).name not in by_name]
        if unknown:
            raise InputDataError(path, f"{len(unknown)} {key} images not in the dataset, e.g. {unknown[0]}")
        out[key] = [by_name[Path(n).name] for n in listed]
    if not out["training"]:
        raise InputDataError(path, "split file lists no training image")
    return out


def prepare_seg2d(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    layout: str = "kvasir",
    image_size: int = 224,
    seed: int = 0,
    ratios: Sequence[float] = SEG2D_RATIOS,
    split_file: str | os.PathLike | None = None,
    busi_classes: Sequence[str] | None = ("benign", "malignant"),
    max_mid_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare ``dataset_dir`` (``layout``) into ``output_dir``; returns ``output_dir/datalist.json``.

    Already prepared cases (with the same settings, ``prepare.json``) are skipped unless
    ``overwrite``; a store prepared with other settings is an error (choose another ``output_dir``).
    """
    from tqdm.auto import tqdm

    out = Path(output_dir)
    cases = find_cases(dataset_dir, layout, busi_classes)
    settings: dict[str, Any] = {
        "version": _PREPARE_VERSION,
        "layout": layout,
        "image_size": int(image_size),
        "busi_classes": list(busi_classes) if (layout == "busi" and busi_classes) else None,
        "jpeg_thresholds": [JPEG_LOW, JPEG_HIGH] if layout == "kvasir" else None,
        "max_mid_fraction": float(max_mid_fraction),
    }
    record = out / "prepare.json"
    # the settings are recorded before the first case, so an interrupted run resumes only with the same ones
    started = out / "prepare_settings.json"
    for path in (record, started):
        if path.is_file() and not overwrite:
            try:
                saved = json.loads(path.read_text()).get("settings")
            except (ValueError, AttributeError):
                raise InputDataError(path, "unreadable preparation record; use another output_dir or overwrite") from None
            if saved != settings:
                raise InputDataError(out, f"prepared with other settings ({saved}); use another output_dir or overwrite")
    atomic_save_json({"settings": settings}, started)
    jpeg = layout == "kvasir"
    mid_total = 0
    for case in tqdm(cases, desc=f"prepare {layout}", disable=not progress):
        done = (out / "images" / f"{case.case}.png").is_file() and (out / "masks" / f"{case.case}.png").is_file()
        if done and not overwrite:
            continue
        mid_total += _prepare_case(case, out, int(image_size), jpeg, max_mid_fraction)
    if split_file:
        splits = _reference_split(split_file, cases)
    else:
        splits = random_split([c.case for c in cases], ratios=tuple(ratios), seed=int(seed))
    by_id = {c.case: c for c in cases}
    root = Path(dataset_dir)
    datalist: dict[str, Any] = {}
    for key, ids in splits.items():
        datalist[key] = [
            {
                "image": f"images/{i}.png",
                "label": f"masks/{i}.png",
                "case": i,
                "source": by_id[i].image.relative_to(root).as_posix(),
            }
            for i in ids
        ]
    atomic_save_json(
        {
            "settings": settings,
            "n_cases": len(cases),
            "counts": {k: len(v) for k, v in datalist.items()},
            "split": str(split_file) if split_file else {"seed": int(seed), "ratios": list(ratios)},
            "mid_value_pixels_this_run": mid_total,
        },
        record,
    )
    path = out / "datalist.json"
    atomic_save_json(datalist, path)
    return path


#: ImageNet channel statistics (RGB, on [0, 1] values)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SCALINGS = ("imagenet", "unit", "reference_0_255")


def scale_input(image: Any, mode: str = "imagenet") -> Any:
    """Scale a (C, H, W) uint8-range image for the network (spec lvmmed.md section 6).

    ``imagenet`` (project default): /255 then ImageNet mean/std per channel. ``unit``: /255.
    ``reference_0_255``: the reference's per-image min-max to [0, 255] without normalisation.
    """
    import torch

    x = torch.as_tensor(image).float()
    if mode == "imagenet":
        c = x.shape[0]
        mean = torch.tensor(IMAGENET_MEAN[:c] if c == 3 else (sum(IMAGENET_MEAN) / 3,) * c).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD[:c] if c == 3 else (sum(IMAGENET_STD) / 3,) * c).view(-1, 1, 1)
        return (x / 255.0 - mean) / std
    if mode == "unit":
        return x / 255.0
    if mode == "reference_0_255":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) * 255.0 if hi > lo else torch.zeros_like(x)
    raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, got {mode!r}")


class ScaleInputd:
    """Dictionary transform applying :func:`scale_input` to ``keys`` (MONAI metadata is kept)."""

    def __init__(self, keys: str | Sequence[str] = "image", mode: str = "imagenet") -> None:
        if mode not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, got {mode!r}")
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.mode = mode

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.keys:
            value = d[key]
            scaled = scale_input(value, self.mode)
            if hasattr(value, "copy_meta_from"):  # MetaTensor: keep its metadata
                from monai.data import MetaTensor

                scaled = MetaTensor(scaled, meta=getattr(value, "meta", None))
            d[key] = scaled
        return d
