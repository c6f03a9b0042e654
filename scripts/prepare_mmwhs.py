#!/usr/bin/env python
"""Prepare MM-WHS (CT or MR) for the LVM-Med slice-wise 3-D segmentation bundle (spec lvmmed.md section 4).

Commands::

    python scripts/prepare_mmwhs.py prepare --dataset_dir D --output_dir O [--modality ct|mr] [--image_size 224]
        [--split published|random|FILE.json] [--split_ratios 0.65,0.15,0.2] [--split_seed 0]
        [--cases ct_train_1001,ct_train_1002] [--overwrite] [--progress False]
    python scripts/prepare_mmwhs.py split_from_reference \\
        --split_json /path/to/LVM-Med/files_split/MMWHS_CT_Heart.json --out data_lists/mmwhs_ct.json

``dataset_dir`` holds ``ct_train/`` and / or ``mr_train/`` (``<modality>_train_NNNN_image.nii.gz`` +
``_label.nii.gz``), or the files flat (see :mod:`custom_components.data.mmwhs`). The bundle prepares
the store itself on its first run; this script does it ahead of time. ``split_from_reference``
turns the reference's frame-level split into the shipped volume datalist.

Bad input data ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from custom_components.cli import parse_names, run_commands
from custom_components.data.datalists import split_to_datalist
from custom_components.data.mmwhs import SPLIT_RATIOS, prepare_mmwhs, reference_split_volumes
from custom_components.io import atomic_save_json


def prepare(
    dataset_dir: str,
    output_dir: str,
    modality: str = "ct",
    split: str | None = "published",
    image_size: int = 224,
    cases: str | list[str] | tuple[str, ...] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    split_ratios: str | tuple[float, ...] | list[float] = SPLIT_RATIOS,
    split_seed: int = 0,
) -> str:
    """Prepare the slice store of ``modality`` in ``output_dir``; print and return the datalist path."""
    path = prepare_mmwhs(dataset_dir, output_dir, modality=modality, split=split, image_size=image_size,
                         cases=parse_names(cases), overwrite=overwrite, progress=progress, split_ratios=split_ratios,
                         split_seed=split_seed)  # fmt: skip
    print(f"datalist: {path}")
    return str(path)


def split_from_reference(split_json: str, out: str) -> str:
    """Write the volumes of the reference's frame-level split file as a datalist (``data_lists/mmwhs_<modality>.json``)."""
    datalist = split_to_datalist(reference_split_volumes(split_json))
    atomic_save_json(datalist, out)
    print(f"{out}: " + ", ".join(f"{k} {len(v)}" for k, v in datalist.items()))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    return run_commands({"prepare": prepare, "split_from_reference": split_from_reference}, argv)


if __name__ == "__main__":
    sys.exit(main())
