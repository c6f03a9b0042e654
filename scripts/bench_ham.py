#!/usr/bin/env python
"""Cost of HAM's training step against a plain ResNet multi-label step, and of its attention maps.

Issue target: HAM training step / plain ResNet-50 multi-label step at the same batch, at most 1.3x.
Every step = zero_grad + forward + loss + backward + Adam step on the same random batch (half of the
images box-supervised, as a box fold of the localisation split); the models run interleaved after
``warmup`` rounds and the median of ``steps`` timed steps per model is reported.

* **HAM** (:class:`custom_components.networks.ham.HAMNet`, the bundle's ``train.json``: output
  stride 8, foreground attention, 512-channel fusion, LSE pooling) with its five losses
  (:class:`custom_components.guidance.ham.HAMLoss`) through
  :meth:`custom_components.engines.ham.HAMIteration.losses`, the bundle's own step.
* **plain ResNet** (MONAI ``resnet50`` with the ImageNet stem: 7x7 stride 2 + max-pool; output
  stride 32, global average pooling, 14 logits, BCE): the issue's reference.
* **HAM at output stride 32** (no dilation): HAM's own parts (foreground attention, fusion head,
  LSE pooling, the five losses) on the plain ResNet's feature resolution.
* **CAM baseline at HAM's output stride** (:class:`custom_components.networks.cam_resnet.CAMResNet`
  with ``output_stride=8``, BCE only): the same dilated backbone without HAM's heads and losses, which
  separates the cost of the dilated backbone from the cost of HAM's own parts.

Further rows: forward FLOPs of each network (``torch.utils.flop_counter``), the loss terms alone
(forward + backward of :class:`HAMLoss` on fixed network outputs), and the map extraction time per
image: HAM's refined class attention map (:class:`custom_components.explain.ham_cam.HAMAttention`,
one forward, no gradient) and Grad-CAM on the CAM baseline (``backbone.layer4``, forward + backward).

Usage::

    python scripts/bench_ham.py [--batch 4] [--image_size 256] [--arch resnet50] [--steps 3] [--warmup 1]
        [--device cpu] [--seed 0] [--tiny False] [--out FILE.md]

:func:`rows` returns the Markdown rows ``(measurement, value)``; ratio cells read ``**1.23x**``.
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

from custom_components.engines.ham import HAMIteration  # noqa: E402
from custom_components.explain.cnn_cam import CNNGradCAM  # noqa: E402
from custom_components.explain.ham_cam import HAMAttention  # noqa: E402
from custom_components.guidance.ham import HAMLoss  # noqa: E402
from custom_components.networks.cam_resnet import CAMResNet  # noqa: E402
from custom_components.networks.ham import HAMNet  # noqa: E402

FINDINGS = 14
TARGET = 1.3


def _batch(batch: int, image_size: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random images and labels; the first half of the images carries one box per positive finding."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batch, FINDINGS, generator=g) < 0.2).float()
    labels[:, 0] = 1.0  # every image has a finding, so the box half has a box
    flags = (torch.arange(batch) < max(1, batch // 2)).float()
    tags = labels * flags[:, None]
    masks = torch.zeros(batch, FINDINGS, image_size, image_size)
    q = image_size // 4
    masks[..., q : 3 * q, q : 2 * q] = 1.0
    masks *= tags[..., None, None]
    out = {"images": torch.rand(batch, 3, image_size, image_size, generator=g), "labels": labels, "masks": masks,
           "tags": tags, "flags": flags}  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}


def _ham_step(model: HAMNet, data: dict, device: torch.device) -> Callable[[], float]:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-5, weight_decay=1e-4)
    loss_fn, iteration = HAMLoss(), HAMIteration(loss=None)

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, terms = iteration.losses(model, loss_fn, data["images"], data["labels"], data["masks"], data["tags"],
                                    data["flags"])  # fmt: skip
        terms["loss"].backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - t

    return step


def _bce_step(model: nn.Module, data: dict, device: torch.device, offset: int) -> Callable[[], float]:
    """A multi-label BCE step; ``offset`` skips the CAM baseline's abnormality logit."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-5, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(data["images"])[:, offset:], data["labels"])
        loss.backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - t

    return step


def _gflops(model: nn.Module, x: torch.Tensor, forward: Callable | None = None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        (forward or model)(x)
    return counter.get_total_flops() / 1e9


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rows(batch: int = 4, image_size: int = 256, arch: str = "resnet50", steps: int = 3, warmup: int = 1,
         device: str = "cpu", seed: int = 0, tiny: bool = False) -> list[tuple[str, str]]:
    """Markdown rows ``(measurement, value)`` of the HAM section (``tiny``: ResNet-18 and 64-channel fusion)."""
    from monai.networks import nets

    if steps < 1 or warmup < 0 or batch < 2:
        raise ValueError("need steps >= 1, warmup >= 0, batch >= 2 (half of the batch has boxes)")
    dev = torch.device(device)
    fusion = 64 if tiny else 512
    torch.manual_seed(seed)
    ham = HAMNet(arch=arch, num_classes=FINDINGS, output_stride=8, fusion_channels=fusion).to(dev)
    ham32 = HAMNet(arch=arch, num_classes=FINDINGS, output_stride=32, fusion_channels=fusion).to(dev)
    # the ImageNet ResNet layout (7x7 stride-2 stem + max-pool, output stride 32); MONAI's default stem has stride 1
    plain = getattr(nets, arch)(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2,
                                num_classes=FINDINGS).to(dev)  # fmt: skip
    cam8 = CAMResNet(arch=arch, num_classes=FINDINGS, output_stride=8).to(dev)
    data = _batch(batch, image_size, seed, dev)
    times = interleaved({"ham": _ham_step(ham, data, dev), "plain": _bce_step(plain, data, dev, 0),
                          "cam8": _bce_step(cam8, data, dev, 1), "ham32": _ham_step(ham32, data, dev)},
                         steps, warmup)  # fmt: skip
    h, p, c, h32 = (statistics.median(times[k]) for k in ("ham", "plain", "cam8", "ham32"))

    x1 = data["images"][:1]
    f_ham, f_ham32 = _gflops(ham, x1, ham.forward_with_maps), _gflops(ham32, x1, ham32.forward_with_maps)
    f_plain, f_cam8 = _gflops(plain, x1), _gflops(cam8, x1)

    # the loss terms alone, on fixed network outputs that require gradients
    with torch.no_grad():
        logits, cams, refined = ham.forward_with_maps(data["images"])
    outs = [t.detach().requires_grad_(True) for t in (logits, cams, refined)]
    loss_fn = HAMLoss()

    def loss_only() -> None:
        lg, cm, rf = outs
        terms = loss_fn(lg[:, :1], lg[:, 1:], rf[:, :1], rf[:, 1:], cm[:, :1], cm[:, 1:], data["labels"], data["masks"],
                        data["tags"], data["flags"])  # fmt: skip
        terms["loss"].backward()

    t_loss = _timed(loss_only, dev, max(3, steps))

    # map extraction: HAM's refined map (no gradient) vs Grad-CAM on the CAM baseline (gradient of one logit)
    target = torch.ones(batch, dtype=torch.long, device=dev)  # logit 1 = the first finding
    ham.eval()
    cam8.eval()
    ham_maps, gradcam = HAMAttention(ham, refine=True), CNNGradCAM(cam8, "backbone.layer4")
    t_ham_map = _timed(lambda: ham_maps.attribute(data["images"], target), dev, max(2, steps))
    t_gradcam = _timed(lambda: gradcam.attribute(data["images"], target), dev, max(2, steps))

    name = f"{arch}, batch {batch} ({max(1, batch // 2)} with boxes), 3×{image_size}², {FINDINGS} findings, Adam"
    n_params = lambda m: f"{sum(q.numel() for q in m.parameters()) / 1e6:.2f} M"  # noqa: E731
    return [
        (f"**HAM / plain ResNet multi-label training step** ({name}; target ≤ {TARGET}x)",
         f"**{h / p:.2f}x** ({ms(h)} / {ms(p)})"),
        (f"  HAM step (output stride 8, fusion {fusion}; {n_params(ham)} parameters), median (min–max)", spread(times["ham"])),
        (f"  plain ResNet step (output stride 32, GAP, BCE; {n_params(plain)} parameters), median (min–max)",
         spread(times["plain"])),
        ("**HAM / CAM-baseline step at HAM's output stride 8** (same dilated backbone, GAP, BCE)",
         f"**{h / c:.2f}x** ({ms(h)} / {ms(c)})"),
        ("  CAM baseline at output stride 8 / plain ResNet step (the cost of dilation)", f"{c / p:.2f}x"),
        ("**HAM at output stride 32 / plain ResNet step** (HAM's heads and losses without the dilation)",
         f"**{h32 / p:.2f}x** ({ms(h32)} / {ms(p)})"),
        ("  forward GFLOPs per image: HAM OS 8 / HAM OS 32 / CAM baseline OS 8 / plain ResNet OS 32",
         f"{f_ham:.1f} / {f_ham32:.1f} / {f_cam8:.1f} / {f_plain:.1f}"),
        ("  HAM's five loss terms alone (forward + backward on fixed outputs) / HAM step",
         f"{t_loss / h:.3f} ({ms(t_loss)})"),
        ("**map extraction per image: HAM refined class map** (one forward, no gradient)",
         f"**{ms(t_ham_map / batch)}**"),
        ("**map extraction per image: Grad-CAM on the CAM baseline** (layer4, forward + backward)",
         f"**{ms(t_gradcam / batch)}**"),
    ]  # fmt: skip


def main(batch: int = 4, image_size: int = 256, arch: str = "resnet50", steps: int = 3, warmup: int = 1,
         device: str = "cpu", seed: int = 0, tiny: bool = False, out: str | None = None) -> str:
    """Print (and with ``--out`` write) the Markdown table of :func:`rows`."""
    return report(lambda: rows(int(batch), int(image_size), arch, int(steps), int(warmup), device, int(seed), bool(tiny)),
                  steps, warmup, device, out)


if __name__ == "__main__":
    fire.Fire(main)
