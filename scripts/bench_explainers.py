#!/usr/bin/env python
"""Cost of each explanation method relative to one forward+backward of the same ViT.

For every explainer of :mod:`custom_components.explain` (raw attention, rollout, GAE, Chefer's LRP
transformer attribution, Grad-CAM, Grad-CAM + eigen_smooth, Grad-CAM + aug_smooth, EAFEM) the time
to produce one batch of maps (``attribute``: forward, gradients, map, resize, normalisation) is
divided by the time of one forward+backward of the same model on the same batch (backward of the
sum of the target logits w.r.t. the parameters, fused SDPA attention as in training). Batched LRP
is also compared with a per-image loop over the same images (upstream Chefer code runs batch 1
only, spec section 5).

Variants run interleaved, the start rotating every round, and the medians after the warm-up
rounds are reported. The model is :class:`~custom_components.networks.vit.AttributionViT` in eval
mode with 2 classes; every map explains class 1 (the ugent-korea protocol target).

Usage::

    python scripts/bench_explainers.py [--size base|tiny] [--batch 32] [--image_size 224] [--steps 3]
        [--warmup 1] [--device cpu] [--seed 0] [--lrp_loop_batch N] [--out FILE.md]

Smoke test (seconds)::

    python scripts/bench_explainers.py --size tiny --batch 4 --image_size 32 --steps 1 --warmup 0
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import fire
import torch

from custom_components.explain import (
    EAFEM,
    GAE,
    AttentionRollout,
    Explainer,
    RawAttention,
    TransformerAttribution,
    ViTGradCAM,
)
from custom_components.networks.vit import AttributionViT

__all__ = ["rows", "main", "SIZES", "METHODS"]

#: ViT-B/16 (the study's backbone) and a 2-block D=64 ViT for smoke tests
SIZES = {
    "base": dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "tiny": dict(patch_size=8, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128),
}
SIZE_NAMES = {"base": "ViT-B/16", "tiny": "ViT-tiny (2 blocks, D=64, patch 8)"}
TARGET_CLASS = 1

#: row label -> explainer factory (project defaults: bilinear upsampling, per-sample min-max)
METHODS: dict[str, Callable[[torch.nn.Module], Explainer]] = {
    "raw attention (last block)": lambda m: RawAttention(m),
    "attention rollout": lambda m: AttentionRollout(m),
    "GAE": lambda m: GAE(m),
    "LRP transformer attribution (Chefer), batched": lambda m: TransformerAttribution(m),
    "Grad-CAM (blocks[-1].norm1)": lambda m: ViTGradCAM(m),
    "Grad-CAM + eigen_smooth": lambda m: ViTGradCAM(m, eigen_smooth=True),
    "Grad-CAM + aug_smooth (6 passes)": lambda m: ViTGradCAM(m, aug_smooth=True),
    "EAFEM (β 0.85)": lambda m: EAFEM(m, beta=0.85),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    return run


def _forward_backward(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            logits = model(images)
            logits.gather(1, targets.view(-1, 1)).sum().backward()

    return step


def _explain(explainer: Explainer, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        # as the evaluation iteration: autograd only for the methods that differentiate
        with torch.set_grad_enabled(explainer.needs_gradients):
            return explainer.attribute(images, target=targets).detach()

    return step


def _lrp_loop(explainer: Explainer, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.enable_grad():
            maps = [explainer.attribute(images[i : i + 1], target=targets[i : i + 1]).detach() for i in range(len(images))]
        return torch.cat(maps)

    return step


def _measure(size: str, batch: int, image_size: int, steps: int, warmup: int, device: torch.device, seed: int,
             lrp_loop_batch: int) -> tuple[dict[str, list[float]], float]:  # fmt: skip
    torch.manual_seed(seed)
    model = AttributionViT(img_size=image_size, num_classes=2, **SIZES[size]).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, image_size, image_size, generator=g).to(device)
    targets = torch.full((batch,), TARGET_CLASS, dtype=torch.long, device=device)

    lrp = METHODS["LRP transformer attribution (Chefer), batched"](model)
    variants: dict[str, Callable[[], float]] = {"baseline": _timed(_forward_backward(model, images, targets), device)}
    for name, make in METHODS.items():
        variants[name] = _timed(_explain(make(model), images, targets), device)
    variants["lrp_loop"] = _timed(_lrp_loop(lrp, images[:lrp_loop_batch], targets[:lrp_loop_batch]), device)

    # the loop computes the same maps as the batch (batched == per-sample, spec section 0)
    batched = _explain(lrp, images[:lrp_loop_batch], targets[:lrp_loop_batch])()
    looped = _lrp_loop(lrp, images[:lrp_loop_batch], targets[:lrp_loop_batch])()
    max_diff = float((batched - looped).abs().max())

    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(warmup + steps):
        order = names[i % len(names) :] + names[: i % len(names)]  # no variant always follows the same one
        for name in order:
            t = variants[name]()
            if i >= warmup:
                times[name].append(t)
    return times, max_diff


def rows(
    size: str = "base",
    batch: int = 32,
    image_size: int = 224,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    lrp_loop_batch: int | None = None,
) -> list[tuple[str, str]]:
    """Markdown table rows (label, value) of the explainer benchmark.

    Args:
        size: ``"base"`` (ViT-B/16) or ``"tiny"`` (smoke test).
        batch: images per batch of maps (and of the forward+backward baseline).
        image_size: square input side (224: 14 x 14 patches for ViT-B/16).
        steps: timed interleaved rounds (medians); warmup: untimed rounds before them.
        device: torch device. seed: model and image seed.
        lrp_loop_batch: how many of the batch's images the per-image LRP loop explains (default:
            all); its time is scaled to the full batch (per-image time x ``batch``).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if batch < 1 or steps < 1 or warmup < 0:
        raise ValueError("batch and steps must be >= 1 and warmup >= 0")
    n_loop = batch if lrp_loop_batch is None else int(lrp_loop_batch)
    if not 1 <= n_loop <= batch:
        raise ValueError(f"lrp_loop_batch must be in [1, batch={batch}], got {lrp_loop_batch}")
    dev = torch.device(device)
    times, max_diff = _measure(size, int(batch), int(image_size), int(steps), int(warmup), dev, int(seed), n_loop)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["baseline"]

    def ms(s: float) -> str:
        return f"{1000 * s:.1f} ms"

    cfg = f"{SIZE_NAMES[size]}, batch {batch}, {image_size}², 2 classes, eval"
    out = [(f"forward+backward of the model (baseline; {cfg})", f"{ms(base)} per batch")]
    for name in METHODS:
        out.append((f"**{name} / forward+backward**", f"**{med[name] / base:.2f}x** ({ms(med[name])} per batch)"))
    loop_per_batch = med["lrp_loop"] / n_loop * batch
    per_image = "" if n_loop == batch else f", {n_loop} of {batch} images, time per image x {batch}"
    lrp = med["LRP transformer attribution (Chefer), batched"]
    out.append(
        (f"**batched LRP vs per-image loop** (batch-1 calls{per_image})",
         f"**{loop_per_batch / lrp:.1f}x faster** ({ms(lrp)} vs {ms(loop_per_batch)} per batch)")
    )  # fmt: skip
    # float32 at random initialisation: the raw relevances are ~1e-6 and LRP divides by near-cancelling
    # sums, so batch-size-dependent rounding is amplified (and stretched by min-max); in float64 the
    # batched and looped maps agree to ~1e-12 (ViT-B, 3 images; tests: batched == loop on small models)
    out.append(("max \\|batched − looped\\| LRP map (min-maxed; float32 rounding at random init, see README)",
                f"{max_diff:.1e}"))
    return out


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def main(
    size: str = "base",
    batch: int = 32,
    image_size: int = 224,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    lrp_loop_batch: int | None = None,
    out: str | None = None,
) -> None:
    """Print (and optionally write to ``out``) the Markdown table of :func:`rows`."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} intra-op threads, device {dev}, {_machine(dev)}", file=sys.stderr)
    t0 = time.perf_counter()
    table_rows = rows(size, batch, image_size, steps, warmup, device, seed, lrp_loop_batch)
    wall = time.perf_counter() - t0
    lines = ["| measurement | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in table_rows], ""]
    lines.append(
        f"Medians of {steps} interleaved rounds after {warmup} warm-up round(s). Machine: {_machine(dev)}; "
        f"device {dev}; torch {torch.__version__}, {threads} threads; wall time {wall:.0f} s."
    )
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    fire.Fire(main)
