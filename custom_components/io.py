"""Atomic writes, safe checkpoint loading and the project's clear input error.

Every file the collection produces (checkpoints, prepared data, reports) goes through
:func:`atomic_write`, so an interrupted job never leaves a half-written file under the
final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "InputDataError",
    "atomic_write",
    "atomic_save",
    "atomic_save_json",
    "atomic_write_text",
    "load_checkpoint",
]


class InputDataError(ValueError):
    """Bad input data: the message names the file (or case) and the problem."""

    def __init__(self, source: str | os.PathLike, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same folder so that ``os.replace`` is atomic.
    ``suffix`` keeps an extension for writers that infer the format from it (e.g. ``.npy``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name ends with ``suffix`` (writers such as np.save append their extension
    # otherwise) and carries ".tmp" so leftovers of a killed job are recognisable.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise stick to the final file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_save_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; raise :class:`InputDataError` on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "checkpoint file does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated or pickled with non-tensor objects
        raise InputDataError(path, f"cannot load checkpoint ({type(e).__name__}: {e})") from e
