"""The settings a checkpoint was trained with, and how they differ from this run's.

A fingerprint is the merged config of the run (the config files in order, then the command-line
overrides) as raw text, flattened to ``id -> value`` pairs, without the ids that only say where
files live or how the run is executed (paths, device, workers, resume switches, logging), plus the
SHA-256 of the data-split files. :class:`~custom_components.handlers.checkpoint.TrainingCheckpoint`
stores it in every checkpoint and compares it before a resume, so a rerun with another method,
learning rate, seed, epoch count or split is refused instead of silently continuing the old run.

The merged config is read from the :class:`monai.bundle.ConfigParser` that is resolving the
current config item: MONAI evaluates components and ``$`` expressions inside
``ConfigParser.get_parsed_content``, so the parser is on the call stack. This serves
``monai.bundle run``, ``create_workflow`` and ``ConfigWorkflow`` alike, overrides included.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = [
    "DEFAULT_IGNORE",
    "find_parser",
    "describe_differences",
    "fingerprint_differences",
    "flatten_config",
    "run_fingerprint",
]

# Ids that do not change the experiment: where things live, the hardware, the run's mechanics.
DEFAULT_IGNORE = (
    "_meta_", "imports", "initialize", "run", "finalize", "training", "evaluating", "inferring",
    "bundle_root", "dataset_dir", "ckpt_dir", "output_dir", "log_dir", "prepared_dir", "datalist",
    "run_lock_dir", "device", "num_workers", "prepare_data", "resume", "force_resume",
    "log_every_n_iterations", "num_panel_images", "pretrained_path", "tb_writer",
)  # fmt: skip

ID_SEP = "#"


def find_parser() -> ConfigParser | None:
    """The ConfigParser resolving the config item that is running this code (None outside one)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigParser):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` -> ``{"a#b#0": 1, "a#b#1": 2}``; empty containers stay as leaves."""
    if isinstance(config, Mapping) and config:
        items: Iterable[tuple[Any, Any]] = config.items()
    elif isinstance(config, (list, tuple)) and config:
        items = enumerate(config)
    else:
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten_config(value, f"{prefix}{ID_SEP}{key}" if prefix else str(key)))
    return flat


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(
    data_files: Sequence[str | os.PathLike] = (),
    ignore: Sequence[str] = DEFAULT_IGNORE,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint of the run whose config is being resolved (or of ``config`` when given).

    Args:
        data_files: files whose content defines the data (the prepared datalist: the split);
            recorded as ``data#<file name>`` -> SHA-256, missing files as ``None``.
        ignore: top-level ids left out (see :data:`DEFAULT_IGNORE`).
        config: a raw config mapping instead of the parser's merged config.
    """
    if config is None:
        parser = find_parser()
        if parser is None:
            raise RuntimeError("run_fingerprint() must be resolved from a bundle config (no ConfigParser on the stack)")
        config = parser.get()
    skipped = set(ignore)
    kept = {k: v for k, v in config.items() if k not in skipped}
    flat = flatten_config(kept)
    for f in data_files:
        flat[f"data{ID_SEP}{Path(f).name}"] = _sha256(f) if Path(f).is_file() else None
    return flat


_MISSING = object()


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(id, saved value, current value)`` for every id that differs (absent ids as ``_MISSING``)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, _MISSING), current.get(key, _MISSING)
        if a != b:
            out.append((key, a, b))
    return out


def _short(value: Any, width: int = 40) -> str:
    if value is _MISSING:
        return "(absent)"
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_differences(differences: Sequence[tuple[str, Any, Any]], most: int = 4) -> str:
    """``lr: 1e-05 -> 0.5; seed: 42 -> 1; and 3 more`` (one line)."""
    parts = [f"{key}: {_short(a)} -> {_short(b)}" for key, a, b in differences[:most]]
    if len(differences) > most:
        parts.append(f"and {len(differences) - most} more")
    return "; ".join(parts)
