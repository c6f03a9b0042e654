"""custom_components.reports.explanation_html and scripts/explanation_report.py on tiny fake runs.

The HTML is checked twice: parsed in Python (images, table) and opened in headless Chromium
(images decode, no console errors, header clicks sort the table). The Chromium part is skipped
only when no Chromium binary is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from custom_components.io import InputDataError
from custom_components.reports.explanation_html import (
    colormap_lut,
    discover_runs,
    heatmap_overlay,
    image_data_uri,
    write_explanation_report,
)

REPO = Path(__file__).resolve().parents[1]
S, N = 32, 5
METHODS = ["attention", "rollout", "gradcam"]
LABELS = [1, 0, 1, 1, 0]
HAS_MASK = [True, False, True, False, True]
# Annotated positives (0, 2) first, then the annotated negative (4), before the unannotated positive (3).
N_EXAMPLES = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def make_run(root: Path, init: str, dataset: str = "kvasir", reverse: bool = False, metrics: bool = True,
             methods: list[str] = METHODS, size: int = S, n: int = N, seed: int = 0) -> Path:  # fmt: skip
    """A fake run folder following the explain/evaluate contract; ``reverse`` stores the items backwards."""
    rng = np.random.default_rng(seed)
    run = root / init
    (run / "explanations" / "maps").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    maps = {m: np.zeros((n, size, size), np.float16) for m in methods}
    for i in range(n):  # same picture for the same image key in every run, whatever the order
        images[i] = (np.stack([xx, yy, 0.5 + 0 * xx], -1) * 200 + 20 * i).astype(np.uint8)
        if HAS_MASK[i % len(HAS_MASK)]:
            masks[i, size // 4 : size // 2, size // 4 : size // 2] = 1
        for k, m in enumerate(methods):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            maps[m][i] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 * (k + 1))).astype(np.float16)
    items = [
        {"index": i, "image": f"kvasir-dataset-v2/class/img{i}.jpg", "case": f"img{i}", "label": LABELS[i % 5],
         "prob": round(float(rng.uniform()), 3), "pred": LABELS[i % 5], "has_mask": HAS_MASK[i % 5]}
        for i in range(n)
    ]  # fmt: skip
    order = list(range(n))[::-1] if reverse else list(range(n))
    index = {"dataset": dataset, "init": init, "target": 1, "image_size": size, "split": "test",
             "methods": methods, "items": [items[i] for i in order]}  # fmt: skip
    (run / "explanations" / "index.json").write_text(json.dumps(index))
    np.save(run / "explanations" / "images.npy", images[order])
    np.save(run / "explanations" / "masks.npy", masks[order])
    for m in methods:
        np.save(run / "explanations" / "maps" / f"{m}.npy", maps[m][order])
    if metrics:
        scores = {m: {"pointing_game": round(float(rng.uniform()), 4), "iou_top10": round(float(rng.uniform()), 4),
                      "energy_pointing_game": round(float(rng.uniform()), 4),
                      "deletion_auc": round(float(rng.uniform()), 4)} for m in methods}  # fmt: skip
        metrics_doc = {"dataset": dataset, "init": init, "n_images": n, "n_annotated": sum(HAS_MASK), "metrics": scores}
        (run / "explanation_metrics.json").write_text(json.dumps(metrics_doc))
    return run


class ReportParser(HTMLParser):
    """Collects <img> attributes and the metric table (header keys, rows of cell dicts)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.header_keys: list[str] = []
        self.rows: list[list[dict]] = []
        self.html_attrs: dict = {}
        self._in_table = False
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.html_attrs = a
        elif tag == "img":
            self.images.append(a)
        elif tag == "table" and a.get("id") == "metric-table":
            self._in_table = True
        elif self._in_table and tag == "th" and "data-key" in a:
            self.header_keys.append(a["data-key"])
        elif self._in_table and tag == "tr" and "data-order" in a:
            self.rows.append([])
        elif self._in_table and tag == "td":
            self._cell = {"attrs": a, "text": ""}

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def parse(text: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(text)
    return parser


def _payload(uri: str) -> bytes:
    """The encoded image bytes of a ``data:...;base64,`` URI."""
    return base64.b64decode(uri.split(",", 1)[1])


def _decode(uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(_payload(uri))).convert("RGB"))


@pytest.fixture()
def report(tmp_path):
    runs = [make_run(tmp_path, "random", seed=1), make_run(tmp_path, "sup", reverse=True, seed=2)]
    out = write_explanation_report(runs, tmp_path / "out" / "report.html", n_examples=N_EXAMPLES)
    return out


def test_html_structure(report):
    text = report.read_text()
    assert text.isascii()
    doc = parse(text)
    # images: examples x (input + ground truth + methods) x runs, every one an embedded JPEG (default) with alt text
    assert len(doc.images) == N_EXAMPLES * (2 + len(METHODS)) * 2
    for img in doc.images:
        assert img["src"].startswith("data:image/jpeg;base64,"), img["src"][:40]
        assert _payload(img["src"]).startswith(JPEG_MAGIC)
        assert img.get("alt")
    assert not re.search(r"(src|href)=\"(https?:|//)", text)  # nothing fetched from the network
    # the two grids show the same images (matched by key although "sup" stores them reversed)
    per_run = len(doc.images) // 2
    inputs = lambda imgs: [i["src"] for i in imgs[:: 2 + len(METHODS)]]  # noqa: E731
    assert inputs(doc.images[:per_run]) == inputs(doc.images[per_run:])
    assert [a["alt"].split("input image ")[1] for a in doc.images[: per_run : 2 + len(METHODS)]] == [
        f"kvasir-dataset-v2/class/img{i}.jpg" for i in (0, 2, 4)
    ]
    # metric table: one row per (init, method), one column per metric plus init, method, n annotated
    keys = ["pointing_game", "iou_top10", "energy_pointing_game", "deletion_auc"]
    assert doc.header_keys == ["init", "method", "n_annotated", *keys]
    assert [(r[0]["text"], r[1]["text"]) for r in doc.rows] == [(i, m) for i in ("random", "sup") for m in METHODS]
    assert all(len(r) == 3 + len(keys) for r in doc.rows)
    assert all(r[2]["text"] == str(sum(HAS_MASK)) for r in doc.rows)
    # best value highlighted: the maximum, except for deletion AUC (lower is better)
    for col, key in enumerate(doc.header_keys[3:], start=3):
        values = [float(r[col]["attrs"]["data-value"]) for r in doc.rows]
        best = [float(r[col]["attrs"]["data-value"]) for r in doc.rows if "best" in r[col]["attrs"].get("class", "")]
        assert best == [min(values) if key == "deletion_auc" else max(values)], key
    # header
    assert "kvasir" in text and "random" in text and "target class" in text


def test_not_evaluated_run_and_discovery(tmp_path):
    make_run(tmp_path, "zeta", seed=3)
    make_run(tmp_path, "mae", metrics=False, seed=4)
    make_run(tmp_path, "random", seed=5)
    (tmp_path / "unrelated").mkdir()
    runs = discover_runs(tmp_path)
    assert [p.name for p in runs] == ["random", "mae", "zeta"]
    doc = parse(write_explanation_report(runs, tmp_path / "r.html", n_examples=2).read_text())
    assert len(doc.images) == 2 * (2 + len(METHODS)) * 3
    mae_rows = [r for r in doc.rows if r[0]["text"] == "mae"]
    assert len(mae_rows) == len(METHODS)
    assert all(r[2]["text"] == "not evaluated" and "data-value" not in r[3]["attrs"] for r in mae_rows)


def test_colormap_and_overlay():
    lut = colormap_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[0, 2] > lut[0, 0] and lut[-1, 0] > lut[-1, 2]  # blue for 0, red for 1
    image = np.full((4, 4, 3), 100, np.uint8)
    heat = np.array([[0, 1, np.nan, 2]] * 4, np.float32)  # NaN -> 0, out-of-range clipped
    out = heatmap_overlay(image, heat, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[0, 2], out[0, 0])
    np.testing.assert_array_equal(out[0, 3], out[0, 1])


def test_image_formats(tmp_path):
    # a smooth radiograph-like overlay: PNG is lossless, JPEG close to it and much smaller
    yy, xx = np.mgrid[:224, :224] / 223.0
    image = np.repeat((255 * (0.3 + 0.5 * np.sin(3 * xx) * yy)).astype(np.uint8)[..., None], 3, axis=-1)
    rgb = heatmap_overlay(image, np.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.05))
    png, jpeg = image_data_uri(rgb, "png"), image_data_uri(rgb, "jpeg")
    assert png.startswith("data:image/png;base64,") and jpeg.startswith("data:image/jpeg;base64,")
    np.testing.assert_array_equal(_decode(png), rgb)
    assert np.abs(_decode(jpeg).astype(int) - rgb).mean() < 2.0
    assert len(jpeg) < len(png) / 2
    with pytest.raises(ValueError, match="image_format"):
        image_data_uri(rgb, "gif")
    runs = [make_run(tmp_path, "random", seed=1)]
    with pytest.raises(ValueError, match="image_format"):
        write_explanation_report(runs, tmp_path / "r.html", image_format="bmp")
    assert not (tmp_path / "r.html").exists()
    doc = parse(write_explanation_report(runs, tmp_path / "r.html", n_examples=2, image_format="png").read_text())
    assert doc.images and all(_payload(i["src"]).startswith(PNG_MAGIC) for i in doc.images)


# --------------------------------------------------------------------------- errors


def test_missing_maps_file(tmp_path):
    run = make_run(tmp_path, "random")
    (run / "explanations" / "maps" / "rollout.npy").unlink()
    with pytest.raises(InputDataError, match=r"maps[/\\]rollout\.npy.*'rollout'"):
        write_explanation_report([run], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_shape_mismatch(tmp_path):
    run = make_run(tmp_path, "random")
    np.save(run / "explanations" / "maps" / "gradcam.npy", np.zeros((N, S, S + 1), np.float16))
    with pytest.raises(InputDataError, match=r"gradcam\.npy: shape \(5, 32, 33\) does not match index\.json"):
        write_explanation_report([run], tmp_path / "r.html")
    np.save(run / "explanations" / "maps" / "gradcam.npy", np.zeros((N, S, S), np.float16))
    np.save(run / "explanations" / "masks.npy", np.zeros((N - 1, S, S), np.uint8))
    with pytest.raises(InputDataError, match=r"masks\.npy: shape"):
        write_explanation_report([run], tmp_path / "r.html")


def test_mixed_datasets_and_missing_index(tmp_path):
    a = make_run(tmp_path, "random", dataset="kvasir")
    b = make_run(tmp_path, "sup", dataset="mura")
    with pytest.raises(InputDataError, match=r"sup[/\\]explanations[/\\]index\.json: dataset 'mura' differs"):
        write_explanation_report([a, b], tmp_path / "r.html")
    with pytest.raises(InputDataError, match=r"nowhere[/\\]explanations[/\\]index\.json: explanation index does not exist"):
        write_explanation_report([a, tmp_path / "nowhere"], tmp_path / "r.html")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "scripts" / "explanation_report.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_cli(tmp_path):
    make_run(tmp_path / "eval", "sup", seed=1)
    make_run(tmp_path / "eval", "random", seed=2)
    out = tmp_path / "report.html"
    ok = _cli("--eval_dir", str(tmp_path / "eval"), "--out", str(out), "--n_examples", "2", "--image_format", "png")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert str(out) in ok.stdout and "open" in ok.stdout
    doc = parse(out.read_text())
    assert len(doc.images) == 2 * (2 + len(METHODS)) * 2
    assert all(i["src"].startswith("data:image/png;base64,") for i in doc.images)
    assert [r[0]["text"] for r in doc.rows[:: len(METHODS)]] == ["random", "sup"]  # conventional order
    # bad input: exit status 2 and one "error:" line naming the file, no traceback
    runs = f"{tmp_path / 'eval' / 'random'},{tmp_path / 'eval' / 'missing'}"
    bad = _cli("--runs", runs, "--out", str(tmp_path / "bad.html"))
    assert bad.returncode == 2, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing" in errors[0] and "index.json" in errors[0], bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.html").exists()


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def dump_dom(chromium: str, page: Path, fragment: str, profile: Path) -> tuple[str, str]:
    """The DOM after load (page scripts have run) and Chromium's stderr, console messages included."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri() + fragment]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


def test_chromium_renders_and_sorts(report, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (apt-get install chromium)")
    n_images = N_EXAMPLES * (2 + len(METHODS)) * 2

    # two clicks on the same header: ascending, then descending
    dom, stderr = dump_dom(chromium, report, "#click=pointing_game,pointing_game", tmp_path / "profile")
    doc = parse(dom)
    assert doc.html_attrs.get("data-js-errors") == "0", stderr[-3000:]
    assert doc.html_attrs.get("data-images-total") == str(n_images)
    assert doc.html_attrs.get("data-images-loaded") == str(n_images)
    assert doc.html_attrs.get("data-sorted") == "pointing_game:desc"
    # the page's own console message proves the console is captured; nothing else may be logged
    console = console_lines(stderr)
    assert any(f"{n_images}/{n_images} images loaded" in line for line in console), stderr[-3000:]
    assert all("images loaded" in line for line in console), console
    col = doc.header_keys.index("pointing_game")
    values = [float(r[col]["attrs"]["data-value"]) for r in doc.rows]
    assert len(values) == 2 * len(METHODS) and values == sorted(values, reverse=True)

    # sort through the fragment, on a lower-is-better column, ascending
    dom, stderr = dump_dom(chromium, report, "#sort=deletion_auc:asc", tmp_path / "profile")
    doc = parse(dom)
    assert doc.html_attrs.get("data-sorted") == "deletion_auc:asc" and doc.html_attrs.get("data-js-errors") == "0"
    col = doc.header_keys.index("deletion_auc")
    values = [float(r[col]["attrs"]["data-value"]) for r in doc.rows]
    assert values == sorted(values)
