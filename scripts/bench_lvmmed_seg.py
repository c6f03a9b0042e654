#!/usr/bin/env python
"""Training-step cost of the LVM-Med segmentation network against a MONAI UNet of similar size (one run, ratio).

The bundle ``lvmmed_seg2d_kvasir`` trains MONAI's ``FlexibleUNet`` with a ResNet-50 encoder
(:func:`custom_components.networks.encoder_init.lvmmed_unet`, decoder 256/128/64/32/16). It is
compared with ``monai.networks.nets.UNet`` (2-D, 5 levels, strides 2, 2 residual units per level)
whose base width is chosen so that its parameter count is the closest to the FlexibleUNet's. Both
get the same random batch (``batch`` x 3 x ``image_size``², 2 classes), the bundle's loss
(``DiceCELoss(to_onehot_y=True, softmax=True)``), Adam and gradient-norm clipping at 1.0: one
training step = zero_grad + forward + loss + backward + clip + optimizer step. The two models run
interleaved (A B A B ..., the starting model alternating) after ``warmup`` rounds; the median of
``steps`` timed steps per model is reported.

``tiny`` (a stand-in size for CI) swaps the ResNet-50 encoder for the demo's ResNet-18 with the
narrow decoder 64/32/16/16/8 (and the UNet is matched to that size).

Usage::

    python scripts/bench_lvmmed_seg.py [--batch 64] [--image_size 224] [--steps 5] [--warmup 2]
        [--device cpu] [--seed 0] [--tiny False] [--out FILE.md]

:func:`rows` returns the Markdown table rows ``(measurement, value)``; ratio cells read ``**1.23x**``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fire
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

for _path in (REPO / "scripts",):  # the sibling bench_timing
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_timing import interleaved, ms, report, spread, sync  # noqa: E402

from custom_components.networks.encoder_init import lvmmed_unet  # noqa: E402

CLASSES = 2
TINY_DECODER = (64, 32, 16, 16, 8)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def monai_unet(width: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=CLASSES, channels=tuple(width * 2**i for i in range(5)),
                strides=(2, 2, 2, 2), num_res_units=2)  # fmt: skip


def matched_unet_width(target: int, lo: int = 8, hi: int = 128) -> int:
    """The base width of :func:`monai_unet` whose parameter count is the closest to ``target`` (count ~ width²)."""
    # parameters are a quadratic in the width: fit it on three widths, then check the neighbours
    ws = (16, 32, 64)
    a = torch.tensor([[w * w, w, 1.0] for w in ws], dtype=torch.float64)
    b = torch.tensor([float(n_params(monai_unet(w))) for w in ws], dtype=torch.float64)
    c2, c1, c0 = torch.linalg.solve(a, b).tolist()
    guess = (-c1 + (c1 * c1 - 4 * c2 * (c0 - target)) ** 0.5) / (2 * c2)
    candidates = {max(lo, min(hi, int(guess) + d)) for d in (-1, 0, 1, 2)}
    return min(candidates, key=lambda w: abs(n_params(monai_unet(w)) - target))


def _step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Callable[[], float]:
    from monai.losses import DiceCELoss

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync(device)
        return time.perf_counter() - t

    return step


def rows(batch: int = 64, image_size: int = 224, steps: int = 5, warmup: int = 2, device: str = "cpu", seed: int = 0,
         tiny: bool = False) -> list[tuple[str, str]]:  # fmt: skip
    """Markdown rows ``(measurement, value)``: FlexibleUNet-ResNet / matched MONAI UNet step times."""
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError("need steps >= 1, warmup >= 0, batch >= 1")
    dev = torch.device(device)
    torch.manual_seed(seed)
    if tiny:
        flex, name = lvmmed_unet(backbone="resnet18", decoder_channels=TINY_DECODER), "FlexibleUNet-ResNet-18 (demo decoder)"
    else:
        flex, name = lvmmed_unet(backbone="resnet50"), "FlexibleUNet-ResNet-50"
    width = matched_unet_width(n_params(flex))
    unet = monai_unet(width)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, image_size, image_size, generator=g).to(dev)
    y = (torch.rand(batch, 1, image_size, image_size, generator=g) > 0.7).float().to(dev)
    t = interleaved({"f": _step_fn(flex.to(dev), x, y, dev), "u": _step_fn(unet.to(dev), x, y, dev)}, steps, warmup)
    t_f, t_u = t["f"], t["u"]
    f, u = statistics.median(t_f), statistics.median(t_u)
    return [
        (f"**{name} / MONAI UNet training step** (batch {batch}, 3×{image_size}², {CLASSES} classes, DiceCE, Adam, clip 1)",
         f"**{f / u:.2f}x** ({ms(f)} / {ms(u)})"),
        (f"  {name} step ({n_params(flex) / 1e6:.2f} M parameters), median (min–max)", spread(t_f)),
        (f"  MONAI UNet step (widths {width}…{16 * width}, 2 residual units; {n_params(unet) / 1e6:.2f} M parameters), "
         "median (min–max)", spread(t_u)),
    ]  # fmt: skip


def main(batch: int = 64, image_size: int = 224, steps: int = 5, warmup: int = 2, device: str = "cpu", seed: int = 0,
         tiny: bool = False, out: str | None = None) -> str:  # fmt: skip
    """Print (and with ``--out`` write) the Markdown table of :func:`rows`."""
    return report(lambda: rows(int(batch), int(image_size), int(steps), int(warmup), device, int(seed), bool(tiny)),
                  steps, warmup, device, out)


if __name__ == "__main__":
    fire.Fire(main)
