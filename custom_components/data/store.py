"""The prepared slice store shared by every slice dataset (BraTS2020, LiTS17, ...).

Layout: ``<store>/<case>/image.npy`` (slices, C, H, W), ``<case>/mask.npy`` (slices, H, W) uint8
and ``<case>/meta.json`` (written last: the per-case completion marker), plus
``<store>/datalist.json`` holding the split's prepared cases. Dataset modules supply how one case
is read; this module owns case selection, resumability, atomic writing and the datalist.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from custom_components.io import InputDataError, atomic_save_json, atomic_write

__all__ = ["write_case", "prepare_store", "short_list"]


def short_list(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (" ..." if len(ids) > n else "")


def _clean_tmp(case_out: Path) -> None:
    # temp files left by a killed run (atomic_write cleans up only on normal exits); their names
    # start with "." and carry ".tmp" before the extension (".image.npy.abc123.tmp.npy")
    for p in case_out.glob(".*.tmp*"):
        p.unlink(missing_ok=True)


def write_case(case_out: Path, image: np.ndarray, mask: np.ndarray, meta: dict) -> dict:
    """Write one case atomically: image, mask, then ``meta.json`` as the completion marker."""
    case_out.mkdir(parents=True, exist_ok=True)
    _clean_tmp(case_out)
    # the marker goes first, so a crash while rewriting never leaves a stale "complete" case
    (case_out / "meta.json").unlink(missing_ok=True)
    with atomic_write(case_out / "image.npy", suffix=".npy") as tmp:
        np.save(tmp, image)
    with atomic_write(case_out / "mask.npy", suffix=".npy") as tmp:
        np.save(tmp, mask)
    atomic_save_json(meta, case_out / "meta.json")
    return meta


def prepare_store(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    found: Iterable[str],
    splits: Mapping[str, Sequence[str]],
    split_name: str | None,
    cases: Iterable[str] | None,
    prepare_case: Callable[[str, Path], dict],
    prepared_meta: Callable[[Path], dict | None],
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "prepare",
) -> Path:
    """Prepare the selected cases and write ``<output_dir>/datalist.json``; returns its path.

    Selection: exactly ``cases`` when given (cases outside the split go under ``"unsplit"``),
    every found case when there is no split, else the split's cases found in ``dataset_dir``
    (missing and extra cases are reported, not errors). ``prepared_meta(case_out)`` returns the
    meta of an already prepared case with the current settings (skipped unless ``overwrite``),
    ``prepare_case(case, case_out)`` prepares one and returns its meta (with ``n_slices`` and
    per-slice ``labels``). An empty result raises :class:`InputDataError`.
    """
    from tqdm.auto import tqdm

    found = list(found)
    split_of = {case: key for key, ids in splits.items() for case in ids}
    if cases is not None:
        wanted = list(dict.fromkeys([cases] if isinstance(cases, str) else cases))
        missing = [c for c in wanted if c not in set(found)]
        if missing:
            raise InputDataError(dataset_dir, f"requested cases not found: {short_list(missing)}")
    elif not splits:
        wanted = found
    else:
        present = set(found)
        wanted = [c for ids in splits.values() for c in ids if c in present]
        missing = [c for ids in splits.values() for c in ids if c not in present]
        if missing:
            print(
                f"note: {len(missing)} of {len(split_of)} split cases are not in {dataset_dir} (skipped): {short_list(missing)}"
            )
        extra = [c for c in found if c not in split_of]
        if extra:
            print(f"note: {len(extra)} cases in {dataset_dir} are not in split {split_name!s} (ignored): {short_list(extra)}")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metas: dict[str, dict] = {}
    n_skipped = 0
    for case in tqdm(wanted, desc=desc, unit="case", disable=not progress):
        meta = None if overwrite else prepared_meta(out / case)
        if meta is None:
            meta = prepare_case(case, out / case)
        else:
            n_skipped += 1
        metas[case] = meta
    if n_skipped:
        print(f"note: {n_skipped} cases were already prepared (skipped; use overwrite=True to redo)")

    datalist: dict[str, list[dict]] = {k: [] for k in splits}
    ordered = [c for k in splits for c in splits[k] if c in metas] + [c for c in wanted if c not in split_of]
    for case in ordered:
        meta = metas[case]
        datalist.setdefault(split_of.get(case, "unsplit"), []).append(
            {
                "case": case,
                "image": f"{case}/image.npy",
                "mask": f"{case}/mask.npy",
                "n_slices": meta["n_slices"],
                "n_positive": int(sum(meta["labels"])),
            }
        )
    if not any(datalist.values()):
        raise InputDataError(
            dataset_dir,
            f"empty datalist: no case of split {split_name!s} was found to prepare "
            "(to split the cases present, pass --split random)",
        )
    return atomic_save_json(datalist, out / "datalist.json")
