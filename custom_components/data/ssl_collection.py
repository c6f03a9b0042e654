"""The unlabelled image collection of LVM-Med pre-training (spec ``specs/lvmmed.md`` section 3).

LVM-Med pre-trains on many datasets merged, 2-D images and the slices of 3-D volumes alike.
:func:`prepare_ssl_collection` turns one or more *sources* into one datalist
``{"training": [{"image": PATH}, ...], "test": [...]}`` (absolute paths) beside a folder of slices:

* a **folder**: every PNG / JPEG image and NIfTI volume (``.nii``, ``.nii.gz``) below it, sorted,
  all for ``training``; a folder with a ``datalist.json`` at its top is read through that datalist;
* a **datalist JSON**: ``{"training": [...], "test": [...]}`` (other keys are ignored) or a plain
  list; entries are ``{"image": PATH}`` or ``PATH`` strings, relative to the JSON's folder unless
  absolute. Its ``test`` entries are the held-out list of the ``evaluate`` workflow;
* a single image or volume file (``training``).

Volumes become 2-D images once, at preparation: each slice along ``slice_axis`` (default the last,
axial for RAS-stored scans) with any non-constant content is written as an 8-bit PNG
(``slices/<k>_<volume name>/<slice:04d>.png``; intensities clipped to the volume's 0.5 / 99.5
percentiles, scaled to [0, 255]), atomically, so a rerun reuses what an interrupted one wrote.

Every 2-D file is decoded once (:func:`~custom_components.data.image_folders.check_image_file`);
the result is remembered beside the datalist (same sources, same file list: no second check).
Problems stop with one line (:class:`~custom_components.io.InputDataError`) naming the file: an
unreadable image or volume, a source that does not exist or holds nothing, an empty collection, or
one smaller than one graph (``graph_size`` images: the objective matches graphs of that many).

:class:`LoadSSLImaged` reads an entry's image as a (C, H, W) float tensor in [0, 1] with the
network's channel count (grey repeated to RGB, or RGB converted to grey with ITU-R 601 weights);
:class:`NormalizeImageNetd` applies the ImageNet mean/std the ImageNet and LVM-Med ResNet files
expect (grey: the mean of the three channels' values).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from custom_components.data.image_folders import check_image_file
from custom_components.io import InputDataError, atomic_save_json, atomic_write

__all__ = [
    "IMAGE_EXTS",
    "VOLUME_EXTS",
    "collect_sources",
    "volume_slices",
    "prepare_ssl_collection",
    "LoadSSLImaged",
    "load_ssl_image",
    "NormalizeImageNetd",
    "held_out_list",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
VOLUME_EXTS = (".nii", ".nii.gz")
SPLITS = ("training", "test")
#: a folder holding this file is read through it (a prepared dataset's datalist, as the twin writes)
DATALIST_NAME = "datalist.json"


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_EXTS)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def _as_list(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return [Path(s) for s in sources]


def _read_datalist(path: Path) -> dict[str, list[Path]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputDataError(path, f"cannot read datalist ({type(e).__name__}: {e})") from e
    lists = {"training": data} if isinstance(data, list) else data
    if not isinstance(lists, Mapping):
        raise InputDataError(path, f"a datalist is a JSON object of lists or a list, found {type(data).__name__}")
    out: dict[str, list[Path]] = {}
    for split in SPLITS:
        entries = lists.get(split, [])
        if not isinstance(entries, list):
            raise InputDataError(path, f"'{split}' is not a list")
        files = []
        for e in entries:
            rel = e.get("image") if isinstance(e, Mapping) else e
            if not isinstance(rel, str) or not rel:
                raise InputDataError(path, f"entry without an image path in '{split}': {e!r}")
            p = Path(rel)
            files.append(p if p.is_absolute() else path.parent / p)
        out[split] = files
    return out


def collect_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, list[Path]]:
    """The image and volume files of ``sources`` (folders, datalist JSONs, files), per split, merged in order.

    Raises :class:`InputDataError` for a source that does not exist, is of an unknown kind or holds
    no image, and for a listed file that does not exist or is of an unknown type.
    """
    merged: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for source in _as_list(sources):
        if source.is_dir() and (source / DATALIST_NAME).is_file():
            source = source / DATALIST_NAME
        if source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and (_is_image(p) or _is_volume(p)))
            found = {"training": files, "test": []}
        elif source.is_file() and source.suffix.lower() == ".json":
            found = _read_datalist(source)
            for path in found["training"] + found["test"]:
                if not path.is_file():
                    raise InputDataError(path, f"listed in {source} but missing")
                if not (_is_image(path) or _is_volume(path)):
                    raise InputDataError(path, f"listed in {source}: not a PNG/JPEG image or NIfTI volume")
        elif source.is_file() and (_is_image(source) or _is_volume(source)):
            found = {"training": [source], "test": []}
        elif not source.exists():
            raise InputDataError(source, "image source does not exist (give folders, datalist JSONs or image files)")
        else:
            raise InputDataError(source, "not a folder, a datalist JSON, a PNG/JPEG image or a NIfTI volume")
        if not found["training"] and not found["test"]:
            raise InputDataError(source, "holds no PNG/JPEG image or NIfTI volume")
        for split in SPLITS:
            merged[split].extend(found[split])
    return merged


def volume_slices(path: str | os.PathLike, out_dir: str | os.PathLike, slice_axis: int = -1) -> list[Path]:
    """Write the non-constant slices of a NIfTI volume as 8-bit PNGs under ``out_dir``; returns their paths.

    Intensities are clipped to the volume's 0.5 / 99.5 percentiles and scaled to [0, 255]. Slices
    already written (by an interrupted run) are kept; each is written through an atomic rename.
    """
    import nibabel as nib
    from PIL import Image

    path, out_dir = Path(path), Path(out_dir)
    try:
        vol = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors ...
        raise InputDataError(path, f"cannot read NIfTI volume ({type(e).__name__}: {e})") from e
    vol = np.squeeze(vol)
    if vol.ndim != 3:
        raise InputDataError(path, f"expected a 3-D volume, found shape {list(vol.shape)}")
    if not np.isfinite(vol).all():
        raise InputDataError(path, "volume holds NaN or infinite values")
    lo, hi = np.percentile(vol, (0.5, 99.5))
    scaled = np.clip((vol - lo) / max(float(hi - lo), 1e-8), 0.0, 1.0)
    scaled = np.moveaxis(scaled, slice_axis, 0)
    written = []
    for k, plane in enumerate(scaled):
        if float(plane.max() - plane.min()) <= 0.0:
            continue
        target = out_dir / f"{k:04d}.png"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target, suffix=".png") as tmp:
                Image.fromarray((plane * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        written.append(target)
    if not written:
        raise InputDataError(path, "volume has no slice with any contrast (constant intensity)")
    return written


def _volume_folder(path: Path, slice_axis: int) -> str:
    """``<name>_<key>``: the key changes with the volume file (path, size, time) and the slice axis, so slices
    written for another volume of the same name, an edited file or another axis are never reused."""
    name = path.name
    for ext in VOLUME_EXTS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{slice_axis}".encode()).hexdigest()[:12]
    return f"{name}_{key}"


def prepare_ssl_collection(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    graph_size: int = 16,
    slice_axis: int = -1,
    check_images: bool = True,
    name: str = "collection.json",
) -> Path:
    """Build the merged datalist of ``sources`` under ``output_dir`` (see the module docstring); returns its path.

    Args:
        sources: folders, datalist JSONs and image/volume files (one or a list).
        output_dir: where ``collection.json`` and the volume slices go.
        graph_size: images per graph; a training list shorter than this is refused.
        slice_axis: axis of the volumes along which slices are taken.
        check_images: decode every 2-D image once (remembered for an unchanged file list).
        name: file name of the datalist.
    """
    out = Path(output_dir)
    files = collect_sources(sources)
    lists: dict[str, list[str]] = {}
    for split in SPLITS:
        entries: list[str] = []
        for path in files[split]:
            if _is_volume(path):
                folder = out / "slices" / _volume_folder(path, slice_axis)
                entries.extend(str(p.resolve()) for p in volume_slices(path, folder, slice_axis))
            else:
                entries.append(str(path.resolve()))
        lists[split] = entries
    origin = ", ".join(str(s) for s in _as_list(sources))
    if not lists["training"]:
        raise InputDataError(origin, "the collection holds no training image (empty datalist or folder)")
    if len(lists["training"]) < int(graph_size):
        raise InputDataError(
            origin, f"the collection holds {len(lists['training'])} training image(s), fewer than one graph "
            f"(graph_size {int(graph_size)}): give more images or lower --graph_size",
        )
    datalist_path = out / name
    record = {"sources": [str(Path(s).resolve()) for s in _as_list(sources)], "slice_axis": int(slice_axis),
              "files": lists["training"] + lists["test"]}
    record_path = datalist_path.with_name(datalist_path.stem + ".checked.json")
    previous = None
    if record_path.is_file():
        try:
            previous = json.loads(record_path.read_text())
        except (OSError, ValueError):
            previous = None
    if check_images and previous != record:
        for f in record["files"]:
            check_image_file(f)
    data = {split: [{"image": f} for f in lists[split]] for split in SPLITS}
    atomic_save_json(data, datalist_path)
    if check_images:
        atomic_save_json(record, record_path)
    return datalist_path


def load_ssl_image(path: str | os.PathLike, channels: int = 3) -> torch.Tensor:
    """A PNG / JPEG image as a (channels, H, W) float32 tensor in [0, 1]; one error line naming the file."""
    from PIL import Image

    if int(channels) not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / max(hi - lo, 1e-8)
                arr = np.repeat(arr[None], int(channels), axis=0)
            else:
                im = im.convert("L" if int(channels) == 1 else "RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise InputDataError(path, f"cannot read image ({type(e).__name__}: {e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr))


class LoadSSLImaged(MapTransform):
    """Replace the path at ``keys`` by the image as (channels, H, W) float in [0, 1] (:func:`load_ssl_image`)."""

    def __init__(self, keys: Hashable | Sequence[Hashable] = "image", channels: int = 3,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_ssl_image(d[key], self.channels)
        return d


#: ImageNet channel statistics (RGB); a grey input uses their means
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalizeImageNetd(MapTransform):
    """(x - mean) / std per channel with the ImageNet statistics at ``keys`` ((C, H, W), C = 1 or 3)."""

    def __init__(self, keys: Hashable | Sequence[Hashable] = ("view_s", "view_t"), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            if img.shape[0] == 3:
                mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            elif img.shape[0] == 1:
                mean, std = torch.tensor([sum(IMAGENET_MEAN) / 3]), torch.tensor([sum(IMAGENET_STD) / 3])
            else:
                raise ValueError(f"{key}: expected 1 or 3 channels, got shape {tuple(img.shape)}")
            d[key] = (img - mean.to(img)[:, None, None]) / std.to(img)[:, None, None]
        return d


def held_out_list(datalist: str | os.PathLike, split: str = "test", graph_size: int = 16) -> list[dict]:
    """The ``split`` entries of a prepared collection for the ``evaluate`` workflow (at least one graph).

    One error line when the list is missing or shorter than ``graph_size`` (a datalist source with a
    ``test`` list gives it).
    """
    path = Path(datalist)
    if not path.is_file():
        raise InputDataError(path, "prepared collection not found: run with --prepare_data true first")
    try:
        entries = json.loads(path.read_text()).get(split, [])
    except (OSError, ValueError, AttributeError) as e:
        raise InputDataError(path, f"cannot read the prepared collection ({type(e).__name__}: {e})") from e
    if len(entries) < int(graph_size):
        raise InputDataError(
            path, f"{len(entries)} held-out image(s) in '{split}', fewer than one graph (graph_size {int(graph_size)}): "
            f"give a datalist source with a '{split}' list",
        )
    return [dict(e) for e in entries]
