#!/usr/bin/env python
"""Training-step cost of MedViT against MONAI's ResNet-18, 2-D and 3-D (one run, ratios).

For each pair, the same random batch, the same loss (cross-entropy) and the same optimiser (AdamW):
one training step = zero_grad + forward + loss + backward + optimizer step. The two models run
interleaved (A B A B ..., the starting model alternating) after ``warmup`` rounds, and the median
of ``steps`` timed steps per model is reported.

* 2-D: MedViT-T (:func:`custom_components.networks.medvit.medvit_t`, the released
  ``MedViT_small``; Manzari et al., CBM 2023) vs ``monai.networks.nets.resnet18(spatial_dims=2,
  n_input_channels=3)`` at ``batch`` x 3 x ``image_size``^2, 2 classes (BreastMNIST).
* 3-D: MedViT-3D with T depths (:func:`custom_components.networks.medvit3d.medvit3d_t`) vs
  ``resnet18(spatial_dims=3, n_input_channels=1)`` at ``batch`` x 1 x ``volume_size``^3, 11 classes
  (OrganMNIST3D).

``tiny`` swaps both MedViTs for depths 1/1/5/1 (smoke tests); ResNet-18 stays.

Usage::

    python scripts/bench_medvit.py [--batch 8] [--image_size 224] [--volume_size 64] [--batch3d 4]
        [--steps 5] [--warmup 2] [--device cpu] [--seed 0] [--tiny False] [--out FILE.md]

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
for _path in (REPO, REPO / "scripts"):  # the package, and the sibling bench_timing
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_timing import interleaved, ms, report, spread, sync  # noqa: E402

from custom_components.networks.medvit import MedViT, medvit_t  # noqa: E402
from custom_components.networks.medvit3d import MedViT3D, medvit3d_t  # noqa: E402

TINY_DEPTHS = (1, 1, 5, 1)
CLASSES_2D, CLASSES_3D = 2, 11


def _n_params(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def _step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Callable[[], float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - t

    return step


def rows(batch: int = 8, image_size: int = 224, volume_size: int = 64, steps: int = 5, warmup: int = 2,
         device: str = "cpu", seed: int = 0, tiny: bool = False, batch3d: int | None = None) -> list[tuple[str, str]]:
    """Markdown rows ``(measurement, value)``: MedViT-T / ResNet-18 (2-D) and MedViT-3D / ResNet-18 (3-D) step times.

    ``batch3d`` (default ``batch``) is the 3-D batch size. Ratio cells are ``**<ratio>x**`` followed by
    the two median step times.
    """
    from monai.networks.nets import resnet18

    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError("need steps >= 1, warmup >= 0, batch >= 1")
    dev = torch.device(device)
    b3 = int(batch if batch3d is None else batch3d)
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[str, str]] = []

    # ---- 2-D
    torch.manual_seed(seed)
    if tiny:
        medvit2d: nn.Module = MedViT(depths=TINY_DEPTHS, num_classes=CLASSES_2D, path_dropout=0.0,
                                     stem_stride=4 if image_size >= 64 else 1)
        name2d = "MedViT (depths 1/1/5/1)"
    else:
        medvit2d, name2d = medvit_t(num_classes=CLASSES_2D), "MedViT-T"
    resnet2d = resnet18(spatial_dims=2, n_input_channels=3, num_classes=CLASSES_2D)
    x2 = torch.rand(batch, 3, image_size, image_size, generator=g).to(dev)
    y2 = torch.randint(0, CLASSES_2D, (batch,), generator=g).to(dev)
    t = interleaved({"m": _step_fn(medvit2d.to(dev), x2, y2, dev), "r": _step_fn(resnet2d.to(dev), x2, y2, dev)},
                    steps, warmup)
    t_m, t_r = t["m"], t["r"]
    m, r = statistics.median(t_m), statistics.median(t_r)
    out += [
        (f"**{name2d} / ResNet-18 training step** (2-D, batch {batch}, 3×{image_size}², {CLASSES_2D} classes, AdamW)",
         f"**{m / r:.2f}x** ({ms(m)} / {ms(r)})"),
        (f"  {name2d} step ({_n_params(medvit2d)} parameters), median (min–max)", spread(t_m)),
        (f"  MONAI ResNet-18 2-D step ({_n_params(resnet2d)} parameters), median (min–max)", spread(t_r)),
    ]  # fmt: skip
    del medvit2d, resnet2d, x2

    # ---- 3-D
    torch.manual_seed(seed)
    if tiny:
        medvit3d: nn.Module = MedViT3D(depths=TINY_DEPTHS, num_classes=CLASSES_3D, path_dropout=0.0,
                                       stem_stride=2 if volume_size <= 32 else 4)
        name3d = "MedViT-3D (depths 1/1/5/1)"
    else:
        medvit3d, name3d = medvit3d_t(input_size=volume_size, num_classes=CLASSES_3D), "MedViT-3D (T)"
    resnet3d = resnet18(spatial_dims=3, n_input_channels=1, num_classes=CLASSES_3D)
    x3 = torch.rand(b3, 1, volume_size, volume_size, volume_size, generator=g).to(dev)
    y3 = torch.randint(0, CLASSES_3D, (b3,), generator=g).to(dev)
    t = interleaved({"m": _step_fn(medvit3d.to(dev), x3, y3, dev), "r": _step_fn(resnet3d.to(dev), x3, y3, dev)},
                    steps, warmup)
    t_m, t_r = t["m"], t["r"]
    m, r = statistics.median(t_m), statistics.median(t_r)
    out += [
        (f"**{name3d} / ResNet-18 training step** (3-D, batch {b3}, 1×{volume_size}³, {CLASSES_3D} classes, AdamW)",
         f"**{m / r:.2f}x** ({ms(m)} / {ms(r)})"),
        (f"  {name3d} step ({_n_params(medvit3d)} parameters), median (min–max)", spread(t_m)),
        (f"  MONAI ResNet-18 3-D step ({_n_params(resnet3d)} parameters), median (min–max)", spread(t_r)),
    ]  # fmt: skip
    return out


def main(batch: int = 8, image_size: int = 224, volume_size: int = 64, steps: int = 5, warmup: int = 2,
         device: str = "cpu", seed: int = 0, tiny: bool = False, batch3d: int | None = None,
         out: str | None = None) -> str:
    """Print (and with ``--out`` write) the Markdown table of :func:`rows`."""
    return report(lambda: rows(int(batch), int(image_size), int(volume_size), int(steps), int(warmup), device, int(seed),
                               bool(tiny), None if batch3d is None else int(batch3d)), steps, warmup, device, out)


if __name__ == "__main__":
    fire.Fire(main)
