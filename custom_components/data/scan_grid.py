"""Where prepared slices come from in their source scan, and the way back to that scan's grid.

Preparation (:mod:`~custom_components.data.brats20`, :mod:`~custom_components.data.lits17`)
turns a NIfTI volume, nibabel axes (x, y, z), into slices (S, H, W) =
``array.transpose(2, 1, 0)``, each resized in-plane to ``image_size`` (bicubic) when its size
differs: prepared slice ``k`` is source ``[:, :, k]`` with rows along source axis 1 and columns
along axis 0. Every slice is kept, in order; there is no crop, flip or reorientation (the affine
is ignored while preparing). :func:`source_grid` records this per case (``meta.json["grid"]``);
:func:`to_source` and :func:`source_nifti` undo it for per-slice outputs, so a written volume
has the source's shape, affine and spatial header and overlays the scan in a viewer.

A preparation that adds a crop, flip or slice selection must record it here and bump
:data:`GRID_VERSION`, so that older readers refuse the record instead of misplacing voxels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from custom_components.io import InputDataError

__all__ = ["GRID_VERSION", "load_grid", "source_grid", "source_nifti", "to_source"]

GRID_VERSION = 1
#: NIfTI header fields that define the voxel -> world mapping and the units: copied verbatim
#: (float32 values survive JSON exactly), so a written file's affine equals the source's
_HEADER_FIELDS = (
    "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units",
)  # fmt: skip
_CHUNK = 32  # slices resampled at a time (a LiTS scan on its source grid is ~1 GB as float32)


def source_grid(
    img: nib.spatialimages.SpatialImage,
    path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    image_size: int,
    axes: Sequence[int] = (2, 1, 0),
) -> dict:
    """The grid record of one prepared case (JSON-ready).

    ``img`` is the opened source file at ``path`` (stored relative to ``dataset_dir``);
    ``axes`` the source axes of the prepared (slice, row, column) axes, i.e. the transpose the
    preparation applied. Keys: ``source``, ``shape``, ``affine``, ``zooms``, ``header`` (the
    NIfTI fields of :data:`_HEADER_FIELDS`, None for other formats), ``slice_axis`` /
    ``row_axis`` / ``col_axis``, ``slices`` (source index of each prepared slice),
    ``prepared_size`` and ``resize`` (in-plane interpolation used, None if sizes matched).
    """
    shape = [int(n) for n in img.shape[:3]]
    s_ax, r_ax, c_ax = (int(a) for a in axes)
    header = img.header
    fields = {k: np.asarray(header[k]).tolist() for k in _HEADER_FIELDS} if isinstance(header, nib.Nifti1Header) else None
    resized = (shape[r_ax], shape[c_ax]) != (image_size, image_size)
    return {
        "grid_version": GRID_VERSION,
        "source": Path(os.path.relpath(path, dataset_dir)).as_posix(),
        "shape": shape,
        "affine": np.asarray(img.affine, dtype=float).tolist(),
        "zooms": [float(z) for z in header.get_zooms()[:3]],
        "header": fields,
        "slice_axis": s_ax,
        "row_axis": r_ax,
        "col_axis": c_ax,
        "slices": list(range(shape[s_ax])),  # all kept, in order
        "prepared_size": [int(image_size), int(image_size)],
        "resize": "bicubic" if resized else None,
    }


def load_grid(meta_path: str | os.PathLike) -> dict | None:
    """The grid record of a prepared case's ``meta.json``; None when it has none (older store).

    Raises :class:`InputDataError` naming the file when it is unreadable or the record is
    malformed or of another :data:`GRID_VERSION`.
    """
    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(meta_path, f"cannot read prepared case meta ({type(e).__name__}: {e})") from e
    grid = meta.get("grid") if isinstance(meta, dict) else None
    if grid is None:
        return None
    if grid.get("grid_version") != GRID_VERSION:
        raise InputDataError(
            meta_path,
            f"source-grid record version {grid.get('grid_version')!r}, this code reads {GRID_VERSION}; re-prepare the store",
        )
    try:
        shape = [int(n) for n in grid["shape"]]
        axes = sorted(int(grid[k]) for k in ("slice_axis", "row_axis", "col_axis"))
        ok = len(shape) == 3 and axes == [0, 1, 2] and np.asarray(grid["affine"]).shape == (4, 4)
        ok = ok and all(0 <= int(s) < shape[int(grid["slice_axis"])] for s in grid["slices"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InputDataError(meta_path, "malformed source-grid record; re-prepare the store")
    return grid


def to_source(maps: np.ndarray, slices: Sequence[int], grid: dict, mode: str = "bilinear") -> np.ndarray:
    """Per-slice outputs on the prepared grid -> one float32 volume on the source grid.

    ``maps`` (n, h, w) are the outputs of prepared slices ``slices`` (indices into the case's
    prepared slices). Each is resampled to the source in-plane size (``mode``: ``bilinear`` for
    maps, ``nearest`` for masks and labels; half-pixel centres, the inverse of the preparation's
    resize), put at its source slice index, and the axes are put back in source order. Slices
    without an output are 0. Returns an array of shape ``grid["shape"]``.
    """
    shape = [int(n) for n in grid["shape"]]
    s_ax, r_ax, c_ax = int(grid["slice_axis"]), int(grid["row_axis"]), int(grid["col_axis"])
    rows, cols = shape[r_ax], shape[c_ax]
    order = np.asarray(grid["slices"], dtype=np.int64)
    slices = np.asarray(list(slices), dtype=np.int64)
    if len(maps) != len(slices):
        raise ValueError(f"{len(maps)} maps for {len(slices)} slice indices")
    if slices.size and (slices.min() < 0 or slices.max() >= len(order)):
        raise ValueError(f"prepared slice index outside 0..{len(order) - 1}: {slices.min()}..{slices.max()}")
    out = np.zeros((shape[s_ax], rows, cols), np.float32)
    kw = {} if mode == "nearest" else {"align_corners": False}
    for a in range(0, len(slices), _CHUNK):
        x = torch.from_numpy(np.asarray(maps[a : a + _CHUNK], dtype=np.float32))[:, None]
        if x.shape[-2:] != (rows, cols):
            x = F.interpolate(x, size=(rows, cols), mode=mode, **kw)
        out[order[slices[a : a + _CHUNK]]] = x[:, 0].numpy()
    # out's axes are source axes (slice, row, col); argsort gives the transpose back to (0, 1, 2)
    return np.transpose(out, np.argsort([s_ax, r_ax, c_ax]))


def source_nifti(volume: np.ndarray, grid: dict) -> nib.Nifti1Image:
    """A float32 NIfTI image of ``volume`` with the source's affine and spatial header fields."""
    if grid.get("header"):
        header = nib.Nifti1Header()
        for key, value in grid["header"].items():
            header[key] = value
        header.set_data_dtype(np.float32)
        # the header's own affine, so nibabel keeps the copied qform/sform as they are
        return nib.Nifti1Image(volume.astype(np.float32, copy=False), header.get_best_affine(), header=header)
    return nib.Nifti1Image(volume.astype(np.float32, copy=False), np.asarray(grid["affine"], dtype=float))
