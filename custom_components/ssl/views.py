"""Two augmented views of an image with their geometry (spec §2.4, §3: VICRegL-style views).

:class:`TwoViews` is a MONAI dictionary transform: from ``item["image"]`` ((C, H, W) in [0, 1],
C = 1 or 3, any H, W) it makes ``view_s`` and ``view_t`` ((C, size, size)) and ``geom_s``,
``geom_t`` = (y0, x0, y1, x1, flip): the crop box in original-image coordinates normalised to
[0, 1] (pixel k of H spans [k/H, (k+1)/H]) and the horizontal flip (0./1.). Order of operations
per view: random resized crop -> resize to ``size`` (bilinear, antialiased, ``align_corners=False``)
-> horizontal flip -> colour jitter -> grayscale -> Gaussian blur -> solarisation.
:func:`cell_centres` maps the cells of a backbone feature map of such a view back to original-image
coordinates, which the local (location) matching term needs.

Defaults follow VICRegL's global crops (``facebookresearch/VICRegL``, ``main_vicregl.py``):
scale (0.4, 1), ratio (3/4, 4/3), flip 0.5, colour jitter p 0.8 (brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1), grayscale p 0.2, blur p 1.0 / 0.1 and solarisation p 0.0 / 0.2 for the
first / second view (a probability may be one float for both views or a pair).

Not from the paper: the blur sigma range (0.1, 2.0) px is for 224-px views and scales with
``size``/224; the hue jitter is a rotation of the chroma plane in YIQ space (a close, cheap stand-in
for an HSV hue shift); colour jitter's saturation/hue and grayscale do nothing to 1-channel images;
the random-resized-crop sampler is the usual one (10 tries of area scale × log-uniform ratio, then
a centre crop of the clamped ratio).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable, Transform

__all__ = ["TwoViews", "cell_centres", "sample_crop"]

_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)


def _pair(p: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(p, (int, float)):
        return float(p), float(p)
    a, b = p
    return float(a), float(b)


def sample_crop(rng: np.random.RandomState, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop (area fraction in ``scale``, aspect in ``ratio``)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.randint(0, h - ch + 1)), int(rng.randint(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def cell_centres(geom: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Centres of the R×S cells of a view's feature map in normalised original-image (y, x) coordinates.

    geom: (B, 5) = (y0, x0, y1, x1, flip) -> (B, R·S, 2), cells in row-major order (r·S + c). The
    feature map is assumed to tile the view evenly (cell (r, c) covers view rows [r/R, (r+1)/R]).
    """
    r, s = grid
    geom = geom.to(torch.float32) if not geom.is_floating_point() else geom
    v = (torch.arange(r, device=geom.device, dtype=geom.dtype) + 0.5) / r
    u = (torch.arange(s, device=geom.device, dtype=geom.dtype) + 0.5) / s
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    vv, uu = vv.reshape(1, -1), uu.reshape(1, -1)
    y0, x0, y1, x1, flip = (geom[:, k : k + 1] for k in range(5))
    uu = torch.where(flip > 0.5, 1.0 - uu, uu)
    return torch.stack((y0 + vv * (y1 - y0), x0 + uu * (x1 - x0)), dim=-1)


class TwoViews(Randomizable, Transform):
    """Dictionary transform: item with ``keys[0]`` = (C, H, W) image -> adds view_s, view_t, geom_s, geom_t.

    Other keys of the item are kept (the input dict is not modified). Honours ``set_random_state``.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.4, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float | Sequence[float] = 0.5,
        jitter_prob: float | Sequence[float] = 0.8,
        grayscale_prob: float | Sequence[float] = 0.2,
        blur_prob: float | Sequence[float] = (1.0, 0.1),
        solarize_prob: float | Sequence[float] = (0.0, 0.2),
        keys: Sequence[Hashable] = ("image",),
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_threshold: float = 0.5,
        view_keys: tuple[str, str] = ("view_s", "view_t"),
        geom_keys: tuple[str, str] = ("geom_s", "geom_t"),
    ):
        self.size = int(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip_prob, self.jitter_prob = _pair(flip_prob), _pair(jitter_prob)
        self.grayscale_prob, self.blur_prob, self.solarize_prob = _pair(grayscale_prob), _pair(blur_prob), _pair(solarize_prob)
        self.keys = tuple(keys)
        if len(self.keys) != 1:
            raise ValueError(f"TwoViews reads one image key, got keys={self.keys}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_sigma = tuple(blur_sigma)
        self.solarize_threshold = solarize_threshold
        self.view_keys, self.geom_keys = tuple(view_keys), tuple(geom_keys)

    def randomize(self, data: Any = None) -> None:  # parameters are drawn per view in _view
        pass

    def _jitter(self, img: torch.Tensor) -> torch.Tensor:
        ops = list(self.R.permutation(4))
        for op in ops:
            if op == 0 and self.brightness > 0:
                img = img * self.R.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
            elif op == 1 and self.contrast > 0:
                mean = _gray(img).mean()
                img = (img - mean) * self.R.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) + mean
            elif op == 2 and self.saturation > 0 and img.shape[0] == 3:
                gray = _gray(img)
                img = (img - gray) * self.R.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation) + gray
            elif op == 3 and self.hue > 0 and img.shape[0] == 3:
                theta = 2 * math.pi * self.R.uniform(-self.hue, self.hue)
                c, s = math.cos(theta), math.sin(theta)
                rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
                m = (_YIQ_INV @ rot @ _YIQ).to(img)  # RGB -> YIQ, rotate the chroma plane, back
                img = torch.einsum("ij,jhw->ihw", m, img)
            img = img.clamp(0.0, 1.0)
        return img

    def _blur(self, img: torch.Tensor) -> torch.Tensor:
        sigma = self.R.uniform(*self.blur_sigma) * self.size / 224.0
        radius = max(1, int(math.ceil(3 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = k / k.sum()
        c = img.shape[0]
        out = F.pad(img[None], (radius, radius, 0, 0), mode="replicate")
        out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        out = F.pad(out, (0, 0, radius, radius), mode="replicate")
        out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return out[0]

    def _view(self, img: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, h, w = img.shape
        top, left, ch, cw = sample_crop(self.R, h, w, self.scale, self.ratio)
        crop = img[None, :, top : top + ch, left : left + cw]
        view = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)[0]
        flip = self.R.uniform() < self.flip_prob[which]
        if flip:
            view = view.flip(-1)
        if self.R.uniform() < self.jitter_prob[which]:
            view = self._jitter(view)
        if self.R.uniform() < self.grayscale_prob[which] and view.shape[0] == 3:
            view = _gray(view).expand(3, -1, -1).clone()
        if self.R.uniform() < self.blur_prob[which]:
            view = self._blur(view)
        if self.R.uniform() < self.solarize_prob[which]:
            view = torch.where(view >= self.solarize_threshold, 1.0 - view, view)
        geom = torch.tensor([top / h, left / w, (top + ch) / h, (left + cw) / w, float(flip)], dtype=torch.float32)
        return view.clamp(0.0, 1.0).contiguous(), geom

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        img = torch.as_tensor(d[key]).as_subclass(torch.Tensor).to(torch.float32)
        if img.ndim != 3 or img.shape[0] not in (1, 3):
            raise ValueError(f"TwoViews expects a (C, H, W) image with C = 1 or 3 under {key!r}, got shape {tuple(img.shape)}")
        for which in (0, 1):
            d[self.view_keys[which]], d[self.geom_keys[which]] = self._view(img, which)
        return d


def _gray(img: torch.Tensor) -> torch.Tensor:
    if img.shape[0] == 1:
        return img
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
