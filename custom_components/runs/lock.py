"""One run per output folder: an advisory lock that names its holder.

A run takes ``<folder>/.run.lock`` with ``fcntl.flock`` before it writes anything there. The
kernel drops the lock when the holding process ends, however it ends, so a lock left by a killed
run is free again and is simply taken over; there is no stale-PID guessing. The file also holds
the holder's PID, host, start time and command line, so a refused second run can say who holds
the folder. Only the distributed rank 0 (``RANK`` unset or 0) takes the lock: the other ranks of
the same run write nothing of their own there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from custom_components.io import InputDataError

__all__ = ["LOCK_NAME", "RunLockedError", "acquire_run_lock", "held_locks", "release_run_lock"]

LOCK_NAME = ".run.lock"
logger = logging.getLogger(__name__)

# folder -> open file object; a process takes each folder once (re-entrant within the process).
_HELD: dict[Path, object] = {}


class RunLockedError(InputDataError):
    """Another live process holds the folder's run lock."""


def _holder_text(info: dict) -> str:
    if not info:
        return "another process (no holder details recorded)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}: {info.get('command', '?')}"


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py":  # python -m <package>
        argv[0] = "python -m " + Path(argv[0]).parent.name if Path(argv[0]).parent.name != "bundle" else "python -m monai.bundle"
    return " ".join(argv)


def _read_info(fh) -> dict:
    try:
        fh.seek(0)
        text = fh.read()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def held_locks() -> list[Path]:
    """Folders whose run lock this process holds."""
    return list(_HELD)


def acquire_run_lock(folder: str | os.PathLike) -> Path | None:
    """Take the run lock of ``folder`` (created if missing) or raise :class:`RunLockedError`.

    Returns the lock file, or ``None`` on a non-zero distributed rank (which takes no lock).
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    folder = Path(folder).resolve()
    if folder in _HELD:
        return folder / LOCK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fh = open(path, "a+")  # noqa: SIM115 - kept open for the life of the run: the open file *is* the lock
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _read_info(fh)
        if not info:  # the holder may be between taking the lock and writing its details
            time.sleep(0.2)
            info = _read_info(fh)
        fh.close()
        raise RunLockedError(
            path, f"another run is using this folder ({_holder_text(info)}); wait for it to end, or give this run "
            "another bundle_root"
        ) from None
    previous = _read_info(fh)
    if previous.get("pid") not in (None, os.getpid()):
        logger.info("taking over the run lock of %s left by an ended run (PID %s)", folder, previous.get("pid"))
    fh.seek(0)
    fh.truncate()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command_line()}
    fh.write(json.dumps(info) + "\n")
    fh.flush()
    _HELD[folder] = fh
    return path


def release_run_lock(folder: str | os.PathLike | None = None) -> None:
    """Release the lock of ``folder`` (every lock of this process when ``None``); the file stays."""
    folders = list(_HELD) if folder is None else [Path(folder).resolve()]
    for f in folders:
        fh = _HELD.pop(f, None)
        if fh is None:
            continue
        try:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            fh.close()
