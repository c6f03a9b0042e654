"""Checks shared by the MedViT bundle tests (2-D and 3-D): resume after a kill, pack -> download -> run,
one clear error line for broken MedMNIST files, and the robustness report."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from custom_components.data.medmnist import MEDMNIST_INFO

from bundle_utils import REPO, resumes_after_kill, run

CmdFn = Callable[..., list]

#: broken-file cases: name -> words the one error line must contain (besides "error:" and the file name)
BAD_INPUTS = {
    "missing": "file not found",
    "truncated": "cannot read as .npz",
    "labels_out_of_range": "out of range",
    "nan_images": "NaN",
    "wrong_shape": "got shape",
}


def killed_training_resumes(bundle: Path, cmd: CmdFn, root: Path, twin: Path, epochs: int = 4) -> None:
    """Kill a training as soon as models/last.pt exists; the rerun resumes there and ends with every epoch run once."""
    command = cmd("training", root, twin, args=["--num_epochs", str(epochs)])
    killed, final = resumes_after_kill(command, bundle, root / "models" / "last.pt", epochs)
    # the scheduler and the best-model record continued
    assert final["lr_scheduler"]["last_epoch"] == epochs
    assert final["best"]["best_epoch"] >= 1 and final["best"]["best_value"] is not None
    if killed["best"]["best_value"] is not None:
        assert final["best"]["best_value"] >= killed["best"]["best_value"]
    assert not list(root.rglob("*.tmp*")), "temporary files left behind"


def packed_bundle_downloads_and_runs(name: str, cmd: CmdFn, tmp_path: Path, twin: Path) -> Path:
    zip_path = tmp_path / f"{name}.zip"
    run([sys.executable, str(REPO / "scripts" / "pack_bundle.py"), name, "--out", str(zip_path)], cwd=REPO)
    run([sys.executable, "-m", "monai.bundle", "download", "--name", name, "--url", zip_path.as_uri(),
         "--bundle_dir", str(tmp_path / "installed")], cwd=tmp_path)  # fmt: skip
    installed = tmp_path / "installed" / name
    for rel in ("configs/train.json", "configs/metadata.json", "configs/evaluate_robustness.json", "docs/README.md", "LICENSE"):
        assert (installed / rel).is_file(), rel
    run(cmd("training", installed, twin, args=["--num_epochs", "1"]), cwd=installed)
    assert (installed / "models" / "model.pt").is_file()
    return installed


def write_bad_input(case: str, good_npz: Path, folder: Path) -> Path:
    """A dataset folder holding a broken copy of ``good_npz`` (same file name) for ``case`` of :data:`BAD_INPUTS`."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / good_npz.name
    if case == "missing":
        return folder
    if case == "truncated":
        data = good_npz.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        return folder
    with np.load(good_npz) as npz:
        arrays = {k: npz[k] for k in npz.files}
    info = MEDMNIST_INFO[good_npz.stem.split("_")[0].lower()]
    if case == "labels_out_of_range":
        arrays["train_labels"] = arrays["train_labels"].copy()
        arrays["train_labels"][0, 0] = info["n_classes"]
    elif case == "nan_images":
        images = arrays["train_images"].astype(np.float32) / 255.0
        images[0].flat[0] = np.nan
        arrays["train_images"] = images
    elif case == "wrong_shape":
        arrays["train_images"] = np.repeat(arrays["train_images"][..., None], 2, axis=-1)
    else:
        raise ValueError(case)
    np.savez(target, **arrays)
    return folder


def bad_input_gives_one_clear_error(bundle: Path, cmd: CmdFn, case: str, good_npz: Path, tmp_path: Path) -> None:
    folder = write_bad_input(case, good_npz, tmp_path / "data")
    proc = run(cmd("training", tmp_path / "root", folder), cwd=bundle, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert good_npz.name in lines[0] and BAD_INPUTS[case] in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    # nothing written but the run lock (taken before the data is read)
    models = tmp_path / "root" / "models"
    assert not models.exists() or [p.name for p in models.iterdir()] == [".run.lock"]


def robustness_report(bundle: Path, cmd: CmdFn, trained: Path, twin: Path, n_test: int) -> dict:
    """Run configs/evaluate_robustness.json with a 2-step PGD and check the report."""
    run(cmd("evaluating_robustness", trained, twin, "configs/evaluate_robustness.json",
            args=["--pgd_steps", "2", "--epsilons", "[0.0, 0.0313725]"]), cwd=bundle)  # fmt: skip
    report = json.loads((trained / "eval" / "robustness_test.json").read_text())
    assert report["n_samples"] == n_test and report["epsilons"] == [0.0, 0.0313725]
    assert set(report["attacks"]) == {"fgsm", "pgd"}
    for rows in report["attacks"].values():
        assert rows[0]["ACC"] == report["clean"]["ACC"]  # eps 0 = the clean images
        assert 0.0 <= rows[1]["ACC"] <= 1.0
    md = (trained / "eval" / "robustness_test.md").read_text()
    assert "| eps | eps x 255 | FGSM ACC | PGD ACC |" in md
    assert not list((trained / "eval").glob("*.tmp*"))
    return report
