#!/usr/bin/env python
"""Side-by-side cost of LGM-ViT guidance and of the prepared slice store (one run, ratios).

1. Training step: the LGM-ViT guided step (EAFEM beta 0.85 + KL loss, kernel 51, lambda 1000)
   against the plain classification step, same :class:`AttributionViT`, same batch (random images,
   half positive labels, random blob masks), same AdamW. The variants run interleaved
   (A B A B ...) after a warm-up; each step is timed as forward+loss / backward / optimizer step
   and the median per-step times are reported. Two more variants switch every block to the
   explicit softmax attention (``record_attention = True``), so the table shows what the fused
   SDPA path buys.
2. Data: a BraTS-format synthetic twin is written to a temporary folder and prepared with
   :func:`prepare_brats20`; one epoch of per-slice items is read (a) from the prepared store
   (:class:`SliceDataset`) and (b) by re-reading NIfTI with :class:`NiftiScanReader` (decode +
   min-max + resize per case, as the reference loader does every epoch).

3. Explainers (``scripts/bench_explainers.py``): time of each explanation method for a batch of
   maps (ViT-B/16, batch 32, 224²) over one forward+backward of the same model, and batched Chefer
   LRP against a per-image loop.
4. MedViT (``scripts/bench_medvit.py``): training-step time of MedViT-T over MONAI's ResNet-18
   (2-D) and of MedViT-3D over MONAI's 3-D ResNet-18, same input and batch.
5. HAM (``scripts/bench_ham.py``): HAM's training step (ResNet-50, output stride 8, its five
  losses) over a plain ResNet-50 multi-label BCE step at the same batch (target at most 1.3x), the
  same against the CAM baseline on HAM's dilated backbone, forward FLOPs, the loss terms' share, and
  the map extraction time per image (HAM's refined map; Grad-CAM on the baseline).

Usage::

    python scripts/benchmark.py [--size tiny|base] [--batch 8] [--image_size 256] [--steps 5]
        [--warmup 2] [--data_cases 3] [--data_shape 240,240,155] [--data_epochs 2]
        [--compress False] [--out FILE.md] [--device cpu] [--seed 0]
        [--explainers True] [--explain_batch 32] [--explain_image_size 224] [--explain_lrp_loop_batch N]
        [--medvit True] [--medvit_batch 8] [--medvit_image_size 224] [--medvit_volume_size 64] [--medvit_batch3d 4]
        [--ham True] [--ham_batch 4] [--ham_image_size 256]

Smoke test (well under a minute on 2 CPU cores)::

    python scripts/benchmark.py --size tiny --steps 3 --data_cases 2 --data_shape 64,64,20 --image_size 64
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn as nn

from custom_components.cli import parse_ints
from custom_components.data.brats20 import NiftiScanReader, find_cases, prepare_brats20
from custom_components.data.slice_store import SliceDataset
from custom_components.data.synthetic import write_brats20_twin
from custom_components.engines.guided import GuidedIteration
from custom_components.explain.eafem import EAFEM
from custom_components.guidance.blur import gaussian_blur
from custom_components.guidance.lgmvit_kl import LGMViTKLLoss
from custom_components.io import atomic_write_text
from custom_components.networks.vit import AttributionViT

#: model sizes: ViT-B/16 (the paper) and a small ViT for smoke tests
SIZES = {
    "base": dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "tiny": dict(patch_size=16, hidden_size=192, num_layers=4, num_heads=3, mlp_dim=768),
}
SIZE_NAMES = {"base": "ViT-B/16", "tiny": "ViT-tiny/16 (4 blocks, D=192)"}
BETA, KERNEL, WEIGHT = 0.85, 51, 1000.0  # BraTS20 settings (spec sections 3-4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


# --------------------------------------------------------------------------------------------
# 1. training step


def _blob_masks(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, size, size) float masks: one random ellipse per positive slice, zeros otherwise."""
    b = labels.shape[0]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    masks = torch.zeros(b, 1, size, size)
    for i in range(b):
        if labels[i, 0] > 0.5:
            cy, cx = (torch.rand(2, generator=generator) * 1.0 - 0.5).tolist()
            ry, rx = (torch.rand(2, generator=generator) * 0.25 + 0.1).tolist()
            masks[i, 0] = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1.0).float()
    return masks


def _set_explicit(model: AttributionViT, on: bool) -> None:
    for blk in model.blocks:
        blk.attn.record_attention = on


def _make_step(model, optimizer, loss_fn, iteration: GuidedIteration, batch, explicit_all: bool, device):
    images, labels, masks = batch

    def step() -> tuple[float, float, float, float]:
        """Seconds of forward+loss, backward, optimizer step, and process CPU seconds of the step."""
        if explicit_all:
            _set_explicit(model, True)
        try:
            _sync(device)
            c0 = time.process_time()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            _, loss_cls, loss_loc = iteration.losses(model, loss_fn, images, labels, masks)
            loss = loss_cls + iteration.weight * loss_loc.float()
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            optimizer.step()
            _sync(device)
            t3 = time.perf_counter()
            c3 = time.process_time()
        finally:
            # the capture of a guided step restores its own block; restore the others here
            _set_explicit(model, False)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} in the benchmark step")
        return t1 - t0, t2 - t1, t3 - t2, c3 - c0

    return step


def _competing_methods(model: AttributionViT, grid: int) -> dict[str, GuidedIteration]:
    """The competing guidance methods of specs/lgmvit.md §8.1 with their BraTS weights (GAE-based)."""
    from custom_components.explain import GAE
    from custom_components.guidance import GradMaskLoss, RESLoss, RobustViTLoss

    gae_full = GAE(model, upsample="bilinear", normalize="minmax")
    gae_grid = GAE(model, upsample="none", normalize="minmax")
    return {
        "gradmask": GuidedIteration(gae_full, GradMaskLoss(KERNEL), weight=0.1),
        "robustvit": GuidedIteration(gae_full, RobustViTLoss(), weight=50.0),
        "res_g": GuidedIteration(gae_grid, RESLoss(imputation="gaussian", grid=grid), weight=0.1),
        "res_l": GuidedIteration(gae_grid, RESLoss(imputation="learned", grid=grid), weight=0.1),
    }


def _bench_steps(size: str, batch: int, image_size: int, steps: int, warmup: int, device: torch.device, seed: int,
                 methods: bool = True):  # fmt: skip
    torch.manual_seed(seed)
    model = AttributionViT(img_size=image_size, **SIZES[size]).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, image_size, image_size, generator=g)
    labels = torch.zeros(batch, 1)
    labels[torch.randperm(batch, generator=g)[: max(1, batch // 2)]] = 1.0
    masks = _blob_masks(labels, image_size, g)
    data = (images.to(device), labels.to(device), masks.to(device))

    plain = GuidedIteration()
    guided = GuidedIteration(EAFEM(model, BETA), LGMViTKLLoss(KERNEL), weight=WEIGHT)
    variants = {
        "plain": _make_step(model, optimizer, loss_fn, plain, data, False, device),
        "guided": _make_step(model, optimizer, loss_fn, guided, data, False, device),
        "plain_explicit": _make_step(model, optimizer, loss_fn, plain, data, True, device),
        "guided_explicit": _make_step(model, optimizer, loss_fn, guided, data, True, device),
    }
    if methods:
        for name, iteration in _competing_methods(model, image_size // SIZES[size]["patch_size"]).items():
            variants[f"method_{name}"] = _make_step(model, optimizer, loss_fn, iteration, data, False, device)
    times: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for i in range(steps):
        # interleaved, rotating the start so no variant always follows the same one
        names = list(variants)
        names = names[i % len(names):] + names[: i % len(names)]
        for name in names:
            times[name].append(variants[name]())

    # components of the guidance term, timed alone on the same positive slices
    pos = data[1][:, 0] > 0.5
    pos_masks = data[2][pos]
    comp = {}
    reps = max(steps, 3)

    def timed(fn: Callable[[], object]) -> float:
        fn()
        out = []
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    comp["blur"] = timed(lambda: gaussian_blur(pos_masks, KERNEL))
    grid = image_size // SIZES[size]["patch_size"]
    seq = grid * grid + 1
    attn = torch.rand(int(pos.sum()), SIZES[size]["num_heads"], seq, seq, device=device).softmax(-1).requires_grad_()
    tok = torch.randn(int(pos.sum()), seq, SIZES[size]["hidden_size"], device=device, requires_grad=True)
    kl = LGMViTKLLoss(KERNEL)
    pos_labels = data[1][pos]

    def map_and_kl():
        from custom_components.explain.eafem import eafem_map

        loss = kl(eafem_map(attn, tok, BETA, (image_size, image_size)), pos_masks, pos_labels)
        loss.backward()

    comp["map_kl"] = timed(map_and_kl)
    return times, comp


def _med(xs: list[tuple[float, float, float, float]], part: int | None = None) -> float:
    if part is None:
        return statistics.median(sum(x[:3]) for x in xs)
    return statistics.median(x[part] for x in xs)


def _spread(xs: list[tuple[float, float, float, float]]) -> str:
    totals = [sum(x[:3]) for x in xs]
    return f"{1000 * min(totals):.1f}–{1000 * max(totals):.1f}"


def _utilisation(times: dict, threads: int) -> float:
    """Process CPU time / (wall time x threads) over all timed steps: well below 1 means the
    benchmark was starved (other processes on the cores), so its timings are noisy."""
    cpu = sum(x[3] for xs in times.values() for x in xs)
    wall = sum(sum(x[:3]) for xs in times.values() for x in xs)
    return cpu / max(wall * threads, 1e-12)


# --------------------------------------------------------------------------------------------
# 2. data throughput


def _store_epoch(ds: SliceDataset) -> int:
    n = 0
    for i in range(len(ds)):
        item = ds[i]
        n += item["image"].shape[0] > 0
    return n


def _nifti_epoch(reader: NiftiScanReader) -> int:
    """Re-read every scan and build the same per-slice items as :class:`SliceDataset`."""
    n = 0
    for c, (image, mask) in enumerate(reader):
        labels = mask.reshape(mask.shape[0], -1).any(axis=1)
        for s in range(image.shape[0]):
            item = {
                "image": torch.from_numpy(np.ascontiguousarray(image[s], dtype=np.float32)),
                "mask": torch.from_numpy(mask[s].astype(np.float32)[None]),
                "label": torch.tensor([float(labels[s])], dtype=torch.float32),
                "case": reader.case_dirs[c].name,
                "slice": s,
            }
            n += item["image"].shape[0] > 0
    return n


def _bench_data(cases: int, shape: tuple[int, ...], image_size: int, epochs: int, compress: bool, seed: int):
    with tempfile.TemporaryDirectory(prefix="lgmvit_bench_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        data_dir = write_brats20_twin(tmp / "raw", n_per_split=(cases, 0, 0), shape=shape, seed=seed,
                                      compress=compress)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        datalist = prepare_brats20(data_dir, tmp / "store", split=None, image_size=image_size, progress=False)
        t_prepare = time.perf_counter() - t
        ds = SliceDataset(datalist, split="unsplit")
        reader = NiftiScanReader(list(find_cases(data_dir).values()), image_size=image_size)

        # the two sources must give the same tensors (the store is float16: tolerance 1e-3)
        first_image, first_mask = reader[0]
        item = ds[first_image.shape[0] // 2]
        diff = float((item["image"] - torch.from_numpy(first_image[item["slice"]])).abs().max())
        same_mask = bool(torch.equal(item["mask"][0], torch.from_numpy(first_mask[item["slice"]]).float()))
        if diff > 2e-3 or not same_mask:
            raise AssertionError(f"store and NIfTI items differ (max |image diff| {diff:g}, mask equal {same_mask})")

        store_t, nifti_t, n_slices = [], [], len(ds)
        for _ in range(max(1, epochs)):  # interleaved epochs
            t = time.perf_counter()
            n_store = _store_epoch(ds)
            store_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            n_nifti = _nifti_epoch(reader)
            nifti_t.append(time.perf_counter() - t)
            if n_store != n_slices or n_nifti != n_slices:
                raise AssertionError(f"slice counts differ: store {n_store}, NIfTI {n_nifti}, dataset {n_slices}")
        return {
            "n_slices": n_slices,
            "store_s": statistics.median(store_t),
            "nifti_s": statistics.median(nifti_t),
            "write_s": t_write,
            "prepare_s": t_prepare,
            "max_diff": diff,
        }


# --------------------------------------------------------------------------------------------


def main(
    size: str = "base",
    batch: int = 8,
    image_size: int = 256,
    steps: int = 5,
    warmup: int = 2,
    data_cases: int = 3,
    data_shape: str | Sequence[int] = (240, 240, 155),
    data_epochs: int = 2,
    compress: bool = False,
    out: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    methods: bool = True,
    explainers: bool = True,
    explain_batch: int = 32,
    explain_image_size: int = 224,
    explain_lrp_loop_batch: int | None = None,
    medvit: bool = True,
    medvit_batch: int = 8,
    medvit_image_size: int = 224,
    medvit_volume_size: int = 64,
    medvit_batch3d: int = 4,
    ham: bool = True,
    ham_batch: int = 4,
    ham_image_size: int = 256,
    lvmmed: bool = True,
    lvmmed_batch: int = 32,
    lvmmed_image_size: int = 64,
    lvmmed_full: bool = False,
) -> None:
    """Run the step, data, explainer, MedViT and HAM benchmarks (sections off with --methods/--explainers/--medvit/--ham False).

    Prints one Markdown table. ``--size tiny`` also shrinks the explainer and MedViT sections.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if batch < 2:
        raise ValueError("batch must be >= 2 (half the slices are positive)")
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    dev = torch.device(device)
    shape = parse_ints(data_shape)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} intra-op threads, device {dev}, {_machine(dev)}", file=sys.stderr)

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    times, comp = _bench_steps(size, int(batch), int(image_size), int(steps), int(warmup), dev, int(seed), bool(methods))
    t_steps = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = _bench_data(int(data_cases), shape, int(image_size), int(data_epochs), bool(compress), int(seed))
    t_data = time.perf_counter() - t0
    extra: list[tuple[str, str]] = []
    t_extra = 0.0
    if explainers or medvit or ham or lvmmed:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling section modules
        t0 = time.perf_counter()
        if explainers:
            import bench_explainers

            extra += bench_explainers.rows(size=size, batch=int(explain_batch), image_size=int(explain_image_size),
                                           steps=max(1, int(steps) // 2), warmup=min(int(warmup), 1), device=device,
                                           seed=int(seed), lrp_loop_batch=explain_lrp_loop_batch)
        if medvit:
            import bench_medvit

            extra += bench_medvit.rows(batch=int(medvit_batch), image_size=int(medvit_image_size),
                                       volume_size=int(medvit_volume_size), steps=int(steps), warmup=int(warmup),
                                       device=device, seed=int(seed), tiny=size == "tiny", batch3d=int(medvit_batch3d))
        if ham:
            import bench_ham

            tiny = size == "tiny"
            extra += bench_ham.rows(batch=int(ham_batch), image_size=int(ham_image_size),
                                    arch="resnet18" if tiny else "resnet50", steps=max(1, int(steps) // 2),
                                    warmup=min(int(warmup), 1), device=device, seed=int(seed), tiny=tiny)
        if lvmmed:  # LVM-Med: graph matching over the backbone (stand-in; --lvmmed_full adds ResNet-50 224², batch 64)
            import bench_lvmmed

            extra += bench_lvmmed.rows(batch=int(lvmmed_batch), image_size=int(lvmmed_image_size),
                                       graph_size=min(16, int(lvmmed_batch)), steps=max(1, int(steps) // 2),
                                       warmup=min(int(warmup), 1), device=device, seed=int(seed), full=bool(lvmmed_full))
        t_extra = time.perf_counter() - t0
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
    p, g = _med(times["plain"]), _med(times["guided"])
    pe, ge = _med(times["plain_explicit"]), _med(times["guided_explicit"])
    pf, gf = _med(times["plain"], 0), _med(times["guided"], 0)
    pb, gb = _med(times["plain"], 1), _med(times["guided"], 1)
    cfg = f"{SIZE_NAMES[size]}, batch {batch} ({max(1, batch // 2)} positive), {image_size}²"
    rows = [
        (f"**guided / plain step** ({cfg})", f"**{g / p:.2f}x**"),
        ("plain step (fused SDPA attention in every block), median (min–max)", f"{ms(p)} ({_spread(times['plain'])})"),
        ("guided step (EAFEM β 0.85 + KL k51, λ 1000; explicit attention in the last block only)",
         f"{ms(g)} ({_spread(times['guided'])})"),
        ("  forward+loss: plain / guided (ratio)", f"{ms(pf)} / {ms(gf)} ({gf / pf:.2f}x)"),
        ("  backward: plain / guided (ratio)", f"{ms(pb)} / {ms(gb)} ({gb / pb:.2f}x)"),
        ("  optimizer step: plain / guided", f"{ms(_med(times['plain'], 2))} / {ms(_med(times['guided'], 2))}"),
        ("plain step, explicit attention in every block", f"{ms(pe)} ({_spread(times['plain_explicit'])})"),
        ("guided step, explicit attention in every block", f"{ms(ge)} ({_spread(times['guided_explicit'])})"),
        ("guided (explicit everywhere) / plain (explicit everywhere)", f"{ge / pe:.2f}x"),
        ("guided (explicit everywhere) / plain (fused)", f"{ge / p:.2f}x"),
        ("fused-attention speed-up of the plain step (explicit / fused)", f"{pe / p:.2f}x"),
        (f"  guidance parts alone: blur k51 of {max(1, batch // 2)} masks (no grad)", ms(comp["blur"])),
        ("  guidance parts alone: EAFEM map + KL, forward+backward", ms(comp["map_kl"])),
        *[
            (f"**{name[len('method_'):]} / baseline step** (GAE relevance, gradients without create_graph)",
             f"**{_med(times[name]) / p:.2f}x** ({ms(_med(times[name]))})")
            for name in times if name.startswith("method_")
        ],
        (f"**store / NIfTI data throughput** ({data['n_slices']} slices, {data_cases} cases "
         f"{'x'.join(map(str, shape))} → {image_size}², .nii{'.gz' if compress else ''})",
         f"**{data['nifti_s'] / data['store_s']:.1f}x**"),
        ("prepared store (SliceDataset, float16 memory map)",
         f"{data['n_slices'] / data['store_s']:.0f} slices/s ({ms(data['store_s'])}/epoch)"),
        ("NIfTI re-read (NiftiScanReader: decode + min-max + bicubic resize)",
         f"{data['n_slices'] / data['nifti_s']:.0f} slices/s ({ms(data['nifti_s'])}/epoch)"),
        ("one-off: write twin / prepare store", f"{data['write_s']:.1f} s / {data['prepare_s']:.1f} s"),
        ("max \\|store − NIfTI\\| on a checked slice (float16 store)", f"{data['max_diff']:.1e}"),
        *extra,
    ]
    lines = [
        "| measurement | value |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        f"Medians of {steps} interleaved steps per variant after {warmup} warm-up rounds; data: median of "
        f"{max(1, data_epochs)} interleaved epochs. Machine: {_machine(dev)}; device {dev}; "
        f"torch {torch.__version__}, {threads} threads (torch default); Python {platform.python_version()}. "
        f"Wall time: steps {t_steps:.0f} s, data {t_data:.0f} s, explainers + MedViT + HAM {t_extra:.0f} s. "
        f"CPU utilisation during the timed steps "
        f"{_utilisation(times, threads):.0%} of {threads} threads (well below 100 % = other processes competed "
        f"for the cores and the timings are noisy); 1-min load average {load0:.2f} before, {load1:.2f} after.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        atomic_write_text(table, out)
    return None


if __name__ == "__main__":
    fire.Fire(main)
