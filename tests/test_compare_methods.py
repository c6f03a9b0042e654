"""scripts/compare_methods.py on a tiny BraTS twin: every method once, then a second seed for two methods.

The second call must reuse the finished seed-42 runs (only the new seed trains) and report mean ± std
over both seeds; the first covers every method config end to end.
"""

import csv
import math
import subprocess
import sys

import pytest

from custom_components.data.synthetic import write_brats20_twin

from bundle_utils import REPO, TINY, subprocess_env

pytestmark = pytest.mark.slow

METHODS = ["baseline", "gradmask", "robustvit", "res_g", "res_l", "lgmvit"]


def _compare(twin, out, *args):
    cmd = [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "lgmvit_brats20", "--dataset_dir", str(twin),
           "--demo", "--output_dir", str(out), "--num_epochs", "1", *args, *TINY]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, list(csv.DictReader((out / "comparison.csv").open()))


def _assert_finite(rows, keys=("f1", "accuracy", "auroc", "ap", "kappa", "pointing_game", "iou_top10")):
    for row in rows:
        for key in keys:
            assert math.isfinite(float(row[f"{key}_mean"])) and math.isfinite(float(row[f"{key}_std"])), (row["method"], key)


def test_compare_methods_table(tmp_path):
    twin = write_brats20_twin(tmp_path / "raw", n_per_split=(3, 2, 2), shape=(40, 40, 16), seed=3)
    out = tmp_path / "compare"
    _, rows = _compare(twin, out, "--seeds", "1")
    assert [r["method"] for r in rows] == METHODS
    assert all(r["seeds"] == "1" and float(r["f1_std"]) == 0.0 for r in rows)
    _assert_finite(rows)
    table = (out / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    # every run shared one prepared store
    assert len(list((out / "prepared").glob("*/meta.json"))) == 7
    first_run = (out / "baseline_seed42" / "eval" / "metrics_test.json").stat().st_mtime_ns

    stdout, rows = _compare(twin, out, "--seeds", "2", "--methods", "baseline,lgmvit")
    assert [r["method"] for r in rows] == ["baseline", "lgmvit"]
    assert all(r["seeds"] == "2" for r in rows)
    _assert_finite(rows)
    # only the new seed trained; the finished seed-42 runs were read back, not rerun
    assert "seed 42 ..." not in stdout and stdout.count("seed 43 ...") == 2, stdout[-2000:]
    assert (out / "baseline_seed42" / "eval" / "metrics_test.json").stat().st_mtime_ns == first_run
    assert "2 seeds: 42, 43" in (out / "comparison.md").read_text()


def test_misspelt_option_stops_the_comparison_before_any_run(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "lgmvit_brats20", "--dataset_dir", str(tmp_path),
           "--demo", "--output_dir", str(tmp_path / "compare"), "--num_epoch", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --num_epoch: unknown option (not a key of train.json, demo.json, evaluate.json, inference.json); "
        "did you mean --num_epochs?"
    )
    assert not (tmp_path / "compare").exists()


def test_compare_ham_with_the_cam_baseline(tmp_path):
    from custom_components.data.synthetic import write_nihcxr14_twin

    twin = write_nihcxr14_twin(tmp_path / "nih", n_images=32, size=48, seed=1)
    out = tmp_path / "compare_ham"
    cmd = [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "ham_nihcxr14", "--dataset_dir", str(twin),
           "--demo", "--output_dir", str(out), "--seeds", "1", "--methods", "ham,baseline", "--num_epochs", "1",
           "--image_size", "32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["method"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    # HAM's own maps and the two Grad-CAMs for HAM; the Grad-CAMs for the CAM baseline
    assert list(rows) == ["ham + ham", "ham + gradcam", "ham + gradcampp", "baseline + gradcam", "baseline + gradcampp"]
    tiou = [f"tiou_{t}" for t in ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7")]
    for row in rows.values():
        values = [float(row[f"{k}_mean"]) for k in tiou]
        assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values, reverse=True), row
        assert 0.0 <= float(row["pointing_game_mean"]) <= 1.0
    # one training per method: the AUROC of a training is the same on each of its map rows
    assert rows["ham + ham"]["auroc_mean"] == rows["ham + gradcam"]["auroc_mean"]
    assert "| baseline + gradcam |" in (out / "comparison.md").read_text()
    # a second call reads the finished runs back instead of training again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert again.returncode == 0 and " ..." not in again.stdout, again.stdout[-2000:]
    assert [r["method"] for r in csv.DictReader((out / "comparison.csv").open())] == list(rows)
