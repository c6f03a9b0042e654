"""MM-WHS (multi-modality whole-heart segmentation) reading, validation and slice preparation (spec lvmmed.md section 4).

The LVM-Med 3-D protocol segments MM-WHS volumes slice by slice with a 2-D U-Net. Layout of the
MM-WHS training release (one folder per modality, CT and MR alike)::

    <dataset_dir>/ct_train/ct_train_1001_image.nii.gz + ct_train_1001_label.nii.gz ... (1001-1020)
    <dataset_dir>/mr_train/mr_train_1001_image.nii.gz + mr_train_1001_label.nii.gz ...

(the files may also lie directly in ``<dataset_dir>``; ``.nii`` or ``.nii.gz``). Case IDs are
``ct_train_1001`` / ``mr_train_1001``.

Preparation (per volume, once; :mod:`custom_components.data.store` layout, read by
:class:`~custom_components.data.slice_store.SliceDataset`):

* intensities as the reference's PNG export: clip to the volume's [0.5, 99.5] percentiles,
  z-score (mean / std of the clipped volume), divide by 10, clip to [0, 1], times 255, rounded to
  uint8 (the PNG values the reference trains on); a constant volume gives zeros;
* labels 0 / 205 / 420 / 500 / 550 / 600 / 820 / 850 -> class indices 0..7 (:data:`LABEL_VALUES`);
  any other value is an error naming the file and the values;
* slices along the third NIfTI axis, ``array.transpose(2, 1, 0)`` (as :mod:`scan_grid` records),
  every slice kept; image and label resized in-plane to ``image_size`` with nearest interpolation
  (the reference's resize); ``meta.json["grid"]`` holds the source grid, so predictions go back
  onto the volume's grid with its affine;
* slice label (``meta.json["labels"]``) = the slice contains label 420 (class 2, left-atrium blood
  cavity) at native resolution: the training set takes those slices plus as many without
  (:func:`balanced_indices`).

Every input problem is one :class:`~custom_components.io.InputDataError` naming the file: a missing
label file, an unreadable NIfTI, a label whose shape or affine differs from its image, a label
value outside the eight known ones.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from custom_components.data.brats20 import _open, _read
from custom_components.data.scan_grid import source_grid
from custom_components.data.seg2d import INPUT_SCALINGS, scale_input
from custom_components.data.slice_store import SliceDataset
from custom_components.data.splits import choose_split
from custom_components.data.store import prepare_store, write_case
from custom_components.io import InputDataError

__all__ = [
    "LABEL_VALUES",
    "MODALITIES",
    "SPLIT_RATIOS",
    "STRUCTURES",
    "TARGET_CLASS",
    "MMWHSSlices",
    "balanced_indices",
    "find_cases",
    "load_case",
    "map_labels",
    "mmwhs_slices",
    "normalise_intensity",
    "positive_items",
    "prepare_mmwhs",
    "reference_split_volumes",
    "unmap_labels",
]

#: MM-WHS label values; the index of a value is its class
LABEL_VALUES: tuple[int, ...] = (0, 205, 420, 500, 550, 600, 820, 850)
#: structure of each class (MM-WHS label definitions)
STRUCTURES: tuple[str, ...] = (
    "background", "lv_myocardium", "la_blood", "lv_blood", "ra_blood", "rv_blood", "ascending_aorta", "pulmonary_artery",
)  # fmt: skip
#: the class the paper reports (label 420, left-atrium blood cavity)
TARGET_CLASS = 2
MODALITIES: tuple[str, ...] = ("ct", "mr")
#: random-split proportions giving the reference's 13 / 3 / 4 of 20 volumes
SPLIT_RATIOS: tuple[float, float, float] = (0.65, 0.15, 0.2)
FORMAT_VERSION = 1
_CHUNK = 32


def _case_re(modality: str) -> re.Pattern:
    return re.compile(rf"^({modality}_train_\d+)_image\.nii(\.gz)?$")


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return modality


def map_labels(label: np.ndarray, path: str | os.PathLike = "label") -> np.ndarray:
    """MM-WHS label values -> class indices 0..7 (uint8); another value raises :class:`InputDataError` naming ``path``."""
    arr = np.asarray(label)
    values = np.asarray(LABEL_VALUES)
    bad = ~np.isin(arr, values)
    if bad.any():
        vals = np.unique(arr[bad])
        shown = ", ".join(f"{v:g}" for v in vals[:10]) + (" ..." if vals.size > 10 else "")
        raise InputDataError(path, f"label values outside {{{', '.join(map(str, LABEL_VALUES))}}}: {shown}")
    return np.searchsorted(values, arr).astype(np.uint8)


def unmap_labels(indices: np.ndarray) -> np.ndarray:
    """Class indices 0..7 -> MM-WHS label values (uint16)."""
    idx = np.asarray(indices)
    if idx.size and (idx.min() < 0 or idx.max() >= len(LABEL_VALUES)):
        raise ValueError(f"class indices must be in 0..{len(LABEL_VALUES) - 1}, got {idx.min()}..{idx.max()}")
    return np.asarray(LABEL_VALUES, dtype=np.uint16)[idx.astype(np.int64)]


def normalise_intensity(volume: np.ndarray) -> np.ndarray:
    """The reference's intensity pipeline of one volume -> uint8 (see the module docstring)."""
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    v = np.clip(v, lo, hi)
    mean, std = float(v.mean()), float(v.std())
    if not std > 0:
        return np.zeros(v.shape, np.uint8)
    v = np.clip((v - mean) / std / 10.0, 0.0, 1.0) * 255.0
    return np.rint(v).astype(np.uint8)


def find_cases(dataset_dir: str | os.PathLike, modality: str = "ct") -> dict[str, tuple[Path, Path]]:
    """Map case ID (``ct_train_1001``) -> (image path, label path; the label may not exist), sorted by ID."""
    modality = _check_modality(modality)
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    pattern = _case_re(modality)
    found: dict[str, tuple[Path, Path]] = {}
    for folder in (root / f"{modality}_train", root):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = pattern.match(p.name)
            if not (m and p.is_file()):
                continue
            case = m.group(1)
            if case in found:
                raise InputDataError(p, f"case {case}: also found as {found[case][0]}; keep one")
            label = p.with_name(p.name.replace("_image.nii", "_label.nii"))
            found[case] = (p, label)
    if not found:
        raise InputDataError(
            root, f"no MM-WHS {modality.upper()} volumes ({modality}_train_NNNN_image.nii[.gz]) here or in {modality}_train/"
        )
    return dict(sorted(found.items()))


def _read_pair(case: str, image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    if not label_path.is_file():
        other = label_path.with_suffix("") if label_path.suffix == ".gz" else label_path.with_name(label_path.name + ".gz")
        if other.is_file():
            label_path = other
        else:
            raise InputDataError(label_path, f"case {case}: missing label file ({case}_label.nii[.gz]) beside its image")
    img, lab = _open(case, image_path), _open(case, label_path)
    if tuple(img.shape) != tuple(lab.shape):
        raise InputDataError(
            label_path,
            f"case {case}: label shape {tuple(lab.shape)} differs from image shape {tuple(img.shape)} of {image_path.name}",
        )
    if not np.allclose(img.affine, lab.affine, rtol=1e-5, atol=1e-4):
        raise InputDataError(label_path, f"case {case}: label affine differs from the affine of its image {image_path.name}")
    classes = map_labels(_read(case, label_path, lab), label_path)
    volume = _read(case, image_path, img)
    if volume.dtype.kind in "fc" and not np.isfinite(volume).all():
        raise InputDataError(image_path, f"case {case}: NaN/Inf voxels in the image")
    return normalise_intensity(volume), classes, img


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """(S, H, W) uint8 -> (S, size, size) uint8, nearest, in chunks."""
    if x.shape[1:] == (size, size):
        return np.ascontiguousarray(x)
    out = np.empty((x.shape[0], size, size), np.uint8)
    for a in range(0, x.shape[0], _CHUNK):
        t = torch.from_numpy(np.ascontiguousarray(x[a : a + _CHUNK]))[:, None]
        out[a : a + _CHUNK] = F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy()
    return out


def load_case(image_path: str | os.PathLike, label_path: str | os.PathLike, image_size: int = 224) -> dict:
    """One volume as slices: ``image`` uint8 (S, 1, size, size), ``mask`` uint8 class indices (S, size, size),
    ``labels`` (S,) 0/1 (label 420 present at native resolution) and the opened NIfTI ``nifti``."""
    image_path = Path(image_path)
    case = image_path.name.split("_image.nii")[0]
    volume, classes, img = _read_pair(case, image_path, Path(label_path))
    volume, classes = volume.transpose(2, 1, 0), classes.transpose(2, 1, 0)  # (S, H, W)
    labels = (classes == TARGET_CLASS).any(axis=(1, 2)).astype(np.uint8)
    size = int(image_size)
    return {"image": _resize(volume, size)[:, None], "mask": _resize(classes, size), "labels": labels, "nifti": img}


def _meta_ok(case_out: Path, image_size: int, modality: str) -> dict | None:
    meta_path = case_out / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        meta.get("format_version") == FORMAT_VERSION
        and meta.get("dataset") == f"mmwhs_{modality}"
        and meta.get("image_size") == image_size
        and (case_out / "image.npy").is_file()
        and (case_out / "mask.npy").is_file()
    )
    return meta if ok else None


def prepare_mmwhs(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    modality: str = "ct",
    split: str | os.PathLike | None = "published",
    image_size: int = 224,
    cases: Iterable[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    split_ratios: str | Sequence[float] = SPLIT_RATIOS,
    split_seed: int = 0,
) -> Path:
    """Prepare MM-WHS volumes of ``modality`` into a slice store and write ``<output_dir>/datalist.json``.

    ``split``: ``"published"`` (``data_lists/mmwhs_<modality>.json``, the reference's 13 / 3 / 4
    volumes), a datalist name or JSON path, ``"random"`` (seeded, ``split_ratios``), or None (every
    case under ``unsplit``). Resumable: a case prepared with the same settings is skipped unless
    ``overwrite``. Returns the datalist path.
    """
    modality = _check_modality(modality)
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    found = find_cases(dataset_dir, modality)
    if cases is not None:
        cases = [cases] if isinstance(cases, str) else list(cases)
    present = list(found) if cases is None else [c for c in cases if c in found]
    splits, split_name = choose_split(split, f"mmwhs_{modality}", present, output_dir, split_ratios, split_seed)

    def prepare_case(case: str, case_out: Path) -> dict:
        image_path, label_path = found[case]
        data = load_case(image_path, label_path, image_size)
        grid = source_grid(data["nifti"], image_path, dataset_dir, image_size, axes=(2, 1, 0))
        if grid["resize"]:
            grid["resize"] = "nearest"
        present_classes = np.unique(data["mask"]).tolist()
        meta = {
            "format_version": FORMAT_VERSION,
            "dataset": f"mmwhs_{modality}",
            "case": case,
            "n_slices": int(data["image"].shape[0]),
            "image_size": image_size,
            "dtype": "uint8",
            "labels": [int(v) for v in data["labels"]],
            "classes_present": [int(c) for c in present_classes],
            "sources": {"image": image_path.name, "label": label_path.name},
            "grid": grid,
        }
        return write_case(case_out, data["image"], data["mask"], meta)

    return prepare_store(
        dataset_dir, output_dir, found=found, splits=splits, split_name=split_name, cases=cases,
        prepare_case=prepare_case, prepared_meta=lambda case_out: _meta_ok(case_out, image_size, modality),
        overwrite=overwrite, progress=progress, desc=f"prepare MM-WHS {modality.upper()}",
    )  # fmt: skip


class _Item:
    """SliceDataset item -> ``{"image": scaled (1, H, W), "label": class indices (1, H, W), "case", "slice"}``."""

    def __init__(self, input_scaling: str) -> None:
        if input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, got {input_scaling!r}")
        self.input_scaling = input_scaling

    def __call__(self, item: dict) -> dict:
        return {
            "image": scale_input(item["image"], self.input_scaling).float(),
            "label": item["mask"],
            "case": item["case"],
            "slice": item["slice"],
        }


def balanced_indices(labels: np.ndarray, seed: int = 0) -> list[int]:
    """Every positive slice plus as many negatives drawn without replacement (all if fewer), sorted.

    The reference's training set: slices containing label 420 and equally many without.
    """
    labels = np.asarray(labels)
    pos = np.flatnonzero(labels > 0)
    neg = np.flatnonzero(labels == 0)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(neg, size=min(len(pos), len(neg)), replace=False) if len(neg) else neg
    return sorted(int(i) for i in np.concatenate([pos, chosen]))


class MMWHSSlices(Subset):
    """Slices of a prepared MM-WHS split (``SliceDataset`` + scaling + ``selection``).

    ``selection="all"``: every slice in volume order (validation, test, inference: volumes are
    stacked back). ``"balanced"``: :func:`balanced_indices` with ``seed`` (training).
    """

    def __init__(self, datalist: str | os.PathLike, split: str, selection: str = "all",
                 input_scaling: str = "imagenet", seed: int = 0) -> None:
        if selection not in ("all", "balanced"):
            raise ValueError(f"selection must be 'all' or 'balanced', got {selection!r}")
        base = SliceDataset(datalist, split=split, transform=_Item(input_scaling))
        indices = list(range(len(base))) if selection == "all" else balanced_indices(base.labels, seed)
        super().__init__(base, indices)
        self.case_slice_ranges = base.case_slice_ranges
        self.case_ids = base.case_ids


def mmwhs_slices(datalist: str | os.PathLike, split: str, selection: str = "all",
                 input_scaling: str = "imagenet", seed: int = 0) -> Dataset:
    """:class:`MMWHSSlices` (a function for configs)."""
    return MMWHSSlices(datalist, split, selection, input_scaling, seed)


def positive_items(dataset: MMWHSSlices, n: int = 4) -> list[dict]:
    """``n`` items of ``dataset`` evenly spaced over its slices with label 420 (all slices if none): TensorBoard panels."""
    base = dataset.dataset
    labels = base.labels[np.asarray(dataset.indices, dtype=np.int64)] if len(dataset) else np.zeros(0)
    candidates = np.flatnonzero(labels > 0)
    if candidates.size == 0:
        candidates = np.arange(len(dataset))
    if n <= 0 or candidates.size == 0:
        return []
    picks = candidates[np.linspace(0, candidates.size - 1, min(int(n), candidates.size)).round().astype(int)]
    return [dataset[int(i)] for i in dict.fromkeys(picks.tolist())]


_FRAME_RE = re.compile(r"^((?:ct|mr)_train_\d+)_(?:image|label)_frame_\d+\.png$")
_REFERENCE_KEYS = {"train": "training", "training": "training", "val": "validation", "valid": "validation",
                   "validation": "validation", "test": "test"}


def reference_split_volumes(split_json: str | os.PathLike) -> dict[str, list[str]]:
    """Volume IDs per set of the reference's slice-level split (``files_split/MMWHS_{CT,MR}_Heart.json``).

    The reference lists PNG frames (``ct_train_1020_image_frame_32.png``, label frames alike) per
    set; a volume is in the set its frames are in (a volume in two sets is an error). Sets are
    renamed ``training`` / ``validation`` / ``test``; IDs are sorted.
    """
    path = Path(split_json)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(path, f"cannot read split JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise InputDataError(path, "expected a JSON object mapping set names to lists of frame names")
    out: dict[str, set[str]] = {}
    for key, names in data.items():
        if key not in _REFERENCE_KEYS or not isinstance(names, list):
            raise InputDataError(path, f"unexpected set {key!r} (expected lists under {sorted(_REFERENCE_KEYS)})")
        for name in names:
            m = _FRAME_RE.match(Path(str(name)).name)
            if not m:
                raise InputDataError(path, f"set {key!r}: {name!r} is not an MM-WHS frame name (<case>_image_frame_N.png)")
            out.setdefault(_REFERENCE_KEYS[key], set()).add(m.group(1))
    seen: dict[str, str] = {}
    for key, ids in out.items():
        for case in ids:
            if case in seen and seen[case] != key:
                raise InputDataError(path, f"volume {case} has frames in both {seen[case]!r} and {key!r}")
            seen[case] = key
    return {k: sorted(out[k]) for k in ("training", "validation", "test") if k in out}
