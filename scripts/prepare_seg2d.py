#!/usr/bin/env python
"""Prepare a 2-D segmentation dataset (Kvasir-SEG, BUSI, ISIC layouts) for the LVM-Med seg2d bundle.

Command::

    python scripts/prepare_seg2d.py prepare --dataset_dir D --output_dir O [--layout kvasir|busi|isic]
        [--image_size 224] [--seed 0] [--ratios 0.64,0.16,0.2] [--split_file Kvasir.json]
        [--busi_classes benign,malignant] [--max_mid_fraction 0.01] [--overwrite] [--progress False]

Checks every image/mask pair, resizes each once to ``image_size``² into ``O/images`` and
``O/masks`` (resumable: rerun after an interruption) and writes ``O/datalist.json``; layouts,
mask thresholds and split: :mod:`custom_components.data.seg2d`. Bad input data ends with a
one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from custom_components.cli import parse_floats, parse_names, run_commands
from custom_components.data import seg2d


def prepare(
    dataset_dir: str,
    output_dir: str,
    layout: str = "kvasir",
    image_size: int = 224,
    seed: int = 0,
    ratios: str | Sequence[float] = seg2d.SEG2D_RATIOS,
    split_file: str | None = None,
    busi_classes: str | Sequence[str] | None = ("benign", "malignant"),
    max_mid_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Prepare ``dataset_dir`` into ``output_dir``; prints the datalist path and set sizes."""
    import json

    path = seg2d.prepare_seg2d(
        dataset_dir, output_dir, layout=str(layout), image_size=int(image_size), seed=int(seed),
        ratios=parse_floats(ratios), split_file=split_file,
        busi_classes=parse_names(busi_classes) if busi_classes else None,
        max_mid_fraction=float(max_mid_fraction), overwrite=bool(overwrite), progress=bool(progress),
    )  # fmt: skip
    counts = {k: len(v) for k, v in json.loads(path.read_text()).items()}
    print(f"datalist: {path}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return str(path)


COMMANDS = {"prepare": prepare}


def main(argv: list[str] | None = None) -> int:
    return run_commands(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
