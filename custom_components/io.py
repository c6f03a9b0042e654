"""Atomic writes, safe checkpoint loading and the project's clear input error.

Every file the collection produces (checkpoints, prepared data, reports) goes through
:func:`atomic_write`, so an interrupted job never leaves a half-written file under the
final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "InputDataError",
    "atomic_write",
    "atomic_save",
    "atomic_save_json",
    "atomic_write_text",
    "load_checkpoint",
    "load_network_weights",
    "state_dict_mismatch",
    "remove_stale_temporaries",
]


class InputDataError(ValueError):
    """Bad input data: the message names the file (or case) and the problem.

    ``InputDataError(message)`` with one argument is how PyTorch's DataLoader re-raises an error of
    a worker process (the message then carries the worker's traceback); the last line, the
    original ``<file>: <problem>``, is kept so the error stays one line in the main process too.
    """

    def __init__(self, source: str | os.PathLike, problem: str | None = None):
        if problem is None:
            source, problem = _split_message(str(source))
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


def _split_message(message: str) -> tuple[str, str]:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    # "custom_components.io.InputDataError: <file>: <problem>" as a worker's traceback ends
    head, sep, rest = last.partition("Error: ")
    if sep and " " not in head and "." in head:
        last = rest
    source, sep, problem = last.partition(": ")
    return (source, problem) if sep else ("", last)


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


# atomic_write's temporary names: "." + final name + "." + mkstemp's 8 random characters + ".tmp"
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed :func:`atomic_write` calls left directly in ``folder``.

    Only call this while holding the folder's run lock (:mod:`custom_components.runs.lock`): a
    temporary of a live writer would otherwise be removed under it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


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
        # torch's messages run to several sentences of advice; the first says what is wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        first = first.split(". ")[0].rstrip(".")
        raise InputDataError(path, f"cannot load checkpoint ({type(e).__name__}: {first})") from e


def state_dict_mismatch(module: torch.nn.Module, state: Mapping[str, Any]) -> str | None:
    """One line describing why ``state`` does not load strictly into ``module`` (None when it does)."""
    target = module.state_dict()
    shapes = [
        f"{k}: file {list(v.shape)} vs network {list(target[k].shape)}"
        for k, v in state.items()
        if k in target and hasattr(v, "shape") and tuple(v.shape) != tuple(target[k].shape)
    ]
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if not (shapes or missing or unexpected):
        return None
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors differ in shape ({'; '.join(shapes[:2])}{'; ...' if len(shapes) > 2 else ''})")
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    return ", ".join(parts)


def load_network_weights(
    network: torch.nn.Module, path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> torch.nn.Module:
    """Load trained weights (a ``state_dict`` file or a resumable ``last.pt``) strictly into ``network``.

    The one path by which evaluation, inference, explanation and robustness workflows load a
    checkpoint: a missing, truncated or unpicklable file, or weights of another network
    configuration, raise :class:`InputDataError` naming the file and the problem in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(
            path, "trained weights not found: run the training workflow first (with the same config files), or set --ckpt_dir"
        )
    state = load_checkpoint(path, map_location=map_location)
    if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping):
        state = state["network"]  # a resumable training checkpoint (last.pt)
    if not isinstance(state, Mapping):
        raise InputDataError(path, f"expected a state dict, found {type(state).__name__}")
    target = network.module if isinstance(getattr(network, "module", None), torch.nn.Module) else network
    problem = state_dict_mismatch(target, state)
    if problem is not None:
        raise InputDataError(
            path, f"weights do not fit the configured network: {problem}; give the config files the model was trained with"
        )
    target.load_state_dict(state)
    return network
