"""NIH ChestX-ray14: reading, checking and preparing the release for HAM (spec ``ham.md`` sections 5, 7, 8, 10).

**Findings** (:data:`FINDINGS`, the standard order of Wang et al. 2017 and CheXNet): the 8
ChestX-ray8 findings that carry boxes, then the 6 added in ChestX-ray14::

    0 Atelectasis  1 Cardiomegaly  2 Effusion  3 Infiltration  4 Mass  5 Nodule  6 Pneumonia
    7 Pneumothorax  8 Consolidation  9 Edema  10 Emphysema  11 Fibrosis  12 Pleural_Thickening  13 Hernia

so the box findings are indices 0-7 (:data:`BOX_FINDINGS`). ``No Finding`` is the all-zero vector.

**Release layout** read by :func:`prepare_nihcxr14` (``dataset_dir``):

* images in ``images/`` or in the download batches ``images_001/images/`` ... ``images_012/images/``
  (a name found twice is an error);
* ``Data_Entry_2017.csv`` (2017: 11 fields + a trailing empty field) or ``Data_Entry_2017_v2020.csv``
  (11 fields), parsed by position (:func:`read_data_entry`); with both present the 2017 table
  (the one HAM used) is read, ``data_entry=`` picks another;
* ``BBox_List_2017.csv`` (first six fields by position, ``Infiltrate`` -> ``Infiltration``;
  :func:`read_bbox_list`) or HAM's ``Annotations/BBoxes.json`` via ``boxes_json=`` (:func:`read_ham_boxes`);
* ``train_val_list.txt`` and ``test_list.txt`` (optional: without them the official split is not written).

Every check raises :class:`~custom_components.io.InputDataError` naming the file (and row):
an unreadable or truncated PNG, a box outside its image (by more than ``box_tolerance`` pixels),
a box with ``w`` or ``h`` <= 0, an unknown finding name, a CSV row whose image is missing (or
``missing_images="skip"`` to prepare the images present), a box or list name without a
``Data_Entry`` row, a name in both lists, duplicate rows.

**Prepared store** (``output_dir``): ``images/<name>.png`` (grey uint8, ``dtype="uint8"``) or
``images/<name>.npy`` (float16 in [0, 1], ``dtype="float16"``), resized once to
``image_size`` x ``image_size`` (bilinear, PIL; the reference's test transform resizes to 512²
without cropping). Each image is written atomically (temporary name, then rename), so an image
file under its final name is complete: a killed or repeated preparation skips the images that
exist and removes the temporaries a killed run left. ``prepare.json`` records the settings
(written before the first image, so a store is never filled with two sizes) and, at the end,
the counts and notes (list counts against the release's) and, under ``missing``, every name
left out: CSV rows in neither split list, rows / list names / box images without an image,
images without a row, boxes of a finding the image's labels do not list.

**Datalists** (Decathlon style, paths relative to ``output_dir``, one entry per line), entries::

    {"image": "images/00000032_037.png", "case": "00000032_037", "patient": "32",
     "label": [14 x 0/1], "has_boxes": 0/1, "tag": [14 x 0/1], "flag": 0/1,
     "boxes": {"Infiltration": [[x, y, w, h], ...]}}

``boxes`` are in pixels of the prepared image (``image_size``), ``{}`` without boxes; ``tag`` is
the spec's tag (section 4): 1 where the image has a box of the class, and the label itself for
an image without boxes; ``flag`` is 1 iff the image's boxes supervise training: 1 for the
box-supervised training images and for every validation / test entry (explicit split kinds
instead of the reference's always-true ``elif``, spec section 10), 0 for the other training images.

* ``datalist_official.json``: ``training`` / ``validation`` from ``train_val_list`` (project
  choice: a seeded patient-level ``val_fraction`` = 10 % validation split; ``select_on_test``
  reproduces the reference, which selects on ``test_list``), ``test`` = ``test_list``,
  ``test_boxes`` = every box image (the reference's test_bboxs, 880). No box supervision in training.
* ``datalist_nobox.json``: ``training`` = every image without boxes (train_wo_bbox, 111,240),
  ``test`` = the box images; ``validation`` as above (seeded patient-level from training, or
  the test set with ``select_on_test``). ``exclude_test_patients`` also drops the other images
  of the box patients from training (off by default: the reference keeps them).
* ``datalist_box_fold{k}.json`` (k = 1..5): the box images are dealt to ``n_folds`` folds
  patient-wise (no patient in two folds); fold k's ``test`` = its box images, ``box_supervised``
  = the other folds' box images (flag 1, also in ``training``), ``training`` adds
  ``unannotated_fraction`` (50 %) of the patients without boxes, drawn patient-wise once for
  all folds, minus the patients of fold k's test set (patient-wise: a test patient has no image
  in training); ``validation`` = a seeded patient-level ``val_fraction`` of those unannotated
  patients (never a box patient), or fold k's test set with ``select_on_test``. The reference's
  published fold lists (HAM ``ImageSets``) are image lists whose patient grouping is not
  established; :func:`datalist_from_lists` builds a datalist from such lists instead.

**CRF refinement** (spec section 5, ``Using_CRF``, off by default in the reference) is not
implemented: ``pydensecrf`` is not installable here (its only release, 1.0rc3 of 2018, is a
source package whose Cython code no longer compiles with Cython 3: ``'eigen.pxd' not found``);
a fork ``pydensecrf2`` exists only as a source package needing a C++ build. ``crf=True``
raises an error saying so.

**CheXpert boxes** (HAM ``datasets/CheXpert/Annotations/BBoxes.json``, [xmin, ymin, xmax, ymax])
are read by :func:`read_chexpert_boxes` into [x, y, w, h] with spellings normalised
(:data:`CHEXPERT_ALIASES`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from custom_components.io import InputDataError, atomic_save_json, atomic_write, atomic_write_text, remove_stale_temporaries

__all__ = [
    "FINDINGS",
    "BOX_FINDINGS",
    "NO_FINDING",
    "BOX_LABEL_ALIASES",
    "DATA_ENTRY_HEADER",
    "RELEASE_COUNTS",
    "CHEXPERT_FINDINGS",
    "CHEXPERT_ALIASES",
    "FORMAT_VERSION",
    "EntryRow",
    "label_vector",
    "find_images",
    "find_data_entry",
    "read_data_entry",
    "read_bbox_list",
    "read_ham_boxes",
    "read_chexpert_boxes",
    "normalise_chexpert_finding",
    "read_image_list",
    "compare_boxes",
    "check_boxes",
    "rescale_boxes",
    "boxes_to_masks",
    "BoxMasksd",
    "patient_folds",
    "patient_val_split",
    "make_entry",
    "datalist_from_lists",
    "write_datalist",
    "prepare_nihcxr14",
]

#: the 14 findings in the standard order (Wang et al. 2017 / CheXNet): the 8 box findings first
FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
#: the 8 findings of ``BBox_List_2017.csv`` (indices 0-7 of :data:`FINDINGS`)
BOX_FINDINGS: tuple[str, ...] = FINDINGS[:8]
NO_FINDING = "No Finding"
#: spellings of the box list mapped to :data:`FINDINGS`
BOX_LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}
#: the 11 positional fields of ``Data_Entry_2017*.csv`` (the bracketed headers span two fields each)
DATA_ENTRY_HEADER: tuple[str, ...] = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)  # fmt: skip
#: sizes of the full release (spec sections 7 and 8)
RELEASE_COUNTS: dict[str, int] = {"data_entry": 112120, "train_val": 86524, "test": 25596, "boxes": 984, "box_images": 880}
#: the 14 CheXpert observations (canonical spellings)
CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip
#: CheXpert spelling variants beyond case, ``_``, ``-`` and spaces (which are folded: ``edema`` is Edema);
#: the variant named in the spec (section 7). An unknown name raises, naming the known ones.
CHEXPERT_ALIASES: dict[str, str] = {"enlarg cardiomediastinum": "Enlarged Cardiomediastinum"}
#: 1: the first store layout (``prepare.json`` "format")
FORMAT_VERSION = 1
_DTYPES = {"uint8": ".png", "float16": ".npy"}
_STORE_RECORD = "prepare.json"
_INDEX = "index.json"
_IMAGE_DIR = "images"
_BATCH_DIR = re.compile(r"^images_\d{3}$")


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip()).lower()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class EntryRow:
    """One row of ``Data_Entry_2017*.csv`` (``line`` = its line in the file, for messages)."""

    image: str
    findings: tuple[str, ...]
    follow_up: int
    patient: str
    age: int
    gender: str
    view: str
    original_size: tuple[int, int]
    spacing: tuple[float, float]
    line: int

    @property
    def label(self) -> list[int]:
        return label_vector(self.findings)


def label_vector(findings: Iterable[str]) -> list[int]:
    """14-vector (order :data:`FINDINGS`) with 1 for each finding named; ``No Finding`` adds nothing."""
    names = set(findings)
    return [int(f in names) for f in FINDINGS]


def _csv_rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row, the header included."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for fields in reader:
                if fields and any(f.strip() for f in fields):
                    yield reader.line_num, [f.strip() for f in fields]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputDataError(path, f"cannot read CSV ({type(e).__name__}: {e})") from e


def _number(path: Path, line: int, column: str, text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)):
        raise InputDataError(path, f"row {line}: {column} {text!r} is not a {'number' if kind is float else 'whole number'}")
    return value


def _findings(path: Path, line: int, text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split("|") if t.strip()]
    if not names:
        raise InputDataError(path, f"row {line}: empty Finding Labels (expected names or {NO_FINDING!r})")
    if NO_FINDING in names:
        if len(names) > 1:
            raise InputDataError(path, f"row {line}: {NO_FINDING!r} together with findings: {text!r}")
        return ()
    unknown = [n for n in names if n not in FINDINGS]
    if unknown:
        raise InputDataError(path, f"row {line}: unknown finding {unknown[0]!r} (known: {', '.join(FINDINGS)}, {NO_FINDING})")
    return tuple(f for f in FINDINGS if f in names)


def read_data_entry(path: str | os.PathLike) -> dict[str, EntryRow]:
    """Rows of ``Data_Entry_2017.csv`` / ``Data_Entry_2017_v2020.csv`` by image name, parsed by position.

    The header must be the 11 NIH fields (:data:`DATA_ENTRY_HEADER`); a row has 11 fields after one
    empty trailing field is dropped (the 2017 table's trailing comma). Ages may be ``58`` or ``058Y``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "Data_Entry CSV does not exist")
    rows: dict[str, EntryRow] = {}
    header_seen = False
    for line, fields in _csv_rows(path):
        if len(fields) > 1 and not fields[-1]:
            fields = fields[:-1]  # the 2017 table's trailing comma (spacing y is never empty)
        if not header_seen:
            header_seen = True
            if tuple(fields) != DATA_ENTRY_HEADER:
                raise InputDataError(
                    path, f"header is not the NIH Data_Entry header ({', '.join(DATA_ENTRY_HEADER)}): got {', '.join(fields)}"
                )
            continue
        if len(fields) != 11:
            raise InputDataError(path, f"row {line}: {len(fields)} fields, expected 11 (+ an empty trailing field)")
        image = fields[0]
        if not image:
            raise InputDataError(path, f"row {line}: empty Image Index")
        if image in rows:
            raise InputDataError(path, f"row {line}: {image} already listed in row {rows[image].line}")
        age_text = re.sub(r"^(\d+)[YMD]$", r"\1", fields[4])
        rows[image] = EntryRow(
            image=image,
            findings=_findings(path, line, fields[1]),
            follow_up=_number(path, line, "Follow-up #", fields[2], int),
            patient=str(_number(path, line, "Patient ID", fields[3], int)),
            age=_number(path, line, "Patient Age", age_text, int),
            gender=fields[5],
            view=fields[6],
            original_size=(_number(path, line, "width", fields[7], int), _number(path, line, "height", fields[8], int)),
            spacing=(_number(path, line, "spacing x", fields[9], float), _number(path, line, "spacing y", fields[10], float)),
            line=line,
        )
    if not rows:
        raise InputDataError(path, "no image rows")
    return rows


def _box_finding(path: Path, where: str, name: str) -> str:
    name = BOX_LABEL_ALIASES.get(name.strip(), name.strip())
    if name not in FINDINGS:
        raise InputDataError(
            path, f"{where}: unknown finding {name!r} (box findings: {', '.join(BOX_FINDINGS)}; Infiltrate = Infiltration)"
        )
    return name


def _four_numbers(path: Path, where: str, values: Any) -> list[float]:
    try:
        box = [float(v) for v in values]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise InputDataError(path, f"{where}: box {values!r} is not 4 finite numbers")
    return box


def _box(path: Path, where: str, values: Any) -> list[float]:
    box = _four_numbers(path, where, values)
    if box[2] <= 0 or box[3] <= 0:
        raise InputDataError(path, f"{where}: box [x, y, w, h] = {box} has w or h <= 0")
    return box


def read_bbox_list(path: str | os.PathLike) -> dict[str, dict[str, list[list[float]]]]:
    """``BBox_List_2017.csv`` as ``{image: {finding: [[x, y, w, h], ...]}}`` (original pixels).

    The header is literally ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the first six fields
    are read by position and any further field must be empty. ``Infiltrate`` becomes ``Infiltration``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "box list does not exist")
    out: dict[str, dict[str, list[list[float]]]] = {}
    header_seen = False
    for line, fields in _csv_rows(path):
        if not header_seen:
            header_seen = True
            if fields[:3] != ["Image Index", "Finding Label", "Bbox [x"]:
                raise InputDataError(path, f"header is not 'Image Index,Finding Label,Bbox [x,y,w,h],,,': got {','.join(fields)}")
            continue
        if len(fields) < 6 or any(fields[6:]):
            raise InputDataError(path, f"row {line}: expected 6 fields (image, finding, x, y, w, h), got {len(fields)}")
        where = f"row {line}"
        finding = _box_finding(path, where, fields[1])
        out.setdefault(fields[0], {}).setdefault(finding, []).append(_box(path, where, fields[2:6]))
    return out


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputDataError(path, f"{what} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputDataError(path, f"cannot read {what} ({type(e).__name__}: {e})") from e


def _boxes_json(path: Path, what: str) -> dict[str, dict[str, list]]:
    data = _read_json(path, what)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputDataError(path, f'{what}: expected {{"<image>": {{"<finding>": [[4 numbers], ...]}}}}')
    for image, per_class in data.items():
        for finding, boxes in per_class.items():
            if not isinstance(boxes, list) or not boxes or not all(isinstance(b, list) for b in boxes):
                raise InputDataError(path, f"{image} / {finding}: expected a non-empty list of boxes")
    return data


def read_ham_boxes(path: str | os.PathLike) -> dict[str, dict[str, list[list[float]]]]:
    """HAM's ``Annotations/BBoxes.json`` (NIH): ``{image: {finding: [[x, y, w, h], ...]}}``, checked."""
    path = Path(path)
    out: dict[str, dict[str, list[list[float]]]] = {}
    for image, per_class in _boxes_json(path, "boxes JSON").items():
        for finding, boxes in per_class.items():
            name = _box_finding(path, str(image), str(finding))
            out.setdefault(str(image), {}).setdefault(name, []).extend(_box(path, f"{image} / {finding}", b) for b in boxes)
    return out


def normalise_chexpert_finding(name: str, source: str | os.PathLike = "CheXpert boxes") -> str:
    """Canonical CheXpert spelling (:data:`CHEXPERT_FINDINGS`) of ``name``; unknown names raise."""
    key = _fold(name)
    for canonical in CHEXPERT_FINDINGS:
        if _fold(canonical) == key:
            return canonical
    if key in CHEXPERT_ALIASES:
        return CHEXPERT_ALIASES[key]
    raise InputDataError(source, f"unknown CheXpert finding {name!r} (known: {', '.join(CHEXPERT_FINDINGS)})")


def read_chexpert_boxes(path: str | os.PathLike) -> dict[str, dict[str, list[list[float]]]]:
    """HAM's CheXpert ``BBoxes.json`` (keyed by relative image path; boxes [xmin, ymin, xmax, ymax]).

    Returns ``{path: {finding: [[x, y, w, h], ...]}}`` with spellings normalised by
    :func:`normalise_chexpert_finding`; a box with xmax <= xmin or ymax <= ymin raises.
    """
    path = Path(path)
    out: dict[str, dict[str, list[list[float]]]] = {}
    for image, per_class in _boxes_json(path, "CheXpert boxes JSON").items():
        key = str(image).replace("\\", "/")
        for finding, boxes in per_class.items():
            name = normalise_chexpert_finding(str(finding), path)
            for b in boxes:
                where = f"{image} / {finding} (box [xmin, ymin, xmax, ymax] = {b})"
                x0, y0, x1, y1 = _four_numbers(path, where, b)
                out.setdefault(key, {}).setdefault(name, []).append(_box(path, where, [x0, y0, x1 - x0, y1 - y0]))
    return out


def compare_boxes(
    a: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    b: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    tolerance: float = 1e-6,
) -> list[str]:
    """Differences between two box tables (images, findings, boxes as multisets); ``[]`` if they agree."""
    out = []
    for image in sorted(set(a) | set(b)):
        if image not in a or image not in b:
            out.append(f"{image}: only in the {'first' if image in a else 'second'} table")
            continue
        for finding in sorted(set(a[image]) | set(b[image])):
            ba = sorted(map(list, a[image].get(finding, [])))
            bb = sorted(map(list, b[image].get(finding, [])))
            same = len(ba) == len(bb) and all(
                all(abs(u - v) <= tolerance for u, v in zip(x, y, strict=True)) for x, y in zip(ba, bb, strict=True)
            )
            if not same:
                out.append(f"{image} / {finding}: {ba} vs {bb}")
    return out


def read_image_list(path: str | os.PathLike) -> list[str]:
    """Image names of a split list (one per line; blank lines skipped); a repeated name raises."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "image list does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputDataError(path, f"cannot read image list ({type(e).__name__}: {e})") from e
    names: dict[str, int] = {}
    for i, text in enumerate(lines, 1):
        name = text.strip()
        if not name:
            continue
        if name in names:
            raise InputDataError(path, f"line {i}: {name} already listed on line {names[name]}")
        names[name] = i
    return list(names)


def find_images(dataset_dir: str | os.PathLike) -> dict[str, Path]:
    """Image name -> file, from ``images/`` and ``images_NNN/images/`` (or ``images_NNN/``)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    folders = []
    if (root / _IMAGE_DIR).is_dir():
        folders.append(root / _IMAGE_DIR)
    for batch in sorted(p for p in root.iterdir() if p.is_dir() and _BATCH_DIR.match(p.name)):
        folders.append(batch / _IMAGE_DIR if (batch / _IMAGE_DIR).is_dir() else batch)
    found: dict[str, Path] = {}
    for folder in folders:
        for p in folder.iterdir():
            if p.suffix.lower() != ".png" or p.name.startswith(".") or not p.is_file():
                continue
            if p.name in found:
                raise InputDataError(p, f"image {p.name} is also in {found[p.name].parent}")
            found[p.name] = p
    if not found:
        raise InputDataError(root, "no PNG images in images/ or images_NNN/images/")
    return found


def find_data_entry(dataset_dir: str | os.PathLike, data_entry: str | os.PathLike | None = None) -> Path:
    """The ``Data_Entry`` table: ``data_entry`` if given, else the 2017 table, else the v2020 one."""
    root = Path(dataset_dir)
    if data_entry is not None:
        path = Path(data_entry)
        path = path if path.is_absolute() or path.exists() else root / path
        if not path.is_file():
            raise InputDataError(path, "Data_Entry CSV does not exist")
        return path
    for name in ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"):
        if (root / name).is_file():
            others = [p.name for p in sorted(root.glob("Data_Entry_2017*.csv")) if p.name != name]
            if others:
                print(f"note: reading {name}; also present: {', '.join(others)} (choose with --data_entry)")
            return root / name
    found = sorted(root.glob("Data_Entry_2017*.csv"))
    if len(found) == 1:
        return found[0]
    raise InputDataError(root, "no Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv); pass --data_entry" if not found
                         else f"several Data_Entry tables ({', '.join(p.name for p in found)}); pass --data_entry")


# --------------------------------------------------------------------------- boxes


def check_boxes(
    boxes: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    sizes: Mapping[str, tuple[int, int]],
    source: str | os.PathLike,
    tolerance: float = 1.0,
) -> None:
    """Raise if a box leaves its image ((width, height) in ``sizes``) by more than ``tolerance`` pixels."""
    for image, per_class in boxes.items():
        width, height = sizes[image]
        for finding, bs in per_class.items():
            for x, y, w, h in bs:
                if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
                    raise InputDataError(
                        source, f"{image} / {finding}: box [x, y, w, h] = {[x, y, w, h]} is outside the {width}x{height} image"
                    )


def rescale_boxes(
    boxes: Mapping[str, Sequence[Sequence[float]]], from_size: Sequence[int], to_size: Sequence[int], digits: int = 3
) -> dict[str, list[list[float]]]:
    """Boxes of one image from ``from_size`` = (W, H) to ``to_size`` = (W', H') pixels, clipped to the image."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    out = {}
    for finding, bs in boxes.items():
        scaled = []
        for x, y, w, h in bs:
            x0, y0 = max(x * sx, 0.0), max(y * sy, 0.0)
            x1, y1 = min((x + w) * sx, float(to_size[0])), min((y + h) * sy, float(to_size[1]))
            scaled.append([round(x0, digits), round(y0, digits), round(x1 - x0, digits), round(y1 - y0, digits)])
        out[finding] = scaled
    return out


def boxes_to_masks(
    boxes: Mapping[str, Sequence[Sequence[float]]], size: Sequence[int], classes: Sequence[str] = FINDINGS
) -> np.ndarray:
    """uint8 masks (len(classes), H, W): channel c is the union of class c's ``[x, y, w, h]`` boxes.

    ``size`` = (W, H). A pixel is inside a box when its centre lies in [x, x + w) x [y, y + h)
    (so an integer box covers w·h pixels; the reference's ``mask[y:y+h, x:x+w] = 1``).
    Box findings not in ``classes`` raise ``KeyError``.
    """
    from custom_components.data.image_folders import rasterise_boxes

    index = {c: i for i, c in enumerate(classes)}
    width, height = int(size[0]), int(size[1])
    masks = np.zeros((len(classes), height, width), dtype=np.uint8)
    for finding, bs in boxes.items():
        if finding not in index:
            raise KeyError(f"box finding {finding!r} is not one of the classes {list(classes)}")
        masks[index[finding]] = rasterise_boxes(bs, (width, height))
    return masks


class BoxMasksd:
    """Dictionary transform: ``data[boxes_key]`` ({finding: [[x, y, w, h]]}) -> ``data[mask_key]`` (C, H, W) float32.

    ``spatial_size`` = (H, W) of the image the boxes were drawn on (the prepared size); ``None``
    takes the last two dimensions of ``data[image_key]``. ``order="yx"`` gives row-major masks
    (H, W), as NumPy / PIL read a PNG; ``order="xy"`` gives (W, H), as MONAI's ``LoadImage``
    reads a PNG by default (``reverse_indexing=True``). The boxes key is removed (a dict of
    variable-length lists does not collate) unless ``keep_boxes``.
    """

    def __init__(self, boxes_key: str = "boxes", mask_key: str = "box_mask", spatial_size: Sequence[int] | None = None,
                 image_key: str = "image", classes: Sequence[str] = FINDINGS, order: str = "yx", keep_boxes: bool = False):
        if order not in ("yx", "xy"):
            raise ValueError(f"order must be 'yx' or 'xy', got {order!r}")
        self.boxes_key, self.mask_key, self.image_key = boxes_key, mask_key, image_key
        self.spatial_size = None if spatial_size is None else tuple(int(v) for v in spatial_size)
        self.classes, self.order, self.keep_boxes = tuple(classes), order, bool(keep_boxes)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        d = dict(data)
        if self.spatial_size is not None:
            height, width = self.spatial_size
        else:
            shape = tuple(d[self.image_key].shape[-2:])
            height, width = shape if self.order == "yx" else shape[::-1]
        masks = boxes_to_masks(d.get(self.boxes_key) or {}, (width, height), self.classes)
        if self.order == "xy":
            masks = masks.transpose(0, 2, 1)
        d[self.mask_key] = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
        if not self.keep_boxes:
            d.pop(self.boxes_key, None)
        return d


# --------------------------------------------------------------------------- splits


def _draw_patients(patients: Iterable[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of ``patients`` (rounded; at least one while two or more are left)."""
    ids = sorted(set(patients), key=lambda p: (len(p), p))
    if fraction <= 0 or not ids:
        return set()
    n = int(round(len(ids) * fraction))
    if n == 0 and len(ids) > 1:
        n = 1
    n = min(n, len(ids) - 1) if fraction < 1 else len(ids)
    order = np.random.default_rng(int(seed)).permutation(len(ids))
    return {ids[i] for i in order[:n]}


def patient_val_split(
    names: Sequence[str], patient_of: Mapping[str, str], fraction: float = 0.1, seed: int = 0,
    exclude_patients: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """Split ``names`` into (training, validation) patient-wise: a seeded ``fraction`` of the patients validates.

    Patients in ``exclude_patients`` stay in training. Depends on the set of patients, not on the order.
    """
    excluded = set(exclude_patients)
    val_patients = _draw_patients((patient_of[n] for n in names if patient_of[n] not in excluded), fraction, seed)
    return [n for n in names if patient_of[n] not in val_patients], [n for n in names if patient_of[n] in val_patients]


def patient_folds(names: Sequence[str], patient_of: Mapping[str, str], n_folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Deal ``names`` to ``n_folds`` folds patient-wise (no patient in two folds), sizes balanced.

    Patients are shuffled with ``seed``, then taken largest first (stable) and each goes to the
    fold with the fewest images so far (lowest index on ties). Each fold's names are sorted.
    """
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(patient_of[n], []).append(n)
    if len(groups) < n_folds:
        raise ValueError(f"{len(groups)} patients cannot fill {n_folds} patient-wise folds")
    ids = sorted(groups, key=lambda p: (len(p), p))
    shuffled = [ids[i] for i in np.random.default_rng(int(seed)).permutation(len(ids))]
    shuffled.sort(key=lambda p: -len(groups[p]))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for p in shuffled:
        target = min(range(n_folds), key=lambda k: (len(folds[k]), k))
        folds[target].extend(groups[p])
    return [sorted(f) for f in folds]


# --------------------------------------------------------------------------- datalists


def make_entry(
    name: str, patient: str, findings: Iterable[str], rel_image: str,
    boxes: Mapping[str, Sequence[Sequence[float]]] | None, flag: int,
) -> dict[str, Any]:
    """One datalist entry (see the module docstring); ``boxes`` already in prepared-image pixels."""
    label = label_vector(findings)
    boxes = {f: [list(b) for b in bs] for f, bs in (boxes or {}).items()}
    tag = [int(f in boxes) for f in FINDINGS] if boxes else list(label)
    return {
        "image": rel_image,
        "case": Path(name).stem,
        "patient": str(patient),
        "label": label,
        "has_boxes": int(bool(boxes)),
        "tag": tag,
        "flag": int(flag),
        "boxes": boxes,
    }


def write_datalist(datalist: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Write a datalist atomically, one entry per line (a 112,120-image list stays readable and small)."""
    parts = []
    for key, entries in datalist.items():
        body = ",\n".join("    " + json.dumps(e) for e in entries)
        parts.append(f"  {json.dumps(key)}: [\n{body}\n  ]" if entries else f"  {json.dumps(key)}: []")
    return atomic_write_text("{\n" + ",\n".join(parts) + "\n}\n", path)


@dataclass
class _Index:
    """What the datalist builders need: patient and findings per image, prepared-pixel boxes, the file suffix."""

    patient: dict[str, str]
    findings: dict[str, tuple[str, ...]]
    boxes: dict[str, dict[str, list[list[float]]]]
    suffix: str

    def entries(self, names: Iterable[str], flag: int | Mapping[str, int]) -> list[dict[str, Any]]:
        return [
            make_entry(n, self.patient[n], self.findings[n], f"{_IMAGE_DIR}/{Path(n).stem}{self.suffix}", self.boxes.get(n),
                       flag if isinstance(flag, int) else flag.get(n, 0))
            for n in names
        ]

    def patients(self, names: Iterable[str]) -> set[str]:
        return {self.patient[n] for n in names}

    def validation(self, training: list[str], test: list[str], val_fraction: float, seed: int, select_on_test: bool,
                   exclude_patients: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        if select_on_test:
            return training, list(test)
        return patient_val_split(training, self.patient, val_fraction, seed, exclude_patients)

    def to_json(self) -> dict[str, Any]:
        return {"suffix": self.suffix, "patient": self.patient, "findings": {n: list(f) for n, f in self.findings.items()},
                "boxes": self.boxes}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Index:
        return cls(dict(data["patient"]), {n: tuple(f) for n, f in data["findings"].items()}, dict(data["boxes"]),
                   str(data["suffix"]))


def _official(index: _Index, train_val: list[str], test: list[str], val_fraction: float, seed: int,
              select_on_test: bool) -> dict[str, list[dict]]:
    training, validation = index.validation(train_val, test, val_fraction, seed, select_on_test)
    return {
        "training": index.entries(training, 0),
        "validation": index.entries(validation, 1),
        "test": index.entries(test, 1),
        "test_boxes": index.entries(sorted(index.boxes), 1),
    }


def _nobox(index: _Index, names: list[str], val_fraction: float, seed: int, select_on_test: bool,
           exclude_test_patients: bool) -> dict[str, list[dict]]:
    box_names = sorted(index.boxes)
    test_patients = index.patients(box_names) if exclude_test_patients else set()
    training = [n for n in names if n not in index.boxes and index.patient[n] not in test_patients]
    training, validation = index.validation(training, box_names, val_fraction, seed, select_on_test)
    return {"training": index.entries(training, 0), "validation": index.entries(validation, 1),
            "test": index.entries(box_names, 1)}


def _box_fold(index: _Index, fold: int, folds: list[list[str]], names: list[str], unannotated_patients: set[str],
              val_fraction: float, seed: int, select_on_test: bool, exclude_test_patients: bool) -> dict[str, list[dict]]:
    test = folds[fold - 1]
    supervised = sorted(n for k, f in enumerate(folds) if k != fold - 1 for n in f)
    test_patients = index.patients(test) if exclude_test_patients else set()
    unannotated = [n for n in names if n not in index.boxes and index.patient[n] in unannotated_patients
                   and index.patient[n] not in test_patients]
    unannotated, validation = index.validation(unannotated, test, val_fraction, seed, select_on_test,
                                               index.patients(supervised))
    in_training = set(unannotated) | set(supervised)
    return {
        "training": index.entries([n for n in names if n in in_training], dict.fromkeys(supervised, 1)),
        "box_supervised": index.entries(supervised, 1),
        "validation": index.entries(validation, 1),
        "test": index.entries(test, 1),
    }


def datalist_from_lists(
    store_dir: str | os.PathLike,
    training: Sequence[str],
    test: Sequence[str],
    box_supervised: Sequence[str] = (),
    validation: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """A datalist from image-name lists (e.g. HAM's ``ImageSets``) over a prepared store.

    ``box_supervised`` images get ``flag`` 1 and are added to training; ``validation`` ``None``
    draws a seeded patient-level ``val_fraction`` from training (never a box-supervised patient).
    Every name must be an image of the store (the first that is not raises).
    """
    store = Path(store_dir)
    index_path = store / _INDEX
    if not index_path.is_file():
        raise InputDataError(index_path, "not a prepared NIH ChestX-ray14 store (run prepare first)")
    index = _Index.from_json(_read_json(index_path, "store index"))
    for what, names in (("training", training), ("test", test), ("box_supervised", box_supervised),
                        ("validation", validation or ())):
        unknown = [n for n in names if n not in index.patient]
        if unknown:
            raise InputDataError(store, f"{what} list: {len(unknown)} names are not images of this store, e.g. {unknown[0]}")
    supervised = list(dict.fromkeys(box_supervised))
    train = list(dict.fromkeys([*training, *supervised]))
    if validation is None:
        train, validation = patient_val_split(train, index.patient, val_fraction, seed, index.patients(supervised))
    return {
        "training": index.entries(train, dict.fromkeys(supervised, 1)),
        "box_supervised": index.entries(supervised, 1),
        "validation": index.entries(validation, 1),
        "test": index.entries(test, 1),
    }


# --------------------------------------------------------------------------- release


@dataclass
class _Release:
    """The checked tables of one release folder."""

    images: dict[str, Path]
    entry_path: Path
    rows: dict[str, EntryRow]  # rows with an image
    box_path: Path
    boxes: dict[str, dict[str, list[list[float]]]]  # original pixels, images present only
    sizes: dict[str, tuple[int, int]]  # (W, H) of the box images
    lists: dict[str, list[str]]  # "train_val" / "test" -> names present (both or neither)
    listed: dict[str, int]  # names per list file


def _read_release(root: Path, data_entry: str | os.PathLike | None, boxes_json: str | os.PathLike | None,
                  missing_images: str, box_tolerance: float, note: Any) -> _Release:
    images = find_images(root)
    entry_path = find_data_entry(root, data_entry)
    all_rows = read_data_entry(entry_path)
    missing = [n for n in all_rows if n not in images]
    if missing and missing_images == "error":
        r = all_rows[missing[0]]
        raise InputDataError(entry_path, f"row {r.line}: image {r.image} not found in images/ or images_NNN/images/"
                             f" ({len(missing)} rows without an image; missing_images='skip' prepares the images present)")
    if missing:
        note(f"{len(missing)} of {len(all_rows)} rows of {entry_path.name} have no image (skipped): {_short(missing)}",
             "rows_without_image", missing)
    rows = {n: r for n, r in all_rows.items() if n in images}
    unlisted = sorted(set(images) - set(all_rows))
    if unlisted:
        note(f"{len(unlisted)} images have no row in {entry_path.name} (ignored): {_short(unlisted)}",
             "images_without_row", unlisted)

    box_path = Path(boxes_json) if boxes_json is not None else root / "BBox_List_2017.csv"
    if boxes_json is not None:
        boxes = read_ham_boxes(box_path)
    elif box_path.is_file():
        boxes = read_bbox_list(box_path)
    else:
        boxes = {}
        note(f"no {box_path.name}: no image has boxes")
    for name in boxes:
        if name not in all_rows:
            raise InputDataError(box_path, f"boxes for {name}, which has no row in {entry_path.name}")
    gone = sorted(n for n in boxes if n not in rows)
    if gone:
        note(f"{len(gone)} box images are missing (skipped): {_short(gone)}", "box_images_without_image", gone)
    boxes = {n: boxes[n] for n in sorted(boxes) if n in rows}
    sizes = {n: _image_size(images[n]) for n in boxes}
    check_boxes(boxes, sizes, box_path, box_tolerance)
    n_boxes = sum(len(bs) for per in boxes.values() for bs in per.values())
    off_label = [f"{n} / {f}" for n, per in boxes.items() for f in per if f not in rows[n].findings]
    if off_label:
        note(f"{len(off_label)} boxes are of a finding the image's labels do not list: {_short(off_label)}",
             "boxes_of_unlabelled_findings", off_label)
    if len(all_rows) == RELEASE_COUNTS["data_entry"] and boxes_json is None and (len(boxes), n_boxes) != (880, 984):
        note(f"{box_path.name}: {n_boxes} boxes on {len(boxes)} images; the NIH release has 984 on 880")

    lists: dict[str, list[str]] = {}
    listed: dict[str, int] = {}
    files = {"train_val": root / "train_val_list.txt", "test": root / "test_list.txt"}
    present = {k: p for k, p in files.items() if p.is_file()}
    if len(present) < 2:
        note(("only " + next(iter(present.values())).name + " is present" if present else
              "no train_val_list.txt / test_list.txt") + ": the official split is not written")
        return _Release(images, entry_path, rows, box_path, boxes, sizes, {}, {})
    seen: dict[str, str] = {}
    for key, path in files.items():
        names = read_image_list(path)
        for i, n in enumerate(names, 1):
            if n not in all_rows:
                raise InputDataError(path, f"entry {i}: {n} has no row in {entry_path.name}")
            if n in seen:
                raise InputDataError(path, f"entry {i}: {n} is also in {seen[n]}")
            seen[n] = path.name
        gone = [n for n in names if n not in rows]
        if gone:
            note(f"{len(gone)} names of {path.name} have no image (skipped): {_short(gone)}", f"{key}_list_without_image", gone)
        lists[key] = [n for n in names if n in rows]
        listed[key] = len(names)
        if len(all_rows) == RELEASE_COUNTS["data_entry"] and len(names) != RELEASE_COUNTS[key]:
            note(f"{path.name} holds {len(names)} names; the NIH release {RELEASE_COUNTS[key]}")
    neither = [n for n in rows if n not in seen]
    if neither:
        note(f"{len(neither)} rows of {entry_path.name} are in neither list (left out of the official split): {_short(neither)}",
             "in_neither_list", neither)
    return _Release(images, entry_path, rows, box_path, boxes, sizes, lists, listed)


# --------------------------------------------------------------------------- store


def _read_record(out: Path) -> dict | None:
    path = out / _STORE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_grey(path: Path) -> tuple[np.ndarray, float]:
    """Decode the whole image as a 2-D array and its full-scale value (255 or 65535); raise naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                return arr, 65535.0 if arr.max(initial=0) > 255 else 255.0
            if im.mode != "L":
                im = im.convert("L")  # RGBA / RGB / P copies of some NIH images
            return np.asarray(im), 255.0
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise InputDataError(path, f"corrupt or truncated image file ({type(e).__name__}: {' '.join(str(e).split())})") from e


def _prepare_image(task: tuple[str, str, int, str]) -> None:
    """Read, resize and write one image atomically (module level: picklable for worker processes)."""
    from PIL import Image

    src, dst, size, dtype = Path(task[0]), Path(task[1]), int(task[2]), task[3]
    arr, full = _read_grey(src)
    if dtype == "uint8":
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr * (255.0 / full)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        with atomic_write(dst, suffix=".png") as tmp:
            im.save(tmp, format="PNG")
    else:
        im = Image.fromarray(arr.astype(np.float32) / full, mode="F")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        with atomic_write(dst, suffix=".npy") as tmp:
            np.save(tmp, np.clip(np.asarray(im), 0.0, 1.0).astype(np.float16))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # as in _read_grey
        raise InputDataError(path, f"cannot read image header ({type(e).__name__}: {' '.join(str(e).split())})") from e


def _start_store(out: Path, settings: dict, overwrite: bool) -> None:
    """Check (or write) the store's settings record before any image is written."""
    record = _read_record(out)
    images = out / _IMAGE_DIR
    if record is not None and record.get("settings") == settings and not overwrite:
        return
    if images.is_dir() and any(images.iterdir()) and not overwrite:
        why = (f"was prepared with {record['settings']}" if record is not None and "settings" in record
               else f"holds images but no {_STORE_RECORD}")
        raise InputDataError(
            out, f"the store {why}, not {settings}; pass overwrite=True to re-prepare it, or use another output_dir"
        )
    if images.is_dir():
        shutil.rmtree(images)
    atomic_save_json({"settings": settings}, out / _STORE_RECORD)


def _run_tasks(tasks: list[tuple[str, str, int, str]], num_workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="prepare NIH ChestX-ray14", unit="image", disable=not progress)
    try:
        if num_workers > 0 and len(tasks) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                for _ in pool.map(_prepare_image, tasks, chunksize=16):
                    bar.update()
        else:
            for task in tasks:
                _prepare_image(task)
                bar.update()
    finally:
        bar.close()


def _short(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _fold_list(folds: int | str | Sequence[int] | None, n_folds: int) -> list[int]:
    if folds is None:
        return list(range(1, n_folds + 1))
    values = [int(v) for v in (str(folds).split(",") if isinstance(folds, (int, str)) else folds)]
    bad = [k for k in values if not 1 <= k <= n_folds]
    if bad:
        raise ValueError(f"folds are numbered 1..{n_folds}, got {bad}")
    return values


def prepare_nihcxr14(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int = 512,
    dtype: str = "uint8",
    data_entry: str | os.PathLike | None = None,
    boxes_json: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    select_on_test: bool = False,
    n_folds: int = 5,
    folds: int | str | Sequence[int] | None = None,
    unannotated_fraction: float = 0.5,
    exclude_test_patients: bool | None = None,
    box_tolerance: float = 1.0,
    missing_images: str = "error",
    crf: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Check the release, prepare the image store and write the datalists (see the module docstring).

    Returns ``{"official": path, "nobox": path, "box_fold1": path, ..., "record": prepare.json}``
    (``official`` only with both split lists, ``box_fold*`` only with box images of at least
    ``n_folds`` patients). ``folds`` (1-based, e.g. ``1`` or ``"1,3"``; default all) chooses the
    box folds written; ``exclude_test_patients`` defaults to False for the no-box split (as the
    reference) and True for the folds (patient-wise). ``missing_images="skip"`` prepares the
    images present and drops the rows, boxes and list names of missing ones instead of raising.
    Resumable and atomic (see the module docstring); ``overwrite`` redoes every image.
    """
    from custom_components.runs.lock import acquire_run_lock, release_run_lock

    if crf:
        raise InputDataError("--crf", "CRF box refinement (spec section 5) is not available: pydensecrf does not build here "
                             "(its 2018 source release fails under Cython 3); prepare without --crf (the reference default)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if missing_images not in ("error", "skip"):
        raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not (0 <= val_fraction < 1 and 0 <= unannotated_fraction <= 1):
        raise ValueError("val_fraction must be in [0, 1) and unannotated_fraction in [0, 1]")
    wanted_folds = _fold_list(folds, n_folds)
    root, out = Path(dataset_dir), Path(output_dir)
    notes: list[str] = []
    missing: dict[str, list[str]] = {}

    def note(text: str, key: str | None = None, names: Sequence[str] = ()) -> None:
        notes.append(text)
        if key is not None:
            missing[key] = list(names)
        print(f"note: {text}")

    release = _read_release(root, data_entry, boxes_json, missing_images, float(box_tolerance), note)
    rows = release.rows
    names = list(rows)
    settings = {"format": FORMAT_VERSION, "image_size": image_size, "dtype": dtype, "resample": "bilinear"}
    out.mkdir(parents=True, exist_ok=True)
    acquire_run_lock(out)
    try:
        _start_store(out, settings, overwrite)
        img_dir = out / _IMAGE_DIR
        img_dir.mkdir(exist_ok=True)
        removed = remove_stale_temporaries(img_dir)
        if removed:
            print(f"note: removed {len(removed)} temporary files left by an interrupted preparation")
        suffix = _DTYPES[dtype]
        done = set() if overwrite else {p.name for p in img_dir.iterdir()}
        tasks = [(str(release.images[n]), str(img_dir / f"{Path(n).stem}{suffix}"), image_size, dtype)
                 for n in names if f"{Path(n).stem}{suffix}" not in done]
        if len(tasks) < len(names):
            print(f"note: {len(names) - len(tasks)} images were already prepared (skipped; overwrite=True redoes them)")
        _run_tasks(tasks, int(num_workers), progress)

        boxes = {n: rescale_boxes(b, release.sizes[n], (image_size, image_size)) for n, b in release.boxes.items()}
        index = _Index({n: r.patient for n, r in rows.items()}, {n: r.findings for n, r in rows.items()}, boxes, suffix)
        datalists: dict[str, dict[str, list[dict]]] = {}
        if release.lists:
            datalists["official"] = _official(index, release.lists["train_val"], release.lists["test"], val_fraction, seed,
                                              select_on_test)
            in_train = sorted(set(boxes) & set(release.lists["train_val"]))
            if in_train:
                note(f"{len(in_train)} box images are in train_val_list (trained on without boxes): {_short(in_train)}")
        datalists["nobox"] = _nobox(index, names, val_fraction, seed, select_on_test, bool(exclude_test_patients))
        if not datalists["nobox"]["training"]:
            note("every image has boxes: the no-box split has no training image")
        if len(index.patients(boxes)) >= n_folds:
            box_folds = patient_folds(sorted(boxes), index.patient, n_folds, seed)
            unannotated = _draw_patients(index.patients(n for n in names if n not in boxes), unannotated_fraction, seed)
            for k in wanted_folds:
                datalists[f"box_fold{k}"] = _box_fold(index, k, box_folds, names, unannotated, val_fraction, seed, select_on_test,
                                                      exclude_test_patients is not False)
        elif boxes:
            note(f"box images of {len(index.patients(boxes))} patients cannot fill {n_folds} patient-wise folds: "
                 "no box folds written")
        written = {key: write_datalist(dl, out / f"datalist_{key}.json") for key, dl in datalists.items()}
        atomic_write_text(json.dumps(index.to_json(), separators=(",", ":")) + "\n", out / _INDEX)
        n_boxes = sum(len(bs) for per in boxes.values() for bs in per.values())
        record = {
            "settings": settings,
            "source": {"dataset_dir": str(root.resolve()), "data_entry": release.entry_path.name,
                       "boxes": release.box_path.name, "lists": {f"{k}_list.txt": n for k, n in release.listed.items()}},
            "options": {"val_fraction": val_fraction, "seed": seed, "select_on_test": bool(select_on_test), "n_folds": n_folds,
                        "unannotated_fraction": unannotated_fraction, "exclude_test_patients": exclude_test_patients},
            "counts": {"images": len(rows), "box_images": len(boxes), "boxes": n_boxes,
                       **{k: len(v) for k, v in release.lists.items()}},
            "datalists": {k: {s: len(v) for s, v in dl.items()} for k, dl in datalists.items()},
            "notes": notes,
            "missing": missing,
        }
        written["record"] = atomic_save_json(record, out / _STORE_RECORD)
        for key, dl in datalists.items():
            print(f"datalist {key}: {written[key]}: " + ", ".join(f"{s} {len(v)}" for s, v in dl.items()))
    finally:
        release_run_lock(out)
    return written
