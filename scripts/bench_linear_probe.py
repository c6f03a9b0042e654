#!/usr/bin/env python
"""Linear-probe epoch time with cached encoder features vs. without (issue 14, item 6).

Both variants train the same head of a frozen :class:`LVMMedClassifier` on the same images (a Brain
Tumor MRI-format twin written to a temporary folder) with Adam and cross-entropy:

* without the cache, every epoch reads and decodes the images and runs the frozen encoder again;
* with the cache (:class:`~custom_components.engines.feature_cache.CachedFeatureDataset`), the features
  are computed once (reported as the one-off cost) and an epoch is a pass of the head only.

Prints the median epoch times (ms) over ``--epochs`` epochs, their ratio, and after how many epochs
the one-off feature pass has paid for itself (one warm-up epoch of each variant is not counted).
Everything is measured in this one run::

    python scripts/bench_linear_probe.py [--arch resnet50] [--image_size 64] [--n_per_class 16]
        [--batch_size 16] [--epochs 3] [--threads 0] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def _epoch(head: torch.nn.Module, forward, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) * 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--n_per_class", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from custom_components.data.class_folders import brain_tumor_datalist
    from custom_components.data.image_folders import ImageFolderDataset
    from custom_components.data.synthetic import write_brain_tumor_twin
    from custom_components.engines.feature_cache import CachedFeatureDataset
    from custom_components.networks.lvmmed_classifier import LVMMedClassifier

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_brain_tumor_twin(Path(tmp) / "brain", n_per_class=(args.n_per_class, 1),
                                      size=args.image_size, seed=args.seed)  # fmt: skip
        entries = brain_tumor_datalist(root, val_fraction=0.0)["training"]
        images = ImageFolderDataset(entries, root, split="training", image_size=args.image_size,
                                    resize_mode="resize", label_dtype="long")  # fmt: skip
        net = LVMMedClassifier(num_classes=4, arch=args.arch, frozen=True).train()
        head = net.head
        optimizer = torch.optim.Adam(net.trainable_parameters(), lr=5e-4)

        image_loader = DataLoader(images, batch_size=args.batch_size, shuffle=True)
        without = [_epoch(head, net, image_loader, optimizer) for _ in range(args.epochs + 1)][1:]  # 1 warm-up

        start = time.perf_counter()
        cached = CachedFeatureDataset(net, images, Path(tmp) / "cache", "training", batch_size=args.batch_size)
        one_off = (time.perf_counter() - start) * 1000.0
        feature_loader = DataLoader(cached, batch_size=args.batch_size, shuffle=True)
        with_cache = [_epoch(head, head, feature_loader, optimizer) for _ in range(args.epochs + 1)][1:]

    t_without, t_with = statistics.median(without), statistics.median(with_cache)
    saved = t_without - t_with
    print(f"linear probe, {args.arch} at {args.image_size}², {len(images)} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.epochs} epochs")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| epoch without cache (encoder every epoch) | {t_without:.1f} ms |")
    print(f"| epoch with cached features (head only) | {t_with:.2f} ms |")
    print(f"| **speed-up (without / with)** | **{t_without / t_with:.0f}x** |")
    print(f"| one-off feature pass + cache write | {one_off:.1f} ms |")
    print(f"| epochs until the cache has paid for itself | {one_off / saved:.2f} |" if saved > 0 else
          "| epochs until the cache has paid for itself | never (no saving) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
