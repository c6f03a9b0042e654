"""BraTS2020 reading, validation and preparation into a slice store (LGM-ViT spec, section 6).

The reference pipeline re-reads each NIfTI scan every epoch; here each case is read and
validated once and written as ``<store>/<case>/{image.npy, mask.npy, meta.json}``:

* channels T1, T2, FLAIR in that order (T1ce unused);
* volumes as (z, y, x) = (155, 240, 240), all axial slices kept, empty ones included;
* per-slice, per-modality min-max to [0, 1] (constant slice -> zeros; no z-score, no clipping);
* resize 240 -> ``image_size`` with bicubic (image) / nearest (mask), ``mask = seg > 0``;
* slice label = 1 iff the tumour mask of the slice is non-empty (at native resolution).

``meta.json["grid"]`` records the FLAIR file's grid and the transform above
(:mod:`custom_components.data.scan_grid`), so per-slice outputs can be written back on the scan's grid.
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

from custom_components.data.scan_grid import source_grid
from custom_components.data.splits import DEFAULT_RATIOS, choose_split
from custom_components.data.store import prepare_store, write_case
from custom_components.io import InputDataError

__all__ = [
    "MODALITIES",
    "SEG_LABELS",
    "FORMAT_VERSION",
    "find_cases",
    "case_files",
    "load_case",
    "prepare_brats20",
    "NiftiScanReader",
]

#: image channels in LGM-ViT order (spec section 6); T1ce is not used
MODALITIES: tuple[str, ...] = ("t1", "t2", "flair")
#: BraTS labels: 0 background, 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing
SEG_LABELS: tuple[int, ...] = (0, 1, 2, 4)
#: 2: meta.json holds the source-grid record ("grid"); older cases are re-prepared
FORMAT_VERSION = 2
DATA_FOLDER = "MICCAI_BraTS2020_TrainingData"
CASE_RE = re.compile(r"^BraTS20_Training_\d{3}$")
# Kaggle copy pitfall (spec section 6): this case's segmentation carries a foreign name.
MISNAMED_SEG = {"BraTS20_Training_355": "W39_1998.09.19_Segm.nii"}
_DTYPES = ("float16", "float32")


def find_cases(dataset_dir: str | os.PathLike) -> dict[str, Path]:
    """Map case ID -> case folder, sorted by ID.

    ``dataset_dir`` is the ``MICCAI_BraTS2020_TrainingData`` folder itself or its parent.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    if (root / DATA_FOLDER).is_dir():
        root = root / DATA_FOLDER
    cases = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and CASE_RE.match(p.name)}
    if not cases:
        raise InputDataError(
            root, f"no BraTS2020 case folders (BraTS20_Training_NNN) found here or in {DATA_FOLDER}/"
        )
    return cases


def _find_file(case_dir: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = case_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def case_files(case_dir: str | os.PathLike) -> dict[str, Path]:
    """Files of one case: ``{"t1", "t2", "flair", "seg"}`` -> path (``.nii`` or ``.nii.gz``)."""
    case_dir = Path(case_dir)
    case = case_dir.name
    files: dict[str, Path] = {}
    for mod in (*MODALITIES, "seg"):
        p = _find_file(case_dir, f"{case}_{mod}")
        if p is None and mod == "seg" and case in MISNAMED_SEG:
            alt = case_dir / MISNAMED_SEG[case]
            p = alt if alt.is_file() else _find_file(case_dir, MISNAMED_SEG[case].removesuffix(".nii"))
        if p is None:
            raise InputDataError(
                case_dir / f"{case}_{mod}.nii[.gz]", f"case {case}: missing {mod} file ({case}_{mod}.nii or .nii.gz)"
            )
        files[mod] = p
    return files


def _why(e: Exception) -> str:
    # one line: some nibabel messages span several, and the CLI prints a one-line error
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _open(case: str, path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except Exception as e:  # bad magic, truncated header, unreadable gzip ...
        raise InputDataError(path, f"case {case}: cannot read NIfTI file ({_why(e)})") from e
    if len(img.shape) != 3:
        raise InputDataError(path, f"case {case}: expected a 3-D volume, got shape {tuple(img.shape)}")
    return img


def _read(case: str, path: Path, img: nib.Nifti1Image) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # truncated data, gzip EOF / CRC errors ...
        raise InputDataError(path, f"case {case}: cannot read image data ({_why(e)})") from e


def _minmax_slices(vol: np.ndarray, out: np.ndarray) -> None:
    """Per-slice min-max of a (S, H, W) volume to [0, 1] into ``out``; constant slices -> 0."""
    out[...] = vol  # float32 copy, written in place to avoid a second full-size temporary
    lo = out.min(axis=(1, 2), keepdims=True)
    rng = out.max(axis=(1, 2), keepdims=True) - lo
    # divide only where the slice has a range, so constant (e.g. empty) slices become zeros
    scale = np.divide(1.0, rng, out=np.zeros_like(rng), where=rng > 0)
    out -= lo
    out *= scale


def _has_bad_labels(seg: np.ndarray) -> bool:
    """True if ``seg`` holds a value outside {0, 1, 2, 4} (fast path for integer volumes)."""
    if seg.dtype.kind in "ui":
        lo, hi = int(seg.min()), int(seg.max())
        return lo < 0 or hi > 4 or (hi >= 3 and bool((seg == 3).any()))
    return not np.isin(seg, SEG_LABELS).all()  # float segs (seen in some copies), NaN included


def _load_case(
    case_dir: Path, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Path], dict[str, nib.Nifti1Image]]:
    """Read, validate and transform one case; return image, mask, slice labels, files, opened images."""
    case_dir = Path(case_dir)
    case = case_dir.name
    files = case_files(case_dir)
    imgs = {mod: _open(case, p) for mod, p in files.items()}
    # shapes come from the headers, so a mismatch is reported before any voxel is read
    ref_shape = tuple(imgs["seg"].shape)
    for mod in MODALITIES:
        if tuple(imgs[mod].shape) != ref_shape:
            raise InputDataError(
                files[mod],
                f"case {case}: shape {tuple(imgs[mod].shape)} of {files[mod].name} does not match "
                f"segmentation shape {ref_shape} of {files['seg'].name}",
            )

    seg = _read(case, files["seg"], imgs["seg"])
    if _has_bad_labels(seg):
        bad = ~np.isin(seg, SEG_LABELS)
        vals = np.unique(seg[bad])
        shown = ", ".join(f"{v:g}" for v in vals[:10]) + (" ..." if vals.size > 10 else "")
        raise InputDataError(
            files["seg"], f"case {case}: segmentation labels outside {{0, 1, 2, 4}}: {shown}"
        )
    # nibabel arrays are (x, y, z); (z, y, x) matches SimpleITK's GetArrayFromImage (slice-major)
    tumour = np.ascontiguousarray((seg > 0).transpose(2, 1, 0))
    labels = tumour.any(axis=(1, 2)).astype(np.uint8)

    n_slices, height, width = tumour.shape
    stack = np.empty((n_slices, len(MODALITIES), height, width), dtype=np.float32)
    for c, mod in enumerate(MODALITIES):
        vol = _read(case, files[mod], imgs[mod])
        if vol.dtype.kind in "fc" and not np.isfinite(vol).all():
            n = int((~np.isfinite(vol)).sum())
            raise InputDataError(files[mod], f"case {case}: {n} NaN/Inf voxels in {mod} image")
        _minmax_slices(vol.transpose(2, 1, 0), stack[:, c])
    image = torch.from_numpy(stack)  # (S, 3, H, W)
    mask = torch.from_numpy(tumour).unsqueeze(1)  # (S, 1, H, W) bool
    if image.shape[-2:] != (image_size, image_size):
        image = F.interpolate(image, size=(image_size, image_size), mode="bicubic", align_corners=False)
        mask = F.interpolate(mask.to(torch.uint8), size=(image_size, image_size), mode="nearest")
    return image.numpy(), mask[:, 0].to(torch.uint8).numpy(), labels, files, imgs


def load_case(case_dir: str | os.PathLike, image_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Load one case as ``image`` float32 (S, 3, size, size) and ``mask`` uint8 (S, size, size).

    Raises :class:`InputDataError` naming the case and the file for missing/unreadable files,
    non-3-D volumes, shape mismatches, NaN/Inf intensities and labels outside {0, 1, 2, 4}.
    """
    image, mask, _, _, _ = _load_case(Path(case_dir), int(image_size))
    return image, mask


def _meta_ok(meta_path: Path, image_size: int, dtype: str) -> dict | None:
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None  # a corrupt marker means "not prepared": redo the case
    ok = (
        meta.get("format_version") == FORMAT_VERSION
        and meta.get("image_size") == image_size
        and meta.get("dtype") == dtype
        and (meta_path.parent / "image.npy").is_file()
        and (meta_path.parent / "mask.npy").is_file()
    )
    return meta if ok else None


def _prepare_one(case_dir: Path, case_out: Path, image_size: int, dtype: str, dataset_dir: Path) -> dict:
    image, mask, labels, files, imgs = _load_case(case_dir, image_size)
    meta = {
        "format_version": FORMAT_VERSION,
        "case": case_dir.name,
        "n_slices": int(image.shape[0]),
        "image_size": image_size,
        "dtype": dtype,
        "labels": [int(v) for v in labels],
        "sources": {mod: files[mod].name for mod in (*MODALITIES, "seg")},
        # FLAIR stands for the case: the four modalities and seg share one grid in BraTS
        "grid": source_grid(imgs["flair"], files["flair"], dataset_dir, image_size, axes=(2, 1, 0)),
    }
    return write_case(case_out, image.astype(dtype, copy=False), mask, meta)


def prepare_brats20(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str | os.PathLike | None = "published",
    image_size: int = 256,
    dtype: str = "float16",
    cases: Iterable[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    split_ratios: str | Sequence[float] = DEFAULT_RATIOS,
    split_seed: int = 0,
) -> Path:
    """Prepare BraTS2020 cases into a slice store and write ``<output_dir>/datalist.json``.

    Cases: those of ``split`` found in ``dataset_dir``, or exactly ``cases`` when given. ``split``
    is ``"published"`` (``data_lists/brats20.json``), a shipped datalist name, a JSON path, or
    ``"random"``: a seeded case-wise split of the cases present (or of ``cases``) with
    ``split_ratios`` (training, validation, test) and ``split_seed``, written to
    ``<output_dir>/split.json`` and reused while seed, ratios and cases stay the same (see
    :mod:`custom_components.data.splits`). Given ``cases`` outside the split go under the
    ``"unsplit"`` key; with ``split=None`` every case goes there. Resumable: a case whose
    ``meta.json`` matches ``image_size``/``dtype`` is skipped unless ``overwrite``. Returns the
    datalist path.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    found = find_cases(dataset_dir)
    if cases is not None:
        cases = [cases] if isinstance(cases, str) else list(cases)
    present = list(found) if cases is None else [c for c in cases if c in found]
    splits, split_name = choose_split(split, "brats20", present, output_dir, split_ratios, split_seed)
    return prepare_store(
        dataset_dir,
        output_dir,
        found=found,
        splits=splits,
        split_name=split_name,
        cases=cases,
        prepare_case=lambda case, case_out: _prepare_one(found[case], case_out, image_size, dtype, Path(dataset_dir)),
        prepared_meta=lambda case_out: _meta_ok(case_out / "meta.json", image_size, dtype),
        overwrite=overwrite,
        progress=progress,
        desc="prepare BraTS2020",
    )


class NiftiScanReader:
    """Baseline that re-reads NIfTI scans with :func:`load_case` (no prepared store).

    Used to benchmark the prepared slice store against reading every scan each epoch,
    which is what the LGM-ViT reference data loader does.
    """

    def __init__(self, case_dirs: Iterable[str | os.PathLike], image_size: int = 256):
        self.case_dirs = [Path(p) for p in case_dirs]
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.case_dirs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return load_case(self.case_dirs[i], self.image_size)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def read_all(self) -> int:
        """Read every case once (one "epoch"); return the number of slices read."""
        return sum(image.shape[0] for image, _ in self)
