"""Two views with geometry for the LVM-Med objective: shapes, reproducibility, and the mapping of
feature-map cells back to original-image coordinates after crop and flip (spec §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from custom_components.ssl.views import TwoViews, cell_centres, sample_crop

NO_COLOUR = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


@pytest.mark.parametrize("shape", [(1, 40, 56), (3, 33, 21), (3, 64, 64)])
def test_views_shapes_ranges_and_kept_keys(shape):
    tv = TwoViews(24)
    tv.set_random_state(0)
    image = torch.rand(shape)
    for _ in range(10):
        out = tv({"image": image, "label": 3, "path": "a.png"})
        assert out["label"] == 3 and out["path"] == "a.png" and out["image"] is image
        for which in ("s", "t"):
            view, geom = out[f"view_{which}"], out[f"geom_{which}"]
            assert view.shape == (shape[0], 24, 24) and view.dtype == torch.float32
            assert view.min() >= 0 and view.max() <= 1
            assert geom.shape == (5,) and geom.dtype == torch.float32
            y0, x0, y1, x1, flip = geom.tolist()
            assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 and flip in (0.0, 1.0)
            area = (y1 - y0) * (x1 - x0)
            assert 0.4 - 0.1 <= area <= 1.0  # scale (0.4, 1), up to rounding to whole pixels / the fallback


def test_views_reproducible_with_set_random_state_and_in_compose():
    image = torch.rand(3, 32, 32)

    def run(seed):
        tv = TwoViews(16)
        tv.set_random_state(seed)
        return [tv({"image": image}) for _ in range(4)]

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b, strict=True):
        for k in ("view_s", "view_t", "geom_s", "geom_t"):
            assert torch.equal(x[k], y[k])
    assert any(not torch.equal(x["view_s"], z["view_s"]) for x, z in zip(a, c, strict=True))
    chain = Compose([TwoViews(16)]).set_random_state(seed=7)
    chain2 = Compose([TwoViews(16)]).set_random_state(seed=7)
    assert torch.equal(chain({"image": image})["view_t"], chain2({"image": image})["view_t"])


def test_full_crop_without_augmentation_keeps_the_image():
    tv = TwoViews(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=(0.0, 1.0), **NO_COLOUR)
    tv.set_random_state(0)
    image = torch.rand(1, 16, 16)
    out = tv({"image": image})
    assert out["geom_s"].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert out["geom_t"].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert torch.allclose(out["view_s"], image, atol=1e-6)  # same size: the resize is the identity
    assert torch.allclose(out["view_t"], image.flip(-1), atol=1e-6)


def test_cell_centres_closed_form():
    geom = torch.tensor([[0.2, 0.1, 0.6, 0.5, 0.0], [0.2, 0.1, 0.6, 0.5, 1.0]])
    c = cell_centres(geom, (2, 2))
    expected = torch.tensor([[0.3, 0.2], [0.3, 0.4], [0.5, 0.2], [0.5, 0.4]])
    assert torch.allclose(c[0], expected)
    assert torch.allclose(c[1], expected[[1, 0, 3, 2]])  # flipped: columns swap


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_known_pixel_lands_in_the_cell_whose_centre_maps_back_to_it(flip):
    h, w, size, grid = 40, 56, 32, (4, 4)
    rng = np.random.RandomState(0)
    checked = 0
    for seed in range(60):
        py, px = int(rng.randint(h)), int(rng.randint(w))
        image = torch.zeros(1, h, w)
        image[0, py, px] = 1.0
        tv = TwoViews(size, scale=(0.2, 0.6), flip_prob=flip, **NO_COLOUR)
        tv.set_random_state(seed)
        out = tv({"image": image})
        for which in ("s", "t"):
            view, geom = out[f"view_{which}"][0], out[f"geom_{which}"]
            y0, x0, y1, x1, f = geom.tolist()
            if not (y0 <= (py + 0.5) / h <= y1 and x0 <= (px + 0.5) / w <= x1) or view.max() <= 0:
                continue
            assert f == flip
            vy, vx = divmod(int(view.argmax()), size)
            cell = (vy * grid[0] // size) * grid[1] + vx * grid[1] // size
            cy, cx = cell_centres(geom[None], grid)[0, cell].tolist()
            # the cell's centre is within half a cell (+ one view pixel of resampling) of the pixel
            half_y, half_x = (y1 - y0) / grid[0] / 2, (x1 - x0) / grid[1] / 2
            assert abs(cy - (py + 0.5) / h) <= half_y + (y1 - y0) / size + 0.5 / h
            assert abs(cx - (px + 0.5) / w) <= half_x + (x1 - x0) / size + 0.5 / w
            # and it is the nearest cell centre in units of cells
            centres = cell_centres(geom[None], grid)[0]
            scaled = (centres - torch.tensor([(py + 0.5) / h, (px + 0.5) / w])) / torch.tensor([2 * half_y, 2 * half_x])
            assert scaled.norm(dim=1).min() >= scaled[cell].norm() - 0.5 * size**-1 * grid[0] - 1e-6
            checked += 1
    assert checked >= 20


def test_sample_crop_stays_inside_and_respects_ratio():
    rng = np.random.RandomState(0)
    for h, w in [(10, 100), (100, 10), (37, 53)]:
        for _ in range(50):
            top, left, ch, cw = sample_crop(rng, h, w, (0.4, 1.0), (3 / 4, 4 / 3))
            assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w and ch >= 1 and cw >= 1


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        TwoViews(8)({"image": torch.rand(2, 8, 8)})
    with pytest.raises(ValueError, match="one image key"):
        TwoViews(8, keys=("a", "b"))
