"""Datalists shipped with the project (``<repo root>/data_lists/<name>.json``).

A datalist maps split keys (``training``/``validation``/``test``) to lists of entries
``{"case": ID, "image": "ID/image.npy", "mask": "ID/mask.npy"}``, with paths relative to
the prepared slice store. The LGM-ViT patient-level splits (spec section 6: BraTS2020
258 / 37 / 74) are published as ``{"train": [...], "val": [...], "test": [...]}`` of case
IDs; :func:`split_to_datalist` converts that form, keeping the order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_components.io import InputDataError

__all__ = ["REPO_ROOT", "SPLIT_KEYS", "datalist_path", "load_split", "split_to_datalist"]

#: repository root = parent of the ``custom_components`` package folder
REPO_ROOT = Path(__file__).resolve().parents[2]

#: published split key -> datalist key
SPLIT_KEYS: dict[str, str] = {"train": "training", "val": "validation", "test": "test"}


def datalist_path(name: str) -> Path:
    """Path of the shipped datalist ``<repo root>/data_lists/<name>.json`` (must exist)."""
    path = REPO_ROOT / "data_lists" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (REPO_ROOT / "data_lists").glob("*.json"))
        raise InputDataError(path, f"no datalist named {name!r} (known: {', '.join(known) or 'none'})")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputDataError(path, f"cannot read JSON ({type(e).__name__}: {e})") from e


def load_split(name_or_path: str | os.PathLike) -> dict[str, list[str]]:
    """Case IDs per split key (``training``, ``validation``, ``test``, ...).

    ``name_or_path`` is a shipped datalist name (``"brats20"``) or a JSON file path, either in
    our datalist form (lists of ``{"case": ...}`` entries) or in the published form
    (``train``/``val``/``test`` lists of IDs, renamed to the datalist keys). Keys starting with
    ``_`` hold notes, not cases (the ``_random_split`` record of a random split file), and are skipped.
    """
    s = str(name_or_path)
    is_path = s.endswith(".json") or os.sep in s or "/" in s or Path(s).is_file()
    path = Path(s) if is_path else datalist_path(s)
    if not path.is_file():
        raise InputDataError(path, "split file does not exist")
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise InputDataError(path, "expected a JSON object mapping split names to case lists")
    out: dict[str, list[str]] = {}
    for key, items in data.items():
        if key.startswith("_"):
            continue
        if not isinstance(items, list):
            raise InputDataError(path, f"split {key!r} is not a list")
        ids = []
        for item in items:
            case = item.get("case") if isinstance(item, dict) else item
            if not isinstance(case, str) or not case:
                raise InputDataError(path, f"split {key!r} has an entry without a case ID: {item!r}")
            ids.append(case)
        out[SPLIT_KEYS.get(key, key)] = ids
    seen: dict[str, str] = {}
    for key, ids in out.items():
        for case in ids:
            if case in seen and seen[case] != key:
                # a patient in two splits would leak between training and evaluation
                raise InputDataError(path, f"case {case} is in both {seen[case]!r} and {key!r}")
            seen[case] = key
    return out


def split_to_datalist(
    split: Mapping[str, list[str]],
    image: str = "{case}/image.npy",
    mask: str = "{case}/mask.npy",
) -> dict[str, list[dict[str, str]]]:
    """Convert a published split (``train``/``val``/``test`` ID lists) to our datalist form.

    Keys are renamed by :data:`SPLIT_KEYS` (others kept as they are); order is kept.
    """
    return {
        SPLIT_KEYS.get(key, key): [
            {"case": case, "image": image.format(case=case), "mask": mask.format(case=case)} for case in ids
        ]
        for key, ids in split.items()
    }
