#!/usr/bin/env python
"""Write synthetic format twins of the datasets (exact on-disk layouts, synthetic content).

Commands (one per dataset; add e.g. ``lits17`` as another function in ``COMMANDS``)::

    python scripts/make_synthetic.py brats20 --output_dir D [--shape 48,48,20] [--seed 0] [--compress True]
        [--n_per_split 3,2,2] [--case_ids ID1,ID2] [--spacing 0.9,0.9,6.5] [--origin 12,-30,40]
    python scripts/make_synthetic.py lits17 --output_dir D [--shape 512,512,75] [--seed 0] [--compress False]
        [--n_per_split 3,2,2] [--case_ids volume-0,volume-1] [--spacing 0.8,0.8,5] [--origin 12,-30,40]

``--spacing`` (voxel size x, y, z in mm) and ``--origin`` (mm) give a non-default grid, e.g. a
thick-slice scan ``--shape 40,32,9 --spacing 0.9,0.9,6.5``; the defaults are those of the datasets.
    python scripts/make_synthetic.py medmnist2d --output D/breastmnist.npz [--name breastmnist] [--n 60,20,20]
        [--size 28] [--seed 0]
    python scripts/make_synthetic.py medmnist3d --output D/organmnist3d.npz [--name organmnist3d] [--n 24,12,12]
        [--size 28] [--seed 0]
    python scripts/make_synthetic.py kvasir --output_dir D [--n_per_class 6] [--size 720,576] [--with_masks True]
        [--seed 0]
    python scripts/make_synthetic.py mura --output_dir D [--n_patients 8] [--body_parts XR_WRIST,XR_HAND]
        [--size 256,320] [--with_masks True] [--seed 0]
    python scripts/make_synthetic.py nihcxr14 --output_dir D [--n_images 32] [--size 128] [--seed 0]
        [--n_patients 10] [--layout images|batches] [--data_entry 2017|v2020]
    python scripts/make_synthetic.py brain_tumor --output_dir D [--n_per_class 8,3] [--size 256] [--seed 0]
    python scripts/make_synthetic.py fgadr --output_dir D [--n_images 25] [--size 256] [--seed 0]
    python scripts/make_synthetic.py kvasir_seg --output_dir D [--n_images 20] [--size 160] [--seed 0]
    python scripts/make_synthetic.py busi --output_dir D [--n_per_class 4] [--size 96] [--seed 0]
    python scripts/make_synthetic.py mmwhs --output_dir D [--n_per_split 3,1,1] [--shape 96,96,40] [--seed 0]
        [--modality ct|mr]
    python scripts/make_synthetic.py vindr --output_dir D [--n_images 24] [--size 96] [--seed 0] [--n_dicom 0]
    python scripts/make_synthetic.py ssl2d --output_dir D [--n_images 48] [--size 64] [--seed 0] [--n_test 12]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from custom_components.cli import parse_floats, parse_ints, parse_names, run_commands


def brats20(
    output_dir: str,
    shape: str | Sequence[int] = (240, 240, 155),
    seed: int = 0,
    compress: bool = True,
    n_per_split: str | Sequence[int] = (3, 2, 2),
    case_ids: str | Sequence[str] | None = None,
    spacing: str | Sequence[float] | None = None,
    origin: str | Sequence[float] | None = None,
) -> str:
    """BraTS2020 twin: ``<output_dir>/MICCAI_BraTS2020_TrainingData/<case>/<case>_<mod>.nii[.gz]``."""
    from custom_components.data.synthetic import write_brats20_twin

    case_ids = parse_names(case_ids)
    root = write_brats20_twin(output_dir, case_ids=case_ids, n_per_split=parse_ints(n_per_split),
                              shape=parse_ints(shape), seed=int(seed), compress=bool(compress),
                              spacing=parse_floats(spacing), origin=parse_floats(origin))
    print(root)
    return str(root)


def lits17(
    output_dir: str,
    shape: str | Sequence[int] = (512, 512, 75),
    seed: int = 0,
    compress: bool = False,
    n_per_split: str | Sequence[int] = (3, 2, 2),
    case_ids: str | Sequence[str] | None = None,
    spacing: str | Sequence[float] | None = None,
    origin: str | Sequence[float] | None = None,
) -> str:
    """LiTS17 twin: ``<output_dir>/scans/volume-N.nii[.gz]`` + ``segmentations/segmentation-N.nii[.gz]``."""
    from custom_components.data.synthetic import write_lits17_twin

    case_ids = parse_names(case_ids)
    root = write_lits17_twin(output_dir, case_ids=case_ids, n_per_split=parse_ints(n_per_split),
                             shape=parse_ints(shape), seed=int(seed), compress=bool(compress),
                             spacing=parse_floats(spacing), origin=parse_floats(origin))
    print(root)
    return str(root)


def medmnist2d(
    output: str,
    name: str = "breastmnist",
    n: str | Sequence[int] = (60, 20, 20),
    size: int = 28,
    seed: int = 0,
) -> str:
    """MedMNIST-2D twin: one ``.npz`` with ``{train,val,test}_{images,labels}`` in the official layout."""
    from custom_components.data.synthetic import write_medmnist2d_twin

    path = write_medmnist2d_twin(output, name=str(name), n=parse_ints(n), size=int(size), seed=int(seed))
    print(path)
    return str(path)


def medmnist3d(
    output: str,
    name: str = "organmnist3d",
    n: str | Sequence[int] = (24, 12, 12),
    size: int = 28,
    seed: int = 0,
) -> str:
    """MedMNIST-3D twin: one ``.npz`` with (N, size, size, size) uint8 images and (N, 1) labels."""
    from custom_components.data.synthetic import write_medmnist3d_twin

    path = write_medmnist3d_twin(output, name=str(name), n=parse_ints(n), size=int(size), seed=int(seed))
    print(path)
    return str(path)


def kvasir(
    output_dir: str,
    n_per_class: int = 6,
    size: str | Sequence[int] = (720, 576),
    with_masks: bool = True,
    seed: int = 0,
) -> str:
    """Kvasir v2 twin: ``<output_dir>/kvasir-dataset-v2/<class>/<uuid>.jpg`` (+ ``masks/`` PNGs)."""
    from custom_components.data.synthetic import write_kvasir_twin

    root = write_kvasir_twin(output_dir, n_per_class=int(n_per_class), size=parse_ints(size),
                             with_masks=bool(with_masks), seed=int(seed))
    print(root)
    return str(root)


def mura(
    output_dir: str,
    n_patients: int = 8,
    body_parts: str | Sequence[str] = ("XR_WRIST", "XR_HAND"),
    size: str | Sequence[int] = (256, 320),
    with_masks: bool = True,
    seed: int = 0,
) -> str:
    """MURA v1.1 twin: ``<output_dir>/MURA-v1.1/`` CSVs + PNGs (+ ``mura_boxes.json``)."""
    from custom_components.data.synthetic import write_mura_twin

    root = write_mura_twin(output_dir, n_patients=int(n_patients), body_parts=tuple(parse_names(body_parts)),
                           size=parse_ints(size), with_masks=bool(with_masks), seed=int(seed))
    print(root)
    return str(root)


def nihcxr14(
    output_dir: str,
    n_images: int = 32,
    size: int = 128,
    seed: int = 0,
    n_patients: int | None = None,
    layout: str = "images",
    data_entry: str = "2017",
) -> str:
    """NIH ChestX-ray14 twin: ``images/*.png``, ``Data_Entry_2017.csv``, ``BBox_List_2017.csv``, split lists."""
    from custom_components.data.synthetic import write_nihcxr14_twin

    root = write_nihcxr14_twin(output_dir, n_images=int(n_images), size=int(size), seed=int(seed),
                               n_patients=None if n_patients is None else int(n_patients), layout=str(layout),
                               data_entry=str(data_entry))
    print(root)
    return str(root)


def vit_checkpoints(
    output_dir: str,
    img_size: int = 224,
    patch_size: int = 16,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    mlp_dim: int = 3072,
    seed: int = 0,
) -> str:
    """Stand-in sup / DINO / MAE ViT checkpoints (random weights, released key layouts) for demos and tests."""
    from custom_components.data.synthetic import write_standin_vit_checkpoints

    paths = write_standin_vit_checkpoints(output_dir, img_size=int(img_size), patch_size=int(patch_size),
                                          hidden_size=int(hidden_size), num_layers=int(num_layers),
                                          num_heads=int(num_heads), mlp_dim=int(mlp_dim), seed=int(seed))
    for init, path in paths.items():
        print(f"{init}: {path}")
    return str(output_dir)


def vindr(output_dir: str, n_images: int = 24, size: int = 96, seed: int = 0, n_dicom: int = 0) -> str:
    """VinDr-CXR twin: ``train.csv`` (2-3 readers per box, "No finding" images) and ``train/<id>.png|.dicom``."""
    from custom_components.data.synthetic import write_vindr_twin

    root = write_vindr_twin(output_dir, n_images=int(n_images), size=int(size), seed=int(seed), n_dicom=int(n_dicom))
    print(root)
    return str(root)


def ssl2d(output_dir: str, n_images: int = 48, size: int = 64, seed: int = 0, n_test: int | None = None) -> str:
    """Unlabelled collection for LVM-Med pre-training: grey and RGB PNGs, one NIfTI volume, ``datalist.json``."""
    from custom_components.data.synthetic import write_ssl2d_twin

    root = write_ssl2d_twin(output_dir, n_images=int(n_images), size=int(size), seed=int(seed),
                            n_test=None if n_test is None else int(n_test))
    print(root)
    return str(root)


COMMANDS = {"brats20": brats20, "lits17": lits17, "medmnist2d": medmnist2d, "medmnist3d": medmnist3d,
            "kvasir": kvasir, "mura": mura, "nihcxr14": nihcxr14, "vit_checkpoints": vit_checkpoints}
COMMANDS["vindr"] = vindr


def brain_tumor(output_dir: str, n_per_class: str | Sequence[int] = (8, 3), size: int = 256, seed: int = 0) -> str:
    """Brain Tumor MRI twin: ``<output_dir>/{Training,Testing}/<class>/*.jpg`` (4 classes)."""
    from custom_components.data.synthetic import write_brain_tumor_twin

    root = write_brain_tumor_twin(output_dir, n_per_class=parse_ints(n_per_class), size=int(size), seed=int(seed))
    print(root)
    return str(root)


def fgadr(output_dir: str, n_images: int = 25, size: int = 256, seed: int = 0) -> str:
    """FGADR Seg-set twin: ``<output_dir>/Original_Images/*.png`` + ``DR_Seg_Grading_Label.csv``."""
    from custom_components.data.synthetic import write_fgadr_twin

    root = write_fgadr_twin(output_dir, n_images=int(n_images), size=int(size), seed=int(seed))
    print(root)
    return str(root)


COMMANDS.update({"brain_tumor": brain_tumor, "fgadr": fgadr})


def kvasir_seg(output_dir: str, n_images: int = 20, size: str | int | Sequence[int] = 160, seed: int = 0) -> str:
    """Kvasir-SEG twin: ``<output_dir>/images/<id>.jpg`` + ``masks/<id>.jpg`` (JPEG masks)."""
    from custom_components.data.synthetic import write_kvasir_seg_twin

    sizes = parse_ints(size)
    root = write_kvasir_seg_twin(output_dir, n_images=int(n_images), size=sizes[0] if len(sizes) == 1 else sizes,
                                 seed=int(seed))
    print(root)
    return str(root)


def busi(output_dir: str, n_per_class: int = 4, size: int = 96, seed: int = 0) -> str:
    """BUSI twin: ``<output_dir>/<class>/<class> (i).png`` + ``_mask.png`` (+ ``_mask_1.png``)."""
    from custom_components.data.synthetic import write_busi_twin

    root = write_busi_twin(output_dir, n_per_class=int(n_per_class), size=int(size), seed=int(seed))
    print(root)
    return str(root)


COMMANDS.update({"kvasir_seg": kvasir_seg, "busi": busi})


def mmwhs(output_dir: str, n_per_split: str | Sequence[int] = (3, 1, 1), shape: str | Sequence[int] = (96, 96, 40),
          seed: int = 0, modality: str = "ct") -> str:
    """MM-WHS twin: ``<output_dir>/<modality>_train/<modality>_train_NNNN_{image,label}.nii.gz`` (real label values)."""
    from custom_components.data.synthetic import write_mmwhs_twin

    root = write_mmwhs_twin(output_dir, n_per_split=parse_ints(n_per_split), shape=parse_ints(shape), seed=int(seed),
                            modality=str(modality))
    print(root)
    return str(root)


COMMANDS.update({"mmwhs": mmwhs})
COMMANDS["ssl2d"] = ssl2d


def main(argv: list[str] | None = None) -> int:
    return run_commands(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
