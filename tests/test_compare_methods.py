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
