#!/usr/bin/env python
"""Write datalists for the image-folder datasets of the ugent-korea study (spec section 8).

Commands::

    python scripts/prepare_image_folders.py kvasir --root R --out data_lists/kvasir.json
        [--positive esophagitis] [--negatives normal-z-line] [--val_fraction 0.1] [--test_fraction 0.2]
        [--seed 0] [--masks_dir masks] [--boxes_json B.json] [--box_masks_dir D] [--check_images]
    python scripts/prepare_image_folders.py mura --root R --out data_lists/mura.json
        [--val_fraction 0.1] [--seed 0] [--body_parts XR_WRIST,XR_HAND] [--masks_dir ..] [--boxes_json ..]
    python scripts/prepare_image_folders.py cp_child --root R --out data_lists/cp_child.json
        [--subsets CP-CHILD-A,CP-CHILD-B] [--val_fraction 0.1] [--seed 0] [...]
    python scripts/prepare_image_folders.py duke --root R --out data_lists/duke.json
        [--val_fraction 0.1] [--test_fraction 0.2] [--seed 0] [--balance] [...]

Layouts, labels and split rules: :mod:`custom_components.data.image_folders`. Entry paths are
relative to ``--root``; ``--masks_dir`` / ``--box_masks_dir`` relative to ``--root`` unless absolute.
Bad input data ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from custom_components.cli import parse_names, run_commands
from custom_components.data import image_folders as imf


def _write(datalist: dict, out: str) -> str:
    path = imf.write_datalist(datalist, out)
    counts = ", ".join(f"{k} {len(v)} ({sum(e['label'] for e in v)} pos, "
                       f"{sum('mask' in e or 'boxes' in e for e in v)} masks)" for k, v in datalist.items())
    print(f"datalist: {path}: {counts}")
    return str(path)


def kvasir(root: str, out: str = "data_lists/kvasir.json", positive: str = "esophagitis",
           negatives: str | Sequence[str] = ("normal-z-line",), val_fraction: float = 0.1,
           test_fraction: float = 0.2, seed: int = 0, masks_dir: str | None = None, boxes_json: str | None = None,
           box_masks_dir: str | None = None, check_images: bool = False) -> str:
    """Kvasir v2: ``positive`` (1) vs. ``negatives`` (0), image-level stratified split."""
    dl = imf.kvasir_datalist(root, positive=str(positive), negatives=parse_names(negatives),
                             val_fraction=float(val_fraction), test_fraction=float(test_fraction), seed=int(seed),
                             masks_dir=masks_dir, boxes_json=boxes_json, box_masks_dir=box_masks_dir,
                             check_images=bool(check_images))
    return _write(dl, out)


def mura(root: str, out: str = "data_lists/mura.json", val_fraction: float = 0.1, seed: int = 0,
         body_parts: str | Sequence[str] | None = None, masks_dir: str | None = None, boxes_json: str | None = None,
         box_masks_dir: str | None = None, check_images: bool = False) -> str:
    """MURA v1.1: abnormal (1) vs. normal (0); validation from official train, test = official valid."""
    dl = imf.mura_datalist(root, val_fraction=float(val_fraction), seed=int(seed), body_parts=parse_names(body_parts),
                           masks_dir=masks_dir, boxes_json=boxes_json, box_masks_dir=box_masks_dir,
                           check_images=bool(check_images))
    return _write(dl, out)


def cp_child(root: str, out: str = "data_lists/cp_child.json", subsets: str | Sequence[str] | None = None,
             val_fraction: float = 0.1, seed: int = 0, masks_dir: str | None = None, boxes_json: str | None = None,
             box_masks_dir: str | None = None, check_images: bool = False) -> str:
    """CP-CHILD: Polyp (1) vs. Non-Polyp (0); official Train/Test, validation from Train."""
    dl = imf.cp_child_datalist(root, subsets=parse_names(subsets), val_fraction=float(val_fraction), seed=int(seed),
                               masks_dir=masks_dir, boxes_json=boxes_json, box_masks_dir=box_masks_dir,
                               check_images=bool(check_images))
    return _write(dl, out)


def duke(root: str, out: str = "data_lists/duke.json", val_fraction: float = 0.1, test_fraction: float = 0.2,
         seed: int = 0, balance: bool = False, masks_dir: str | None = None, boxes_json: str | None = None,
         box_masks_dir: str | None = None, check_images: bool = False) -> str:
    """DUKE slices ``<root>/{pos,neg}/<patient>_<slice>.png`` (assumed layout), patient-level split."""
    dl = imf.duke_datalist(root, val_fraction=float(val_fraction), test_fraction=float(test_fraction),
                           seed=int(seed), balance=bool(balance), masks_dir=masks_dir, boxes_json=boxes_json,
                           box_masks_dir=box_masks_dir, check_images=bool(check_images))
    return _write(dl, out)


COMMANDS = {"kvasir": kvasir, "mura": mura, "cp_child": cp_child, "duke": duke}


def main(argv: list[str] | None = None) -> int:
    return run_commands(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
