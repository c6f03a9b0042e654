"""Box prompts derived from ground-truth masks (LVM-Med / MedSAM protocol, spec section 4).

The prompt of an image is the tight box of its mask (at the mask's resolution, 256 x 256 in the
reference), each side pushed outwards by an independent random integer in ``[0, max_jitter)``
(20), clipped to the image, then scaled to the encoder's input frame (x 4 -> 1024). Boxes are
``(x0, y0, x1, y1)`` float pixel coordinates, the convention of SAM's prompt encoder.

The reference draws the jitter once per dataset item and caches it; here (spec section 6) training
re-draws it every time an item is loaded (``mode="random"``), and evaluation uses a fixed jitter
(``mode="fixed"``) drawn from a generator seeded by ``seed`` and the mask's content, so it is the
same in every run, for any item order and any number of workers.

An empty mask has no tight box: its prompt is the whole image (a project choice; the reference
fails on empty masks, which its prompt-based data lists do not contain).
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

__all__ = ["tight_box", "box_prompt_from_mask", "BoxPromptd"]


def tight_box(mask: Any) -> tuple[int, int, int, int] | None:
    """Inclusive pixel bounds (x0, y0, x1, y1) of the nonzero pixels of a 2-D mask (None when empty).

    A leading channel axis of size 1 is accepted.
    """
    arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {arr.shape}")
    rows = np.flatnonzero(arr.any(axis=1))
    cols = np.flatnonzero(arr.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def box_prompt_from_mask(
    mask: Any, max_jitter: int = 20, scale: float = 4.0, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """Jittered box prompt (4,) float32 of a 2-D mask, in the frame ``scale`` x the mask's size.

    Each side moves outwards by an independent integer in ``[0, max_jitter)`` drawn from ``rng``
    (no jitter when ``max_jitter <= 0``); the minima are clipped at 0 and the maxima at the mask's
    width / height (as in the reference). An empty mask gives the whole image.
    """
    arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    h, w = arr.shape[-2], arr.shape[-1]
    box = tight_box(arr)
    if box is None:
        return torch.tensor([0.0, 0.0, w * scale, h * scale], dtype=torch.float32)
    x0, y0, x1, y1 = box
    if max_jitter > 0:
        rng = rng if rng is not None else np.random.default_rng()
        d = rng.integers(0, max_jitter, size=4)
        x0, y0 = max(0, x0 - int(d[0])), max(0, y0 - int(d[1]))
        x1, y1 = min(w, x1 + int(d[2])), min(h, y1 + int(d[3]))
    return torch.tensor([x0, y0, x1, y1], dtype=torch.float32) * scale


class BoxPromptd(Randomizable, MapTransform):
    """Add ``box_key``: the box prompt of the mask under ``keys`` (one key), see :func:`box_prompt_from_mask`.

    Args:
        keys: the mask key (a (1, H, W) or (H, W) array / tensor; nonzero = foreground).
        box_key: where the (4,) float32 box goes.
        max_jitter: sides move outwards by an integer in [0, max_jitter) (20 in the reference).
        scale: factor from the mask's frame to the encoder's input frame (4: 256 -> 1024).
        mode: ``"random"`` (a new jitter at every call: training) or ``"fixed"`` (seeded by
            ``seed`` and the mask's content: evaluation, inference).
        seed: the seed of the fixed jitter.
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        box_key: str = "box",
        max_jitter: int = 20,
        scale: float = 4.0,
        mode: str = "random",
        seed: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("BoxPromptd takes one mask key")
        if mode not in ("random", "fixed"):
            raise ValueError(f"mode must be 'random' or 'fixed', got {mode!r}")
        self.box_key = box_key
        self.max_jitter = int(max_jitter)
        self.scale = float(scale)
        self.mode = mode
        self.seed = int(seed)

    def randomize(self, data: Any = None) -> None:  # the draw happens in __call__, per mask
        pass

    def _rng(self, mask: np.ndarray) -> np.random.Generator:
        if self.mode == "fixed":
            content = zlib.crc32(np.ascontiguousarray(mask != 0).tobytes())
            return np.random.default_rng([self.seed, content, mask.shape[-2], mask.shape[-1]])
        return np.random.default_rng(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            mask = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
            d[self.box_key] = box_prompt_from_mask(mask, self.max_jitter, self.scale, self._rng(mask))
        return d
