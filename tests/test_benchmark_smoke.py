"""scripts/benchmark.py runs end to end at a tiny size, every section, and reports every ratio (timings are not asserted)."""

import re
import subprocess
import sys

import pytest

from bundle_utils import REPO, subprocess_env

pytestmark = pytest.mark.slow


def _ratio(table: str, label: str) -> float:
    row = next(line for line in table.splitlines() if label in line)
    return float(re.search(r"\*\*([0-9.]+)x", row).group(1))


def test_benchmark_tiny_all_sections(tmp_path):
    # a subprocess with one intra-op thread (bundle_utils.subprocess_env): in-process threads spin on shared cores
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--size", "tiny", "--steps", "1", "--warmup", "1",
           "--data_cases", "2", "--data_shape", "48,48,12", "--image_size", "32", "--batch", "4",
           "--explain_batch", "3", "--explain_image_size", "32", "--explain_lrp_loop_batch", "2",
           "--medvit_batch", "2", "--medvit_image_size", "32", "--medvit_volume_size", "16", "--medvit_batch3d", "2",
           "--ham_batch", "2", "--ham_image_size", "32", "--lvmmed_batch", "8", "--lvmmed_image_size", "32",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for label in ("guided / plain step", "gradmask / baseline step", "robustvit / baseline step",
                  "res_g / baseline step", "res_l / baseline step", "store / NIfTI data throughput"):  # fmt: skip
        assert _ratio(table, label) > 0
    # the MedViT section: both ratios and their step times agree
    medvit = [line for line in table.splitlines() if "ResNet-18 training step" in line]
    assert len(medvit) == 2 and "MedViT-3D" in medvit[1]
    for row in medvit:
        ratio, a, b = (float(v) for v in re.search(r"\*\*([0-9.]+)x\*\* \(([0-9.]+) ms / ([0-9.]+) ms\)", row).groups())
        assert ratio > 0 and ratio == pytest.approx(a / b, rel=0.05, abs=0.01)
    # the explainer section: one ratio per method and the LRP loop comparison
    # the LVM-Med section: graph matching over the backbone's forward + backward
    assert _ratio(table, "LVM-Med graph matching / backbone fwd+bwd") > 0
    for label in ("GAE", "LRP", "Grad-CAM", "rollout"):
        assert any(label in line and "x**" in line for line in table.splitlines()), label
    # the HAM section: the step ratio against the plain ResNet agrees with its two step times, and map times
    ham = next(line for line in table.splitlines() if "HAM / plain ResNet multi-label training step" in line)
    ratio, a, b = (float(v) for v in re.search(r"\*\*([0-9.]+)x\*\* \(([0-9.]+) ms / ([0-9.]+) ms\)", ham).groups())
    assert "target ≤ 1.3x" in ham and ratio == pytest.approx(a / b, rel=0.05, abs=0.01)
    assert sum("map extraction per image" in line for line in table.splitlines()) == 2
