"""scripts/benchmark.py runs end to end at a tiny size and reports every ratio (timings are not asserted)."""

import re
import subprocess
import sys

import pytest

from bundle_utils import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_benchmark_tiny(tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--size", "tiny", "--steps", "1", "--warmup", "1",
           "--data_cases", "2", "--data_shape", "48,48,12", "--image_size", "32", "--batch", "4", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for label in ("guided / plain step", "gradmask / baseline step", "robustvit / baseline step",
                  "res_g / baseline step", "res_l / baseline step", "store / NIfTI data throughput"):  # fmt: skip
        row = next(line for line in table.splitlines() if label in line)
        ratio = float(re.search(r"\*\*([0-9.]+)x\*\*", row).group(1))
        assert ratio > 0
