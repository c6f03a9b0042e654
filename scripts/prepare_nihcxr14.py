#!/usr/bin/env python
"""Prepare NIH ChestX-ray14 for the HAM bundle (spec ``ham.md`` sections 7, 8 and 10).

Commands::

    python scripts/prepare_nihcxr14.py prepare --dataset_dir D --output_dir O [--image_size 512]
        [--dtype uint8|float16] [--data_entry Data_Entry_2017_v2020.csv] [--boxes_json Annotations/BBoxes.json]
        [--val_fraction 0.1] [--seed 0] [--select_on_test] [--n_folds 5] [--folds 1,2]
        [--unannotated_fraction 0.5] [--exclude_test_patients True|False] [--box_tolerance 1]
        [--missing_images error|skip] [--num_workers 0] [--overwrite] [--progress False]
    python scripts/prepare_nihcxr14.py from_lists --store_dir O --training train.txt --test test.txt
        [--box_supervised box.txt] [--validation val.txt] [--val_fraction 0.1] [--seed 0] --out O/datalist_custom.json
    python scripts/prepare_nihcxr14.py compare_boxes --bbox_csv BBox_List_2017.csv --boxes_json Annotations/BBoxes.json

``prepare`` checks every file of the release, resizes each image once into ``O/images/``
(resumable: rerun after an interruption) and writes ``O/datalist_official.json`` (with both split
lists), ``O/datalist_nobox.json`` and ``O/datalist_box_fold{k}.json``; layouts and choices:
:mod:`custom_components.data.nihcxr14`. ``from_lists`` builds a datalist from image-name lists
(e.g. HAM's ``ImageSets``) over a prepared store. Bad input data ends with a one-line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from custom_components.cli import run_commands
from custom_components.data import nihcxr14 as nih


def prepare(
    dataset_dir: str,
    output_dir: str,
    image_size: int = 512,
    dtype: str = "uint8",
    data_entry: str | None = None,
    boxes_json: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    select_on_test: bool = False,
    n_folds: int = 5,
    folds: str | int | Sequence[int] | None = None,
    unannotated_fraction: float = 0.5,
    exclude_test_patients: bool | None = None,
    box_tolerance: float = 1.0,
    missing_images: str = "error",
    crf: bool = False,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Check the release, prepare ``output_dir`` and write the datalists; prints their sizes."""
    written = nih.prepare_nihcxr14(
        dataset_dir, output_dir, image_size=int(image_size), dtype=str(dtype), data_entry=data_entry,
        boxes_json=boxes_json, val_fraction=float(val_fraction), seed=int(seed), select_on_test=bool(select_on_test),
        n_folds=int(n_folds), folds=folds, unannotated_fraction=float(unannotated_fraction),
        exclude_test_patients=exclude_test_patients, box_tolerance=float(box_tolerance), missing_images=str(missing_images),
        crf=bool(crf), overwrite=bool(overwrite), num_workers=int(num_workers), progress=bool(progress),
    )  # fmt: skip
    print(f"record: {written['record']}")
    return str(output_dir)


def from_lists(
    store_dir: str,
    training: str,
    test: str,
    out: str,
    box_supervised: str | None = None,
    validation: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> str:
    """Datalist from image-name list files (one name per line) over a prepared store."""
    lists = {k: nih.read_image_list(v) if v is not None else None
             for k, v in (("training", training), ("test", test), ("box_supervised", box_supervised),
                          ("validation", validation))}
    datalist = nih.datalist_from_lists(store_dir, lists["training"], lists["test"], lists["box_supervised"] or (),
                                       lists["validation"], val_fraction=float(val_fraction), seed=int(seed))
    path = nih.write_datalist(datalist, out)
    print(f"datalist: {path}: " + ", ".join(f"{k} {len(v)}" for k, v in datalist.items()))
    return str(path)


def compare_boxes(bbox_csv: str, boxes_json: str) -> int:
    """Compare ``BBox_List_2017.csv`` with HAM's ``BBoxes.json`` box for box; prints the differences."""
    a, b = nih.read_bbox_list(bbox_csv), nih.read_ham_boxes(boxes_json)
    diffs = nih.compare_boxes(a, b, tolerance=1e-3)
    n_a = sum(len(v) for per in a.values() for v in per.values())
    print(f"{bbox_csv}: {n_a} boxes on {len(a)} images; {boxes_json}: "
          f"{sum(len(v) for per in b.values() for v in per.values())} boxes on {len(b)} images")
    for d in diffs:
        print(f"differs: {d}")
    print("the tables agree box for box" if not diffs else f"{len(diffs)} differences")
    return len(diffs)


COMMANDS = {"prepare": prepare, "from_lists": from_lists, "compare_boxes": compare_boxes}


def main(argv: list[str] | None = None) -> int:
    return run_commands(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
