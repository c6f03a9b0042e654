"""Score stored explanation maps against ground truth: the ``evaluate_explanations.json`` workflow.

Spec ``explanations.md`` section 7. On the images with a non-empty ground-truth mask:

* ``pointing_game``: hit iff any pixel at the map's global maximum lies inside the mask;
* ``iou_top{k}`` for k in ``ks`` (5, 10, 20, 40): IoU of the rectangle around the top-k % pixels
  with the mask (the study's ``binarize_inter_map`` + ``binary_map_to_rect_mask``);
* ``energy_pointing_game``: fraction of the map's mass inside the mask (beyond the study).

On the images of the target class (annotated or not), with the network (beyond the study;
Petsiuk et al., RISE, BMVC 2018): ``deletion_auc`` (lower is better) and ``insertion_auc``
(higher is better) of the target-class probability while the most relevant pixels are replaced
by ``baseline`` (``"black"``: 0 in [0, 1] image space, as Chefer's perturbation test; ``"mean"``:
the normalisation mean, i.e. 0 after normalisation) in ``faithfulness_steps`` equal steps;
``faithfulness_steps = 0`` skips them.

With ``localization_threshold`` (HAM's binarisation, spec ``ham.md`` section 6: the min-maxed map
>= :data:`~custom_components.metrics.localization.MINMAX_THRESHOLD`): ``loc_iou`` / ``loc_ior``
per item (IoU and intersection over the predicted region of the binarised map with the mask) and,
per method, ``mtiou``, ``mtior``, ``tiou_<T>``, ``tior_<T>`` of
:func:`~custom_components.metrics.localization.localization_accuracy` (fractions of cases at or
above T per target class, then the mean over the classes).

**Per-item targets** (``index.json`` ``target == "per_item"``, e.g. HAM's (image, finding)
cases): every item is scored against its own target class and mask; deletion / insertion use the
index's ``activation`` (sigmoid for multi-label networks) on the positive cases (the image has the
finding); the summary adds ``per_target`` ({method: {target name: {"n", metric: mean}}}) and the
Markdown / ``explanation_metrics_per_target.csv`` list one row per target and method.

Ground truth: the masks stored by ``explain.json`` (from the datalist), or, when ``masks_dir`` /
``boxes_json`` is given (single-target runs), masks named like the images / boxes keyed by relative
image path, brought to the network input geometry exactly as the images are. Outputs in the run
folder (atomic): ``explanation_metrics.json`` (means per method, counts), ``explanation_metrics.md``
and ``explanation_scores.csv`` (one row per item and method).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_components.data.image_folders import ImageFolderDataset, _attach_masks
from custom_components.interpretability.writer import (
    EXPLANATIONS_DIR,
    PER_ITEM,
    input_normalization,
    item_is_positive,
    item_targets,
    load_network_weights,
)
from custom_components.io import InputDataError, atomic_save_json, atomic_write_text
from custom_components.metrics.localization import (
    TIOR_THRESHOLDS,
    TIOU_THRESHOLDS,
    binarize_maps,
    iou_ior,
    localization_accuracy,
)
from custom_components.metrics.map_quality import (
    deletion_insertion_auc,
    energy_pointing_game,
    pointing_game_hits,
    topk_box_iou,
)

__all__ = ["load_explanations", "score_explanations", "LOCALISATION_KS"]

LOCALISATION_KS = (5.0, 10.0, 20.0, 40.0)


def load_explanations(run_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(index, maps per method, images, masks) of a run folder, memory-mapped and checked against the index."""
    folder = Path(run_dir) / EXPLANATIONS_DIR
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise InputDataError(index_path, "no explanations here (run the explain workflow first)")
    try:
        index = json.loads(index_path.read_text())
        items, methods, size = index["items"], index["methods"], int(index["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputDataError(index_path, f"not a valid explanation index ({type(e).__name__}: {e})") from e

    def load(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        if not path.is_file():
            raise InputDataError(path, "file listed by index.json is missing")
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputDataError(path, f"cannot read array ({type(e).__name__}: {e})") from e
        if arr.shape != shape:
            raise InputDataError(path, f"shape {arr.shape} does not match index.json (expected {shape})")
        return arr

    n = len(items)
    maps = {m: load(folder / "maps" / f"{m}.npy", (n, size, size)) for m in methods}
    images = load(folder / "images.npy", (n, size, size, 3))
    masks = load(folder / "masks.npy", (n, size, size))
    return index, maps, images, masks


def _override_masks(index: dict, root: str | os.PathLike, masks_dir: Any, boxes_json: Any, geometry: dict) -> np.ndarray:
    """Ground truth from a masks folder / boxes JSON, in the network input geometry, (N, S, S) uint8."""
    root = Path(root)
    entries = [{"image": it["image"], "label": it["label"], "case": it["case"]} for it in index["items"]]
    _attach_masks(entries, root, masks_dir, boxes_json, None)
    annotated = [e for e in entries if "mask" in e or "boxes" in e]
    size = int(index["image_size"])
    out = np.zeros((len(entries), size, size), dtype=np.uint8)
    if not annotated:
        return out
    ds = ImageFolderDataset(annotated, root, image_size=size, normalize="none", always_mask=True, **geometry)
    position = {e["image"]: i for i, e in enumerate(entries)}
    for j in range(len(ds)):
        item = ds[j]
        out[position[annotated[j]["image"]]] = (item["mask"][0] > 0.5).numpy()
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score_explanations(
    run_dir: str | os.PathLike,
    ks: Sequence[float] = LOCALISATION_KS,
    network: torch.nn.Module | None = None,
    dataset: Any = None,
    checkpoint: str | os.PathLike | None = None,
    faithfulness_steps: int = 10,
    baseline: str = "black",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    masks_dir: str | os.PathLike | None = None,
    boxes_json: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    geometry: dict | None = None,
    progress: bool = True,
    print_table: bool = False,
    localization_threshold: float | None = None,
    tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
    tior_thresholds: Sequence[float] = TIOR_THRESHOLDS,
) -> dict:
    """Score every method of a run folder; writes and returns the summary.

    Args:
        run_dir: folder with ``explanations/`` (written by :func:`write_explanations`).
        ks: top-k % values of the IoU protocol (each in (0, 100)).
        network, dataset, checkpoint: the classifier, the dataset the maps were made from (same
            split and order; normalised network input) and its weights, for deletion/insertion.
            Without a network the faithfulness metrics are skipped.
        masks_dir, boxes_json: replace the stored ground truth (paths relative to ``dataset_dir``
            unless absolute); ``geometry``: ``resize_mode`` / ``resize_short`` of the images.
        print_table: also print the Markdown table (the bundle's ``evaluate_explanations.json``).
        localization_threshold: binarise each min-maxed map at this value for ``loc_iou`` /
            ``loc_ior`` and T(IoU) / T(IoR) (``None``: not computed); ``tiou_thresholds`` /
            ``tior_thresholds``: their T values.
    """
    for k in ks:
        if not 0.0 < float(k) < 100.0:
            raise ValueError(f"top-k % values must be in (0, 100), got {k}")
    if baseline not in ("black", "mean"):
        raise ValueError(f"baseline must be 'black' or 'mean', got {baseline!r}")
    index, maps, _, masks = load_explanations(run_dir)
    per_item = index["target"] == PER_ITEM
    targets = item_targets(index)
    items = index["items"]
    n = len(items)
    gt_source = "explain (datalist masks)"
    if masks_dir is not None or boxes_json is not None:
        if per_item:
            raise ValueError("masks_dir / boxes_json replace the ground truth of single-target runs only; "
                             "per-item targets keep the masks explain stored")
        if dataset_dir is None:
            raise ValueError("dataset_dir is needed to resolve masks_dir / boxes_json")
        masks = _override_masks(index, dataset_dir, masks_dir, boxes_json, geometry or {})
        gt_source = ", ".join(str(p) for p in (masks_dir, boxes_json) if p is not None)
    annotated = [i for i in range(n) if masks[i].any()]
    positives = [i for i in range(n) if item_is_positive(index, items[i])]
    metric_names = ["pointing_game", *[f"iou_top{float(k):g}" for k in ks], "energy_pointing_game"]
    if localization_threshold is not None:
        metric_names += ["loc_iou", "loc_ior"]
    per_image: dict[str, dict[str, list[float]]] = {m: {k: [math.nan] * n for k in metric_names} for m in maps}
    for method, arr in maps.items():
        for s in range(0, len(annotated), batch_size):
            idx = annotated[s:s + batch_size]
            m = torch.from_numpy(np.asarray(arr[idx], dtype=np.float32))
            g = torch.from_numpy(np.asarray(masks[idx]))
            scores = {"pointing_game": pointing_game_hits(m, g).float(), "energy_pointing_game": energy_pointing_game(m, g)}
            for k in ks:
                scores[f"iou_top{float(k):g}"] = topk_box_iou(m, g, float(k))
            if localization_threshold is not None:
                scores["loc_iou"], scores["loc_ior"] = iou_ior(binarize_maps(m, localization_threshold, True), g > 0)
            for name, vals in scores.items():
                for i, v in zip(idx, vals.tolist(), strict=True):
                    per_image[method][name][i] = v

    faithful = network is not None and dataset is not None and faithfulness_steps > 0 and positives
    if faithful:
        _faithfulness(index, targets, maps, positives, per_image, network, dataset, checkpoint, int(faithfulness_steps),
                      baseline, batch_size, torch.device(device), progress)
        metric_names += ["deletion_auc", "insertion_auc"]

    def mean_of(method: str, key: str, rows: Sequence[int]) -> float:
        return _mean([v for i in rows if not math.isnan(v := per_image[method][key][i])])

    names = [str(it.get("target_name", t)) for it, t in zip(items, targets, strict=True)] if per_item else [str(targets[0])] * n
    groups = sorted(set(zip(targets, names, strict=True)))  # target names in class order
    summary_keys = list(metric_names)
    metrics = {m: {k: mean_of(m, k, range(n)) for k in metric_names} for m in maps}
    localization = {}
    if localization_threshold is not None:
        class_of = {name: c for c, (_, name) in enumerate(groups)}
        for m in maps:
            rows = torch.tensor([[class_of[names[i]], per_image[m]["loc_iou"][i], per_image[m]["loc_ior"][i]]
                                 for i in annotated], dtype=torch.float64).reshape(-1, 3)
            localization[m] = localization_accuracy(rows, [name for _, name in groups], tiou_thresholds, tior_thresholds)
            r = localization[m]
            metrics[m].update({"mtiou": r["mtiou"], "mtior": r["mtior"], **{f"tiou_{t}": v for t, v in r["tiou"].items()},
                               **{f"tior_{t}": v for t, v in r["tior"].items()}})
        summary_keys += [k for k in metrics[next(iter(maps))] if k not in summary_keys]

    summary = {
        "dataset": index.get("dataset", ""),
        "init": index.get("init", ""),
        "split": index.get("split", ""),
        "target": index["target"] if per_item else int(index["target"]),
        "n_images": n,
        "n_annotated": len(annotated),
        "n_target_class": len(positives),
        "ground_truth": gt_source,
        "faithfulness": {"steps": int(faithfulness_steps), "baseline": baseline} if faithful else None,
        "metrics": metrics,
    }
    if localization_threshold is not None:
        summary["localization"] = {"threshold": float(localization_threshold), "normalize": "minmax", **{
            m: {"per_class": r["per_class"], "n_cases": r["n_cases"]} for m, r in localization.items()}}
    if per_item:
        summary["activation"] = index.get("activation", "sigmoid")
        summary["per_target"] = {m: {} for m in maps}
        for _, name in groups:
            rows = [i for i in range(n) if names[i] == name]
            for m in maps:
                entry = {"n": len(rows), "n_annotated": sum(1 for i in rows if masks[i].any()),
                         **{k: mean_of(m, k, rows) for k in metric_names}}
                if m in localization and name in localization[m]["per_class"]:
                    pc = localization[m]["per_class"][name]
                    entry.update({f"tiou_{t}": v for t, v in pc["tiou"].items()})
                    entry.update({f"tior_{t}": v for t, v in pc["tior"].items()})
                summary["per_target"][m][name] = entry
    out = Path(run_dir)
    atomic_save_json(summary, out / "explanation_metrics.json")
    table = _markdown(summary, summary_keys)
    atomic_write_text(table, out / "explanation_metrics.md")
    if print_table:
        print(table)
    buf = io.StringIO()
    w = csv.writer(buf)
    lead = ["image", "case", "target", "target_name", "label"] if per_item else ["image", "label"]
    w.writerow([*lead, "has_mask", "method", *metric_names])
    annotated_set = set(annotated)
    for m in maps:
        for i, it in enumerate(items):
            first = [it["image"], it["case"], targets[i], names[i], it["label"]] if per_item else [it["image"], it["label"]]
            w.writerow([*first, int(i in annotated_set), m,
                        *["" if math.isnan(per_image[m][k][i]) else f"{per_image[m][k][i]:.6f}" for k in metric_names]])
    atomic_write_text(buf.getvalue(), out / "explanation_scores.csv")
    if per_item:
        atomic_write_text(_per_target_csv(summary), out / "explanation_metrics_per_target.csv")
    return summary


def _per_target_csv(summary: dict) -> str:
    per_target = summary["per_target"]
    keys: list[str] = []
    for rows in per_target.values():
        for entry in rows.values():
            keys += [k for k in entry if k not in keys]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["target_name", "method", *keys])
    for name in next(iter(per_target.values())):
        for m, rows in per_target.items():
            entry = rows[name]
            w.writerow([name, m, *[_csv_value(entry.get(k)) for k in keys]])
    return buf.getvalue()


def _csv_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v) if isinstance(v, int) else f"{v:.6f}"


def _faithfulness(index, targets, maps, positives, per_image, network, dataset, checkpoint, steps, baseline, batch_size,
                  device, progress) -> None:
    """Deletion / insertion AUC of each item's target class on the positive items, in place into ``per_image``."""
    items = index["items"]
    if len(dataset) != len(items):
        raise InputDataError(index.get("split", "dataset"), f"dataset has {len(dataset)} items but the explanations "
                                                            f"{len(items)}: explain and evaluate use different data")
    if checkpoint is not None:
        load_network_weights(network, checkpoint)
    network = network.to(device)
    was_training = network.training
    network.eval()
    for method in maps:
        for mode in ("deletion", "insertion"):
            per_image[method][f"{mode}_auc"] = [math.nan] * len(items)
    # indexes written before "activation" existed: the study's softmax (MONAI-style auto choice)
    activation = index.get("activation", "auto")
    base = 0.0
    if baseline == "black":
        mean, std = input_normalization(dataset)
        base = ((0.0 - mean) / std).view(1, 3, 1, 1).to(device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(positives), desc="deletion/insertion", unit="img")
    try:
        for s in range(0, len(positives), batch_size):
            idx = positives[s:s + batch_size]
            batch = [dataset[i] for i in idx]
            for i, it in zip(idx, batch, strict=True):
                same = it["image_path"] == items[i]["image"] and int(it.get("target", targets[i])) == targets[i]
                if not same:
                    raise InputDataError(it["image_path"], f"item {i} is {items[i]['image']!r} (target {targets[i]}) in "
                                                           "the explanations: explain and evaluate use different data")
            images = torch.stack([torch.as_tensor(it["image"]) for it in batch]).to(device)
            target = torch.tensor([targets[i] for i in idx], dtype=torch.long, device=device)
            with torch.no_grad():
                for method, arr in maps.items():
                    m = torch.from_numpy(np.asarray(arr[idx], dtype=np.float32)).to(device)
                    for mode in ("deletion", "insertion"):
                        auc = deletion_insertion_auc(network, images, m, target=target, steps=steps,
                                                     baseline=base, mode=mode, activation=activation)
                        for i, v in zip(idx, auc.tolist(), strict=True):
                            per_image[method][f"{mode}_auc"][i] = v
            if bar is not None:
                bar.update(len(idx))
    finally:
        network.train(was_training)
        if bar is not None:
            bar.close()


def _cell(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (str(v) if isinstance(v, int) else f"{v:.4f}")


def _markdown(summary: dict, metric_names: Sequence[str]) -> str:
    per_item = "per_target" in summary
    target = "per item (each case's finding)" if per_item else f"target class {summary['target']}"
    unit = "cases" if per_item else "images"
    lines = [
        f"# Explanation quality: {summary['dataset']} / {summary['init']} ({summary['split']} split, {target})",
        "",
        f"{summary['n_annotated']} annotated of {summary['n_images']} {unit} (ground truth: {summary['ground_truth']}); "
        f"deletion/insertion on the {summary['n_target_class']} target-class {unit}.",
        "",
        "| method | " + " | ".join(metric_names) + " |",
        "|---|" + "---|" * len(metric_names),
    ]
    for m, vals in summary["metrics"].items():
        lines.append(f"| {m} | " + " | ".join(_cell(vals[k]) for k in metric_names) + " |")
    if "localization" in summary:
        lines += ["", f"loc_iou / loc_ior: the min-maxed map >= {summary['localization']['threshold']:.4f} against the "
                      "mask; tiou_T / tior_T: fraction of a target's cases with IoU / IoR >= T, mean over targets."]
    if per_item:
        keys = ["n", *[k for k in metric_names if k not in ("mtiou", "mtior")]]
        lines += ["", "## Per target", "", "| target | method | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for name in next(iter(summary["per_target"].values())):
            for m, rows in summary["per_target"].items():
                lines.append(f"| {name} | {m} | " + " | ".join(_cell(rows[name].get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"
