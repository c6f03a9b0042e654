"""Box prompts from masks: closed forms (tight box, scaling, clipping), jitter range, fixed vs random mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_components.data.box_prompts import BoxPromptd, box_prompt_from_mask, tight_box


def _rect(h=64, w=48, x0=10, y0=5, x1=30, y1=40):
    m = np.zeros((1, h, w), dtype=np.uint8)
    m[0, y0 : y1 + 1, x0 : x1 + 1] = 1
    return m


def test_tight_box_and_unjittered_prompt():
    m = _rect()
    m[0, 50, 2] = 1  # an isolated pixel widens the box
    assert tight_box(m) == (2, 5, 30, 50)
    assert tight_box(torch.from_numpy(m[0])) == (2, 5, 30, 50)
    assert tight_box(np.zeros((8, 8))) is None
    box = box_prompt_from_mask(m, max_jitter=0, scale=4.0)
    assert box.dtype == torch.float32
    assert box.tolist() == [8.0, 20.0, 120.0, 200.0]


def test_empty_mask_gives_whole_image():
    assert box_prompt_from_mask(np.zeros((1, 64, 48)), scale=4.0).tolist() == [0.0, 0.0, 192.0, 256.0]


def test_jitter_range_and_clipping():
    m = _rect()
    lo = np.full(4, np.inf)
    hi = np.full(4, -np.inf)
    rng = np.random.default_rng(0)
    for _ in range(400):
        b = box_prompt_from_mask(m, max_jitter=20, scale=1.0, rng=rng).numpy()
        lo, hi = np.minimum(lo, b), np.maximum(hi, b)
    # x0 = 10 - [0, 20) clipped at 0; y0 = 5 - [0, 20) clipped at 0; x1 = 30 + [0, 20) clipped at w = 48;
    # y1 = 40 + [0, 20) (max 59 < 64)
    np.testing.assert_array_equal(lo, [0, 0, 30, 40])
    np.testing.assert_array_equal(hi, [10, 5, 48, 59])


def test_fixed_mode_is_reproducible_and_random_mode_varies():
    data = {"label": torch.from_numpy(_rect())}
    fixed = BoxPromptd("label", mode="fixed", seed=3)
    a = fixed(data)["box"]
    fresh = BoxPromptd("label", mode="fixed", seed=3)
    assert torch.equal(a, fresh(data)["box"]) and torch.equal(a, fixed(data)["box"])
    tight = torch.tensor([10.0, 5.0, 30.0, 40.0]) * 4
    assert (a[:2] <= tight[:2]).all() and (a[2:] >= tight[2:]).all()
    rnd = BoxPromptd("label", mode="random")
    rnd.set_random_state(0)
    draws = {tuple(rnd(data)["box"].tolist()) for _ in range(20)}
    assert len(draws) > 1
    rnd.set_random_state(0)
    assert tuple(rnd(data)["box"].tolist()) in draws
    with pytest.raises(ValueError, match="mode"):
        BoxPromptd("label", mode="cached")
