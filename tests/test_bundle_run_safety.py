"""Run safety through ``python -m monai.bundle run`` on the LGM-ViT BraTS bundle (tiny twin).

Each finding of issue #10 repeated as a user would: two trainings on one root, a rerun with other
settings, a misspelt option, missing and truncated checkpoints at every load site, orphaned
temporaries of a killed save, and TensorBoard after a resume. Errors must be one ``error:`` line
with exit status 2 and no traceback, on stdout (the log) or stderr.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from custom_components.data.synthetic import write_brats20_twin
from custom_components.io import load_checkpoint

from bundle_utils import REPO, bundle_cmd, kill_once_checkpointed, subprocess_env
from bundle_utils import run as _run

BUNDLE = REPO / "bundles" / "lgmvit_brats20"

pytestmark = pytest.mark.slow


def run(cmd, **kwargs):
    return _run(cmd, cwd=BUNDLE, **kwargs)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused run (exit 2, no traceback anywhere)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return write_brats20_twin(tmp_path_factory.mktemp("brats_twin"), n_per_split=(3, 2, 2), shape=(40, 40, 16), seed=1)


def test_misspelt_option_is_refused_before_anything_is_written(tmp_path, twin):
    error = one_error_line(run(bundle_cmd("training", tmp_path, twin, args=["--num_epoch", "2"]), check=False))
    assert error == "error: --num_epoch: unknown option (not a key of train.json, demo.json); did you mean --num_epochs?"
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


def test_second_training_on_one_root_is_refused_then_resumes_cleanly(tmp_path, twin):
    """Two trainings at once, a kill during the first, orphans, resume, TensorBoard steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    busy = bundle_cmd("training", tmp_path / "busy", twin, args=["--num_epochs", "100000"])  # killed below
    first = subprocess.Popen(busy, cwd=BUNDLE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        lock = tmp_path / "busy" / "models" / ".run.lock"
        deadline = time.time() + 120
        while (not lock.is_file() or str(first.pid) not in lock.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        second = run(busy, check=False)
        assert first.poll() is None, "the first training ended before the second started"
    finally:
        first.kill()
        first.wait()
    error = one_error_line(second)
    assert f"{lock}: another run is using this folder (PID {first.pid} on host" in error
    assert "python -m monai.bundle run training" in error

    # a killed run leaves its lock (released by the kernel) and, here, a temporary of a save
    epochs = 40
    cmd = bundle_cmd("training", tmp_path, twin, args=["--num_epochs", str(epochs)])
    last = tmp_path / "models" / "last.pt"
    killed = kill_once_checkpointed(cmd, BUNDLE, last, epochs)["trainer"]
    orphan = tmp_path / "models" / ".last.pt.q1w2e3r4.tmp"
    orphan.write_bytes(b"half a checkpoint")
    resumed = run(cmd)
    log = resumed.stdout + resumed.stderr
    assert "taking over the run lock" in log and f"at epoch {killed['epoch']}" in log
    assert not orphan.exists()
    # no per-iteration log lines by default: the progress bar shows the iteration
    assert "Iter:" not in resumed.stdout

    acc = EventAccumulator(str(tmp_path / "eval" / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train_loss")]
    assert steps == list(range(1, epochs * killed["epoch_length"] + 1))


def test_rerun_with_other_settings_is_refused_unless_forced(tmp_path, twin):
    run(bundle_cmd("training", tmp_path, twin, args=["--num_epochs", "1"]))
    other = bundle_cmd(
        "training", tmp_path, twin, "configs/methods/baseline.json", args=["--num_epochs", "2", "--learning_rate", "0.5"]
    )
    error = one_error_line(run(other, check=False))
    assert f"error: {tmp_path / 'models' / 'last.pt'}: was trained with other settings (" in error
    assert "learning_rate: 0.001 -> 0.5" in error and "num_epochs: 1 -> 2" in error
    assert "--resume false" in error and "--force_resume true" in error
    forced = run([*other, "--force_resume", "true"])
    assert "resuming with other settings (--force_resume)" in forced.stdout + forced.stderr
    # "--resume false" as typed (fire passes the string 'false'): starts over, no resume
    fresh = run(bundle_cmd("training", tmp_path, twin, args=["--num_epochs", "1", "--resume", "false"]))
    assert "resumed from" not in fresh.stdout + fresh.stderr
    assert load_checkpoint(tmp_path / "models" / "last.pt")["trainer"]["epoch"] == 1


def test_bad_checkpoints_give_one_line_at_every_load_site(tmp_path, twin):
    root = tmp_path / "root"
    evaluate = bundle_cmd("evaluating", root, twin, "configs/evaluate.json")
    infer = bundle_cmd("inferring", root, twin, "configs/inference.json")
    model = root / "models" / "model.pt"
    error = one_error_line(run(evaluate, check=False))
    assert error.startswith(f"error: {model}: trained weights not found: run the training workflow first")

    run(bundle_cmd("training", root, twin, args=["--num_epochs", "1"]))
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 3])
    for cmd in (evaluate, infer):
        assert one_error_line(run(cmd, check=False)).startswith(f"error: {model}: cannot load checkpoint")
    model.write_bytes(good)
    # weights of another configuration (the override files of training not given)
    wider = one_error_line(run([*evaluate, "--network_def#hidden_size", "32"], check=False))
    assert f"{model}: weights do not fit the configured network:" in wider and "differ in shape" in wider

    last = root / "models" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    resume = one_error_line(run(bundle_cmd("training", root, twin, args=["--num_epochs", "1"]), check=False))
    assert resume.startswith(f"error: {last}: cannot load checkpoint")
