"""LiTS17 reading, validation and preparation into a slice store (LGM-ViT spec, section 6).

Same store as BraTS2020 (:mod:`custom_components.data.brats20`), readable by
:class:`custom_components.data.slice_store.SliceDataset`:
``<store>/<case>/{image.npy (S, 3, H, W), mask.npy (S, H, W) uint8, meta.json}`` and
``<store>/datalist.json``. Case IDs are ``volume-N``.

Transform (spec section 6):

* volumes as (z, y, x) = nibabel (x, y, z) transposed (2, 1, 0); slice k is the third nibabel
  axis; no reorientation (the affine is ignored, like the reference code); all slices kept;
* ``target="organ"`` (the paper's setting): mask = seg > 0 (liver incl. tumour), slice label =
  liver present; ``target="lesion"``: mask = seg == 2, slice label = tumour present. Labels are
  taken at native resolution. For ``organ`` a segmentation without any liver voxel (label 1) is
  an **error**, not a warning: every LiTS scan is a liver CT whose reference segmentation
  labels the liver, so a label map without 1 follows another convention (e.g. a tumour-only
  0/2 map) or is an empty export, and ``seg > 0`` would silently turn it into wrong liver
  labels for every slice. The spec (``specs/lgmvit.md`` section 6) gives no case for going on.
  ``target="lesion"`` reads label 2 only and accepts maps without it (tumour-free scans);
* intensities: by default raw HU min-maxed **per slice** to [0, 1] (constant slice -> zeros);
  with ``hu_window=(lo, hi)`` each slice is first clipped to [lo, hi] HU and *then* min-maxed per
  slice. Most abdominal CT slices contain air (< lo) and bone (> hi), so this is in practice the
  usual fixed window ``(clip(x) - lo) / (hi - lo)``; a slice without values at both ends is
  stretched to [0, 1] instead;
* the single CT channel is repeated to 3 channels; resize to ``image_size`` bicubic (image) /
  nearest (mask); any in-plane size is accepted (real LiTS is 512 x 512, not assumed).

``meta.json["grid"]`` records the volume's grid and this transform
(:mod:`custom_components.data.scan_grid`), so per-slice outputs can be written back on the scan's grid.

Slices are converted and resized in chunks, so memory stays near one volume plus the output
(LiTS has scans of up to ~1000 slices).

Layouts accepted by :func:`find_volumes` (files ``.nii`` or ``.nii.gz``):

* ``<dataset_dir>/scans/volume-N.nii`` + ``<dataset_dir>/segmentations/segmentation-N.nii``;
* flat: both kinds of files directly in ``<dataset_dir>``;
* the original LiTS release: ``<dataset_dir>/Training Batch 1/`` and ``Training Batch 2/``, each
  holding volumes and segmentations; and the Kaggle copy's ``volume_pt1/`` ... ``volume_pt5/``
  (volumes) beside ``segmentations/``.

A segmentation is looked up in the volume's own folder, then in ``segmentations/``, then in
``<dataset_dir>``.

Reused from ``brats20.py``: ``_open`` / ``_read`` (NIfTI opening and reading with case+file
errors), ``_minmax_slices`` (per-slice min-max), ``_meta_ok`` (resumability check, extended here by
``target`` / ``hu_window``), ``FORMAT_VERSION`` and ``_DTYPES``; case selection, atomic case writing
and the datalist come from :mod:`custom_components.data.store`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from custom_components.data.brats20 import (
    _DTYPES,
    FORMAT_VERSION,
    _meta_ok,
    _minmax_slices,
    _open,
    _read,
)
from custom_components.data.scan_grid import source_grid
from custom_components.data.splits import DEFAULT_RATIOS, choose_split
from custom_components.data.store import prepare_store, write_case
from custom_components.io import InputDataError

__all__ = [
    "SEG_LABELS",
    "TARGETS",
    "LiTSFiles",
    "case_id",
    "find_volumes",
    "load_volume",
    "prepare_lits17",
]

#: LiTS labels: 0 background, 1 liver, 2 tumour
SEG_LABELS: tuple[int, ...] = (0, 1, 2)
#: slice-label targets: organ = liver present (seg > 0), lesion = tumour present (seg == 2)
TARGETS: tuple[str, ...] = ("organ", "lesion")
_VOLUME_RE = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_SEG_RE = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
_CASE_RE = re.compile(r"^volume-(\d+)$")
_CHUNK = 32  # slices converted / resized at a time


class LiTSFiles(NamedTuple):
    volume: Path
    seg: Path | None  # None: no segmentation found (reported when the case is prepared)


def case_id(name: str | os.PathLike) -> str:
    """``volume-N`` from ``volume-N``, ``volume-N.nii`` or ``volume-N.nii.gz`` (published split names)."""
    s = Path(name).name
    for ext in (".nii.gz", ".nii"):
        if s.endswith(ext):
            return s[: -len(ext)]
    return s


def _number(case: str) -> int:
    m = _CASE_RE.match(case)
    return int(m.group(1)) if m else -1


def _folders(root: Path, patterns: Sequence[str]) -> list[Path]:
    out = [root]
    for pat in patterns:
        out += sorted(p for p in root.glob(pat) if p.is_dir())
    return out


def _scan(folders: Iterable[Path], pattern: re.Pattern) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for folder in folders:
        for p in sorted(folder.iterdir()):
            m = pattern.match(p.name)
            if m and p.is_file():
                n = int(m.group(1))
                if n in found and found[n].parent == p.parent:
                    raise InputDataError(p, f"both {found[n].name} and {p.name} exist; keep one")
                found.setdefault(n, p)
    return found


def find_volumes(dataset_dir: str | os.PathLike) -> dict[str, LiTSFiles]:
    """Map case ID ``volume-N`` -> :class:`LiTSFiles` (volume, segmentation or None), sorted by N.

    See the module docstring for the accepted layouts. The same volume number in two folders
    is an error (ambiguous).
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    vol_dirs = _folders(root, ("scans", "Training Batch*", "volume_pt*"))
    volumes: dict[int, Path] = {}
    for folder in vol_dirs:
        for n, p in _scan([folder], _VOLUME_RE).items():
            if n in volumes:
                raise InputDataError(p, f"case volume-{n}: also found as {volumes[n]}; keep one")
            volumes[n] = p
    if not volumes:
        raise InputDataError(
            root, "no LiTS17 volumes (volume-N.nii[.gz]) found here, in scans/ or in 'Training Batch */'"
        )
    seg_common = _scan(_folders(root, ("segmentations",))[::-1], _SEG_RE)  # segmentations/ before root
    seg_own = {d: _scan([d], _SEG_RE) for d in {v.parent for v in volumes.values()} if d != root}
    out: dict[str, LiTSFiles] = {}
    for n in sorted(volumes):
        vol = volumes[n]
        own = seg_own.get(vol.parent, {}).get(n)
        out[f"volume-{n}"] = LiTSFiles(vol, own or seg_common.get(n))
    return out


def _seg_expected(dataset_dir: Path, files: LiTSFiles) -> Path:
    seg_dir = Path(dataset_dir) / "segmentations"
    folder = seg_dir if seg_dir.is_dir() else files.volume.parent
    n = _number(case_id(files.volume))
    return folder / f"segmentation-{n}.nii[.gz]"


def _check_labels(case: str, path: Path, seg: np.ndarray) -> None:
    if seg.dtype.kind in "ui":
        if int(seg.min()) >= 0 and int(seg.max()) <= 2:
            return
    elif np.isin(seg, SEG_LABELS).all():  # float segmentations (several LiTS files); NaN fails here
        return
    vals = np.unique(seg[~np.isin(seg, SEG_LABELS)])
    shown = ", ".join(f"{v:g}" for v in vals[:10]) + (" ..." if vals.size > 10 else "")
    raise InputDataError(path, f"case {case}: segmentation labels outside {{0, 1, 2}}: {shown}")


def _check_liver(case: str, path: Path, seg: np.ndarray) -> None:
    """``target="organ"`` needs the liver label 1 somewhere; see the module docstring for why this is an error."""
    if (seg == 1).any():
        return
    present = "no label at all (all background)" if not seg.any() else "only labels 0 and 2 (tumour, no liver)"
    raise InputDataError(
        path, f"case {case}: no liver label (1) in the segmentation, {present}; --target organ needs the LiTS"
              f" labels 0 background / 1 liver / 2 tumour (relabel the file; --target lesion reads label 2 only)",
    )


def _parse_window(hu_window) -> tuple[float, float] | None:
    if hu_window is None:
        return None
    if isinstance(hu_window, str):
        hu_window = [v for v in hu_window.split(",") if v.strip()]
    try:
        lo, hi = (float(v) for v in hu_window)
    except (TypeError, ValueError) as e:
        raise ValueError(f"hu_window must be two numbers (lo, hi), got {hu_window!r}") from e
    if not lo < hi:
        raise ValueError(f"hu_window needs lo < hi, got ({lo:g}, {hi:g})")
    return lo, hi


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target


def _load(
    volume_path: Path,
    seg_path: Path | None,
    image_size: int,
    target: str,
    window: tuple[float, float] | None,
    dtype: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Read, validate and transform one volume; return image (dtype), mask uint8, slice labels, opened volume."""
    volume_path = Path(volume_path)
    case = case_id(volume_path)
    if seg_path is None or not Path(seg_path).is_file():
        expected = seg_path or volume_path.parent / f"segmentation-{_number(case)}.nii[.gz]"
        raise InputDataError(
            expected, f"case {case}: missing segmentation file (segmentation-{_number(case)}.nii or .nii.gz)"
        )
    seg_path = Path(seg_path)
    vol_img, seg_img = _open(case, volume_path), _open(case, seg_path)
    # shapes come from the headers, so a mismatch is reported before any voxel is read
    if tuple(vol_img.shape) != tuple(seg_img.shape):
        raise InputDataError(
            volume_path,
            f"case {case}: shape {tuple(vol_img.shape)} of {volume_path.name} does not match "
            f"segmentation shape {tuple(seg_img.shape)} of {seg_path.name}",
        )
    seg = _read(case, seg_path, seg_img)
    _check_labels(case, seg_path, seg)
    if target == "organ":
        _check_liver(case, seg_path, seg)
    fg = seg > 0 if target == "organ" else seg == 2
    del seg
    # nibabel arrays are (x, y, z); (z, y, x) is slice-major like the BraTS store
    fg = np.ascontiguousarray(fg.transpose(2, 1, 0))
    labels = fg.any(axis=(1, 2)).astype(np.uint8)

    vol = _read(case, volume_path, vol_img)
    if vol.dtype.kind in "fc" and not np.isfinite(vol).all():
        n = int((~np.isfinite(vol)).sum())
        raise InputDataError(volume_path, f"case {case}: {n} NaN/Inf voxels in the CT volume")
    vol = vol.transpose(2, 1, 0)  # view, (S, H, W)
    n_slices, height, width = vol.shape
    resize = (height, width) != (image_size, image_size)
    image = np.empty((n_slices, 3, image_size, image_size), dtype=dtype)
    mask = np.empty((n_slices, image_size, image_size), dtype=np.uint8)
    buf = np.empty((min(_CHUNK, n_slices), height, width), dtype=np.float32)
    for a in range(0, n_slices, _CHUNK):
        b = min(a + _CHUNK, n_slices)
        tmp = buf[: b - a]
        tmp[...] = vol[a:b]
        if window is not None:
            np.clip(tmp, window[0], window[1], out=tmp)
        _minmax_slices(tmp, tmp)
        x = torch.from_numpy(tmp).unsqueeze(1)  # (c, 1, H, W)
        m = torch.from_numpy(fg[a:b]).unsqueeze(1)
        if resize:
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
            m = F.interpolate(m.to(torch.uint8), size=(image_size, image_size), mode="nearest")
        image[a:b] = x.numpy()  # broadcast: the CT channel repeated to 3 channels
        mask[a:b] = m[:, 0].to(torch.uint8).numpy()
    return image, mask, labels, vol_img


def load_volume(
    volume_path: str | os.PathLike,
    seg_path: str | os.PathLike | None,
    image_size: int = 256,
    target: str = "organ",
    hu_window: Sequence[float] | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one LiTS volume as ``image`` float32 (S, 3, size, size) and ``mask`` uint8 (S, size, size).

    Raises :class:`InputDataError` naming the case and the file for a missing segmentation,
    unreadable/truncated files, non-3-D volumes, shape mismatches, NaN/Inf intensities,
    labels outside {0, 1, 2} and, for ``target="organ"``, a segmentation without liver (label 1).
    """
    image, mask, _, _ = _load(
        Path(volume_path), None if seg_path is None else Path(seg_path), int(image_size),
        _check_target(target), _parse_window(hu_window), "float32",
    )
    return image, mask


def _settings_ok(meta: dict | None, target: str, window: tuple[float, float] | None) -> dict | None:
    if meta is None:
        return None
    ok = meta.get("target") == target and meta.get("hu_window") == (list(window) if window else None)
    return meta if ok else None


def _prepare_one(
    case: str, files: LiTSFiles, case_out: Path, image_size: int, target: str,
    window: tuple[float, float] | None, dtype: str, dataset_dir: Path,
) -> dict:
    image, mask, labels, vol_img = _load(files.volume, files.seg, image_size, target, window, dtype)
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": "lits17",
        "case": case,
        "n_slices": int(image.shape[0]),
        "image_size": image_size,
        "dtype": dtype,
        "target": target,
        "hu_window": list(window) if window else None,
        "labels": [int(v) for v in labels],
        "sources": {"volume": files.volume.name, "seg": files.seg.name},
        "grid": source_grid(vol_img, files.volume, dataset_dir, image_size, axes=(2, 1, 0)),
    }
    return write_case(case_out, image, mask, meta)


def prepare_lits17(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str | os.PathLike | None = "published",
    image_size: int = 256,
    target: str = "organ",
    hu_window: Sequence[float] | str | None = None,
    dtype: str = "float16",
    cases: Iterable[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    split_ratios: str | Sequence[float] = DEFAULT_RATIOS,
    split_seed: int = 0,
) -> Path:
    """Prepare LiTS17 volumes into a slice store and write ``<output_dir>/datalist.json``.

    Cases: those of ``split`` found in ``dataset_dir``, or exactly ``cases`` when given
    (``volume-N`` or ``volume-N.nii``; cases not in the split go under ``"unsplit"``; with
    ``split=None`` every case goes there). ``split`` is ``"published"`` (``data_lists/lits17.json``),
    a shipped datalist name, a JSON path (our datalist form or the published ``train``/``val``/
    ``test`` form with ``volume-N.nii`` names), or ``"random"``: a seeded case-wise split of the
    cases present (or of ``cases``) with ``split_ratios`` and ``split_seed``, written to
    ``<output_dir>/split.json`` and reused while they stay the same (see
    :mod:`custom_components.data.splits`).
    Resumable: a case whose ``meta.json`` matches ``image_size``/``dtype``/``target``/``hu_window``
    is skipped unless ``overwrite``. Returns the datalist path.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    target = _check_target(target)
    window = _parse_window(hu_window)
    found = find_volumes(dataset_dir)
    if cases is not None:
        cases = [case_id(c) for c in ([cases] if isinstance(cases, str) else cases)]
    present = list(found) if cases is None else [c for c in cases if c in found]
    splits, split_name = choose_split(split, "lits17", present, output_dir, split_ratios, split_seed, case_id)

    def prepare_case(case: str, case_out: Path) -> dict:
        files = found[case]
        if files.seg is None:
            files = LiTSFiles(files.volume, _seg_expected(Path(dataset_dir), files))
        return _prepare_one(case, files, case_out, image_size, target, window, dtype, Path(dataset_dir))

    return prepare_store(
        dataset_dir,
        output_dir,
        found=found,
        splits=splits,
        split_name=split_name,
        cases=cases,
        prepare_case=prepare_case,
        prepared_meta=lambda case_out: _settings_ok(_meta_ok(case_out / "meta.json", image_size, dtype), target, window),
        overwrite=overwrite,
        progress=progress,
        desc="prepare LiTS17",
    )
