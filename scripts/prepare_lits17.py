#!/usr/bin/env python
"""Prepare LiTS17 for the LGM-ViT bundles (spec section 6: Data preparation).

Commands::

    python scripts/prepare_lits17.py prepare --dataset_dir D --output_dir O [--target organ|lesion]
        [--hu_window -100,400] [--image_size 256] [--dtype float16] [--split published|random|FILE.json]
        [--split_ratios 0.7,0.1,0.2] [--split_seed 0]
        [--cases volume-0,volume-1] [--overwrite] [--progress False]
    python scripts/prepare_lits17.py split_to_datalist \\
        --split_json /work/shared/data/splits/lits17_lgmvit_split.json --out data_lists/lits17.json

``dataset_dir`` holds ``scans/`` + ``segmentations/``, or the files flat, or LiTS's
``Training Batch 1/2`` folders (see :mod:`custom_components.data.lits17`). The default is the
paper's setting: ``--target organ`` (label = liver present) and no HU window (raw HU min-maxed
per slice); ``--hu_window lo,hi`` clips to [lo, hi] HU before the per-slice min-max.

Bad input data ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from custom_components.cli import parse_names, run_commands
from custom_components.data.datalists import split_to_datalist as _split_to_datalist
from custom_components.data.lits17 import case_id, prepare_lits17
from custom_components.data.splits import DEFAULT_RATIOS
from custom_components.io import InputDataError, atomic_save_json


def prepare(
    dataset_dir: str,
    output_dir: str,
    split: str | None = "published",
    image_size: int = 256,
    target: str = "organ",
    hu_window: str | list[float] | tuple[float, ...] | None = None,
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
    path = prepare_lits17(dataset_dir, output_dir, split=split, image_size=image_size, target=target,
                          hu_window=hu_window, dtype=dtype, cases=cases, overwrite=overwrite, progress=progress,
                          split_ratios=split_ratios, split_seed=split_seed)
    print(f"datalist: {path}")
    return str(path)


def split_to_datalist(split_json: str, out: str = "data_lists/lits17.json") -> str:
    """Convert the published split (``volume-N.nii`` names) to our datalist form (case IDs ``volume-N``)."""
    path = Path(split_json)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(path, f"cannot read split JSON ({type(e).__name__}: {e})") from e
    if not isinstance(split, dict) or not all(isinstance(v, list) for v in split.values()):
        raise InputDataError(path, "expected a JSON object mapping split names to lists of volume names")
    datalist = _split_to_datalist({k: [case_id(str(c)) for c in v] for k, v in split.items()})
    atomic_save_json(datalist, out)
    print(f"{out}: " + ", ".join(f"{k} {len(v)}" for k, v in datalist.items()))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    return run_commands({"prepare": prepare, "split_to_datalist": split_to_datalist}, argv)


if __name__ == "__main__":
    sys.exit(main())
