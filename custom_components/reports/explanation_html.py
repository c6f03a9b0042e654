"""A static, offline HTML report of the attention-map interpretability study (spec sections 7-8).

Input: one run folder per initialisation (``random``, ``sup``, ``dino``, ``mae`` or any name), as the
bundles' explain / evaluate workflows write them::

    <run>/explanations/index.json        {"dataset", "init", "target", "image_size", "split",
                                          "methods": [...], "items": [{"index", "image", "case",
                                          "label", "prob", "pred", "has_mask"}, ...]}
    <run>/explanations/images.npy        uint8 (N, S, S, 3) network input crop, de-normalised
    <run>/explanations/masks.npy         uint8 (N, S, S) 0/1 ground truth (zeros without a mask)
    <run>/explanations/maps/<method>.npy float16 (N, S, S) in [0, 1], one per listed method
    <run>/explanation_metrics.json       optional: {"n_annotated", "metrics": {method: {key: value}}}

Multi-label runs with per-item targets (``"target": "per_item"``; items with ``target`` and
``target_name``, e.g. HAM's (image, finding) cases) are shown the same way: an example is one case,
matched across runs by image and finding (:func:`item_key`), its caption names the finding and the
ground-truth panel outlines that finding's boxes.

Output: one self-contained HTML file (images as base64 JPEG or PNG data URIs, inline CSS and a small inline
script, a Content-Security-Policy that forbids any network access) with a header, the metric table
(one row per initialisation and method, sortable by any column, best value per metric highlighted)
and one grid of examples per initialisation: the same images in every grid, matched by their
``image`` key, annotated positives first.

The page's script also supports two URL fragments, used by the headless-browser test and handy for
sharing a view: ``#sort=<column>:<asc|desc>`` and ``#click=<column>,<column>,...`` (clicks the
headers in turn). After loading it sets ``data-images-loaded`` / ``data-images-total`` /
``data-js-errors`` / ``data-sorted`` on the ``<html>`` element.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from custom_components.io import InputDataError, atomic_write_text

__all__ = [
    "ExplanationRun",
    "INIT_ORDER",
    "colormap_lut",
    "discover_runs",
    "heatmap_overlay",
    "IMAGE_FORMATS",
    "image_data_uri",
    "item_key",
    "load_run",
    "mask_overlay",
    "select_examples",
    "write_explanation_report",
]

# Conventional order of the study's initialisations; other run names follow, sorted.
INIT_ORDER: tuple[str, ...] = ("random", "sup", "dino", "mae")
# Metric keys containing one of these words are better when smaller (deletion: the model's score
# should drop fast when the most relevant pixels are removed).
LOWER_IS_BETTER_WORDS: tuple[str, ...] = ("deletion",)
DISPLAY_PX = 144  # on-screen size of every panel; the images keep the native resolution
# Panel encodings: JPEG at quality 90 is ~6x smaller than PNG on radiograph overlays (7 vs 44 KB per
# 224 px panel) with no visible change; PNG is kept for lossless figures.
IMAGE_FORMATS: dict[str, dict] = {"jpeg": {"format": "JPEG", "quality": 90}, "png": {"format": "PNG"}}

# Control points (position, r, g, b) of a turbo-like colormap: dark blue -> cyan -> green ->
# yellow -> red. Written for this report; interpolated linearly into a 256-entry table.
_COLORMAP_STOPS = np.array(
    [
        [0.00, 0.19, 0.07, 0.23],
        [0.12, 0.27, 0.36, 0.88],
        [0.30, 0.13, 0.75, 0.90],
        [0.48, 0.30, 0.95, 0.45],
        [0.64, 0.80, 0.92, 0.22],
        [0.80, 0.99, 0.58, 0.12],
        [0.92, 0.85, 0.22, 0.03],
        [1.00, 0.55, 0.03, 0.01],
    ]
)


# --------------------------------------------------------------------------- loading and checks


def item_key(item: dict) -> str:
    """What matches an example across runs: the image, and its target name for per-item targets."""
    return f"{item['image']}#{item['target_name']}" if "target_name" in item else item["image"]


def _positive(index: dict, item: dict) -> bool:
    """Whether the item shows its target class (older indexes without ``positive``: label == target)."""
    if "positive" in item:
        return bool(item["positive"])
    return item.get("label") == index.get("target", 1)


@dataclass
class ExplanationRun:
    """One run folder: its index, arrays (memory-mapped) and metrics (None if not evaluated)."""

    path: Path
    name: str
    index: dict
    images: np.ndarray
    masks: np.ndarray
    maps: dict[str, np.ndarray]
    metrics: dict | None

    @property
    def index_file(self) -> Path:
        return self.path / "explanations" / "index.json"

    @property
    def items(self) -> list[dict]:
        return self.index["items"]

    @property
    def methods(self) -> list[str]:
        return list(self.index["methods"])

    def position(self, image_key: str) -> int:
        """Row of ``image_key`` in this run's arrays."""
        return self._positions[image_key]

    def __post_init__(self) -> None:
        self._positions = {item_key(item): i for i, item in enumerate(self.items)}

    def has_mask(self, i: int) -> bool:
        flag = self.items[i].get("has_mask")
        # Older indexes without the flag: a non-empty mask means annotated.
        return bool(flag) if flag is not None else bool(np.any(self.masks[i]))


def _check_index(index: Any, index_file: Path) -> None:
    """Raise InputDataError unless ``index`` follows the explanations/index.json contract."""
    if not isinstance(index, dict):
        raise InputDataError(index_file, "expected a JSON object")
    missing = [k for k in ("dataset", "image_size", "methods", "items") if k not in index]
    if missing:
        raise InputDataError(index_file, f"missing key(s) {', '.join(missing)}")
    methods, items = index["methods"], index["items"]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise InputDataError(index_file, "'methods' must be a non-empty list of names")
    for m in methods:
        # Method names become file names under maps/; refuse anything that could leave that folder.
        if not m or Path(m).name != m or m in (".", ".."):
            raise InputDataError(index_file, f"method name {m!r} is not a plain file name")
    if len(set(methods)) != len(methods):
        raise InputDataError(index_file, "'methods' lists a method twice")
    if not isinstance(items, list) or not items:
        raise InputDataError(index_file, "'items' must be a non-empty list")
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise InputDataError(index_file, f"item {i} has no 'image' key")
        key = item_key(item)
        if key in seen:  # examples are matched across runs by this key
            raise InputDataError(index_file, f"image {key!r} is listed twice")
        seen.add(key)
    try:
        size = int(index["image_size"])
    except (TypeError, ValueError):
        size = 0
    if size <= 0:
        raise InputDataError(index_file, f"'image_size' must be a positive integer, got {index['image_size']!r}")


def _load_array(path: Path, expected: tuple[int, ...], what: str) -> np.ndarray:
    """Memory-map ``path`` and check its shape against ``expected`` (from index.json)."""
    if not path.is_file():
        raise InputDataError(path, f"{what} does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # truncated file, not a .npy, object array
        raise InputDataError(path, f"cannot load {what} ({type(e).__name__}: {e})") from e
    if tuple(arr.shape) != expected:
        raise InputDataError(
            path, f"shape {tuple(arr.shape)} does not match index.json: expected {expected} (N items, image_size)"
        )
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputDataError(path, f"{what} has non-numeric dtype {arr.dtype}")
    return arr


def _load_metrics(path: Path, dataset: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(path, f"cannot read JSON ({e})") from e
    if not isinstance(metrics, dict) or not isinstance(metrics.get("metrics"), dict):
        raise InputDataError(path, "expected a JSON object with a 'metrics' object")
    for method, values in metrics["metrics"].items():
        if not isinstance(values, dict):
            raise InputDataError(path, f"metrics of {method!r} must be an object of metric values")
    if metrics.get("dataset") not in (None, dataset):  # stale metrics from another dataset's run
        raise InputDataError(path, f"dataset {metrics['dataset']!r} differs from {dataset!r} in explanations/index.json")
    return metrics


def load_run(path: str | os.PathLike, name: str | None = None) -> ExplanationRun:
    """Load and check one run folder (arrays stay memory-mapped)."""
    root = Path(path)
    folder = root / "explanations"
    index_file = folder / "index.json"
    if not index_file.is_file():
        raise InputDataError(index_file, "explanation index does not exist (run the bundle's explain workflow first)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(index_file, f"cannot read JSON ({e})") from e
    _check_index(index, index_file)
    n, s = len(index["items"]), int(index["image_size"])
    images = _load_array(folder / "images.npy", (n, s, s, 3), "input images file")
    if images.dtype != np.uint8:
        raise InputDataError(folder / "images.npy", f"expected uint8 display images, got {images.dtype}")
    masks = _load_array(folder / "masks.npy", (n, s, s), "ground-truth masks file")
    maps = {
        m: _load_array(folder / "maps" / f"{m}.npy", (n, s, s), f"maps file of method {m!r} (listed in index.json)")
        for m in index["methods"]
    }
    metrics = _load_metrics(root / "explanation_metrics.json", str(index["dataset"]))
    return ExplanationRun(root, name or str(index.get("init") or root.name), index, images, masks, maps, metrics)


def _run_sort_key(name: str) -> tuple[int, str]:
    return (INIT_ORDER.index(name), "") if name in INIT_ORDER else (len(INIT_ORDER), name)


def discover_runs(eval_dir: str | os.PathLike) -> list[Path]:
    """Subfolders of ``eval_dir`` with ``explanations/index.json``: random, sup, dino, mae first, then sorted."""
    root = Path(eval_dir)
    if not root.is_dir():
        raise InputDataError(root, "evaluation folder does not exist")
    found = [p for p in root.iterdir() if (p / "explanations" / "index.json").is_file()]
    if not found:
        raise InputDataError(root, "no subfolder contains explanations/index.json")
    return sorted(found, key=lambda p: _run_sort_key(p.name))


def _unique_names(runs: Sequence[ExplanationRun]) -> None:
    """Two runs with the same init (e.g. two seeds) are told apart by their folder."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        if counts[run.name] > 1:
            run.name = f"{run.name} ({run.path})"


def select_examples(runs: Sequence[ExplanationRun], n_examples: int, seed: int = 0) -> list[str]:
    """Image keys present in every run: annotated positives first, then annotated, then positives.

    Within a group the choice is a seeded shuffle of the sorted keys (deterministic, and not biased
    towards the first images of the dataset); the result is listed group by group, each group in the
    first run's order.
    """
    ref = runs[0]
    common = set(item_key(item) for item in ref.items)
    for run in runs[1:]:
        common &= set(item_key(item) for item in run.items)
        if not common:
            raise InputDataError(run.index_file, f"no image in common with {ref.index_file}")
    keys = sorted(common)
    rank = {keys[i]: r for r, i in enumerate(np.random.default_rng(seed).permutation(len(keys)))}

    def group(key: str) -> int:
        i = ref.position(key)
        annotated = all(run.has_mask(run.position(key)) for run in runs)
        positive = _positive(ref.index, ref.items[i])
        return (0 if positive else 1) if annotated else (2 if positive else 3)

    chosen = sorted(keys, key=lambda k: (group(k), rank[k]))[:n_examples]
    return sorted(chosen, key=lambda k: (group(k), ref.position(k)))


# --------------------------------------------------------------------------- images


def colormap_lut(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 turbo-like colour table for values 0..1."""
    x = np.linspace(0.0, 1.0, n)
    pos = _COLORMAP_STOPS[:, 0]
    rgb = np.stack([np.interp(x, pos, _COLORMAP_STOPS[:, c]) for c in (1, 2, 3)], axis=1)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


_LUT = colormap_lut()


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-mapped ``heat`` (values in [0, 1]; NaN -> 0) over an RGB uint8 ``image``."""
    h = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0), 0.0, 1.0)
    colored = _LUT[np.rint(h * (len(_LUT) - 1)).astype(np.intp)].astype(np.float32)
    out = (1.0 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colored
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion; outside the image counts as background so border edges show."""
    p = np.pad(mask, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask tinted green and its outline in yellow (2 px on large images)."""
    m = np.asarray(mask) > 0
    inner = _erode(m)
    if m.shape[0] >= 128:
        inner = _erode(inner)
    out = np.asarray(image, dtype=np.float32).copy()
    out[m] = 0.65 * out[m] + 0.35 * np.array([0, 255, 0], dtype=np.float32)
    out[m & ~inner] = (255, 230, 0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_image_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")


def image_data_uri(rgb: np.ndarray, image_format: str) -> str:
    """(H, W, 3) uint8 RGB as a base64 ``data:`` URI in one of :data:`IMAGE_FORMATS`."""
    _check_image_format(image_format)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, **IMAGE_FORMATS[image_format])
    return f"data:image/{image_format};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _number(value: Any) -> float | None:
    """A finite float for sorting and highlighting, else None (missing, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else "n/a"
    return str(value)


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER_WORDS)


def _metric_keys(runs: Sequence[ExplanationRun]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        for values in (run.metrics or {}).get("metrics", {}).values():
            keys += [k for k in values if k not in keys]
    return keys


def _metric_rows(runs: Sequence[ExplanationRun]) -> list[dict[str, Any]]:
    """One row per (run, method): the index's methods first, then methods only the metrics list."""
    rows = []
    for run in runs:
        scored = (run.metrics or {}).get("metrics", {})
        methods = run.methods + [m for m in scored if m not in run.methods]
        for method in methods:
            rows.append({"run": run, "method": method, "values": scored.get(method)})
    return rows


def _metric_table(runs: Sequence[ExplanationRun]) -> str:
    keys = _metric_keys(runs)
    rows = _metric_rows(runs)
    best: dict[str, float] = {}
    for key in keys:
        vals = [v for r in rows if r["values"] is not None and (v := _number(r["values"].get(key))) is not None]
        if vals:
            best[key] = min(vals) if lower_is_better(key) else max(vals)

    columns = [("init", "initialisation", "text", ""), ("method", "method", "text", ""),
               ("n_annotated", "n annotated", "number", "")]  # fmt: skip
    for key in keys:
        better = "lower is better" if lower_is_better(key) else "higher is better"
        columns.append((key, key, "number", better))
    head = []
    for key, label, kind, better in columns:
        arrow = f' <span class="better" title="{better}">{"&darr;" if "lower" in better else "&uarr;"}</span>' if better else ""
        head.append(
            f'<th scope="col" aria-sort="none" data-key="{_e(key)}" data-type="{kind}">'
            f'<button type="button" title="sort by {_e(label)}">{_e(label)}'
            f'<span class="dir" aria-hidden="true"></span></button>{arrow}</th>'
        )
    body = []
    for order, row in enumerate(rows):
        run, values = row["run"], row["values"]
        cells = [f'<td>{_e(run.name)}</td>', f'<td>{_e(row["method"])}</td>']
        if run.metrics is None:
            cells.append('<td class="na">not evaluated</td>')
        else:
            n_ann = run.metrics.get("n_annotated")
            num = _number(n_ann)
            attrs = "" if num is None else f' data-value="{num:g}"'
            cells.append(f"<td{attrs}>{_e(_format(n_ann))}</td>")
        for key in keys:
            value = None if values is None else values.get(key)
            num = _number(value)
            if values is None or key not in values:
                cells.append('<td class="na" title="not evaluated">&mdash;</td>')
            elif num is None:
                cells.append(f'<td class="na">{_e(_format(value))}</td>')
            else:
                is_best = key in best and num == best[key]
                attrs = f' data-value="{num!r}"' + (' class="best" title="best in this column"' if is_best else "")
                cells.append(f"<td{attrs}>{_e(_format(value))}</td>")
        body.append(f'<tr data-order="{order}">' + "".join(cells) + "</tr>")
    return (
        '<table id="metric-table" class="metrics">\n<thead><tr>' + "".join(head) + "</tr></thead>\n<tbody>\n"
        + "\n".join(body) + "\n</tbody>\n</table>"
    )  # fmt: skip


def _caption(run: ExplanationRun, i: int) -> str:
    item = run.items[i]
    key = item["image"]
    prob = _number(item.get("prob"))
    finding = f'<span class="info">finding {_e(item["target_name"])}</span>' if "target_name" in item else ""
    parts = [
        f"label {_e(item.get('label', 'n/a'))}",
        f"pred {_e(item.get('pred', 'n/a'))}",
        f"prob {prob:.3f}" if prob is not None else "prob n/a",
    ]
    mask = "annotated" if run.has_mask(i) else "no mask"
    return (
        f'<th scope="row" title="{_e(key)}"><span class="name">{_e(Path(key).name)}</span>'
        f'<span class="info">#{_e(item.get("index", i))} &middot; {mask}</span>{finding}'
        f'<span class="info">{" &middot; ".join(parts)}</span></th>'
    )


def _img(uri: str, alt: str) -> str:
    return f'<td><img src="{uri}" alt="{_e(alt)}" width="{DISPLAY_PX}" height="{DISPLAY_PX}"></td>'


def _grid(run: ExplanationRun, keys: Sequence[str], image_format: str) -> str:
    def uri(rgb: np.ndarray) -> str:
        return image_data_uri(rgb, image_format)

    size = int(run.index["image_size"])
    head = ["<th scope=\"col\">example</th>", "<th scope=\"col\">input</th>", "<th scope=\"col\">ground truth</th>"]
    head += [f'<th scope="col">{_e(m)}</th>' for m in run.methods]
    rows = []
    for key in keys:
        i = run.position(key)
        key = run.items[i]["image"] + (f" ({run.items[i]['target_name']})" if "target_name" in run.items[i] else "")
        image = np.asarray(run.images[i])
        cells = [_caption(run, i), _img(uri(image), f"{run.name}: input image {key}")]
        if run.has_mask(i):
            cells.append(_img(uri(mask_overlay(image, run.masks[i])), f"{run.name}: ground-truth mask of {key}"))
        else:
            cells.append(_img(uri(image), f"{run.name}: no ground-truth mask for {key}"))
        for method in run.methods:
            heat = np.asarray(run.maps[method][i], dtype=np.float32)
            cells.append(_img(uri(heatmap_overlay(image, heat)), f"{run.name}: {method} map of {key} over the input"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    pixelated = " pixelated" if size < DISPLAY_PX else ""
    return (
        f'<section class="run" id="run-{_slug(run.name)}"><h3>{_e(run.name)}</h3>\n'
        f'<div class="scroll"><table class="grid{pixelated}"><caption>{_e(run.name)}: {len(keys)} examples, '
        f"{size}&times;{size} px, folder {_e(run.path)}</caption>\n<thead><tr>{''.join(head)}</tr></thead>\n<tbody>\n"
        + "\n".join(rows) + "\n</tbody></table></div></section>"
    )  # fmt: skip


def _gradient_css() -> str:
    stops = ", ".join(f"rgb({r},{g},{b}) {100 * i / 10:.0f}%" for i, (r, g, b) in enumerate(colormap_lut(11)))
    return f"linear-gradient(to right, {stops})"


def _values(runs: Sequence[ExplanationRun], key: str) -> str:
    found: list[str] = []
    for run in runs:
        value = str(run.index.get(key, "n/a"))
        if value not in found:
            found.append(value)
    return ", ".join(found)


def _target_text(runs: Sequence[ExplanationRun]) -> str:
    if all(run.index.get("target") == "per_item" for run in runs):
        return "each example's own finding (one example per image and finding with a box), not the prediction"
    return f"{_e(_values(runs, 'target'))} (maps explain this class, not the prediction)"


_STYLE = """
:root { color-scheme: light; --line: #d0d4da; --best: #fff1b8; --muted: #5b6470; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; padding: 1.2rem 1.6rem;
       color: #1d232b; background: #fff; }
h1 { font-size: 1.5rem; margin: 0 0 .6rem; } h2 { font-size: 1.2rem; margin: 1.6rem 0 .5rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .3rem; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: 0; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; }
table { border-collapse: collapse; }
table.runs td, table.runs th { padding: .15rem .6rem; border-bottom: 1px solid var(--line); text-align: left; }
table.metrics { font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { border-bottom: 1px solid var(--line); padding: .25rem .5rem; text-align: right;
                                     white-space: nowrap; }
table.metrics td:nth-child(-n+2), table.metrics th:nth-child(-n+2) { text-align: left; }
table.metrics thead th { position: sticky; top: 0; background: #f3f5f8; white-space: nowrap; }
table.metrics th button {
  font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; color: inherit;
}
table.metrics th button:focus-visible { outline: 2px solid #2463eb; outline-offset: 2px; }
table.metrics th[aria-sort="ascending"] .dir::after { content: " \\25B2"; }
table.metrics th[aria-sort="descending"] .dir::after { content: " \\25BC"; }
table.metrics .better { color: var(--muted); font-weight: normal; }
table.metrics td.best { background: var(--best); font-weight: 700; }
table.metrics td.na { color: var(--muted); }
table.metrics tbody tr:hover { background: #f7f9fc; }
.scroll { overflow-x: auto; }
table.grid caption { text-align: left; color: var(--muted); padding-bottom: .3rem; }
table.grid th, table.grid td { padding: 3px; vertical-align: top; }
table.grid thead th { font-weight: 600; text-align: center; }
table.grid tbody th { text-align: left; font-weight: normal; min-width: 9rem; max-width: 12rem; overflow-wrap: break-word; }
table.grid .name { display: block; font-weight: 600; } table.grid .info { display: block; color: var(--muted); }
table.grid img { display: block; border-radius: 2px; }
table.grid.pixelated img { image-rendering: pixelated; }
.legend { display: flex; align-items: center; gap: .5rem; color: var(--muted); }
.legend .bar { width: 14rem; height: .8rem; border: 1px solid var(--line); }
.legend .swatch {
  display: inline-block; width: .8rem; height: .8rem; background: rgb(128,215,64); outline: 2px solid rgb(255,230,0);
}
footer { margin-top: 2rem; color: var(--muted); font-size: .85rem; }
"""

# Runs before anything else so that any later script error is counted (the headless test reads it).
_ERROR_COUNTER = """
document.documentElement.setAttribute("data-js-errors", "0");
window.addEventListener("error", function () {
  var root = document.documentElement;
  root.setAttribute("data-js-errors", String(Number(root.getAttribute("data-js-errors")) + 1));
});
"""

_SCRIPT = """
(function () {
  "use strict";
  var root = document.documentElement;
  var table = document.getElementById("metric-table");
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);

  function columnOf(key) {
    for (var i = 0; i < headers.length; i++) { if (headers[i].getAttribute("data-key") === key) { return i; } }
    return -1;
  }
  function valueOf(row, col, type) {
    var cell = row.cells[col];
    if (type === "number") {
      var raw = cell.getAttribute("data-value");
      var num = raw === null ? NaN : parseFloat(raw);
      return isNaN(num) ? null : num;
    }
    return cell.textContent.trim();
  }
  // Sort the metric table by column `key`; dir is "asc" or "desc". Missing values stay last and
  // ties keep the original row order, so the result does not depend on earlier sorts.
  function sortBy(key, dir) {
    var col = columnOf(key);
    if (col < 0) { return false; }
    var type = headers[col].getAttribute("data-type");
    var sign = dir === "desc" ? -1 : 1;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = valueOf(a, col, type), y = valueOf(b, col, type);
      var c = 0;
      if (x === null || y === null) { c = (x === null) - (y === null); }
      else { c = sign * (type === "number" ? x - y : x.localeCompare(y, undefined, {numeric: true})); }
      return c !== 0 ? c : Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    headers.forEach(function (h, i) {
      h.setAttribute("aria-sort", i === col ? (dir === "desc" ? "descending" : "ascending") : "none");
    });
    root.setAttribute("data-sorted", key + ":" + dir);
    return true;
  }
  headers.forEach(function (h) {
    h.querySelector("button").addEventListener("click", function () {
      sortBy(h.getAttribute("data-key"), h.getAttribute("aria-sort") === "ascending" ? "desc" : "asc");
    });
  });
  // #sort=key:dir and #click=key,key (each clicks that header's button, as a user would).
  function applyHash() {
    var params = location.hash.replace(/^#/, "").split("&");
    params.forEach(function (param) {
      var eq = param.indexOf("=");
      if (eq < 0) { return; }
      var name = param.slice(0, eq), value = decodeURIComponent(param.slice(eq + 1));
      if (name === "sort") {
        var parts = value.split(":");
        sortBy(parts[0], parts[1] === "desc" ? "desc" : "asc");
      } else if (name === "click") {
        value.split(",").forEach(function (key) {
          var col = columnOf(key);
          if (col >= 0) { headers[col].querySelector("button").click(); }
        });
      }
    });
  }
  window.addEventListener("hashchange", applyHash);
  applyHash();
  window.addEventListener("load", function () {
    var images = document.images, loaded = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
    }
    root.setAttribute("data-images-total", String(images.length));
    root.setAttribute("data-images-loaded", String(loaded));
    console.info("explanation report: " + loaded + "/" + images.length + " images loaded");
  });
})();
"""

# No network at all: data: images, inline style and script only.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def write_explanation_report(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    n_examples: int = 8,
    title: str | None = None,
    seed: int = 0,
    image_format: str = "jpeg",
) -> Path:
    """Write the self-contained HTML report of ``runs`` (run folders) to ``out``; return its path.

    ``image_format``: ``"jpeg"`` (quality 90, small files) or ``"png"`` (lossless) for every panel.

    Raises:
        InputDataError: naming the file, for a missing index or maps file, arrays whose shape does
            not match the index, unreadable JSON, runs of different datasets or runs without a
            common image.
        ValueError: no runs, or ``n_examples < 1``.
    """
    if not runs:
        raise ValueError("write_explanation_report needs at least one run folder")
    if int(n_examples) < 1:
        raise ValueError(f"n_examples must be at least 1, got {n_examples}")
    _check_image_format(image_format)  # before any run is loaded
    loaded = [load_run(r) for r in runs]
    dataset = str(loaded[0].index["dataset"])
    for run in loaded[1:]:
        if str(run.index["dataset"]) != dataset:
            raise InputDataError(
                run.index_file, f"dataset {run.index['dataset']!r} differs from {dataset!r} in {loaded[0].index_file}"
            )
    _unique_names(loaded)
    keys = select_examples(loaded, int(n_examples), seed=seed)
    title = title or f"Attention-map explanations: {dataset}"

    run_rows = []
    for run in loaded:
        n_ann = sum(run.has_mask(i) for i in range(len(run.items)))
        evaluated = "yes" if run.metrics is not None else "not evaluated"
        run_rows.append(
            f'<tr><td><a href="#run-{_slug(run.name)}">{_e(run.name)}</a></td><td>{_e(run.path)}</td>'
            f"<td>{len(run.items)}</td><td>{n_ann}</td><td>{_e(', '.join(run.methods))}</td><td>{evaluated}</td></tr>"
        )
    header = (
        f"<header><h1>{_e(title)}</h1>\n<dl class=\"meta\">"
        f"<dt>dataset</dt><dd>{_e(dataset)}</dd>"
        f"<dt>split</dt><dd>{_e(_values(loaded, 'split'))}</dd>"
        f"<dt>target class</dt><dd>{_target_text(loaded)}</dd>"
        f"<dt>image size</dt><dd>{_e(_values(loaded, 'image_size'))} px</dd>"
        f"<dt>runs</dt><dd>{len(loaded)}</dd></dl>\n"
        '<table class="runs"><thead><tr><th scope="col">initialisation</th><th scope="col">folder</th>'
        '<th scope="col">images</th><th scope="col">annotated</th><th scope="col">methods</th>'
        '<th scope="col">metrics</th></tr></thead><tbody>' + "".join(run_rows) + "</tbody></table></header>"
    )
    metrics = (
        '<section id="metrics"><h2>Explanation metrics</h2>\n'
        "<p>One row per initialisation and method. Click a column header (or focus it and press Enter) to sort; "
        "click again to reverse. The best value of each metric column is highlighted "
        "(&uarr; higher is better, &darr; lower is better).</p>\n"
        '<div class="scroll">' + _metric_table(loaded) + "</div></section>"
    )
    examples = (
        '<section id="examples"><h2>Examples</h2>\n'
        f"<p>The same {len(keys)} test images in every initialisation (annotated positives first, chosen with seed "
        f"{int(seed)}). Each map is overlaid on the input at 50 % opacity.</p>\n"
        f'<p class="legend"><span>0</span><span class="bar" style="background: {_gradient_css()}"></span><span>1</span>'
        '<span class="swatch"></span><span>ground-truth mask (outline)</span></p>\n'
        + "\n".join(_grid(run, keys, image_format) for run in loaded) + "</section>"
    )  # fmt: skip
    document = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n<script>{_ERROR_COUNTER}</script>\n</head>\n<body>\n"
        f"{header}\n<main>\n{metrics}\n{examples}\n</main>\n"
        "<footer>Static report written by custom_components.reports.explanation_html; "
        "it loads nothing from the network.</footer>\n"
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )
    # ASCII with character references: the file reads the same whatever the locale's encoding.
    return atomic_write_text(document.encode("ascii", "xmlcharrefreplace").decode("ascii"), out)
