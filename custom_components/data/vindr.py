"""VinDr-CXR (and the NIH ChestX-ray14 box list) for 2-D detection (spec ``lvmmed.md`` section 4 "Detection").

**Release layout** (``dataset_dir``):

* ``train.csv`` with the columns ``image_id, class_name, rad_id, x_min, y_min, x_max, y_max`` (any
  order; an optional ``class_id`` must agree with the class name), one row per box and reader;
  ``No finding`` rows have empty box fields;
* images as ``train/<image_id>.dicom`` (or ``.dcm``; read with ITK, ``MONOCHROME1`` inverted) or
  ``train/<image_id>.png`` (grey or RGB, 8 or 16 bit). Box coordinates are pixels of that image.

**Classes** (:data:`CLASSES`, VinDr-CXR's ``class_id`` order 0-13; ``No finding`` is 14 in the CSV).

**Fusion.** The boxes of the readers (``rad_id``) of one image are fused per class with weighted
boxes fusion (:func:`~custom_components.detection.wbf.weighted_boxes_fusion`, ``iou_thr=0.2``,
``skip_box_thr=1e-4`` as LVM-Med's ``convert_to_coco.py``), one source per reader.

**Negatives.** An image whose rows are all ``No finding`` has no box; LVM-Med drops such images,
this project keeps them by default (``keep_no_finding=True``) as negatives (they teach the detector
the background and are part of the test set a user meets); ``False`` reproduces the paper.

**Split.** Images in the order of their first CSV row, the first 70 % train, the next 10 %
validation, the rest test (LVM-Med computed a shuffle but never used it; spec section 6).

**Prepared store** (``output_dir``): ``images/<image_id>.png`` (grey uint8, resized to
``image_size`` x ``image_size``, bilinear), one ``images/<image_id>.json`` marker per image (original
size, fused boxes rescaled to the prepared image, labels) written after its PNG, both atomically, so
an interrupted preparation resumes where it stopped; ``datalist.json`` with ``training``,
``validation`` and ``test`` lists of ``{"image", "box", "label", "image_id"}``, boxes
``[x_min, y_min, x_max, y_max]`` in prepared pixels; ``prepare.json`` records the settings (another
setting on the same folder is refused unless ``overwrite=True``).

Every check raises :class:`~custom_components.io.InputDataError` naming the file (and row): an
unknown class name, a ``class_id`` that disagrees with it, a box that is not 4 numbers with
``x_min < x_max`` and ``y_min < y_max``, a box outside its image (by more than ``box_tolerance``
pixels), an unreadable DICOM/PNG, an image missing for a CSV row.

The NIH ChestX-ray14 box list (``BBox_List_2017.csv``, 8 findings; :func:`prepare_nih_boxes`) is
read with :func:`custom_components.data.nihcxr14.read_bbox_list` and prepared into the same store
layout (every boxed image, CSV order, same 70/10/20 split).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from custom_components.io import InputDataError, atomic_save_json, atomic_write

__all__ = [
    "CLASSES",
    "NO_FINDING",
    "VinDrBox",
    "read_vindr_csv",
    "fuse_readers",
    "find_vindr_image",
    "read_grey_image",
    "check_inside",
    "csv_order_split",
    "prepare_vindr",
    "prepare_nih_boxes",
    "NIH_BOX_CLASSES",
    "load_datalist",
    "class_names",
]

CLASSES = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
NO_FINDING = "No finding"
NO_FINDING_ID = 14
REQUIRED_COLUMNS = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
IMAGE_SUFFIXES = (".png", ".dicom", ".dcm")
_RECORD = "prepare.json"
_DATALIST = "datalist.json"


@dataclass(frozen=True)
class VinDrBox:
    rad_id: str
    label: int  # index into CLASSES
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max (pixels of the original image)


def _number(path: Path, where: str, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputDataError(path, f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputDataError(path, f"{where}: {column} {text!r} is not finite")
    return value


def read_vindr_csv(path: str | os.PathLike) -> dict[str, list[VinDrBox]]:
    """``train.csv`` as ``{image_id: [VinDrBox, ...]}`` in first-appearance order ("No finding": ``[]``)."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "annotation table does not exist")
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        raise InputDataError(path, f"cannot read ({e.strerror})") from e
    out: dict[str, list[VinDrBox]] = {}
    with handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise InputDataError(path, f"header lacks column(s) {', '.join(missing)} (got {', '.join(header) or 'nothing'})")
        col = {name: header.index(name) for name in header}
        for line, row in enumerate(reader, start=2):
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(header):
                raise InputDataError(path, f"row {line}: {len(row)} fields, the header has {len(header)}")
            where = f"row {line}"
            image_id, name = row[col["image_id"]].strip(), row[col["class_name"]].strip()
            if not image_id:
                raise InputDataError(path, f"{where}: empty image_id")
            if name == NO_FINDING:
                label = NO_FINDING_ID
            elif name in CLASSES:
                label = CLASSES.index(name)
            else:
                known = ", ".join((*CLASSES, NO_FINDING))
                raise InputDataError(path, f"{where}: unknown class name {name!r} (VinDr-CXR: {known})")
            if "class_id" in col and row[col["class_id"]].strip() and row[col["class_id"]].strip() != str(label):
                raise InputDataError(path, f"{where}: class_id {row[col['class_id']].strip()} does not match {name!r} ({label})")
            boxes = out.setdefault(image_id, [])
            if label == NO_FINDING_ID:
                continue
            coords = [_number(path, where, c, row[col[c]].strip()) for c in ("x_min", "y_min", "x_max", "y_max")]
            if not (coords[0] < coords[2] and coords[1] < coords[3]):
                raise InputDataError(path, f"{where}: box {coords} needs x_min < x_max and y_min < y_max")
            boxes.append(VinDrBox(row[col["rad_id"]].strip(), label, tuple(coords)))
    if not out:
        raise InputDataError(path, "no annotation rows")
    return out


def fuse_readers(
    boxes: Sequence[VinDrBox], iou_thr: float = 0.2, skip_box_thr: float = 1e-4
) -> tuple[list[list[float]], list[int]]:
    """WBF of the readers' boxes of one image (one source per ``rad_id``, score 1): boxes and labels."""
    from custom_components.detection.wbf import weighted_boxes_fusion

    if not boxes:
        return [], []
    readers = sorted({b.rad_id for b in boxes})
    boxes_list = [[list(b.box) for b in boxes if b.rad_id == r] for r in readers]
    labels_list = [[b.label for b in boxes if b.rad_id == r] for r in readers]
    fused, _, labels = weighted_boxes_fusion(boxes_list, None, labels_list, iou_thr=iou_thr, skip_box_thr=skip_box_thr)
    return [[float(v) for v in b] for b in fused], [int(v) for v in labels]


def find_vindr_image(image_dir: Path, image_id: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        p = image_dir / f"{image_id}{suffix}"
        if p.is_file():
            return p
    raise InputDataError(image_dir / f"{image_id}.png", f"image of CSV id {image_id!r} not found (.png, .dicom or .dcm)")


def _read_dicom(path: Path) -> np.ndarray:
    import itk

    try:
        image = itk.imread(str(path))
        arr = np.asarray(itk.array_view_from_image(image), dtype=np.float32)
        meta = dict(image)
        photometric = str(meta.get("0028|0004", "")).strip()
    except Exception as e:  # ITK raises RuntimeError / its own exceptions for anything unreadable
        raise InputDataError(path, f"unreadable DICOM ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputDataError(path, f"DICOM is not a 2-D image (shape {arr.shape})")
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    return np.round(arr * 255.0).astype(np.uint8)


def read_grey_image(path: str | os.PathLike) -> np.ndarray:
    """A DICOM or PNG as a 2-D uint8 array (H, W); an unreadable file raises naming it."""
    path = Path(path)
    if path.suffix.lower() in (".dicom", ".dcm"):
        return _read_dicom(path)
    from custom_components.data.nihcxr14 import _read_grey

    arr, full = _read_grey(path)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * (255.0 / full)), 0, 255).astype(np.uint8)
    return arr


def check_inside(boxes: Sequence[Sequence[float]], width: int, height: int, source: str | os.PathLike, what: str,
                 tolerance: float = 1.0) -> None:
    for x0, y0, x1, y1 in boxes:
        if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
            raise InputDataError(source, f"{what}: box [x_min, y_min, x_max, y_max] = {[x0, y0, x1, y1]} "
                                         f"is outside the {width}x{height} image")


def csv_order_split(ids: Sequence[str], fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> dict[str, list[str]]:
    """First ``fractions[0]`` of ``ids`` (rounded) for training, the next ``fractions[1]`` for validation, the rest test."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    n = len(ids)
    n_train = int(round(fractions[0] * n))
    n_val = min(int(round(fractions[1] * n)), n - n_train)
    return {"training": list(ids[:n_train]), "validation": list(ids[n_train:n_train + n_val]),
            "test": list(ids[n_train + n_val:])}


def _start_store(out: Path, settings: dict, overwrite: bool) -> None:
    record_path = out / _RECORD
    record = None
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = None
    images = out / "images"
    if isinstance(record, dict) and record.get("settings") == settings and not overwrite:
        return
    if images.is_dir() and any(images.iterdir()) and not overwrite:
        why = f"was prepared with {record['settings']}" if isinstance(record, dict) and "settings" in record else \
            f"holds images but no {_RECORD}"
        raise InputDataError(out, f"the store {why}, not {settings}; pass overwrite=True or use another output_dir")
    if images.is_dir():
        shutil.rmtree(images)
    atomic_save_json({"settings": settings}, record_path)


def _prepare_one(src: Path, image_id: str, boxes: list[list[float]], labels: list[int], out: Path, size: int,
                 source_csv: Path, tolerance: float) -> dict[str, Any]:
    """Read, check, resize and store one image (resumable: an existing marker is reused)."""
    from PIL import Image

    marker = out / "images" / f"{image_id}.json"
    if marker.is_file():
        try:
            return json.loads(marker.read_text())
        except ValueError:
            pass  # a marker is written atomically; an unreadable one is rewritten below
    arr = read_grey_image(src)
    height, width = arr.shape
    check_inside(boxes, width, height, source_csv, f"image {image_id} ({src.name})", tolerance)
    sx, sy = size / width, size / height
    scaled = [[round(min(max(x0 * sx, 0.0), size), 3), round(min(max(y0 * sy, 0.0), size), 3),
               round(min(max(x1 * sx, 0.0), size), 3), round(min(max(y1 * sy, 0.0), size), 3)] for x0, y0, x1, y1 in boxes]
    for box in scaled:  # a zero-area box would make every background anchor its low-quality match
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            raise InputDataError(source_csv, f"image {image_id} ({src.name}): box {box} has no area on the "
                                 f"{size} x {size} prepared image (a box on the image border?)")  # fmt: skip
    im = Image.fromarray(arr)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    with atomic_write(out / "images" / f"{image_id}.png", suffix=".png") as tmp:
        im.save(tmp, format="PNG")
    entry = {"image": f"images/{image_id}.png", "box": scaled, "label": labels, "image_id": image_id,
             "original_size": [width, height]}
    atomic_save_json(entry, marker)
    return entry


def _prepare_items(items: list[tuple[str, Path, list[list[float]], list[int]]], out: Path, image_size: int,
                   source_csv: Path, tolerance: float, split: dict[str, list[str]], settings: dict, overwrite: bool,
                   progress: bool, desc: str) -> Path:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    _start_store(out, settings, overwrite)
    entries = {}
    for image_id, src, boxes, labels in tqdm(items, desc=desc, unit="image", disable=not progress):
        entry = _prepare_one(src, image_id, boxes, labels, out, int(image_size), source_csv, tolerance)
        entries[image_id] = {k: entry[k] for k in ("image", "box", "label", "image_id")}
    datalist = {key: [entries[i] for i in ids] for key, ids in split.items()}
    datalist["classes"] = settings["classes"]
    path = atomic_save_json(datalist, out / _DATALIST)
    return path


def prepare_vindr(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int = 512,
    csv_name: str = "train.csv",
    image_dir: str = "train",
    iou_thr: float = 0.2,
    skip_box_thr: float = 1e-4,
    keep_no_finding: bool = True,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    box_tolerance: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare VinDr-CXR into ``output_dir`` (see the module docstring); returns the datalist path."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    table = root / csv_name
    annotations = read_vindr_csv(table)
    images = root / image_dir
    if not images.is_dir():
        raise InputDataError(images, "image folder does not exist")
    items = []
    for image_id, boxes in annotations.items():
        if not boxes and not keep_no_finding:
            continue
        fused, labels = fuse_readers(boxes, iou_thr, skip_box_thr)
        items.append((image_id, find_vindr_image(images, image_id), fused, labels))
    split = csv_order_split([i[0] for i in items], fractions)
    settings = {"dataset": "vindr", "image_size": int(image_size), "iou_thr": float(iou_thr),
                "skip_box_thr": float(skip_box_thr), "keep_no_finding": bool(keep_no_finding),
                "fractions": [float(f) for f in fractions], "classes": list(CLASSES), "csv": csv_name}
    return _prepare_items(items, Path(output_dir), image_size, table, box_tolerance, split, settings, overwrite,
                          progress, "prepare VinDr-CXR")


def _nih_box_classes() -> tuple[str, ...]:
    from custom_components.data.nihcxr14 import BOX_FINDINGS

    return tuple(BOX_FINDINGS)


NIH_BOX_CLASSES = _nih_box_classes()


def prepare_nih_boxes(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int = 512,
    bbox_list: str = "BBox_List_2017.csv",
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    box_tolerance: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """NIH ChestX-ray14 box list as a detection store: the 8 box findings (:data:`NIH_BOX_CLASSES`),
    one reader (no fusion), every boxed image in CSV order, 70/10/20 split; returns the datalist path."""
    from custom_components.data.nihcxr14 import find_images, read_bbox_list

    root = Path(dataset_dir)
    table = root / bbox_list
    boxes = read_bbox_list(table)
    found = find_images(root)
    items = []
    for name, per_finding in boxes.items():
        if name not in found:
            raise InputDataError(table, f"image {name} of the box list is not in images/ or images_NNN/images/")
        b, lab = [], []
        for finding, bs in per_finding.items():
            if finding not in NIH_BOX_CLASSES:
                raise InputDataError(table, f"{name}: {finding!r} is not one of the 8 box findings")
            for x, y, w, h in bs:
                b.append([x, y, x + w, y + h])
                lab.append(NIH_BOX_CLASSES.index(finding))
        items.append((Path(name).stem, found[name], b, lab))
    split = csv_order_split([i[0] for i in items], fractions)
    settings = {"dataset": "nih_boxes", "image_size": int(image_size), "fractions": [float(f) for f in fractions],
                "classes": list(NIH_BOX_CLASSES), "csv": bbox_list}
    return _prepare_items(items, Path(output_dir), image_size, table, box_tolerance, split, settings, overwrite,
                          progress, "prepare NIH box list")


def load_datalist(path: str | os.PathLike, key: str, base_dir: str | os.PathLike) -> list[dict]:
    """Entries of ``key`` with absolute image paths (boxes and labels as stored)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(path, f"unreadable datalist ({type(e).__name__})") from e
    if key not in data:
        raise InputDataError(path, f"no {key!r} list")
    return [{**e, "image": str(Path(base_dir) / e["image"])} for e in data[key]]


def class_names(datalist: str | os.PathLike | Mapping) -> list[str]:
    data = datalist if isinstance(datalist, Mapping) else json.loads(Path(datalist).read_text())
    return list(data["classes"])
