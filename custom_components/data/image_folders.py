"""Datalists and a 2-D dataset for the image-folder datasets of the ugent-korea study.

Spec ``explanations.md`` section 8 (Data, GT). Four datasets, each turned into a datalist
``{"training": [...], "validation": [...], "test": [...]}`` whose entries are
``{"image": REL, "label": 0|1, "case": ID}`` (+ ``"mask": REL`` for a binary PNG mask, or
``"boxes": [[x, y, w, h], ...]`` for a box annotation), with paths relative to ``root``.
Splits are patient-level (``case``) and deterministic from ``seed``; a case never occurs in two
splits (checked). Splits are stratified by the case label (= max label of its images).

* **Kvasir v2** (:func:`kvasir_datalist`): ``<root>/kvasir-dataset-v2/<class>/<image>.jpg``.
  Binary task ``positive`` (default ``esophagitis``, label 1) vs. ``negatives`` (default only
  ``normal-z-line``, label 0): the study's esophagitis task; the Z-line is the anatomical site
  of esophagitis, so this is the hard, clinically meaningful contrast. The class subset used by
  the study is not published (spec section 8); pass other classes to change it. Kvasir v2 has
  no patient IDs and no official split, so each image is its own case and the
  val/test fractions are carved image-level.
* **MURA v1.1** (:func:`mura_datalist`): the official ``{train,valid}_image_paths.csv`` and
  ``{train,valid}_labeled_studies.csv``; label 1 = abnormal study. The official ``valid`` split
  is our ``test`` (MURA's test set is hidden); ``validation`` is a seeded patient-level
  ``val_fraction`` of official ``train``. Case = patient ID (``patient00001``), shared across body
  parts; entries also carry ``"study"``.
* **CP-CHILD** (:func:`cp_child_datalist`): ``<root>/CP-CHILD-A|B/{Train,Test}/{Polyp,
  Non-Polyp}/*.jpg``; official Train/Test, ``validation`` carved from Train. No patient IDs are
  published: each image is its own case (``CP-CHILD-A/<stem>``).
* **DUKE** (:func:`duke_datalist`): the study's PNG slice layout is not established from public
  sources. Implemented is the simplest documented folder form ``<root>/{pos,neg}/
  <patient>_<slice>.png`` (patient = the name before the last ``_``), split patient-level with
  ``val_fraction`` / ``test_fraction``; ``balance=True`` subsamples positives to the number of
  negatives as the study's tutorial does.

Ground-truth masks (spec section 8 GT: not distributed; evaluate on whatever masks a datalist
provides): ``masks_dir`` holds binary PNGs named like the images (relative image path mirrored,
extension ``.png``); ``boxes_json`` maps relative image paths to ``[[x, y, w, h], ...]`` boxes in
original-image pixels, kept as ``"boxes"`` (rasterised by :class:`ImageFolderDataset`) or, with
``box_masks_dir``, rasterised once to PNG masks there (entry ``"mask"``).

:class:`ImageFolderDataset` reproduces the study's test transform: short side 256 then
CenterCrop 224 (MURA, Kvasir; ``resize_mode="short_side_crop"``) or Resize(224, 224) (DUKE,
CP-CHILD; ``resize_mode="resize"``), ImageNet mean/std; masks go through the same geometry
with nearest interpolation.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from custom_components.io import InputDataError, atomic_save_json, atomic_write

__all__ = [
    "KVASIR_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "kvasir_datalist",
    "mura_datalist",
    "cp_child_datalist",
    "duke_datalist",
    "write_datalist",
    "rasterise_boxes",
    "check_disjoint",
    "ImageFolderDataset",
    "DATALIST_BUILDERS",
    "prepare_datalist",
    "check_image_file",
    "check_datalist_images",
]

KVASIR_CLASSES = (
    "dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum",
    "normal-pylorus", "normal-z-line", "polyps", "ulcerative-colitis",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SPLITS = ("training", "validation", "test")


# --------------------------------------------------------------------------- helpers


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or absolute when it lies outside ``root``."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS
                  and not p.name.startswith("."))


def check_image_file(path: str | os.PathLike, what: str = "image") -> None:
    """Decode the whole file once; raise :class:`InputDataError` naming it if that fails.

    ``Image.verify()`` only parses headers and chunk checksums, so a JPEG cut short passes it and
    fails later, mid-epoch, inside a DataLoader worker. Decoding reads every byte. For JPEGs the
    decoder's DCT-domain downscale (``draft``) still entropy-decodes every block, so truncation
    and corrupt data are found at ~1/4 of a full decode (0.3 ms vs 1.25 ms for a 720 x 576 twin
    image, 0.4-1.3 ms vs 0.7-3.9 ms for real Kvasir-SEG JPEGs of 617 x 528 - 1348 x 1070).
    """
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(None, (1, 1))
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise InputDataError(path, f"corrupt or truncated {what} file ({type(e).__name__}: {e})") from e


def _check_image(path: Path, check_images: bool) -> None:
    if not path.is_file():
        raise InputDataError(path, "image listed but missing")
    if check_images:
        check_image_file(path)


def _checked_record(datalist_out: Path) -> Path:
    """Where :func:`prepare_datalist` remembers which files decoded (beside the datalist)."""
    return datalist_out.with_name(datalist_out.stem + ".checked.json")


def check_datalist_images(datalist: Mapping[str, Sequence[dict]], root: str | os.PathLike,
                          record: str | os.PathLike | None = None) -> int:
    """Decode every image and mask of ``datalist`` once (:func:`check_image_file`); return how many were decoded.

    ``record`` (JSON) remembers the files that decoded by absolute path, size and modification
    time, so a re-run (every bundle run prepares its datalist) only decodes new or changed files
    and otherwise costs one ``stat`` per file. It is written even when a file fails, so fixing
    that file does not re-check the others.
    """
    root = Path(root)
    record = Path(record) if record is not None else None
    done: dict[str, list[int]] = {}
    if record is not None and record.is_file():
        try:
            loaded = json.loads(record.read_text())
            done = {str(k): list(v) for k, v in loaded.get("files", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError):
            done = {}  # an unreadable record only costs a re-check
    checked: dict[str, list[int]] = {}
    n_decoded = 0
    complete = False
    try:
        for entries in datalist.values():
            for e in entries:
                for key in ("image", "mask"):
                    if key not in e:
                        continue
                    path = root / e[key]
                    name = str(path.resolve())
                    if name in checked:
                        continue
                    try:
                        st = path.stat()
                    except OSError as err:
                        raise InputDataError(path, f"{key} listed but unreadable ({type(err).__name__}: {err})") from err
                    stamp = [int(st.st_size), int(st.st_mtime_ns)]
                    if done.get(name) != stamp:
                        check_image_file(path, key)
                        n_decoded += 1
                    checked[name] = stamp
        complete = True
    finally:
        # a complete pass keeps only this datalist's files; a failed one also keeps the earlier
        # record, whose files not reached yet need no new decode (their stamps are re-checked)
        files = checked if complete else {**done, **checked}
        if record is not None and files != done:
            atomic_save_json({"format": 1, "check": "PIL decode", "files": files}, record)
    return n_decoded


def _split_cases(case_labels: Mapping[str, int], fractions: Sequence[float], seed: int) -> list[set[str]]:
    """Deterministic stratified split of case IDs into ``len(fractions) + 1`` groups.

    Per label stratum the sorted cases are permuted with ``seed``; the first
    ``round(n * f)`` (at least 1 while more than one case is left) go to each of ``fractions``
    in turn, the rest to the last group.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {tuple(fractions)}")
    groups: list[set[str]] = [set() for _ in range(len(fractions) + 1)]
    rng = np.random.default_rng(seed)
    for label in sorted(set(case_labels.values())):
        cases = sorted(c for c, y in case_labels.items() if y == label)
        order = [cases[i] for i in rng.permutation(len(cases))]
        start = 0
        for g, f in enumerate(fractions):
            n = int(round(len(cases) * f))
            if n == 0 and f > 0 and len(cases) - start > 1:
                n = 1  # a small stratum still gives one case to every requested split
            groups[g].update(order[start:start + n])
            start += n
        groups[-1].update(order[start:])
    return groups


def _case_labels(entries: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        out[e["case"]] = max(out.get(e["case"], 0), int(e["label"]))
    return out


def check_disjoint(datalist: Mapping[str, Sequence[dict]], source: str | os.PathLike = "datalist") -> None:
    """Raise :class:`InputDataError` if a case occurs in two splits."""
    seen: dict[str, str] = {}
    for split, entries in datalist.items():
        for e in entries:
            prev = seen.setdefault(e["case"], split)
            if prev != split:
                raise InputDataError(source, f"case {e['case']} is in both {prev!r} and {split!r}")


def _load_boxes(boxes_json: str | os.PathLike) -> dict[str, list[list[float]]]:
    path = Path(boxes_json)
    if not path.is_file():
        raise InputDataError(path, "boxes JSON does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputDataError(path, f"cannot read boxes JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise InputDataError(path, 'expected {"<relative image path>": [[x, y, w, h], ...]}')
    out = {}
    for key, boxes in data.items():
        ok = isinstance(boxes, list) and all(
            isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
            and b[2] > 0 and b[3] > 0 for b in boxes)
        if not ok:
            raise InputDataError(path, f"boxes of {key!r} are not a list of [x, y, w, h] with w, h > 0")
        out[str(key).replace("\\", "/")] = [[float(v) for v in b] for b in boxes]
    return out


def _attach_masks(
    entries: list[dict],
    root: Path,
    masks_dir: str | os.PathLike | None,
    boxes_json: str | os.PathLike | None,
    box_masks_dir: str | os.PathLike | None,
) -> None:
    """Add ``"mask"`` / ``"boxes"`` to the entries that have an annotation (in place)."""
    if masks_dir is not None:
        mdir = Path(masks_dir)
        mdir = mdir if mdir.is_absolute() else root / mdir
        if not mdir.is_dir():
            raise InputDataError(mdir, "masks folder does not exist")
        for e in entries:
            mask = (mdir / e["image"]).with_suffix(".png")
            if mask.is_file():
                e["mask"] = _rel(mask, root)
    if boxes_json is not None:
        boxes = _load_boxes(boxes_json)
        by_image = {e["image"]: e for e in entries}
        # boxes for images outside the selected classes / body parts are ignored; boxes for
        # images that do not exist at all point at a wrong JSON
        for key in boxes:
            if key not in by_image and not (root / key).is_file():
                raise InputDataError(boxes_json, f"boxes given for {key!r}, which is not an image under {root}")
        bdir = None
        if box_masks_dir is not None:
            bdir = Path(box_masks_dir)
            bdir = bdir if bdir.is_absolute() else root / bdir
        for key, bs in boxes.items():
            e = by_image.get(key)
            if e is None or "mask" in e:  # a PNG mask wins over boxes
                continue
            if bdir is None:
                e["boxes"] = bs
                continue
            with Image.open(root / key) as im:
                size = im.size
            out = (bdir / key).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out, suffix=".png") as tmp:
                Image.fromarray(rasterise_boxes(bs, size) * 255).save(tmp, format="PNG")
            e["mask"] = _rel(out, root)


def _finish(splits: dict[str, list[dict]], source: Path) -> dict[str, list[dict]]:
    for key in splits:
        splits[key].sort(key=lambda e: (e["case"], e["image"]))
    check_disjoint(splits, source)
    return {k: splits[k] for k in SPLITS}


def rasterise_boxes(boxes: Sequence[Sequence[float]], size: Sequence[int]) -> np.ndarray:
    """Binary uint8 (H, W) mask, 1 inside the union of ``[x, y, w, h]`` boxes; ``size`` = (W, H).

    Pixel (r, c) is inside a box when its centre lies in ``[x, x + w) x [y, y + h)``, so integer
    boxes cover exactly ``w x h`` pixels; boxes are clipped to the image.
    """
    width, height = int(size[0]), int(size[1])
    mask = np.zeros((height, width), dtype=np.uint8)
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"box must be [x, y, w, h], got {box!r}")
        x, y, w, h = (float(v) for v in box)
        c0, c1 = int(np.ceil(x - 0.5)), int(np.ceil(x + w - 0.5))
        r0, r1 = int(np.ceil(y - 0.5)), int(np.ceil(y + h - 0.5))
        mask[max(r0, 0):max(min(r1, height), 0), max(c0, 0):max(min(c1, width), 0)] = 1
    return mask


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the datalist JSON atomically; returns the path."""
    return atomic_save_json(dict(datalist), path)


# --------------------------------------------------------------------------- Kvasir v2


def kvasir_datalist(
    root: str | os.PathLike,
    positive: str = "esophagitis",
    negatives: str | Sequence[str] = ("normal-z-line",),
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    masks_dir: str | os.PathLike | None = None,
    boxes_json: str | os.PathLike | None = None,
    box_masks_dir: str | os.PathLike | None = None,
    check_images: bool = False,
) -> dict[str, list[dict]]:
    """Kvasir v2 binary datalist: ``positive`` (label 1) vs. ``negatives`` (label 0).

    ``root`` contains ``kvasir-dataset-v2/``. Image-level stratified split (no patient IDs in
    Kvasir v2): ``val_fraction`` / ``test_fraction`` of each class, the rest training.
    """
    root = Path(root)
    base = root / "kvasir-dataset-v2"
    if not base.is_dir():
        raise InputDataError(base, "Kvasir v2 folder does not exist (expected <root>/kvasir-dataset-v2/<class>/)")
    negatives = [negatives] if isinstance(negatives, str) else list(negatives)
    if not negatives:
        raise ValueError("at least one negative class is needed")
    if positive in negatives:
        raise ValueError(f"class {positive!r} is both positive and negative")
    entries = []
    for cls, label in [(positive, 1)] + [(n, 0) for n in negatives]:
        folder = base / cls
        if not folder.is_dir():
            raise InputDataError(folder, "class folder does not exist")
        images = _list_images(folder)
        if not images:
            raise InputDataError(folder, "class folder has no images")
        for p in images:
            _check_image(p, check_images)
            entries.append({"image": _rel(p, root), "label": label, "case": f"{cls}/{p.stem}"})
    _attach_masks(entries, root, masks_dir, boxes_json, box_masks_dir)
    val, test, _ = _split_cases(_case_labels(entries), (val_fraction, test_fraction), seed)
    splits: dict[str, list[dict]] = {k: [] for k in SPLITS}
    for e in entries:
        splits["validation" if e["case"] in val else "test" if e["case"] in test else "training"].append(e)
    return _finish(splits, base)


# --------------------------------------------------------------------------- MURA v1.1

_MURA_IMAGE = re.compile(r"^MURA-v1\.1/(train|valid)/(XR_[A-Z]+)/(patient\d+)/(study\d+_(positive|negative))/[^/]+$")


def _read_csv_rows(path: Path, n_cols: int) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise InputDataError(path, "CSV file does not exist")
    try:
        with open(path, newline="") as f:
            rows = [(i + 1, [c.strip() for c in row]) for i, row in enumerate(csv.reader(f))]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputDataError(path, f"cannot read CSV ({type(e).__name__}: {e})") from e
    rows = [(i, r) for i, r in rows if any(r)]
    for i, r in rows:
        if len(r) != n_cols:
            raise InputDataError(path, f"line {i}: expected {n_cols} column(s), got {len(r)}: {','.join(r)!r}")
    if not rows:
        raise InputDataError(path, "CSV file is empty")
    return rows


def mura_datalist(
    root: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    body_parts: str | Sequence[str] | None = None,
    masks_dir: str | os.PathLike | None = None,
    boxes_json: str | os.PathLike | None = None,
    box_masks_dir: str | os.PathLike | None = None,
    check_images: bool = False,
) -> dict[str, list[dict]]:
    """MURA v1.1 datalist: label 1 = abnormal study; official ``valid`` -> ``test``.

    ``root`` contains ``MURA-v1.1/`` (the CSV paths start with ``MURA-v1.1/``). ``validation``
    is a seeded, patient-level, label-stratified ``val_fraction`` of official ``train``.
    ``body_parts`` (e.g. ``["XR_WRIST"]``) keeps only those studies.
    """
    root = Path(root)
    base = root / "MURA-v1.1"
    if not base.is_dir():
        raise InputDataError(base, "MURA folder does not exist (expected <root>/MURA-v1.1/)")
    wanted = None
    if body_parts is not None:
        wanted = {body_parts} if isinstance(body_parts, str) else set(body_parts)
    entries: dict[str, list[dict]] = {}
    found_parts: set[str] = set()
    for split in ("train", "valid"):
        study_csv = base / f"{split}_labeled_studies.csv"
        labels: dict[str, int] = {}
        for i, (study, label) in _read_csv_rows(study_csv, 2):
            if label not in ("0", "1"):
                raise InputDataError(study_csv, f"line {i}: label must be 0 or 1, got {label!r}")
            labels[study.rstrip("/")] = int(label)
        image_csv = base / f"{split}_image_paths.csv"
        out = []
        for i, (rel,) in _read_csv_rows(image_csv, 1):
            rel = rel.replace("\\", "/")
            m = _MURA_IMAGE.match(rel)
            if m is None or m.group(1) != split:
                raise InputDataError(image_csv, f"line {i}: not a MURA-v1.1/{split}/XR_*/patient*/study*_*/ path: {rel!r}")
            part, patient, suffix = m.group(2), m.group(3), m.group(5)
            found_parts.add(part)
            if wanted is not None and part not in wanted:
                continue
            study = rel.rsplit("/", 1)[0]
            if study not in labels:
                raise InputDataError(study_csv, f"no label for study {study}/ (listed in {image_csv.name} line {i})")
            label = labels[study]
            if label != (suffix == "positive"):
                raise InputDataError(study_csv, f"study {study}/ has label {label} but its folder says {suffix}")
            _check_image(root / rel, check_images)
            out.append({"image": rel, "label": label, "case": patient, "study": study})
        entries[split] = out
    if wanted is not None and wanted - found_parts:
        raise InputDataError(base, f"no images of body part(s) {sorted(wanted - found_parts)} "
                                   f"(present: {sorted(found_parts)})")
    for split in ("train", "valid"):
        if not entries[split]:
            raise InputDataError(base / f"{split}_image_paths.csv", "no images selected")
        if len({e["label"] for e in entries[split]}) < 2:
            raise InputDataError(base / f"{split}_image_paths.csv", "selected images have only one label")
    _attach_masks(entries["train"] + entries["valid"], root, masks_dir, boxes_json, box_masks_dir)
    (val,) = _split_cases(_case_labels(entries["train"]), (val_fraction,), seed)[:1]
    splits = {
        "training": [e for e in entries["train"] if e["case"] not in val],
        "validation": [e for e in entries["train"] if e["case"] in val],
        "test": list(entries["valid"]),
    }
    return _finish(splits, base)


# --------------------------------------------------------------------------- CP-CHILD

CP_CHILD_CLASSES = {"Polyp": 1, "Non-Polyp": 0}


def cp_child_datalist(
    root: str | os.PathLike,
    subsets: str | Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    masks_dir: str | os.PathLike | None = None,
    boxes_json: str | os.PathLike | None = None,
    box_masks_dir: str | os.PathLike | None = None,
    check_images: bool = False,
) -> dict[str, list[dict]]:
    """CP-CHILD datalist: Polyp = 1, Non-Polyp = 0; official Train / Test, validation from Train.

    ``subsets`` defaults to every ``CP-CHILD-A`` / ``CP-CHILD-B`` folder present under ``root``.
    """
    root = Path(root)
    if subsets is None:
        subsets = [s for s in ("CP-CHILD-A", "CP-CHILD-B") if (root / s).is_dir()]
        if not subsets:
            raise InputDataError(root, "no CP-CHILD-A or CP-CHILD-B folder")
    elif isinstance(subsets, str):
        subsets = [subsets]
    raw: dict[str, list[dict]] = {"Train": [], "Test": []}
    for sub in subsets:
        for split in raw:
            for cls, label in CP_CHILD_CLASSES.items():
                folder = root / sub / split / cls
                if not folder.is_dir():
                    raise InputDataError(folder, "class folder does not exist")
                images = _list_images(folder)
                if not images:
                    raise InputDataError(folder, "class folder has no images")
                for p in images:
                    _check_image(p, check_images)
                    raw[split].append({"image": _rel(p, root), "label": label, "case": f"{sub}/{split}/{cls}/{p.stem}"})
    _attach_masks(raw["Train"] + raw["Test"], root, masks_dir, boxes_json, box_masks_dir)
    (val,) = _split_cases(_case_labels(raw["Train"]), (val_fraction,), seed)[:1]
    splits = {
        "training": [e for e in raw["Train"] if e["case"] not in val],
        "validation": [e for e in raw["Train"] if e["case"] in val],
        "test": raw["Test"],
    }
    return _finish(splits, root)


# --------------------------------------------------------------------------- DUKE


def duke_datalist(
    root: str | os.PathLike,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    balance: bool = False,
    masks_dir: str | os.PathLike | None = None,
    boxes_json: str | os.PathLike | None = None,
    box_masks_dir: str | os.PathLike | None = None,
    check_images: bool = False,
) -> dict[str, list[dict]]:
    """DUKE slice datalist from ``<root>/{pos,neg}/<patient>_<slice>.png`` (assumed layout).

    The study's own folder layout is not public; this is the simplest documented form.
    Patient-level split stratified by "patient has a positive slice". ``balance`` keeps a
    seeded random subset of positive slices the size of the negatives (study tutorial).
    """
    root = Path(root)
    entries = []
    for cls, label in (("pos", 1), ("neg", 0)):
        folder = root / cls
        if not folder.is_dir():
            raise InputDataError(folder, "class folder does not exist (expected <root>/{pos,neg}/<patient>_<slice>.png)")
        images = [p for p in _list_images(folder) if p.suffix.lower() == ".png"]
        if not images:
            raise InputDataError(folder, "class folder has no PNG slices")
        for p in images:
            if "_" not in p.stem:
                raise InputDataError(p, "file name is not <patient>_<slice>.png")
            _check_image(p, check_images)
            entries.append({"image": _rel(p, root), "label": label, "case": p.stem.rsplit("_", 1)[0]})
    if balance:
        pos = [e for e in entries if e["label"] == 1]
        neg = [e for e in entries if e["label"] == 0]
        if len(pos) > len(neg):
            keep = np.random.default_rng(seed).choice(len(pos), size=len(neg), replace=False)
            pos = [pos[i] for i in sorted(keep)]
        entries = pos + neg
    _attach_masks(entries, root, masks_dir, boxes_json, box_masks_dir)
    val, test, _ = _split_cases(_case_labels(entries), (val_fraction, test_fraction), seed)
    splits: dict[str, list[dict]] = {k: [] for k in SPLITS}
    for e in entries:
        splits["validation" if e["case"] in val else "test" if e["case"] in test else "training"].append(e)
    return _finish(splits, root)


# --------------------------------------------------------------------------- dataset


def _geometry(
    size: tuple[int, int], image_size: int, resize_mode: str, resize_short: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized (W, H), crop (left, top)) as torchvision's Resize(short) + CenterCrop computes them."""
    w, h = size
    if resize_mode == "resize":
        return (image_size, image_size), (0, 0)
    if resize_mode != "short_side_crop":
        raise ValueError(f"resize_mode must be 'short_side_crop' or 'resize', got {resize_mode!r}")
    if w <= h:
        new = (resize_short, int(resize_short * h / w))
    else:
        new = (int(resize_short * w / h), resize_short)
    if new[0] < image_size or new[1] < image_size:
        raise ValueError(f"resize_short {resize_short} is smaller than image_size {image_size}")
    left = int(round((new[0] - image_size) / 2.0))
    top = int(round((new[1] - image_size) / 2.0))
    return new, (left, top)


class ImageFolderDataset(Dataset):
    """2-D image dataset over a datalist of :func:`kvasir_datalist` & co.

    Args:
        datalist: datalist JSON path (``split`` picks the list) or a list of entries.
        root: folder the entry paths are relative to.
        split: ``training`` / ``validation`` / ``test``.
        image_size: output side (224).
        resize_mode: ``"short_side_crop"`` (short side ``resize_short``, then CenterCrop; MURA,
            Kvasir) or ``"resize"`` (straight to ``image_size``²; DUKE, CP-CHILD).
        resize_short: short side before the crop; default ``round(image_size * 256 / 224)``.
        normalize: ``"imagenet"`` (mean/std) or ``"none"`` (values in [0, 1]).
        label_dtype: ``"float"`` -> label (1,) float32 (BCE / single logit); ``"long"`` -> label
            0-d int64 (cross-entropy over a 2-logit head).
        transform: callable applied to each item dict.
        always_mask: give every item a ``"mask"`` (zeros where the entry has no annotation) and a
            ``"has_mask"`` bool, so that batches of partly annotated splits collate.

    Items: ``{"image": (3, S, S) float32, "label": ..., "case": str, "image_path": str}`` plus
    ``"mask": (1, S, S) float32`` 0/1 when the entry has ``"mask"`` (PNG, non-zero = 1) or
    ``"boxes"`` (rasterised at the original size). Images are converted to RGB (grey repeated),
    resized bilinearly with PIL; masks take the same geometry with nearest interpolation. A mask
    PNG of exactly ``image_size``² for an image of another size is taken as already drawn on the
    network input (the study's ``224_mask_annot`` masks) and used as it is. An image or mask that
    cannot be decoded raises :class:`~custom_components.io.InputDataError` naming the file
    (bundles check every file once when they prepare the datalist, see :func:`prepare_datalist`).
    """

    def __init__(
        self,
        datalist: str | os.PathLike | Sequence[dict],
        root: str | os.PathLike,
        split: str | None = "test",
        image_size: int = 224,
        transform: Callable[[dict], Any] | None = None,
        resize_mode: str = "short_side_crop",
        resize_short: int | None = None,
        normalize: str = "imagenet",
        label_dtype: str = "float",
        always_mask: bool = False,
    ):
        if isinstance(datalist, (str, os.PathLike)):
            path = Path(datalist)
            if not path.is_file():
                raise InputDataError(path, "datalist file does not exist")
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise InputDataError(path, f"cannot read datalist ({type(e).__name__}: {e})") from e
            if not isinstance(data, dict) or split not in data:
                raise InputDataError(path, f"datalist has no split {split!r}")
            entries = data[split]
        else:
            entries = list(datalist)
        for e in entries:
            if not isinstance(e, dict) or "image" not in e or "label" not in e:
                raise InputDataError(str(datalist) if isinstance(datalist, (str, os.PathLike)) else "datalist",
                                     f"entry without image/label: {e!r}")
        if normalize not in ("imagenet", "none"):
            raise ValueError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
        if label_dtype not in ("float", "long"):
            raise ValueError(f"label_dtype must be 'float' or 'long', got {label_dtype!r}")
        if resize_mode not in ("short_side_crop", "resize"):
            raise ValueError(f"resize_mode must be 'short_side_crop' or 'resize', got {resize_mode!r}")
        self.entries = entries
        self.split = split  # named in metric notes (custom_components.metrics.classification.evaluated_split)
        self.root = Path(root)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.resize_short = int(resize_short) if resize_short else int(round(self.image_size * 256 / 224))
        self.normalize = normalize
        self.label_dtype = label_dtype
        self.transform = transform
        self.always_mask = bool(always_mask)
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[int]:
        """Labels of all entries without reading any image (used to pick display examples)."""
        return [int(e["label"]) for e in self.entries]

    def _apply(self, im: Image.Image, resample: int) -> Image.Image:
        new, (left, top) = _geometry(im.size, self.image_size, self.resize_mode, self.resize_short)
        if im.size != new:
            im = im.resize(new, resample=resample)
        if self.resize_mode == "short_side_crop":
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
        return im

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        path = self.root / e["image"]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # decodes the whole file here, inside the try
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise InputDataError(path, f"cannot read image ({type(err).__name__}: {err})") from err
        size = im.size
        arr = np.asarray(self._apply(im, Image.BILINEAR), dtype=np.float32) / 255.0
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        if self.normalize == "imagenet":
            image = (image - self._mean) / self._std
        y = int(e["label"])
        label = torch.tensor([float(y)], dtype=torch.float32) if self.label_dtype == "float" \
            else torch.tensor(y, dtype=torch.long)
        item = {"image": image, "label": label, "case": str(e.get("case", e["image"])), "image_path": e["image"]}
        mask_img = None
        if "mask" in e:
            mpath = self.root / e["mask"]
            try:
                with Image.open(mpath) as m:
                    m = np.asarray(m.convert("L")) if m.mode not in ("L", "1", "I", "I;16", "F") else np.asarray(m)
            except Exception as err:  # as for the image
                raise InputDataError(mpath, f"cannot read mask ({type(err).__name__}: {err})") from err
            binary = (m != 0).astype(np.uint8)
            if m.shape[:2] == (self.image_size, self.image_size) and size != (self.image_size, self.image_size):
                item["mask"] = torch.from_numpy(binary.astype(np.float32))[None]  # drawn on the network input
            elif m.shape[:2] != (size[1], size[0]):
                raise InputDataError(mpath, f"mask size {m.shape[1]}x{m.shape[0]} != image size {size[0]}x{size[1]}"
                                            f" (nor the network input size {self.image_size}x{self.image_size})")
            else:
                mask_img = Image.fromarray(binary)
        elif "boxes" in e:
            mask_img = Image.fromarray(rasterise_boxes(e["boxes"], size))
        if mask_img is not None:
            m = np.asarray(self._apply(mask_img, Image.NEAREST), dtype=np.float32)
            item["mask"] = torch.from_numpy(m.copy())[None]
        if self.always_mask:
            item["has_mask"] = "mask" in item
            item.setdefault("mask", torch.zeros(1, self.image_size, self.image_size))
        if self.transform is not None:
            item = self.transform(item)
        return item


# --------------------------------------------------------------------------- bundles

DATALIST_BUILDERS: dict[str, Callable[..., dict[str, list[dict]]]] = {
    "kvasir": kvasir_datalist,
    "mura": mura_datalist,
    "cp_child": cp_child_datalist,
    "duke": duke_datalist,
}


def prepare_datalist(dataset: str, root: str | os.PathLike, out: str | os.PathLike, check_images: bool = True,
                     **kwargs: Any) -> Path:
    """Build the datalist of ``dataset`` (a key of :data:`DATALIST_BUILDERS`) and write it to ``out``.

    Deterministic for fixed arguments, so every bundle run (and every rank) rebuilds the same
    splits; the keyword arguments go to the builder (``masks_dir``, ``boxes_json``, ``seed``, ...).
    ``check_images`` (on by default) decodes every listed image and mask before the datalist is
    written, so a truncated or corrupt file stops the run here with one line naming it instead
    of failing mid-epoch; the files that decoded are remembered in ``<out stem>.checked.json``
    and are not decoded again while their size and modification time stay the same
    (:func:`check_datalist_images`).
    """
    if dataset not in DATALIST_BUILDERS:
        raise ValueError(f"dataset must be one of {sorted(DATALIST_BUILDERS)}, got {dataset!r}")
    builder_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    datalist = DATALIST_BUILDERS[dataset](root, **builder_kwargs)  # existence only; decoding below, once
    if not datalist["test"] and not datalist["training"]:
        raise InputDataError(root, f"no {dataset} images found")
    if check_images:
        check_datalist_images(datalist, root, _checked_record(Path(out)))
    return write_datalist(datalist, out)
