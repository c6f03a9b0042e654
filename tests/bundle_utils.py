"""Helpers to run bundles in subprocesses from the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "data" / "schemas" / "meta_schema_20240725.json"
# A tiny network and images so that each run takes seconds on 2 CPU cores.
TINY = ["--image_size", "32", "--network_def#patch_size", "8", "--blur_kernel_size", "7", "--batch_size", "16"]


def config_arg(*configs: str) -> str:
    return "[" + ",".join(f"'{c}'" for c in configs) + "]"


def bundle_cmd(run_id: str, bundle_root: Path, dataset_dir: Path, *extra_configs: str, args=()) -> list[str]:
    """``python -m monai.bundle run <run_id>`` with train.json + demo.json + ``extra_configs``, tiny settings."""
    return [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra_configs),
        "--bundle_root", str(bundle_root),
        "--dataset_dir", str(dataset_dir),
        *TINY, *args,
    ]  # fmt: skip


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run(cmd: list[str], cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def kill_once_checkpointed(cmd: list[str], cwd: Path, last: Path, epochs: int, timeout: float = 240) -> dict:
    """Start a training, SIGKILL it as soon as its resumable checkpoint ``last`` exists; return that checkpoint.

    Asserts that the checkpoint survived the kill intact (it loads) and that the run was stopped before
    its last epoch, so that a rerun of ``cmd`` has something to resume.
    """
    from custom_components.io import load_checkpoint

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.time() + timeout
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = load_checkpoint(last)
    assert 1 <= killed["trainer"]["epoch"] < epochs, "the run finished before it could be interrupted"
    return killed


def verify_bundle(bundle: Path, monkeypatch, config_file: str = "configs/train.json") -> None:
    """``monai.bundle verify_metadata`` (when the shared schema is present) and ``verify_net_in_out network_def``.

    The same functions ``python -m monai.bundle verify_*`` runs, called in this process from the
    bundle folder: a subprocess per call spends ~9 s importing MONAI; the CLI path itself is covered
    by every bundle's run/pack tests.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    monkeypatch.chdir(bundle)
    if SCHEMA.is_file():
        verify_metadata(meta_file="configs/metadata.json", filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file="configs/metadata.json", config_file=config_file, device="cpu")
