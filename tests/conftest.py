"""Shared tiny networks for the unit tests.

Plain factories (``from conftest import tiny_vit``: pytest puts ``tests/`` on ``sys.path``, as for
``bundle_utils``) and one fixture. Each factory takes the sizes a test needs as arguments; ``seed``
reseeds torch's global generator just before the module is built (``None`` leaves it alone), so a
test that used ``torch.manual_seed(s)`` followed by the constructor gets the same weights.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from custom_components.networks.medvit import MedViT
from custom_components.networks.vit import AttributionViT, attribution_vit

#: 32x32 inputs, 8x8 patches (a 4x4 grid), 2 blocks of width 32 with 4 heads
TINY_VIT = dict(img_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)

#: MedViT with every block kind (depths[2] must be a multiple of 5), one grey channel, no drop path
TINY_MEDVIT = dict(depths=(1, 1, 5, 1), num_classes=3, in_channels=1, stem_stride=1, path_dropout=0.0)


def tiny_vit(seed: int | None = 0, **overrides: Any) -> AttributionViT:
    """:data:`TINY_VIT` with ``overrides`` (any :func:`attribution_vit` argument, ``pretrained_path`` included)."""
    if seed is not None:
        torch.manual_seed(seed)
    return attribution_vit(**{**TINY_VIT, **overrides})


def scrambled_vit(
    layers: int = 1, classes: int = 1, seed: int = 0, dtype: torch.dtype = torch.float64, hidden: int = 8, **kw: Any
) -> AttributionViT:
    """8x8 two-channel ViT (4x4 patches, 2 heads) in eval mode whose weights are all N(0, 0.5^2).

    Larger weights than the 0.02 init give non-trivial attention, so map comparisons mean something;
    float64 by default for exact comparisons.
    """
    torch.manual_seed(seed)
    m = AttributionViT(
        in_channels=2, img_size=8, patch_size=4, hidden_size=hidden, num_layers=layers, num_heads=2,
        mlp_dim=2 * hidden, num_classes=classes, **kw,
    )  # fmt: skip
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m.eval().to(dtype)


def tiny_medvit(seed: int | None = 0, **overrides: Any) -> MedViT:
    """:data:`TINY_MEDVIT` with ``overrides``."""
    if seed is not None:
        torch.manual_seed(seed)
    return MedViT(**{**TINY_MEDVIT, **overrides})


@pytest.fixture(scope="module")
def tiny_medvit_model() -> MedViT:
    """One :func:`tiny_medvit` per test module (its tests share it and set the mode they need)."""
    return tiny_medvit()
