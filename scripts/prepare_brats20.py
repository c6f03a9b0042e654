#!/usr/bin/env python
"""Prepare BraTS2020 for the LGM-ViT bundles (spec section 6: Data preparation).

Commands::

    python scripts/prepare_brats20.py prepare --dataset_dir D --output_dir O [--image_size 256]
        [--dtype float16] [--split published|random|FILE.json]
        [--split_ratios 0.7,0.1,0.2] [--split_seed 0] [--cases ID1,ID2] [--overwrite] [--progress False]
    python scripts/prepare_brats20.py split_to_datalist \\
        --split_json /work/shared/data/splits/brats20_lgmvit_split.json --out data_lists/brats20.json

Bad input data ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from custom_components.cli import parse_names, run_commands
from custom_components.data.brats20 import prepare_brats20
from custom_components.data.datalists import split_to_datalist as _split_to_datalist
from custom_components.data.splits import DEFAULT_RATIOS
from custom_components.io import InputDataError, atomic_save_json


def prepare(
    dataset_dir: str,
    output_dir: str,
    split: str | None = "published",
    image_size: int = 256,
    dtype: str = "float16",
    cases: str | list[str] | tuple[str, ...] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    split_ratios: str | tuple[float, ...] | list[float] = DEFAULT_RATIOS,
    split_seed: int = 0,
) -> str:
    """Prepare the slice store in ``output_dir``; print and return the datalist path.

    ``--split random`` makes a seeded case-wise split of the cases present (``split_ratios``
    training, validation, test; ``split_seed``) and writes it to ``<output_dir>/split.json``.
    """
    cases = parse_names(cases)
    path = prepare_brats20(dataset_dir, output_dir, split=split, image_size=image_size, dtype=dtype,
                           cases=cases, overwrite=overwrite, progress=progress,
                           split_ratios=split_ratios, split_seed=split_seed)
    print(f"datalist: {path}")
    return str(path)


def split_to_datalist(split_json: str, out: str = "data_lists/brats20.json") -> str:
    """Convert a published ``train``/``val``/``test`` split of case IDs to our datalist form."""
    path = Path(split_json)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(path, f"cannot read split JSON ({type(e).__name__}: {e})") from e
    datalist = _split_to_datalist(split)
    atomic_save_json(datalist, out)
    print(f"{out}: " + ", ".join(f"{k} {len(v)}" for k, v in datalist.items()))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    return run_commands({"prepare": prepare, "split_to_datalist": split_to_datalist}, argv)


if __name__ == "__main__":
    sys.exit(main())
