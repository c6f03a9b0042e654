"""MedMNIST (v2 / v3, 2-D and 3-D) ``.npz`` reading, the dataset table and the official metrics.

Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image
classification", Scientific Data 10:41, 2023. The table mirrors the official ``medmnist/info.py``
(task, label count, channels, split sizes); the metrics follow ``medmnist/evaluator.py``
(``getAUC`` / ``getACC``), see ``specs/medvit.md`` section 4.

Official ``.npz`` layout: ``{train,val,test}_images`` uint8 of shape (N, H, W) (grey 2-D),
(N, H, W, 3) (RGB 2-D) or (N, D, H, W) (3-D), and ``{train,val,test}_labels`` of shape (N, 1)
(binary / multi-class / ordinal) or (N, C) (multi-label ChestMNIST). MedMNIST+ files
(``<name>_64.npz``, ``_128``, ``_224``) share the layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from custom_components.io import InputDataError

__all__ = [
    "MEDMNIST_INFO",
    "MedMNISTDataset",
    "medmnist_metrics",
    "auc_left_out",
    "roc_auc",
    "infer_medmnist_name",
    "infer_medmnist_size",
    "resolve_medmnist_name",
    "TASKS",
]

TASKS = ("binary", "multi-class", "multi-label", "ordinal-regression")
# official task strings of medmnist/info.py -> the short names used here
_TASK_ALIASES = {
    "binary-class": "binary",
    "binary": "binary",
    "multi-class": "multi-class",
    "multi-label, binary-class": "multi-label",
    "multi-label": "multi-label",
    "ordinal-regression": "ordinal-regression",
}


def _info(task: str, n_classes: int, channels: int, dim: int, splits: tuple[int, int, int], official_task: str) -> dict[str, Any]:
    return {
        "task": task,
        "official_task": official_task,
        "n_classes": n_classes,
        "n_channels": channels,
        "dim": dim,
        "n_samples": {"train": splits[0], "val": splits[1], "test": splits[2]},
    }


#: Every MedMNIST dataset: task (short name), ``official_task`` (the string of ``medmnist/info.py``),
#: ``n_classes`` (labels per sample for multi-label), ``n_channels``, ``dim`` (2 or 3) and official split sizes.
MEDMNIST_INFO: dict[str, dict[str, Any]] = {
    "pathmnist": _info("multi-class", 9, 3, 2, (89996, 10004, 7180), "multi-class"),
    "chestmnist": _info("multi-label", 14, 1, 2, (78468, 11219, 22433), "multi-label, binary-class"),
    "dermamnist": _info("multi-class", 7, 3, 2, (7007, 1003, 2005), "multi-class"),
    "octmnist": _info("multi-class", 4, 1, 2, (97477, 10832, 1000), "multi-class"),
    "pneumoniamnist": _info("binary", 2, 1, 2, (4708, 524, 624), "binary-class"),
    "retinamnist": _info("ordinal-regression", 5, 3, 2, (1080, 120, 400), "ordinal-regression"),
    "breastmnist": _info("binary", 2, 1, 2, (546, 78, 156), "binary-class"),
    "bloodmnist": _info("multi-class", 8, 3, 2, (11959, 1712, 3421), "multi-class"),
    "tissuemnist": _info("multi-class", 8, 1, 2, (165466, 23640, 47280), "multi-class"),
    "organamnist": _info("multi-class", 11, 1, 2, (34581, 6491, 17778), "multi-class"),
    "organcmnist": _info("multi-class", 11, 1, 2, (13000, 2392, 8268), "multi-class"),
    "organsmnist": _info("multi-class", 11, 1, 2, (13940, 2452, 8829), "multi-class"),
    "organmnist3d": _info("multi-class", 11, 1, 3, (971, 161, 610), "multi-class"),
    "nodulemnist3d": _info("binary", 2, 1, 3, (1158, 165, 310), "binary-class"),
    "adrenalmnist3d": _info("binary", 2, 1, 3, (1188, 98, 298), "binary-class"),
    "fracturemnist3d": _info("multi-class", 3, 1, 3, (1027, 103, 240), "multi-class"),
    "vesselmnist3d": _info("binary", 2, 1, 3, (1335, 191, 382), "binary-class"),
    "synapsemnist3d": _info("binary", 2, 1, 3, (1230, 177, 352), "binary-class"),
}

SPLITS = ("train", "val", "test")
# official file names: <name>.npz (28 px, MedMNIST v2) or <name>_<side>.npz (MedMNIST+)
_NAME_RE = re.compile(r"^(?P<name>.+?)(?:_(?P<size>28|64|128|224))?(?:\.npz)?$")


def _parse_name(path: str | os.PathLike) -> tuple[str, int] | None:
    m = _NAME_RE.match(Path(path).name.lower())
    if m is None or m.group("name") not in MEDMNIST_INFO:
        return None
    return m.group("name"), int(m.group("size") or 28)


def infer_medmnist_name(path: str | os.PathLike) -> str | None:
    """``breastmnist.npz`` / ``breastmnist_224.npz`` / ``OrganMNIST3D_64.npz`` -> the table key, else None."""
    parsed = _parse_name(path)
    return parsed[0] if parsed else None


def infer_medmnist_size(path: str | os.PathLike) -> int | None:
    """Image side an official file name promises: ``breastmnist_224.npz`` -> 224, ``breastmnist.npz`` -> 28.

    ``None`` for a name that is not an official MedMNIST file name (a custom name says nothing).
    """
    parsed = _parse_name(path)
    return parsed[1] if parsed else None


def resolve_medmnist_name(npz_path: str | os.PathLike, dataset: str | None = None, dim: int | None = None) -> str:
    """The :data:`MEDMNIST_INFO` key whose task table applies to ``npz_path``.

    ``dataset`` (the bundles' ``--data_flag``) wins when given, so a file of any name can be read;
    without it the official file name decides. Raises :class:`InputDataError` naming the file
    when the name says nothing and no dataset is given, when ``dataset`` is unknown or of another
    dimensionality than ``dim`` (2 or 3), and when an official file name names another dataset
    than ``dataset`` (almost certainly a wrong ``--data_flag`` or ``--npz_path``). Reads no file.
    """
    from_name = infer_medmnist_name(npz_path)
    names = sorted(k for k, v in MEDMNIST_INFO.items() if dim is None or v["dim"] == dim)
    if dataset:
        name = str(dataset).lower()
        if name not in MEDMNIST_INFO:
            raise InputDataError(npz_path, f"unknown MedMNIST dataset {dataset!r} (--data_flag): expected one of {names}")
        if from_name is not None and from_name != name:
            raise InputDataError(
                npz_path, f"the file name is that of {from_name} but the dataset is {name}: pass --data_flag {from_name}"
                          f" (or rename the file if it really holds {name})",
            )
    elif from_name is not None:
        name = from_name
    else:
        raise InputDataError(
            npz_path, f"unknown MedMNIST dataset: the file name is not an official MedMNIST name, so pass --data_flag"
                      f" (name= in Python) with one of {names}",
        )
    if dim is not None and MEDMNIST_INFO[name]["dim"] != dim:
        raise InputDataError(npz_path, f"{name} is a {MEDMNIST_INFO[name]['dim']}-D MedMNIST dataset; this reader takes"
                                       f" the {dim}-D ones: {names}")
    return name


class MedMNISTDataset(Dataset):
    """One split of a MedMNIST ``.npz`` file.

    Items are ``{"image": float32 tensor in [0, 1], "label": tensor}``: images (C, H, W) for 2-D
    (C = 1 grey, 3 RGB) and (1, D, H, W) for 3-D; labels a 0-d int64 tensor (class index) for
    binary / multi-class / ordinal tasks and a float32 (C,) 0/1 vector for multi-label. ``transform``
    (optional) is applied to the whole dict. ``name`` selects the :data:`MEDMNIST_INFO` row (default:
    inferred from the official file name; required for any other file name, see
    :func:`resolve_medmnist_name`). ``size`` (optional, the bundles' ``npz_size``) is the image side
    the caller expects.

    Validation errors raise :class:`~custom_components.io.InputDataError` naming the file and the
    key: unreadable file, missing or empty split, wrong dimensionality or channels, images that are
    not square (2-D) / cubic (3-D), a side other than the one the official file name promises
    (``breastmnist_224.npz``: 224; ``breastmnist.npz``: 28) or than ``size``, non-uint8 images,
    image/label length mismatch, labels out of range. Nothing is resized here, so a wrong shape
    stops the run instead of being silently interpolated by the bundle's ``Resized``.
    """

    def __init__(self, npz_path: str | os.PathLike, split: str = "train",
                 transform: Callable[[dict[str, Any]], Any] | None = None, name: str | None = None,
                 size: int | None = None):
        self.path = Path(npz_path)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.transform = transform
        self.size = int(size) if size is not None else None
        self.name = resolve_medmnist_name(self.path, name)
        self.info = MEDMNIST_INFO[self.name]
        self.task: str = self.info["task"]
        self.images, self.labels = self._load()

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.path.is_file():
            raise InputDataError(self.path, "file not found")
        img_key, lab_key = f"{self.split}_images", f"{self.split}_labels"
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                keys = set(npz.files)
                for key in (img_key, lab_key):
                    if key not in keys:
                        raise InputDataError(self.path, f"no {self.split!r} split: missing key {key!r}"
                                                        f" (the file has {sorted(keys)})")
                images = npz[img_key]
                labels = npz[lab_key]
        except InputDataError:
            raise
        except Exception as e:  # zip / format errors
            raise InputDataError(self.path, f"cannot read as .npz: {e}") from e

        info = self.info
        dim, channels = info["dim"], info["n_channels"]
        if images.dtype != np.uint8:
            detail = ""
            if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
                detail = " holding NaN/inf values"
            raise InputDataError(self.path, f"key {img_key!r}: expected uint8 images (0..255), got {images.dtype}{detail}")
        if dim == 2:
            ok = (images.ndim == 3 and channels == 1) or (images.ndim == 4 and images.shape[-1] == channels == 3)
            expected = "(N, H, W)" if channels == 1 else "(N, H, W, 3)"
        else:
            ok = images.ndim == 4
            expected = "(N, D, H, W)"
        if not ok:
            raise InputDataError(self.path, f"key {img_key!r}: expected {self.name} images {expected}, got shape {images.shape}")
        self._check_side(img_key, images.shape[1:1 + dim])

        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.ndim != 2:
            raise InputDataError(self.path, f"key {lab_key!r}: expected labels (N, 1) or (N, C), got shape {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise InputDataError(
                self.path, f"keys {img_key!r}/{lab_key!r}: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if not np.issubdtype(labels.dtype, np.integer) and not np.all(labels == np.round(labels)):
            raise InputDataError(self.path, f"key {lab_key!r}: labels must be integers, got {labels.dtype}")
        n = info["n_classes"]
        if self.task == "multi-label":
            if labels.shape[1] != n:
                raise InputDataError(
                    self.path, f"key {lab_key!r}: expected {n} label columns for {self.name}, got {labels.shape[1]}"
                )
            bad = ~np.isin(labels, (0, 1))
            if bad.any():
                raise InputDataError(self.path, f"key {lab_key!r}: multi-label values must be 0/1, found {labels[bad][0]}")
        else:
            if labels.shape[1] != 1:
                raise InputDataError(self.path, f"key {lab_key!r}: expected labels (N, 1), got shape {labels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= n):
                raise InputDataError(
                    self.path,
                    f"key {lab_key!r}: labels out of range [0, {n - 1}] for {self.name} (found {labels.min()}..{labels.max()})",
                )
        if images.shape[0] == 0:
            # an empty split would only fail later, inside the sampler or the metrics, with a traceback
            raise InputDataError(self.path, f"the {self.split!r} split is empty ({img_key!r} has shape {images.shape})")
        return images, labels.astype(np.int64)

    def _check_side(self, img_key: str, spatial: tuple[int, ...]) -> None:
        """Square / cubic images of the side the file name (and ``size``) promise."""
        shown = " x ".join(str(v) for v in spatial)
        if len(set(spatial)) != 1:
            kind = "square" if len(spatial) == 2 else "cubic"
            raise InputDataError(self.path, f"key {img_key!r}: {self.name} images must be {kind}, got {shown}")
        side = spatial[0]
        from_name = infer_medmnist_size(self.path)
        if from_name is not None and side != from_name:
            official = f"{self.name}.npz" if side == 28 else f"{self.name}_{side}.npz"
            raise InputDataError(self.path, f"key {img_key!r}: images are {shown} but the file name promises {from_name}"
                                            f" (a {side}-pixel file is named {official})")
        if self.size is not None and side != self.size:
            raise InputDataError(self.path, f"key {img_key!r}: images are {shown} but {self.size} was expected:"
                                            f" pass --npz_size {side} (size= in Python)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Any:
        img = torch.from_numpy(np.ascontiguousarray(self.images[index])).float().div_(255.0)
        if self.info["dim"] == 2 and img.ndim == 3:  # (H, W, 3) -> (3, H, W)
            img = img.permute(2, 0, 1).contiguous()
        else:  # (H, W) or (D, H, W) -> add the channel axis
            img = img.unsqueeze(0)
        lab = self.labels[index]
        if self.task == "multi-label":
            label = torch.from_numpy(lab.astype(np.float32))
        else:
            label = torch.tensor(int(lab[0]), dtype=torch.long)
        item = {"image": img, "label": label}
        return self.transform(item) if self.transform is not None else item

    def class_counts(self) -> np.ndarray:
        """Samples per class (single-label) or positives per label (multi-label)."""
        if self.task == "multi-label":
            return self.labels.sum(axis=0)
        return np.bincount(self.labels[:, 0], minlength=self.info["n_classes"])


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Binary ROC-AUC via the Mann-Whitney rank statistic (ties get average ranks); NaN if one class is absent."""
    y_true = np.asarray(y_true).ravel().astype(bool)
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(y_score, kind="mergesort")
    sorted_scores = y_score[order]
    ranks = np.empty(y_score.size, dtype=np.float64)
    # average ranks (1-based) over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [y_score.size]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_left_out(task: str, labels: Any, n_columns: int) -> dict[int, str]:
    """Score columns whose ROC-AUC :func:`medmnist_metrics` cannot define, with the reason.

    ``{column: "absent" | "present in every sample"}``: a multi-class / ordinal class with no sample
    (or that is every sample), a multi-label label that is never / always positive. For binary
    tasks the one AUC is undefined when either class is missing (key 1 = the positive class).
    Such columns are left out of the mean AUC (NaN when none is left); the ignite metric
    :class:`custom_components.metrics.medmnist_metrics.MedMNISTAUC` reports them.
    """
    task = _TASK_ALIASES[task]
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if task == "multi-label":
        pos = (y.reshape(y.shape[0], -1) > 0.5).sum(axis=0)
        n = y.shape[0]
        return {int(c): ("absent" if pos[c] == 0 else "present in every sample") for c in range(pos.size) if pos[c] in (0, n)}
    y = y.reshape(-1).astype(np.int64)
    counts = np.bincount(y[(y >= 0) & (y < max(n_columns, 2))], minlength=max(n_columns, 2))
    if task == "binary":
        if counts[0] and counts[1]:
            return {}
        return {1: "absent" if counts[1] == 0 else "present in every sample"}
    return {int(c): ("absent" if counts[c] == 0 else "present in every sample")
            for c in range(n_columns) if counts[c] in (0, y.size)}


def medmnist_metrics(task: str, scores: Any, labels: Any, threshold: float = 0.5) -> dict[str, float]:
    """ACC and AUC with the official MedMNIST semantics (``medmnist/evaluator.py``).

    ``scores`` are probabilities (softmax for single-label, sigmoid for multi-label) of shape
    (N, C); for binary tasks (N,) or (N, 2) (the last column is the positive class). ``labels``
    are (N,) / (N, 1) class indices or (N, C) 0/1 for multi-label. ``task`` is a short name of
    :data:`TASKS` or an official task string.

    * multi-label: AUC = mean per-label ROC-AUC; ACC = mean per-label accuracy of ``score > threshold``.
    * binary: AUC of the last-column score; ACC of ``score > threshold`` on it.
    * multi-class and ordinal-regression: AUC = mean one-vs-rest ROC-AUC over the score columns;
      ACC = argmax accuracy.

    Deviation: a label/class with only one outcome present gets NaN and is left out of the mean
    (the official code raises); AUC is NaN if no column is defined. :func:`auc_left_out` names
    those columns; the ignite metric warns and records them for the report.
    """
    if task not in _TASK_ALIASES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_TASK_ALIASES)}")
    task = _TASK_ALIASES[task]
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels disagree on N: {s.shape} vs {y.shape}")

    def _mean(values: list[float]) -> float:
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else float("nan")

    if task == "multi-label":
        if s.ndim != 2 or y.shape != s.shape:
            raise ValueError(f"multi-label needs scores and labels of the same (N, C) shape, got {s.shape} and {y.shape}")
        pred = s > threshold
        acc = float(np.mean([(pred[:, i] == (y[:, i] > 0.5)).mean() for i in range(s.shape[1])]))
        auc = _mean([roc_auc(y[:, i] > 0.5, s[:, i]) for i in range(s.shape[1])])
        return {"ACC": acc, "AUC": auc}
    y = y.reshape(-1).astype(np.int64)
    if task == "binary":
        if s.ndim == 2:
            s = s[:, -1]
        if s.ndim != 1:
            raise ValueError(f"binary scores must be (N,) or (N, 2), got {s.shape}")
        return {"ACC": float(((s > threshold).astype(np.int64) == y).mean()), "AUC": roc_auc(y == 1, s)}
    if s.ndim != 2:
        raise ValueError(f"{task} scores must be (N, C), got {s.shape}")
    acc = float((s.argmax(axis=1) == y).mean())
    auc = _mean([roc_auc(y == i, s[:, i]) for i in range(s.shape[1])])
    return {"ACC": acc, "AUC": auc}
