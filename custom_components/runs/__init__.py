"""Run safety for bundle workflows: one run per folder, checked options, checked resumes.

Every workflow's ``initialize`` list starts with :func:`start_run`, and its ``finalize`` list ends
with :func:`finish_run`. Training checkpoints carry :func:`run_fingerprint` (see
:class:`~custom_components.handlers.checkpoint.TrainingCheckpoint`).
"""

from __future__ import annotations

import logging
import os

from custom_components import errors
from custom_components.io import remove_stale_temporaries

from .fingerprint import (
    DEFAULT_IGNORE,
    describe_differences,
    find_parser,
    fingerprint_differences,
    flatten_config,
    run_fingerprint,
)
from .lock import LOCK_NAME, RunLockedError, acquire_run_lock, release_run_lock
from .overrides import (
    UnknownOptionError,
    boolean_overrides,
    bundle_run_arguments,
    check_cli_overrides,
    check_override_ids,
)

__all__ = [
    "DEFAULT_IGNORE",
    "LOCK_NAME",
    "RunLockedError",
    "UnknownOptionError",
    "acquire_run_lock",
    "boolean_overrides",
    "bundle_run_arguments",
    "check_cli_overrides",
    "check_override_ids",
    "describe_differences",
    "end_process_group",
    "fingerprint_differences",
    "finish_run",
    "flatten_config",
    "release_run_lock",
    "run_fingerprint",
    "start_run",
]

logger = logging.getLogger(__name__)


def start_run(lock_dir: str | os.PathLike | None = None) -> None:
    """The first step of a workflow, before anything is read or written.

    1. installs the one-line error hook (:func:`custom_components.errors.install`);
    2. refuses misspelt ``monai.bundle run`` options and reads ``--resume false`` as a boolean
       (:func:`check_cli_overrides`);
    3. takes the run lock of ``lock_dir`` (the folder this workflow writes: checkpoints for
       training, results for evaluation), so a second run on it stops at once naming the holder;
    4. removes temporaries that killed writes left in ``lock_dir`` (safe: the lock is ours).
    """
    errors.install()
    check_cli_overrides(parser=find_parser())
    if lock_dir is None or acquire_run_lock(lock_dir) is None:
        return
    for path in remove_stale_temporaries(lock_dir):
        logger.info("removed %s, left by an interrupted write", path)


def end_process_group() -> None:
    """Leave torch.distributed cleanly: wait for every rank, then destroy the process group.

    Without the barrier a rank that finishes first can tear down its gloo connections while another
    rank still uses them, and that rank aborts (SIGABRT) after a successful training.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish_run() -> None:
    """Release this process's run locks (the kernel releases them anyway when the process ends)."""
    release_run_lock()
