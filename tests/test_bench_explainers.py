"""scripts/bench_explainers.py: every row at a tiny size, ratios positive (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from bundle_utils import REPO


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_explainers", REPO / "scripts" / "bench_explainers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_explainers_tiny_rows():
    bench = _bench_module()
    table = bench.rows(size="tiny", batch=3, image_size=32, steps=1, warmup=0, lrp_loop_batch=2)
    labels = [label for label, _ in table]
    assert len(labels) == len(set(labels)) == len(bench.METHODS) + 3
    assert "forward+backward" in table[0][0] and re.fullmatch(r"[0-9.]+ ms per batch", table[0][1])
    for name in ("raw attention", "attention rollout", "GAE", "LRP transformer attribution", "Grad-CAM (",
                 "eigen_smooth", "aug_smooth", "EAFEM"):  # fmt: skip
        label, value = next(row for row in table if name in row[0] and "/ forward+backward" in row[0])
        ratio = float(re.fullmatch(r"\*\*([0-9.]+)x\*\* \(([0-9.]+) ms per batch\)", value).group(1))
        assert ratio > 0, label
    label, value = next(row for row in table if "per-image loop" in row[0])
    assert "2 of 3 images" in label  # the loop's subset is said in the label
    assert float(re.match(r"\*\*([0-9.]+)x faster\*\*", value).group(1)) > 0
    label, value = table[-1]
    assert "batched" in label and float(value) < 1e-4  # the batched maps equal the loop's


def test_bench_explainers_validates_arguments():
    bench = _bench_module()
    with pytest.raises(ValueError, match="size"):
        bench.rows(size="huge")
    with pytest.raises(ValueError, match="lrp_loop_batch"):
        bench.rows(size="tiny", batch=2, lrp_loop_batch=3)
