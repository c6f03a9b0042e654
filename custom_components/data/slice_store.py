"""Slice-level dataset over a prepared store and a scan-chunk batch sampler.

The store is written by :mod:`custom_components.data.store` (``<root>/<case>/{image,mask}.npy`` +
``meta.json``; ``scripts/prepare_brats20.py``, ``scripts/prepare_lits17.py``). LGM-ViT (spec section 6) trains on
batches of *consecutive* slices of one scan (32 slices per batch); :class:`ScanChunkBatchSampler` reproduces that
batching.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from custom_components.data.splits import empty_set_hint
from custom_components.io import InputDataError

__all__ = ["SliceDataset", "ScanChunkBatchSampler"]


class SliceDataset(Dataset):
    """All slices of all cases of a prepared store, one 2-D item per slice.

    Args:
        datalist: path of a datalist JSON (then ``split`` picks the list) or a list of entries
            ``{"case": ID, "image": "ID/image.npy", "mask": "ID/mask.npy", ...}``.
        root: store folder the entry paths are relative to; defaults to the datalist's folder.
        split: key of the datalist JSON (``training``, ``validation``, ``test``, ``unsplit``).
        transform: callable applied to each item dict.

    Items: ``{"image": (3, H, W) float32, "mask": (1, H, W) float32 0/1, "label": (1,) float32,
    "case": str, "slice": int}``. The label is the prepared slice label (tumour present at native
    resolution); it equals ``mask.any()`` whenever the store's size is >= the scan's in-plane
    size (e.g. 240 -> 256 of the paper), because nearest upsampling keeps every tumour pixel.
    Arrays are opened lazily with ``np.load(mmap_mode="r")`` and cached per process.
    """

    def __init__(
        self,
        datalist: str | os.PathLike | Sequence[dict],
        root: str | os.PathLike | None = None,
        split: str | None = None,
        transform: Callable[[dict], Any] | None = None,
    ):
        if isinstance(datalist, (str, os.PathLike)):
            path = Path(datalist)
            if not path.is_file():
                raise InputDataError(path, "datalist file does not exist")
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise InputDataError(path, f"cannot read datalist JSON ({type(e).__name__}: {e})") from e
            if split is None:
                raise InputDataError(path, f"choose a split (one of {sorted(data)})")
            if split not in data:
                raise InputDataError(path, f"no split {split!r} (has {sorted(data)})")
            entries = data[split]
            root = Path(root) if root is not None else path.parent
            source = f"{path} [{split}]"
            if not entries:
                # the usual cause: only part of a dataset is present, so say what to pass
                hint = empty_set_hint(root, data)
                raise InputDataError(source, f"empty datalist: set {split!r} has no case ({hint})")
        else:
            entries = list(datalist)
            if root is None:
                raise InputDataError("datalist", "root is required when the datalist is given as a list")
            root = Path(root)
            source = str(root)
        if not entries:
            raise InputDataError(source, "empty datalist: no cases")

        self.root = root
        self.transform = transform
        self._cases: list[str] = []
        self._files: list[tuple[Path, Path]] = []
        starts, labels = [0], []
        for entry in entries:
            case = entry["case"] if isinstance(entry, dict) else str(entry)
            entry = entry if isinstance(entry, dict) else {}
            meta_path = root / case / "meta.json"
            if not meta_path.is_file():
                raise InputDataError(
                    meta_path, f"case {case} is not prepared; run the bundle (prepare_data) or scripts/prepare_<dataset>.py"
                )
            try:
                meta = json.loads(meta_path.read_text())
                n, case_labels = int(meta["n_slices"]), meta["labels"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InputDataError(meta_path, f"case {case}: bad meta.json ({type(e).__name__}: {e})") from e
            if len(case_labels) != n:
                raise InputDataError(meta_path, f"case {case}: {len(case_labels)} labels for {n} slices")
            self._cases.append(case)
            self._files.append(
                (root / entry.get("image", f"{case}/image.npy"), root / entry.get("mask", f"{case}/mask.npy"))
            )
            labels.extend(case_labels)
            starts.append(starts[-1] + n)
        self._starts = starts
        self._labels = np.asarray(labels, dtype=np.uint8)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # the memory maps are per process: drop them when pickled (DataLoader workers, spawn)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def case_ids(self) -> list[str]:
        return list(self._cases)

    @property
    def case_slice_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` dataset indices of each case, in datalist order."""
        return list(zip(self._starts[:-1], self._starts[1:], strict=True))

    @property
    def labels(self) -> np.ndarray:
        """Slice labels (0/1) of the whole dataset, from ``meta.json`` (no image reads)."""
        return self._labels.copy()

    def _open(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(c)
        if arrays is None:
            image_path, mask_path = self._files[c]
            try:
                image = np.load(image_path, mmap_mode="r")
                mask = np.load(mask_path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:  # missing, corrupt or truncated .npy
                raise InputDataError(image_path.parent, f"case {self._cases[c]}: cannot open store ({e})") from e
            n = self._starts[c + 1] - self._starts[c]
            if image.ndim != 4 or image.shape[0] != n or mask.shape != (n, *image.shape[2:]):
                raise InputDataError(
                    image_path.parent,
                    f"case {self._cases[c]}: image {image.shape} / mask {mask.shape} do not match {n} slices",
                )
            arrays = self._arrays[c] = (image, mask)
        return arrays

    def __getitem__(self, i: int) -> Any:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} slices")
        c = bisect.bisect_right(self._starts, i) - 1
        s = i - self._starts[c]
        image, mask = self._open(c)
        item = {
            "image": torch.from_numpy(np.asarray(image[s], dtype=np.float32).copy()),
            "mask": torch.from_numpy(np.asarray(mask[s], dtype=np.float32)[None].copy()),
            "label": torch.tensor([float(self._labels[i])], dtype=torch.float32),
            "case": self._cases[c],
            "slice": int(s),
        }
        return self.transform(item) if self.transform is not None else item


class ScanChunkBatchSampler(Sampler[list[int]]):
    """Batches of consecutive slices of one scan (LGM-ViT batching, spec section 6).

    Each scan's index range is cut into consecutive chunks of ``chunk_size`` (155 slices ->
    32, 32, 32, 32, 27). With ``shuffle`` the scan order is permuted each epoch (deterministic
    from ``seed + epoch``; call :meth:`set_epoch`); chunks within a scan stay in order.
    With ``num_replicas > 1`` rank ``r`` takes scans ``r::num_replicas`` of the permuted order.
    Ranks may then get different numbers of batches (scans are not padded or repeated), so
    distributed training must not rely on equal batch counts per rank.

    ``last_batch_min_ratio`` (training only; LiTS17 uses 0.7, spec section 6): for a scan of
    ``n`` slices with ``r = n % chunk_size``, if ``0 < r < last_batch_min_ratio * chunk_size``
    a random contiguous run of ``n - r`` slices is used instead of the whole scan (a new run
    each epoch, deterministic from ``seed``, ``epoch`` and the scan), so no short last batch
    remains (n = 100, chunk 32 -> 96 slices; n = 120 -> r = 24 >= 22.4, all slices). Scans
    shorter than one chunk are kept whole. ``None`` (default): every slice of every scan.
    """

    def __init__(
        self,
        case_slice_ranges: Sequence[tuple[int, int]],
        chunk_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        last_batch_min_ratio: float | None = None,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad rank {rank} for num_replicas {num_replicas}")
        if last_batch_min_ratio is not None and not 0.0 <= last_batch_min_ratio <= 1.0:
            raise ValueError(f"last_batch_min_ratio must be in [0, 1] or None, got {last_batch_min_ratio}")
        self.last_batch_min_ratio = last_batch_min_ratio
        self.ranges = [(int(a), int(b)) for a, b in case_slice_ranges]
        self.chunk_size = int(chunk_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _scans(self) -> list[int]:
        order = list(range(len(self.ranges)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.ranges), generator=g).tolist()
        return order[self.rank :: self.num_replicas]

    def _crop(self, scan: int) -> int:
        """Slices dropped from ``scan`` by ``last_batch_min_ratio`` (0 = whole scan)."""
        if self.last_batch_min_ratio is None:
            return 0
        start, stop = self.ranges[scan]
        n = stop - start
        r = n % self.chunk_size
        return r if n > r and 0 < r < self.last_batch_min_ratio * self.chunk_size else 0

    def _range(self, scan: int) -> tuple[int, int]:
        start, stop = self.ranges[scan]
        r = self._crop(scan)
        if r:
            # one offset per (seed, epoch, scan): independent of the scan order and the rank
            offset = int(np.random.default_rng([self.seed, self.epoch, scan]).integers(0, r + 1))
            start, stop = start + offset, stop - (r - offset)
        return start, stop

    def _n_chunks(self, scan: int) -> int:
        start, stop = self.ranges[scan]
        return -(-(stop - start - self._crop(scan)) // self.chunk_size)

    def __iter__(self) -> Iterator[list[int]]:
        for scan in self._scans():
            start, stop = self._range(scan)
            for a in range(start, stop, self.chunk_size):
                yield list(range(a, min(a + self.chunk_size, stop)))

    def __len__(self) -> int:
        return sum(self._n_chunks(s) for s in self._scans())
