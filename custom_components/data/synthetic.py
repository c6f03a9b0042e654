"""Synthetic format twins of the datasets, written in their exact on-disk layouts.

They let tests and smoke runs exercise the real preparation code (file names, NIfTI headers,
dtypes, label values, the published split) without the real data. No result computed on a
twin means anything clinically.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from custom_components.data.datalists import datalist_path

__all__ = ["write_brats20_twin", "write_lits17_twin"]

# raw scanner-like tissue intensities per modality: (white matter, grey matter, CSF,
# oedema, necrotic core, enhancing rim); BraTS images are int16 and not normalised
_BRATS_CONTRAST = {
    "t1": (620, 480, 180, 380, 240, 460),
    "t1ce": (640, 500, 200, 400, 260, 1100),
    "t2": (420, 620, 1500, 1250, 1400, 900),
    "flair": (380, 460, 90, 880, 300, 700),
}


def _grid(shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Voxel coordinates normalised to [-1, 1] per axis (broadcastable, (x, y, z) order)."""
    return tuple(
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(3)])
        for a, n in enumerate(shape)
    )


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """Low-frequency field (sum of a few random cosines), used for a bias field and texture."""
    x, y, z = _grid(shape)
    f = np.zeros(tuple(shape), np.float32)
    for _ in range(4):
        kx, ky, kz = rng.uniform(0.5, 2.5, 3)
        ph = rng.uniform(0, 2 * np.pi, 3)
        f += np.cos(kx * np.pi * x + ph[0]) * np.cos(ky * np.pi * y + ph[1]) * np.cos(kz * np.pi * z + ph[2])
    return scale * f / 4


def _brats_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x, y, z = _grid(shape)
    # brain: an ellipsoid with a wobbly surface; cortex (grey matter) as an outer shell
    wobble = _smooth_noise(rng, shape, 0.08)
    r_brain = (x / 0.78) ** 2 + (y / 0.88) ** 2 + (z / 0.85) ** 2 + wobble
    brain = r_brain < 1.0
    grey = brain & (r_brain > 0.62)
    # ventricles: two small CSF ellipsoids either side of the midline
    csf = np.zeros(shape, bool)
    for side in (-1, 1):
        csf |= ((x - side * 0.12) / 0.08) ** 2 + (y / 0.28) ** 2 + (z / 0.2) ** 2 < 1.0
    csf &= brain

    # tumour inside one hemisphere, spanning a contiguous run of axial (third-axis) slices;
    # the in-plane radius shrinks only mildly towards the ends of the run so every tumour
    # slice keeps a sizeable cross-section
    cx, cy = rng.uniform(0.25, 0.4) * rng.choice([-1, 1]), rng.uniform(-0.25, 0.25)
    cz, hz = rng.uniform(-0.25, 0.25), rng.uniform(0.22, 0.35)
    rxy = rng.uniform(0.22, 0.3)
    dz = np.clip(np.abs(z - cz) / hz, 0, None)
    taper = np.sqrt(np.clip(1 - 0.5 * dz**2, 0, None)) * (dz <= 1)
    rho = np.sqrt(((x - cx) / rxy) ** 2 + ((y - cy) / (rxy * 1.15)) ** 2) + _smooth_noise(rng, shape, 0.1)
    rho = np.where(taper > 0, rho / np.maximum(taper, 1e-6), np.inf)
    seg = np.zeros(shape, np.uint8)
    seg[rho < 1.0] = 2  # oedema
    inner = (rho < 0.6) & (dz <= 0.7)
    seg[inner] = 4  # enhancing rim
    seg[(rho < 0.35) & (dz <= 0.5)] = 1  # necrotic / non-enhancing core
    seg[~brain] = 0
    # make sure the tumour exists even on very small grids
    if not seg.any():
        i, j, k = (int(round((c + 1) / 2 * (n - 1))) for c, n in zip((cx, cy, cz), shape, strict=True))
        seg[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, k] = 2

    tissue = np.select(
        [seg == 1, seg == 4, seg == 2, csf, grey, brain], [4, 5, 3, 2, 1, 0], default=-1
    )
    bias = 1.0 + _smooth_noise(rng, shape, 0.15)
    images = {}
    for mod, levels in _BRATS_CONTRAST.items():
        lut = np.asarray(levels, np.float32) * rng.uniform(0.85, 1.2)
        img = lut[np.clip(tissue, 0, None)] * bias * (1 + _smooth_noise(rng, shape, 0.05))
        img += rng.normal(0, 0.04 * lut[0], shape).astype(np.float32)
        img[tissue < 0] = 0  # skull-stripped: zeros outside the brain
        images[mod] = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
    return images, seg


def _nifti(arr: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(arr, affine)
    # like the real files: qform and sform both "scanner" (code 1), units mm
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _triple(name: str, value: Sequence[float] | None, positive: bool = False) -> tuple[float, float, float] | None:
    """Validate an optional (x, y, z) triple of numbers (voxel spacing or origin, mm)."""
    if value is None:
        return None
    out = tuple(float(v) for v in value)
    if len(out) != 3 or not all(np.isfinite(out)) or (positive and min(out) <= 0):
        raise ValueError(f"{name} must be 3 {'positive ' if positive else ''}numbers (x, y, z mm), got {value!r}")
    return out[0], out[1], out[2]


def _twin_affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Axis-aligned affine diag(-sx, -sy, sz) (x, y flipped as in BraTS/LiTS) with ``origin``."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def _default_brats_ids(n_per_split: Sequence[int]) -> list[str]:
    data = json.loads(datalist_path("brats20").read_text())
    ids = []
    for key, n in zip(("training", "validation", "test"), n_per_split, strict=False):
        ids += [e["case"] for e in data[key][: int(n)]]
    return ids


def write_brats20_twin(
    output_dir: str | os.PathLike,
    case_ids: Sequence[str] | None = None,
    n_per_split: Sequence[int] = (3, 2, 2),
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    compress: bool = True,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
) -> Path:
    """Write a BraTS2020 twin ``<output_dir>/MICCAI_BraTS2020_TrainingData/<case>/<case>_<mod>.nii[.gz]``.

    Images are int16 skull-stripped brain-like volumes with per-modality contrast, bias field
    and noise; ``seg`` is uint8 with nested tumour labels (oedema 2 around enhancing 4 around
    core 1) on a contiguous run of axial slices. Affine diag(-sx, -sy, sz) with voxel ``spacing``
    (sx, sy, sz) mm, default (1, 1, 1) as BraTS, and ``origin``, default (0, sy * (Y - 1), 0);
    e.g. ``shape=(40, 32, 9), spacing=(0.9, 0.9, 6.5)`` mimics a thick-slice non-BraTS grid.
    Without ``case_ids`` the first ``n_per_split`` IDs of the training/validation/test lists of
    ``data_lists/brats20.json`` are used. Deterministic from ``seed``. Returns the data folder.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes >= 4, got {shape}")
    ids = list(case_ids) if case_ids is not None else _default_brats_ids(n_per_split)
    root = Path(output_dir) / "MICCAI_BraTS2020_TrainingData"
    root.mkdir(parents=True, exist_ok=True)
    spacing = _triple("spacing", spacing, positive=True) or (1.0, 1.0, 1.0)
    origin = _triple("origin", origin) or (0.0, spacing[1] * (shape[1] - 1), 0.0)
    affine = _twin_affine(spacing, origin)
    ext = ".nii.gz" if compress else ".nii"
    for n, case in enumerate(ids):
        # one generator per case, so a case's content does not depend on the others
        rng = np.random.default_rng([seed, n])
        images, seg = _brats_case(rng, shape)
        case_dir = root / case
        case_dir.mkdir(exist_ok=True)
        for mod, arr in (*images.items(), ("seg", seg)):
            nib.save(_nifti(arr, affine), case_dir / f"{case}_{mod}{ext}")

    # name_mapping.csv as in the official release (grades and older IDs are made up)
    rng = np.random.default_rng([seed, 10**6])
    with open(root / "name_mapping.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
             "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"]
        )
        for case in ids:
            grade = "HGG" if rng.random() < 0.8 else "LGG"
            site = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 3))
            w.writerow(
                [grade, f"Brats17_CBICA_{site}_1", f"Brats18_CBICA_{site}_1", "NA",
                 f"BraTS19_CBICA_{site}_1", case]
            )
    return root


# ---------------------------------------------------------------- LiTS17

# Hounsfield units of the tissues of the abdominal CT twin
_HU = {"air": -1000, "fat": -100, "soft": 40, "muscle": 55, "liver": 60, "tumour": 25, "bone": 700}


def _lits_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One abdominal CT-like volume (HU, float32) and its LiTS segmentation (uint8 0/1/2)."""
    x, y, z = _grid(shape)
    wobble = _smooth_noise(rng, shape, 0.05)
    # body: an elliptic cylinder (all slices) with a fat layer, in air
    r_body = (x / 0.85) ** 2 + (y / 0.7) ** 2 + wobble
    body = r_body < 1.0
    fat = body & (r_body > 0.75)
    # spine (bone) behind the centre, on every slice
    bone = ((x / 0.1) ** 2 + ((y - 0.45) / 0.1) ** 2 < 1.0) & body
    # liver: on one side, on a contiguous run of slices (third axis) ending near the top
    z_lo = rng.uniform(-0.3, 0.1)
    cx, cy = rng.uniform(-0.45, -0.3), rng.uniform(-0.2, 0.0)
    rxy = rng.uniform(0.3, 0.4)
    zc = np.clip((z - z_lo) / (1.0 - z_lo), 0, 1)  # 0 at the liver's lower end, 1 at the top
    grow = np.sqrt(np.clip(zc, 0, 1)) * (z >= z_lo)  # small tip at the bottom, large dome above
    rho = np.sqrt(((x - cx) / rxy) ** 2 + ((y - cy) / (0.8 * rxy)) ** 2) + _smooth_noise(rng, shape, 0.06)
    liver = (rho < np.maximum(grow, 0.25 * (z >= z_lo))) & body & ~fat
    seg = liver.astype(np.uint8)
    # one tumour inside the liver, on part of the liver slices
    tz = rng.uniform(z_lo + 0.25 * (1 - z_lo), 1 - 0.25 * (1 - z_lo))
    tr = rng.uniform(0.08, 0.14)
    tumour = ((x - cx) ** 2 + (y - cy) ** 2 + ((z - tz) * 0.5) ** 2 < tr**2) & liver
    seg[tumour] = 2
    # make sure both labels exist even on very small grids
    if not (seg == 1).any() or not (seg == 2).any():
        i, j = (int(round((c + 1) / 2 * (n - 1))) for c, n in zip((cx, cy), shape[:2], strict=True))
        k = shape[2] - 1 - shape[2] // 4
        seg[max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3, k : shape[2]] = 1
        seg[i, j, k + (shape[2] - k) // 2] = 2
        liver = seg > 0

    hu = np.full(shape, _HU["air"], np.float32)
    hu[body] = _HU["soft"] + 20 * _smooth_noise(rng, shape, 1.0)[body]
    hu[fat] = _HU["fat"]
    hu[bone] = _HU["bone"] + rng.uniform(0, 300)
    hu[seg == 1] = _HU["liver"] + rng.uniform(-8, 8)
    hu[seg == 2] = _HU["tumour"] + rng.uniform(-8, 8)
    hu += rng.normal(0, 12, shape).astype(np.float32)
    return hu, seg


def _default_ids(name: str, n_per_split: Sequence[int]) -> list[str]:
    data = json.loads(datalist_path(name).read_text())
    ids = []
    for key, n in zip(("training", "validation", "test"), n_per_split, strict=False):
        ids += [e["case"] for e in data[key][: int(n)]]
    return ids


def write_lits17_twin(
    output_dir: str | os.PathLike,
    case_ids: Sequence[str] | None = None,
    n_per_split: Sequence[int] = (3, 2, 2),
    shape: Sequence[int] = (512, 512, 75),
    seed: int = 0,
    compress: bool = False,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
) -> Path:
    """Write a LiTS17 twin ``<output_dir>/scans/volume-N.nii`` + ``<output_dir>/segmentations/segmentation-N.nii``.

    CT volumes are int16 Hounsfield units (air -1000, fat -100, soft tissue ~40, liver ~60,
    hypodense tumour ~25, spine 700+, noise); segmentations are uint8 with 0 background, 1 liver,
    2 tumour inside the liver. The liver spans a contiguous run of slices of the third axis (the
    upper part of the volume, as in LiTS), the tumour a shorter run inside it. Affine
    diag(-s, -s, dz) with sub-millimetre in-plane spacing s (0.55-0.95 mm) and dz 0.7-5 mm,
    like LiTS; ``spacing`` (sx, sy, sz) mm fixes diag(-sx, -sy, sz) for every volume and ``origin``
    the origin, default (sx * (X - 1) / 2, sy * (Y - 1) / 2, -sz * Z). Without ``case_ids`` the first
    ``n_per_split`` IDs (``volume-N``) of the training/validation/test lists of ``data_lists/lits17.json``
    are used. ``compress`` writes
    ``.nii.gz`` (LiTS itself is uncompressed ``.nii``). Deterministic from ``seed``. Returns
    ``output_dir``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shape}")
    fixed_spacing, fixed_origin = _triple("spacing", spacing, positive=True), _triple("origin", origin)
    ids = list(case_ids) if case_ids is not None else _default_ids("lits17", n_per_split)
    root = Path(output_dir)
    (root / "scans").mkdir(parents=True, exist_ok=True)
    (root / "segmentations").mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if compress else ".nii"
    for case in ids:
        name = Path(case).name.removesuffix(".gz").removesuffix(".nii")
        if not name.startswith("volume-") or not name[7:].isdigit():
            raise ValueError(f"LiTS case IDs are volume-N, got {case!r}")
        n = int(name[7:])
        # one generator per case, so a case's content does not depend on the others
        rng = np.random.default_rng([seed, n])
        hu, seg = _lits_case(rng, shape)
        # drawn even when fixed, so the default twins stay byte-identical
        s, dz = rng.uniform(0.55, 0.95), float(rng.choice([0.7, 1.0, 1.5, 2.5, 5.0]))
        sp = fixed_spacing or (s, s, dz)
        affine = _twin_affine(sp, fixed_origin or (sp[0] * (shape[0] - 1) / 2, sp[1] * (shape[1] - 1) / 2, -sp[2] * shape[2]))
        ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        nib.save(_nifti(ct, affine), root / "scans" / f"volume-{n}{ext}")
        nib.save(_nifti(seg, affine), root / "segmentations" / f"segmentation-{n}{ext}")
    return root


# --------------------------------------------------------------------------------------------
# MedMNIST (2-D and 3-D) format twins
# --------------------------------------------------------------------------------------------


def _medmnist_labels(rng: np.random.Generator, task: str, n_classes: int, n: int) -> np.ndarray:
    """(n, 1) class indices covering every class when n >= n_classes, or (n, C) 0/1 for multi-label."""
    if task == "multi-label":
        labels = (rng.random((n, n_classes)) < 0.3).astype(np.uint8)
        for c in range(min(n_classes, n)):  # every label positive at least once, negative at least once
            labels[c, c] = 1
            if n > 1:
                labels[(c + 1) % n, c] = 0
        return labels
    labels = np.resize(np.arange(n_classes), n)
    rng.shuffle(labels)
    return labels.astype(np.uint8)[:, None]


def _medmnist_images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...], n_classes: int,
                     channels: int) -> np.ndarray:
    """uint8 images whose blob brightness and radius depend on the (first positive) label, plus noise."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = np.empty((labels.shape[0], *shape, channels), dtype=np.uint8)
    for i, lab in enumerate(labels):
        k = int(lab[0]) if lab.size == 1 else int(np.argmax(lab)) if lab.any() else 0
        frac = (k + 1) / (n_classes + 1)
        centre = rng.uniform(-0.3, 0.3, size=len(shape))
        r2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
        radius = 0.25 + 0.4 * frac
        blob = np.exp(-r2 / (2 * radius**2))
        base = 40 + 160 * frac * blob + rng.normal(0, 12, size=shape)
        for ch in range(channels):
            out[i, ..., ch] = np.clip(base * (1.0 - 0.15 * ch) + 10 * ch, 0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def _write_medmnist_twin(path: str | os.PathLike, name: str, n: Sequence[int], size: int, seed: int, dim: int) -> Path:
    from custom_components.data.medmnist import MEDMNIST_INFO
    from custom_components.io import atomic_write

    key = name.lower()
    if key not in MEDMNIST_INFO or MEDMNIST_INFO[key]["dim"] != dim:
        names = sorted(k for k, v in MEDMNIST_INFO.items() if v["dim"] == dim)
        raise ValueError(f"unknown {dim}-D MedMNIST dataset {name!r}; expected one of {names}")
    n = tuple(int(v) for v in n)
    if len(n) != 3 or min(n) < 1 or int(size) < 4:
        raise ValueError(f"n must be 3 positive split sizes and size >= 4, got {n}, {size}")
    info = MEDMNIST_INFO[key]
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        labels = _medmnist_labels(rng, info["task"], info["n_classes"], count)
        arrays[f"{split}_images"] = _medmnist_images(rng, labels, (int(size),) * dim, info["n_classes"], info["n_channels"])
        arrays[f"{split}_labels"] = labels
    path = Path(path)
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


def write_medmnist2d_twin(path: str | os.PathLike, name: str = "breastmnist", n: Sequence[int] = (60, 20, 20),
                          size: int = 28, seed: int = 0) -> Path:
    """Write a MedMNIST-2D twin ``.npz`` at ``path`` with the official keys, dtypes and shapes.

    ``{train,val,test}_images`` uint8 (N, size, size) for grey datasets or (N, size, size, 3) for
    RGB ones; ``{train,val,test}_labels`` uint8 (N, 1), or (N, 14) 0/1 for ChestMNIST. Every class
    occurs in a split with at least as many samples as classes; the blob brightness and radius
    depend on the label, so a classifier can learn it. Deterministic from ``seed``. Returns ``path``.
    """
    return _write_medmnist_twin(path, name, n, size, seed, dim=2)


def write_medmnist3d_twin(path: str | os.PathLike, name: str = "organmnist3d", n: Sequence[int] = (24, 12, 12),
                          size: int = 28, seed: int = 0) -> Path:
    """Write a MedMNIST-3D twin ``.npz``: images uint8 (N, size, size, size), labels uint8 (N, 1).

    Same content rule as :func:`write_medmnist2d_twin` (label-dependent 3-D blob plus noise);
    ``size`` 28 (MedMNIST) or 64 (MedMNIST+). Returns ``path``.
    """
    return _write_medmnist_twin(path, name, n, size, seed, dim=3)


__all__ += ["write_medmnist2d_twin", "write_medmnist3d_twin"]


# --------------------------------------------------------------------------- 2-D image folders


def _name_hex(rng: np.random.Generator) -> str:
    """A UUID-like file stem as Kvasir v2 uses (``0a1b2c3d-....``), deterministic from ``rng``."""
    h = "".join(f"{v:02x}" for v in rng.integers(0, 256, size=16))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _noise2d(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency 2-D field in about [-1, 1] (sum of a few random cosines)."""
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    f = np.zeros((height, width), np.float32)
    for _ in range(4):
        kx, ky = rng.uniform(0.5, 3.0, 2)
        ph = rng.uniform(0, 2 * np.pi, 2)
        f += np.cos(kx * np.pi * x + ph[0]) * np.cos(ky * np.pi * y + ph[1])
    return f / 4


def _ellipse(width: int, height: int, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / a
    v = (-(xx - cx) * s + (yy - cy) * c) / b
    return u * u + v * v <= 1.0


def write_kvasir_twin(output_dir: str | os.PathLike, n_per_class: int = 6, size: Sequence[int] = (720, 576),
                      with_masks: bool = True, seed: int = 0) -> Path:
    """Kvasir v2 twin: ``<output_dir>/kvasir-dataset-v2/<class>/<uuid>.jpg`` for the 8 classes.

    ``size`` = (width, height). Endoscopy-like reddish background with smooth noise and a dark
    vignette; esophagitis images carry a bright elongated (rotated ellipse) lesion. With
    ``with_masks`` the first ``ceil(n_per_class / 2)`` esophagitis images (sorted by name) get a
    binary 0/255 PNG of the lesion at ``<output_dir>/masks/kvasir-dataset-v2/esophagitis/<stem>.png``.
    Deterministic from ``seed``. Returns ``output_dir``.
    """
    from PIL import Image

    from custom_components.data.image_folders import KVASIR_CLASSES

    out = Path(output_dir)
    width, height = (int(v) for v in size)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    vignette = 1.0 - 0.6 * (((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2).clip(0, 1)
    for ci, cls in enumerate(KVASIR_CLASSES):
        folder = out / "kvasir-dataset-v2" / cls
        folder.mkdir(parents=True, exist_ok=True)
        lesions = []
        for _ in range(n_per_class):
            noise = (_noise2d(rng, height, width) + 1) / 2
            base = np.stack([150 + 60 * noise, 70 + 40 * noise + 3 * ci, 60 + 30 * noise], -1) * vignette[..., None]
            lesion = None
            if cls == "esophagitis":
                a = rng.uniform(0.18, 0.3) * width
                b = rng.uniform(0.03, 0.06) * height
                cx = rng.uniform(0.35, 0.65) * width
                cy = rng.uniform(0.35, 0.65) * height
                lesion = _ellipse(width, height, cx, cy, a, b, rng.uniform(0, np.pi))
                base[lesion] = (245, 235, 225)
            name = _name_hex(rng)
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"{name}.jpg", quality=90)
            lesions.append((name, lesion))
        if with_masks and cls == "esophagitis":
            mdir = out / "masks" / "kvasir-dataset-v2" / cls
            mdir.mkdir(parents=True, exist_ok=True)
            for name, lesion in sorted(lesions, key=lambda t: t[0])[: (n_per_class + 1) // 2]:
                Image.fromarray(lesion.astype(np.uint8) * 255).save(mdir / f"{name}.png")
    return out


def write_mura_twin(output_dir: str | os.PathLike, n_patients: int = 8,
                    body_parts: Sequence[str] = ("XR_WRIST", "XR_HAND"), with_masks: bool = True, seed: int = 0,
                    size: Sequence[int] = (256, 320)) -> Path:
    """MURA v1.1 twin: ``<output_dir>/MURA-v1.1/{train,valid}_{image_paths,labeled_studies}.csv`` + PNGs.

    ``max(2, n_patients // 4)`` patients go to ``valid`` (numbered after the train patients, as
    in MURA), the rest to ``train``; ``n_patients`` >= 4 so both splits hold both labels. Each
    patient has 1-2 studies in 1-2 of ``body_parts``, each study 1-3 images of ``size`` =
    (width, height), grey (mode L) or, for every fifth image, RGB. Abnormal studies (label 1,
    folder ``studyN_positive``) carry a bright "hardware" rectangle. With ``with_masks`` the first
    image of every abnormal study gets its rectangle in ``<output_dir>/mura_boxes.json``
    (``{"<relative image path>": [[x, y, w, h]]}``). Deterministic from ``seed``. Returns ``output_dir``.
    """
    from PIL import Image

    if n_patients < 4:
        raise ValueError("n_patients must be >= 4 (both splits need both labels)")
    out = Path(output_dir)
    base = out / "MURA-v1.1"
    base.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in size)
    rng = np.random.default_rng(seed)
    n_valid = max(2, n_patients // 4)
    n_train = n_patients - n_valid
    boxes: dict[str, list[list[int]]] = {}
    image_rows: dict[str, list[str]] = {"train": [], "valid": []}
    study_rows: dict[str, list[str]] = {"train": [], "valid": []}
    k = 0
    for p in range(n_patients):
        split = "train" if p < n_train else "valid"
        j = p if p < n_train else p - n_train  # index within the split
        patient = f"patient{p + 1:05d}"
        parts = list(rng.choice(body_parts, size=min(len(body_parts), int(rng.integers(1, 3))), replace=False))
        for pi, part in enumerate(sorted(parts)):
            for s in range(int(rng.integers(1, 3))):
                label = int(rng.integers(0, 2))
                if pi == 0 and s == 0 and j < 2:
                    label = int(j == 0)  # first patient of each split abnormal, second normal
                study = f"MURA-v1.1/{split}/{part}/{patient}/study{s + 1}_{'positive' if label else 'negative'}"
                study_rows[split].append(f"{study}/,{label}")
                (out / study).mkdir(parents=True, exist_ok=True)
                for i in range(int(rng.integers(1, 4))):
                    _, xx = np.mgrid[0:height, 0:width].astype(np.float32)
                    bone = np.exp(-((xx - width / 2) / (0.12 * width)) ** 2) * 140
                    img = 30 + bone + _noise2d(rng, height, width) * 15
                    rel = f"{study}/image{i + 1}.png"
                    if label:
                        bw, bh = int(rng.integers(width // 10, width // 4)), int(rng.integers(height // 6, height // 3))
                        bx, by = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
                        img[by:by + bh, bx:bx + bw] = 250
                        if with_masks and i == 0:
                            boxes[rel] = [[bx, by, bw, bh]]
                    arr = np.clip(img, 0, 255).astype(np.uint8)
                    im = Image.fromarray(arr)
                    if k % 5 == 4:
                        im = im.convert("RGB")
                    im.save(out / rel)
                    image_rows[split].append(rel)
                    k += 1
    for split in ("train", "valid"):
        (base / f"{split}_image_paths.csv").write_text("\n".join(image_rows[split]) + "\n")
        (base / f"{split}_labeled_studies.csv").write_text("\n".join(study_rows[split]) + "\n")
    if with_masks:
        (out / "mura_boxes.json").write_text(json.dumps(boxes, indent=1) + "\n")
    return out


__all__ += ["write_kvasir_twin", "write_mura_twin"]


def write_standin_vit_checkpoints(output_dir: str | os.PathLike, img_size: int = 224, patch_size: int = 16,
                                  hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                                  mlp_dim: int = 3072, seed: int = 0) -> dict[str, Path]:
    """Stand-ins for the study's pretrained ViT files, with random weights in the released key layouts.

    ``sup.pth``: a timm ``vit_base_patch16_224``-style state dict with a 1000-class head;
    ``dino.pth``: a full DINO checkpoint (``{"teacher": {"backbone.<key>": ...}}``, no head);
    ``mae.pth``: a fine-tuned MAE checkpoint (``{"model": ...}`` with ``fc_norm`` instead of
    ``norm`` and a 1000-class head). They exercise the loading path only: the weights mean nothing.
    The weights of ``sup`` / ``dino`` / ``mae`` are drawn with ``seed`` / ``seed + 1`` / ``seed + 2``.
    Returns ``{init: path}``.
    """
    import torch

    from custom_components.networks.vit import AttributionViT

    def weights(offset: int) -> dict:
        # each stand-in gets its own random weights (seed + offset), so the four inits differ
        torch.manual_seed(seed + offset)
        return dict(AttributionViT(img_size=img_size, patch_size=patch_size, num_classes=1000, hidden_size=hidden_size,
                                   num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
                                   pos_embed="learnable").state_dict())

    state, dino, mae = weights(0), weights(1), weights(2)
    backbone = {k: v for k, v in dino.items() if not k.startswith("head")}
    mae["fc_norm.weight"], mae["fc_norm.bias"] = mae.pop("norm.weight"), mae.pop("norm.bias")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "sup": state,
        "dino": {"teacher": {f"backbone.{k}": v for k, v in backbone.items()}, "epoch": 100},
        "mae": {"model": mae},
    }
    paths = {}
    for init, ckpt in files.items():
        paths[init] = out / f"{init}.pth"
        torch.save(ckpt, paths[init])
    return paths


__all__ += ["write_standin_vit_checkpoints"]


# --------------------------------------------------------------------------- NIH ChestX-ray14


def _chest_radiograph(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey radiograph-like image in [0, 1] (body, dark lungs with ribs, bright mediastinum) and its lung mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = 2 * (xx + 0.5) / size - 1, 2 * (yy + 0.5) / size - 1
    body = (x / 0.88) ** 2 + (y / 0.98) ** 2 < 1
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        cx, rx, ry = side * rng.uniform(0.36, 0.42), rng.uniform(0.25, 0.3), rng.uniform(0.5, 0.6)
        lungs |= ((x - cx) / rx) ** 2 + ((y + 0.05) / ry) ** 2 < 1
    img = np.full((size, size), 0.05, np.float32)
    img[body] = 0.5
    img[lungs] = 0.2 + 0.07 * (np.sin(24 * y[lungs] + 3 * x[lungs] ** 2) > 0.55)  # ribs
    img[(np.abs(x) < 0.13) & (y > -0.7) & body] = 0.72  # mediastinum and spine
    img += 0.05 * _noise2d(rng, size, size) + rng.normal(0, 0.015, (size, size)).astype(np.float32)
    return img, lungs


def _blob(img: np.ndarray, box: Sequence[float], amplitude: float, inside_only: bool = True) -> None:
    """Add a bright Gaussian lesion centred in ``box`` = [x, y, w, h] (pixels); kept inside the box."""
    size = img.shape[0]
    x, y, w, h = box
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    g = np.exp(-(((xx - x - w / 2) / (w / 4)) ** 2 + ((yy - y - h / 2) / (h / 4)) ** 2) / 2)
    if inside_only:
        g *= (xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)
    img += amplitude * g


def write_nihcxr14_twin(
    output_dir: str | os.PathLike,
    n_images: int = 32,
    size: int = 128,
    seed: int = 0,
    n_patients: int | None = None,
    layout: str = "images",
    data_entry: str = "2017",
) -> Path:
    """NIH ChestX-ray14 twin in the release layout; returns ``output_dir``.

    Writes ``images/<patient:08d>_<follow-up:03d>.png`` (``layout="batches"``: spread over
    ``images_001/images/`` ... ``images_003/images/``), grey ``size`` x ``size`` radiograph-like PNGs
    (every seventh image without boxes stored as RGBA, as a few NIH images are);
    ``Data_Entry_2017.csv`` (NIH header, 11 fields and the 2017 trailing empty field;
    ``data_entry="v2020"`` writes ``Data_Entry_2017_v2020.csv`` without it); ``BBox_List_2017.csv``
    (header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``, float boxes in image pixels,
    ``Infiltrate`` spelling); ``train_val_list.txt`` and ``test_list.txt`` (patient-wise; every
    image of a box patient is in the test list, as in NIH).

    ``n_patients`` (default ``max(8, n_images // 3)``, at least 7) patients with one or more
    follow-ups; ``max(5, n_patients // 3)`` of them (at most all but two) have 1, 3, 2, 1, 3, ...
    images, of which the last (and the one before, with three) carry boxes; the other patients
    share the remaining images. The box findings cycle
    through the 8 box findings, with a second box finding or a second box of the same finding on
    some images; each box holds a bright lesion blob. At least two images without boxes are
    ``No Finding``. Deterministic from ``seed``.
    """
    from PIL import Image

    from custom_components.data.nihcxr14 import BOX_FINDINGS, DATA_ENTRY_HEADER, FINDINGS

    if layout not in ("images", "batches"):
        raise ValueError(f"layout must be 'images' or 'batches', got {layout!r}")
    if data_entry not in ("2017", "v2020"):
        raise ValueError(f"data_entry must be '2017' or 'v2020', got {data_entry!r}")
    n_patients = max(8, n_images // 3) if n_patients is None else int(n_patients)
    n_box = min(max(5, n_patients // 3), n_patients - 2)
    box_counts = [(1, 3, 2)[i % 3] for i in range(n_box)]
    if n_patients < 7 or n_images < sum(box_counts) + n_patients - n_box:
        raise ValueError(f"need n_patients >= 7 and n_images >= {sum(box_counts) + n_patients - n_box} "
                         f"for {n_patients} patients, got {n_images} images")
    size = int(size)
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    patients = sorted(int(p) + 1 for p in rng.choice(30000, size=n_patients, replace=False))
    box_patients = sorted(patients[i] for i in rng.choice(n_patients, size=n_box, replace=False))
    others = [p for p in patients if p not in box_patients]
    rest = n_images - sum(box_counts) - len(others)
    other_counts = 1 + np.bincount(rng.integers(0, len(others), rest), minlength=len(others))
    count_of = {**dict(zip(box_patients, box_counts, strict=True)), **dict(zip(others, other_counts.tolist(), strict=True))}
    counts = [count_of[p] for p in patients]

    records, box_rows, k_box, k_plain = [], [], 0, 0
    for patient, count in zip(patients, counts, strict=True):
        for fu in range(int(count)):
            name = f"{patient:08d}_{fu:03d}.png"
            img, lungs = _chest_radiograph(rng, size)
            boxes: dict[str, list[list[float]]] = {}
            if patient in box_patients and (fu == count - 1 or (count >= 3 and fu == count - 2)):
                first = BOX_FINDINGS[k_box % len(BOX_FINDINGS)]
                chosen = [first] + ([BOX_FINDINGS[(k_box + 3) % 8]] if k_box % 3 == 1 else [])
                for j, finding in enumerate(chosen):
                    n_same = 2 if (k_box % 4 == 2 and j == 0) else 1
                    for _ in range(n_same):
                        w, h = rng.uniform(0.15, 0.3, 2) * size
                        x, y = rng.uniform(0.04 * size, 0.96 * size - w), rng.uniform(0.04 * size, 0.96 * size - h)
                        box = [round(float(v), 9) for v in (x, y, w, h)]
                        boxes.setdefault(finding, []).append(box)
                        _blob(img, box, 0.35)
                k_box += 1
                findings = set(boxes) | ({FINDINGS[int(rng.integers(8, 14))]} if rng.random() < 0.3 else set())
            else:
                if k_plain < 2 or rng.random() < 0.3:
                    findings = set()
                else:
                    findings = {FINDINGS[int(i)] for i in rng.choice(14, size=int(rng.integers(1, 3)), replace=False)}
                ly, lx = np.nonzero(lungs)
                for _ in findings:
                    i = int(rng.integers(len(lx)))
                    _blob(img, [lx[i] - 0.08 * size, ly[i] - 0.08 * size, 0.16 * size, 0.16 * size], 0.25, inside_only=False)
                k_plain += 1
            records.append((name, patient, fu, findings))
            box_rows += [(f, name, b) for f, bs in boxes.items() for b in bs]
            arr = np.clip(img * 255, 0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
            if not boxes and k_plain % 7 == 0:
                im = im.convert("RGBA")
            n_batch = (len(records) - 1) * 3 // n_images + 1
            folder = out / "images" if layout == "images" else out / f"images_{n_batch:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            im.save(folder / name)

    trailing = "," if data_entry == "2017" else ""
    header = ",".join(DATA_ENTRY_HEADER[:7]) + ",OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]" + trailing
    lines = [header]
    for name, patient, fu, findings in records:
        labels = "|".join(sorted(findings)) or "No Finding"
        age, gender, view = 20 + patient % 60 + fu // 4, "MF"[patient % 2], ("PA", "AP")[fu % 2]
        lines.append(f"{name},{labels},{fu},{patient},{age},{gender},{view},2500,2048,0.14300000000000002,0.14300000000000002"
                     + trailing)
    table = "Data_Entry_2017.csv" if data_entry == "2017" else "Data_Entry_2017_v2020.csv"
    (out / table).write_text("\n".join(lines) + "\n")
    spelled = {"Infiltration": "Infiltrate"}
    order = {f: i for i, f in enumerate(BOX_FINDINGS)}
    bbox_lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"] + [
        f"{name},{spelled.get(f, f)},{','.join(repr(v) for v in b)}"
        for f, name, b in sorted(box_rows, key=lambda r: (order[r[0]], r[1]))
    ]
    (out / "BBox_List_2017.csv").write_text("\n".join(bbox_lines) + "\n")
    test = sorted(r[0] for r in records if r[1] in box_patients)
    train_val = sorted(r[0] for r in records if r[1] not in box_patients)
    (out / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (out / "test_list.txt").write_text("\n".join(test) + "\n")
    return out


__all__ += ["write_nihcxr14_twin"]


_BRAIN_PREFIX = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}


def write_brain_tumor_twin(root: str | os.PathLike, n_per_class: int | Sequence[int] = (8, 3),
                           size: int | Sequence[int] = 64, seed: int = 0) -> Path:
    """Brain Tumor MRI (Kaggle) twin: ``<root>/{Training,Testing}/<class>/{Tr,Te}-<xx>_<NNNN>.jpg``.

    Classes ``glioma``, ``meningioma``, ``notumor``, ``pituitary``; ``n_per_class`` = (per class in
    Training, per class in Testing) or one number for both. ``size`` = side or (width, height).
    A grey elliptic "head" with smooth noise; the tumour is a bright blob whose place tells the class
    so that a small network learns it: glioma inside the left hemisphere, meningioma at the upper
    rim, pituitary small at the lower centre, notumor none. Every third image is saved as RGB (the
    release mixes grey and RGB JPEGs). Deterministic from ``seed``. Returns ``root``.
    """
    from PIL import Image

    from custom_components.data.class_folders import BRAIN_TUMOR_CLASSES

    out = Path(root)
    counts = [int(n_per_class)] if isinstance(n_per_class, int) else [int(v) for v in n_per_class]
    n_train, n_test = (counts[0], max(1, counts[0] // 3)) if len(counts) == 1 else (counts[0], counts[1])
    width, height = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    head = (((xx - width / 2) / (0.42 * width)) ** 2 + ((yy - height / 2) / (0.46 * height)) ** 2) <= 1.0
    where = {"glioma": (0.32, 0.5, 0.13), "meningioma": (0.5, 0.14, 0.11), "pituitary": (0.5, 0.72, 0.07)}
    k = 0
    for split, prefix, n in (("Training", "Tr", n_train), ("Testing", "Te", n_test)):
        for cls in BRAIN_TUMOR_CLASSES:
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.where(head, 90.0, 5.0) + _noise2d(rng, height, width) * 20 * head
                if cls in where:
                    cx, cy, r = where[cls]
                    cx = (cx + rng.uniform(-0.04, 0.04)) * width
                    cy = (cy + rng.uniform(-0.04, 0.04)) * height
                    rr = r * min(width, height) * rng.uniform(0.85, 1.15)
                    img += 150 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (rr / 1.5) ** 2)))
                im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
                if k % 3 == 2:
                    im = im.convert("RGB")
                im.save(folder / f"{prefix}-{_BRAIN_PREFIX[cls]}_{i:04d}.jpg", quality=92)
                k += 1
    return out


def write_fgadr_twin(root: str | os.PathLike, n_images: int = 25, size: int = 96, seed: int = 0) -> Path:
    """FGADR Seg-set twin: ``<root>/Original_Images/<NNNN>_<k>.png`` + ``<root>/DR_Seg_Grading_Label.csv``.

    Grades 0..4 in turn (``n_images`` >= 5 gives every grade); a reddish fundus disc with
    ``2 * grade`` bright yellow "exudate" spots, so the grade is learnable. The CSV has no header
    (``<file name>,<grade>`` rows, as the release). Deterministic from ``seed``. Returns ``root``.
    """
    from PIL import Image

    out = Path(root)
    folder = out / "Original_Images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    disc = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) <= (0.46 * size) ** 2
    rows = []
    for i in range(int(n_images)):
        grade = i % 5
        noise = (_noise2d(rng, size, size) + 1) / 2
        img = np.stack([150 + 50 * noise, 60 + 20 * noise, 30 + 10 * noise], -1) * disc[..., None]
        for _ in range(2 * grade):
            ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.35 * size)
            cx, cy = size / 2 + rad * np.cos(ang), size / 2 + rad * np.sin(ang)
            spot = ((xx - cx) ** 2 + (yy - cy) ** 2) <= (0.04 * size) ** 2
            img[spot] = (250, 230, 90)
        name = f"{i + 1:04d}_{int(rng.integers(1, 4))}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name)
        rows.append(f"{name},{grade}")
    (out / "DR_Seg_Grading_Label.csv").write_text("\n".join(rows) + "\n")
    return out


__all__ += ["write_brain_tumor_twin", "write_fgadr_twin"]


def _polyp_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """An endoscopy-like RGB frame with 0-2 polyp-like blobs (raised, shaded ellipses) and their mask."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = (_noise2d(rng, height, width) + 1) / 2
    vignette = 1.0 - 0.6 * (((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2).clip(0, 1)
    img = np.stack([170 + 50 * noise, 90 + 40 * noise, 80 + 30 * noise], -1) * vignette[..., None]
    mask = np.zeros((height, width), bool)
    for _ in range(int(rng.choice([1, 1, 1, 2]))):
        a, b = rng.uniform(0.12, 0.25) * width, rng.uniform(0.12, 0.25) * height
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        blob = _ellipse(width, height, cx, cy, a, b, rng.uniform(0, np.pi))
        # a raised blob: brighter and pinker towards its top-left highlight
        shade = np.exp(-(((xx - cx + 0.3 * a) / a) ** 2 + ((yy - cy + 0.3 * b) / b) ** 2))
        img[blob] = np.stack([215 + 35 * shade, 120 + 60 * shade, 120 + 50 * shade], -1)[blob]
        mask |= blob
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_kvasir_seg_twin(root: str | os.PathLike, n_images: int = 20, size: int | Sequence[int] = 160,
                          seed: int = 0, mask_quality: int = 90) -> Path:
    """Kvasir-SEG twin: ``<root>/images/<id>.jpg`` + ``<root>/masks/<id>.jpg`` (same 25-character ids).

    ``size`` = side or (width, height) of the largest image; widths and heights vary per image by up
    to -15 % (the release's sizes differ per image). Masks are RGB JPEGs of a 0/255 polyp mask, so
    their values spread around 0 and 255 as in the release (compression noise at the edges).
    Deterministic from ``seed``. Returns ``root``.
    """
    from PIL import Image

    out = Path(root)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    width0, height0 = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    for _ in range(int(n_images)):
        width = int(width0 * rng.uniform(0.85, 1.0))
        height = int(height0 * rng.uniform(0.85, 1.0))
        img, mask = _polyp_scene(rng, width, height)
        name = "cju" + "".join(rng.choice(alphabet, 22))
        Image.fromarray(img).save(out / "images" / f"{name}.jpg", quality=90)
        m = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, -1)
        Image.fromarray(m).save(out / "masks" / f"{name}.jpg", quality=int(mask_quality))
    return out


def write_busi_twin(root: str | os.PathLike, n_per_class: int = 4, size: int = 96, seed: int = 0) -> Path:
    """BUSI (Dataset_BUSI_with_GT) twin: ``<root>/<class>/<class> (i).png`` + ``<class> (i)_mask.png``.

    Classes ``benign``, ``malignant`` (one dark hypoechoic lesion each; every third image has a
    second lesion in ``_mask_1.png``) and ``normal`` (empty masks). Grey speckled PNGs saved as RGB
    as in the release; masks grey 0/255 PNGs. Deterministic from ``seed``. Returns ``root``.
    """
    from PIL import Image

    out = Path(root)
    rng = np.random.default_rng(seed)
    for cls in ("benign", "malignant", "normal"):
        folder = out / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, int(n_per_class) + 1):
            img = 90 + 40 * _noise2d(rng, size, size) + rng.normal(0, 12, (size, size))
            masks = []
            n_lesions = 0 if cls == "normal" else (2 if i % 3 == 0 else 1)
            for _ in range(max(1, n_lesions)):
                lesion = np.zeros((size, size), bool)
                if n_lesions:
                    lesion = _ellipse(size, size, rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size,
                                      rng.uniform(0.08, 0.18) * size, rng.uniform(0.06, 0.14) * size, rng.uniform(0, np.pi))
                    img[lesion] = 25 + rng.normal(0, 6, int(lesion.sum()))
                masks.append(lesion)
            stem = f"{cls} ({i})"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB").save(folder / f"{stem}.png")
            for k, lesion in enumerate(masks):
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                Image.fromarray(lesion.astype(np.uint8) * 255).save(folder / f"{stem}{suffix}.png")
    return out


# --------------------------------------------------------------------------------------------
# MM-WHS (CT / MR whole heart) format twin
# --------------------------------------------------------------------------------------------

#: (label value, centre (x, y, z) in [-1, 1], semi-axes) of the twin's heart structures; the left
#: atrium (420) spans the middle third of the slices only, so slices without it exist
_MMWHS_STRUCTURES = (
    (500, (0.15, 0.1, 0.0), (0.22, 0.2, 0.55)),  # LV blood cavity (inside the myocardium)
    (205, (0.15, 0.1, 0.0), (0.3, 0.28, 0.62)),  # LV myocardium: the shell around it
    (600, (-0.3, 0.15, 0.0), (0.18, 0.22, 0.5)),  # RV blood cavity
    (420, (0.2, -0.35, 0.0), (0.16, 0.14, 0.3)),  # LA blood cavity
    (550, (-0.3, -0.3, 0.05), (0.15, 0.15, 0.45)),  # RA blood cavity
    (820, (0.0, -0.05, 0.6), (0.1, 0.1, 0.45)),  # ascending aorta
    (850, (-0.1, 0.45, 0.55), (0.1, 0.12, 0.4)),  # pulmonary artery
)


def _mmwhs_case(rng: np.random.Generator, shape: tuple[int, int, int], modality: str) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = _grid(shape)
    label = np.zeros(shape, np.uint16)
    shift = rng.uniform(-0.08, 0.08, 3)
    for value, centre, axes in _MMWHS_STRUCTURES[::-1]:  # outer shells first, cavities over them
        c = np.asarray(centre) + shift
        inside = ((x - c[0]) / axes[0]) ** 2 + ((y - c[1]) / axes[1]) ** 2 + ((z - c[2]) / axes[2]) ** 2 <= 1
        label[inside & ((label == 0) | (value == 500))] = value
    body = np.broadcast_to((x / 0.95) ** 2 + (y / 0.9) ** 2 <= 1, shape)
    if modality == "ct":  # Hounsfield units: air, soft tissue, myocardium, contrast-filled blood
        base = {0: 40.0, 205: 120.0}
        img = np.where(body, base[0], -900.0).astype(np.float32)
        blood = 320.0
    else:  # arbitrary MR units, bright blood
        base = {0: 180.0, 205: 260.0}
        img = np.where(body, base[0], 5.0).astype(np.float32)
        blood = 700.0
    img[label == 205] = base[205]
    img[(label != 0) & (label != 205)] = blood
    img += _smooth_noise(rng, shape, 25.0) + rng.normal(0, 12.0, shape).astype(np.float32)
    return img, label


def write_mmwhs_twin(
    root: str | os.PathLike,
    n_per_split: Sequence[int] = (3, 1, 1),
    shape: Sequence[int] = (96, 96, 40),
    seed: int = 0,
    modality: str = "ct",
    case_ids: Sequence[str] | None = None,
) -> Path:
    """Write an MM-WHS twin ``<root>/<modality>_train/<modality>_train_NNNN_{image,label}.nii.gz``.

    Labels carry the real MM-WHS values (0, 205 LV myocardium, 420 LA, 500 LV, 550 RA, 600 RV,
    820 ascending aorta, 850 pulmonary artery) as uint16; the left atrium spans only part of the
    slices. Images are int16 (CT: HU-like, MR: arbitrary units, bright blood). Each volume has an
    oblique, non-identity affine (rotation about z, anisotropic spacing, an origin) shared by image
    and label. Without ``case_ids`` the first ``n_per_split`` cases of the training / validation /
    test lists of ``data_lists/mmwhs_<modality>.json`` are written. Deterministic from ``seed``.
    Returns ``root``.
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shape}")
    ids = list(case_ids) if case_ids is not None else _default_ids(f"mmwhs_{modality}", n_per_split)
    out = Path(root) / f"{modality}_train"
    out.mkdir(parents=True, exist_ok=True)
    for case in ids:
        n = int(case.rsplit("_", 1)[-1])
        rng = np.random.default_rng([seed, n, 0 if modality == "ct" else 1])
        img, label = _mmwhs_case(rng, shape, modality)
        angle = rng.uniform(-0.4, 0.4)
        spacing = np.array([rng.uniform(0.3, 0.5), rng.uniform(0.3, 0.5), rng.uniform(0.4, 1.6)]) * (
            1.0 if modality == "ct" else 2.5
        )
        rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag(spacing)
        affine[:3, 3] = rng.uniform(-120, 120, 3)
        nib.save(_nifti(np.rint(img).astype(np.int16), affine), out / f"{case}_image.nii.gz")
        nib.save(_nifti(label, affine), out / f"{case}_label.nii.gz")
    return Path(root)
def write_vindr_twin(
    output_dir: str | os.PathLike,
    n_images: int = 24,
    size: int = 96,
    seed: int = 0,
    n_dicom: int = 0,
) -> Path:
    """VinDr-CXR twin in the Kaggle layout; returns ``output_dir``.

    ``train.csv`` (``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max``, one row per box
    and reader, radiologists ``R1`` ... ``R17``) and ``train/<image_id>.png`` (grey, ``size`` wide and
    ``round(1.25 * size)`` high, so preparation must rescale x and y differently). Every fourth
    image is ``No finding`` (three readers, empty box fields). The others hold 1-2 lesions (bright
    blobs) of classes cycling through the first four VinDr classes, each drawn by 2 or 3 readers with
    a jitter of up to 4 % of the box size, so weighted boxes fusion (iou 0.2) merges them into one
    box per lesion. The first ``n_dicom`` images are written as ``train/<image_id>.dicom`` (ITK,
    uint16, MONOCHROME2) instead of PNG. Deterministic from ``seed``.
    """
    from PIL import Image

    from custom_components.data.vindr import CLASSES, NO_FINDING, NO_FINDING_ID

    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    width, height = int(size), int(round(1.25 * size))
    rows = ["image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"]
    k_lesion = 0
    for i in range(int(n_images)):
        image_id = "".join(rng.choice(list("0123456789abcdef"), 32))
        img, _ = _chest_radiograph(rng, height)
        img = img[:, (height - width) // 2:(height - width) // 2 + width].copy()
        readers = [f"R{int(r)}" for r in rng.choice(np.arange(1, 18), size=3, replace=False)]
        if i % 4 == 3:
            rows += [f"{image_id},{NO_FINDING},{NO_FINDING_ID},{r},,,," for r in readers]
        else:
            for _ in range(1 + (i % 3 == 1)):
                label = k_lesion % 4
                k_lesion += 1
                w, h = rng.uniform(0.2, 0.35) * width, rng.uniform(0.2, 0.35) * height
                x0, y0 = rng.uniform(0.05 * width, 0.95 * width - w), rng.uniform(0.05 * height, 0.95 * height - h)
                yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
                g = np.exp(-(((xx - x0 - w / 2) / (w / 4)) ** 2 + ((yy - y0 - h / 2) / (h / 4)) ** 2) / 2)
                img += (0.3 + 0.1 * label) * g * ((xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h))
                for r in readers[: 2 + int(rng.integers(0, 2))]:
                    j = rng.uniform(-0.04, 0.04, 4) * np.array([w, h, w, h])
                    box = [min(max(v, 0.0), lim) for v, lim in zip((x0 + j[0], y0 + j[1], x0 + w + j[2], y0 + h + j[3]),
                                                                    (width, height, width, height), strict=True)]
                    rows.append(f"{image_id},{CLASSES[label]},{label},{r}," + ",".join(f"{v:.1f}" for v in box))
        arr = np.clip(img * 255, 0, 255).astype(np.uint8)
        if i < n_dicom:
            import itk

            tmp = out / "train" / f"{image_id}.dcm"
            itk.imwrite(itk.image_from_array((arr.astype(np.uint16) * 16).copy()), str(tmp))
            tmp.rename(out / "train" / f"{image_id}.dicom")
        else:
            Image.fromarray(arr).save(out / "train" / f"{image_id}.png")
    (out / "train.csv").write_text("\n".join(rows) + "\n")
    return out


__all__ += ["write_vindr_twin"]
def _ssl_image(rng: np.random.Generator, size: int, rgb: bool) -> np.ndarray:
    """One distinct unlabelled image: a smooth background, 2-4 ellipses and a bright disc, uint8
    (size, size) or (size, size, 3); every image gets its own layout and intensities."""
    img = 0.35 + 0.15 * _noise2d(rng, size, size)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        a, b = rng.uniform(0.08, 0.3, 2) * size
        img = np.where(_ellipse(size, size, cx, cy, a, b, rng.uniform(0, np.pi)), rng.uniform(0.1, 0.9), img)
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    img = np.where(_ellipse(size, size, cx, cy, 0.07 * size, 0.07 * size, 0.0), 1.0, img)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    if rgb:
        tint = rng.uniform(0.6, 1.0, 3)
        img = img[..., None] * tint[None, None, :]
    return (img * 255).round().astype(np.uint8)


def write_ssl2d_twin(output_dir: str | os.PathLike, n_images: int = 48, size: int = 64, seed: int = 0,
                     n_test: int | None = None, volume_shape: Sequence[int] = (48, 48, 6)) -> Path:
    """Unlabelled 2-D collection for the LVM-Med pre-training bundle; returns ``output_dir``.

    Writes ``grey/img_<k:04d>.png`` (8-bit grey) and ``rgb/img_<k:04d>.png`` (8-bit RGB), alternating,
    ``n_images`` in all, each ``size`` x ``size`` with its own layout of ellipses and a bright disc
    (so that two views of one image can be told from the others);
    ``volumes/vol_000.nii.gz``, one small NIfTI volume (``volume_shape``, axial slices along the
    last axis) of smooth structures; and ``datalist.json``:
    ``{"training": [{"image": REL}, ...], "test": [...]}`` with paths relative to ``output_dir``,
    the last ``n_test`` images (default ``max(n_images // 4, 1)``) held out as ``test`` and the
    volume in ``training``. Deterministic from ``seed``.
    """
    from PIL import Image

    out = Path(output_dir)
    rng = np.random.default_rng(seed)
    n_images = int(n_images)
    n_test = max(n_images // 4, 1) if n_test is None else int(n_test)
    entries = []
    for k in range(n_images):
        rgb = k % 2 == 1
        rel = f"{'rgb' if rgb else 'grey'}/img_{k:04d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_ssl_image(rng, int(size), rgb)).save(out / rel)
        entries.append({"image": rel})
    shape = tuple(int(s) for s in volume_shape)
    grid = _grid(shape)
    vol = 200.0 * _smooth_noise(rng, shape, 0.3)
    r = np.sqrt(grid[0] ** 2 + grid[1] ** 2)
    vol = vol + 800.0 * (r < 0.5) - 1000.0 * (r > 0.9)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    nib.save(_nifti(vol.astype(np.float32), np.eye(4)), out / "volumes" / "vol_000.nii.gz")
    split = n_images - n_test
    datalist = {"training": [*entries[:split], {"image": "volumes/vol_000.nii.gz"}], "test": entries[split:]}
    (out / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")
    return out
