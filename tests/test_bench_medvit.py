"""scripts/bench_medvit.py at tiny sizes: both ratio rows parse and are positive (timings are not asserted)."""

import re
import subprocess
import sys

import pytest

from bundle_utils import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_bench_medvit_tiny(tmp_path):
    # a subprocess with one intra-op thread (bundle_utils.subprocess_env): in-process threads spin on shared cores
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_medvit.py"), "--tiny", "--batch", "2", "--image_size", "32",
           "--volume_size", "16", "--steps", "1", "--warmup", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio_rows = [line for line in out.read_text().splitlines() if "x** (" in line]
    labels = ["MedViT (depths 1/1/5/1) / ResNet-18 training step", "MedViT-3D (depths 1/1/5/1) / ResNet-18 training step"]
    assert len(ratio_rows) == 2
    for label, row in zip(labels, ratio_rows):
        assert label in row
        m = re.search(r"\| \*\*([0-9.]+)x\*\* \(([0-9.]+) ms / ([0-9.]+) ms\) \|$", row)
        ratio, a, b = (float(v) for v in m.groups())
        assert ratio > 0 and a > 0 and b > 0
        assert ratio == pytest.approx(a / b, rel=0.05, abs=0.01)
