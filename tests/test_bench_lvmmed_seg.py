"""scripts/bench_lvmmed_seg.py: the UNet it compares with is the closest in parameter count."""

from __future__ import annotations

import importlib.util

from bundle_utils import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_lvmmed_seg", REPO / "scripts" / "bench_lvmmed_seg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matched_unet_width_is_the_closest():
    bench = _bench()
    for target in (3_000_000, 11_552_746):
        w = bench.matched_unet_width(target)
        best = abs(bench.n_params(bench.monai_unet(w)) - target)
        assert all(best <= abs(bench.n_params(bench.monai_unet(v)) - target) for v in (w - 1, w + 1))
