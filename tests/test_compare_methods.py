"""scripts/compare_methods.py on a tiny BraTS twin: every method, 2 seeds, finite numbers in the table."""

import csv
import math
import subprocess
import sys

import pytest

from bundle_utils import REPO, TINY, subprocess_env
from custom_components.data.synthetic import write_brats20_twin

pytestmark = pytest.mark.slow

METHODS = ["baseline", "gradmask", "robustvit", "res_g", "res_l", "lgmvit"]


def test_compare_methods_table(tmp_path):
    twin = write_brats20_twin(tmp_path / "raw", n_per_split=(3, 2, 2), shape=(40, 40, 16), seed=3)
    out = tmp_path / "compare"
    cmd = [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "lgmvit_brats20", "--dataset_dir", str(twin),
           "--seeds", "2", "--demo", "--output_dir", str(out), "--num_epochs", "1", *TINY]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert row["seeds"] == "2"
        for key in ("f1", "accuracy", "auroc", "ap", "kappa", "pointing_game", "iou_top10"):
            assert math.isfinite(float(row[f"{key}_mean"])) and math.isfinite(float(row[f"{key}_std"])), (row["method"], key)
    table = (out / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    # every run shared one prepared store
    assert len(list((out / "prepared").glob("*/meta.json"))) == 7
