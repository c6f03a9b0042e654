"""Which split a slice-store preparation uses: the published one, a split file, or a new random one.

``split="random"`` makes a seeded, patient-wise split of the cases that are present (every slice
of a case lands in the same set) and writes it as ``<prepared store>/split.json`` in the published
form (``train``/``val``/``test`` lists of case IDs, plus a ``_random_split`` record of the seed and
ratios). A later preparation with the same seed, ratios and cases reuses that file; anything else
makes a new one. The file can also be passed back as ``split=<path>``.

Set sizes: the default ratios 0.7 / 0.1 / 0.2 are the published proportions (BraTS2020 258 / 37 / 74
of 369, LiTS17 92 / 13 / 26 of 131; with all cases present the sizes come out exactly those).
Sizes are ``n * ratio`` rounded by largest remainder (ties: training, validation, test), then every
set with a positive ratio gets at least one case, taken from the largest set. With fewer cases
than such sets, sets are filled one case each in the order training, validation, test and the
rest stay empty (a warning names them): a case is never put in two sets, so two cases give one
training and one validation case and no test set.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom_components.data.datalists import SPLIT_KEYS, load_split
from custom_components.io import atomic_save_json

__all__ = [
    "DEFAULT_RATIOS",
    "SETS",
    "SPLIT_FILE",
    "choose_split",
    "empty_set_hint",
    "parse_ratios",
    "random_split",
    "set_sizes",
]

#: the datalist sets a split fills, in the order cases are given out
SETS: tuple[str, ...] = ("training", "validation", "test")
#: the published proportions of both LGM-ViT splits (258/37/74 and 92/13/26)
DEFAULT_RATIOS: tuple[float, float, float] = (0.7, 0.1, 0.2)
#: name of the random split file beside the prepared store
SPLIT_FILE = "split.json"
_RECORD = "_random_split"
_FILE_KEYS = {v: k for k, v in SPLIT_KEYS.items()}  # datalist set -> published key


def parse_ratios(ratios: str | Sequence[float]) -> tuple[float, float, float]:
    """Training/validation/test ratios normalised to sum 1 (``"0.7,0.1,0.2"`` or a sequence)."""
    if isinstance(ratios, str):
        ratios = [v for v in ratios.replace("/", ",").split(",") if v.strip()]
    try:
        values = [float(v) for v in ratios]
    except (TypeError, ValueError) as e:
        raise ValueError(f"split_ratios must be 3 numbers (training, validation, test), got {ratios!r}") from e
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or values[0] <= 0:
        raise ValueError(
            f"split_ratios must be 3 non-negative numbers with a positive training ratio, got {ratios!r}"
        )
    total = sum(values)
    # rounded so that the record in split.json compares equal across runs
    return tuple(round(v / total, 6) for v in values)  # type: ignore[return-value]


def set_sizes(n: int, ratios: str | Sequence[float] = DEFAULT_RATIOS) -> tuple[int, int, int]:
    """Cases per set (training, validation, test) for ``n`` cases; see the module docstring."""
    r = parse_ratios(ratios)
    active = [i for i in range(3) if r[i] > 0]
    if n < len(active):
        sizes = [0, 0, 0]
        for i in active[:n]:
            sizes[i] = 1
        return tuple(sizes)  # type: ignore[return-value]
    quota = [n * x for x in r]
    sizes = [math.floor(q) for q in quota]
    left = n - sum(sizes)
    for i in sorted(active, key=lambda i: (-(quota[i] - sizes[i]), i))[:left]:
        sizes[i] += 1
    for i in active:
        if sizes[i] == 0:
            # n >= len(active), so the largest set has at least two cases to give one away
            j = max(range(3), key=lambda k: (sizes[k], -k))
            sizes[j] -= 1
            sizes[i] += 1
    return tuple(sizes)  # type: ignore[return-value]


def random_split(
    cases: Sequence[str], ratios: str | Sequence[float] = DEFAULT_RATIOS, seed: int = 0
) -> dict[str, list[str]]:
    """Seeded case-wise split: ``{"training": [...], "validation": [...], "test": [...]}``.

    Depends only on the set of case IDs (not their order), the ratios and the seed; each set's
    IDs are sorted.
    """
    ids = sorted(set(cases))
    order = np.random.default_rng(int(seed)).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    out, start = {}, 0
    for key, size in zip(SETS, set_sizes(len(ids), ratios), strict=True):
        out[key] = sorted(shuffled[start : start + size])
        start += size
    return out


def _counts(splits: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in splits.items())


def _read_random_split(path: Path) -> tuple[dict[str, list[str]], dict[str, Any]] | None:
    """The sets and record of an existing random split file; None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get(_RECORD)
        splits = load_split(path)
    except (OSError, ValueError, AttributeError):  # InputDataError is a ValueError
        return None
    return (splits, record) if isinstance(record, dict) else None


def _random_split_file(
    present: Sequence[str], output_dir: str | os.PathLike, ratios: Sequence[float], seed: int
) -> dict[str, list[str]]:
    path = Path(output_dir) / SPLIT_FILE
    ids = sorted(set(present))
    record = {"seed": int(seed), "ratios": list(ratios), "n_cases": len(ids)}
    old = _read_random_split(path)
    if old is not None and old[1] == record and sorted(c for v in old[0].values() for c in v) == ids:
        print(f"split: reusing {path} (seed {seed}, ratios {'/'.join(f'{r:g}' for r in ratios)}): {_counts(old[0])}")
        return {k: old[0].get(k, []) for k in SETS}
    if path.exists():
        # the old file was made for other cases, seed or ratios: a model trained on it must not
        # be evaluated on the new sets
        print(f"note: {path} was made for other cases, seed or ratios; writing a new random split")
    splits = random_split(ids, ratios, seed)
    empty = [k for k, v in splits.items() if not v and ratios[SETS.index(k)] > 0]
    if empty:
        print(
            f"warning: {len(ids)} cases for {sum(r > 0 for r in ratios)} sets: set {', '.join(empty)} stays empty "
            "(a case is never put in two sets; add cases or set split_ratios)"
        )
    atomic_save_json({**{_FILE_KEYS[k]: v for k, v in splits.items()}, _RECORD: record}, path)
    print(f"split: random (seed {seed}, ratios {'/'.join(f'{r:g}' for r in ratios)}) of {len(ids)} cases: "
          f"{_counts(splits)} -> {path}")
    return splits


def choose_split(
    split: str | os.PathLike | None,
    published: str,
    present: Sequence[str],
    output_dir: str | os.PathLike,
    ratios: str | Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    case_id: Callable[[str], str] = str,
) -> tuple[dict[str, list[str]], str | None]:
    """The sets a preparation uses and the split's display name.

    ``split``: ``None`` (no split), ``"published"`` (the shipped datalist ``published``),
    ``"random"`` (a new or reused random split of ``present``, written to
    ``<output_dir>/split.json``), or a shipped datalist name / JSON path (see
    :func:`custom_components.data.datalists.load_split`). ``case_id`` maps IDs read from a split
    file to the dataset's case IDs. Prints the present cases per set; a set with none names
    ``--split random``.
    """
    if split is None:
        return {}, None
    name = str(split)
    if name == "random":
        splits = _random_split_file(present, output_dir, parse_ratios(ratios), seed)
        return splits, f"random ({Path(output_dir) / SPLIT_FILE})"
    if name == "published":
        name = published
    splits = {k: [case_id(c) for c in ids] for k, ids in load_split(name).items()}
    have = set(present)
    found = {k: [c for c in ids if c in have] for k, ids in splits.items()}
    print(f"split {name}: present cases per set: {_counts(found)}")
    empty = [k for k, ids in found.items() if not ids]
    if empty and len(empty) < len(found):
        print(
            f"note: no case of set {', '.join(empty)} of split {name} is present; to split the cases "
            "present instead, pass --split random"
        )
    return splits, name


def empty_set_hint(store: str | os.PathLike, datalist: Mapping[str, Sequence[Any]]) -> str:
    """How to fill an empty set of the prepared datalist ``datalist`` in ``store`` (for the one-line error)."""
    path = Path(store) / SPLIT_FILE
    old = _read_random_split(path)
    if old is not None:
        ids = {k: sorted(e["case"] if isinstance(e, dict) else str(e) for e in v) for k, v in datalist.items()}
        if all(ids.get(k, []) == sorted(old[0].get(k, [])) for k in SETS):
            return f"the random split {path} has too few cases for it; add cases or change split_ratios"
    return "only part of the dataset present? pass --split random to split the cases present"
