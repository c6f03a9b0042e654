"""HAM's maps in the explanation workflows: (image, finding) cases, per-item targets, scores, report.

Independent checks: a case's mask is its finding's boxes rasterised by hand; the stored maps are
:class:`HAMAttention` / Grad-CAM called directly with each case's target; the scorer's numbers are
recomputed with NumPy on a hand-made run; the baseline's Grad-CAM equals its CAM (GAP + linear).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from custom_components.data.finding_cases import FindingCaseDataset
from custom_components.data.nihcxr14 import FINDINGS, make_entry
from custom_components.explain import HAMAttention
from custom_components.explain.ham_methods import finding_explainers, finding_target_offset, network_kind
from custom_components.interpretability import score_explanations, write_explanations
from custom_components.io import InputDataError
from custom_components.metrics.localization import MINMAX_THRESHOLD, localization_accuracy
from custom_components.metrics.map_quality import deletion_insertion_auc
from custom_components.networks.cam_resnet import CAMResNet
from custom_components.networks.ham import HAMNet
from custom_components.reports.explanation_html import write_explanation_report

REPO = Path(__file__).resolve().parents[1]
S = 32
# image 0: two Mass boxes (overlapping) and an Effusion box; image 1: no box; image 2: one Nodule box
BOXES = [
    {"Mass": [[2, 3, 10, 6], [8, 5, 6, 12]], "Effusion": [[20, 20, 8, 4]]},
    {},
    {"Nodule": [[4.5, 10.25, 7, 5]]},
]
LABELS = [["Mass", "Effusion"], ["Cardiomegaly"], ["Atelectasis"]]  # image 2 has a box of an unlabelled finding


def load_transforms():
    """The HAM bundle's own preprocessing (train.json ``load_transforms``), as explain.json uses it."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "ham_nihcxr14" / "configs" / "train.json"))
    return Compose(parser.get_parsed_content("load_transforms"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i, (boxes, labels) in enumerate(zip(BOXES, LABELS, strict=True)):
        Image.fromarray(rng.integers(0, 256, (S, S), dtype=np.uint8)).save(root / "images" / f"img{i}.png")
        entries.append(make_entry(f"img{i}.png", str(i), labels, f"images/img{i}.png", boxes, flag=1))
    (root / "datalist.json").write_text(json.dumps({"test": entries}))
    return root


@pytest.fixture(scope="module")
def cases(store) -> FindingCaseDataset:
    return FindingCaseDataset(store / "datalist.json", "test", store, load_transforms())


def hand_mask(boxes) -> np.ndarray:
    """Pixel (r, c) is inside [x, y, w, h] when its centre (c + 0.5, r + 0.5) is."""
    out = np.zeros((S, S), bool)
    r, c = np.mgrid[0:S, 0:S] + 0.5
    for x, y, w, h in boxes:
        out |= (c >= x) & (c < x + w) & (r >= y) & (r < y + h)
    return out


def test_cases_are_image_finding_pairs_with_their_own_boxes(cases, store):
    assert len(cases) == 3
    expected = [(0, "Effusion"), (0, "Mass"), (2, "Nodule")]  # FINDINGS order within an image
    for k, (i, finding) in enumerate(expected):
        item = cases[k]
        c = FINDINGS.index(finding)
        assert item["case"] == f"img{i}/{finding}" and item["image_path"] == f"images/img{i}.png"
        assert item["target"] == 1 + c and item["target_name"] == finding and item["finding"] == c
        assert item["label"] == int(finding in LABELS[i]) and item["has_mask"]
        mask = item["mask"][0].numpy() > 0.5
        assert item["mask"].shape == (1, S, S) and mask.any()
        np.testing.assert_array_equal(mask, hand_mask(BOXES[i][finding]))
        png = np.asarray(Image.open(store / "images" / f"img{i}.png"), dtype=np.float32)
        torch.testing.assert_close(item["image"], torch.from_numpy(png / 127.5 - 1).expand(3, S, S))
    assert cases[1]["mask"].sum() < hand_mask(BOXES[0]["Mass"][:1]).sum() + hand_mask(BOXES[0]["Mass"][1:]).sum()


def test_cases_refuse_an_unknown_finding(tmp_path):
    entry = {"image": "a.png", "label": [0] * 14, "boxes": {"Tumour": [[0, 0, 1, 1]]}}
    (tmp_path / "d.json").write_text(json.dumps({"test": [entry]}))
    with pytest.raises(InputDataError, match="Tumour"):
        FindingCaseDataset(tmp_path / "d.json", "test", tmp_path)
    with pytest.raises(InputDataError, match=r"d\.json"):
        FindingCaseDataset(tmp_path / "d.json", "validation", tmp_path)


@pytest.fixture(scope="module")
def ham() -> HAMNet:
    torch.manual_seed(0)
    net = HAMNet(arch="resnet18", fusion_channels=16).eval()
    with torch.no_grad():  # non-trivial maps: the head weights matter
        net.cls_fc.weight.normal_(0, 1)
        net.anomaly_fc.weight.normal_(0, 1)
    return net


def test_method_sets_follow_the_network(ham):
    base = CAMResNet(arch="resnet18").eval()
    for net, names in ((ham, ["ham", "gradcam", "gradcampp"]), (base, ["gradcam", "gradcampp"]), (ham, ["gradcampp"])):
        explainers = finding_explainers(net, None if len(names) > 1 else names)
        assert list(explainers) == names
        release(explainers)
    with pytest.raises(ValueError, match="ham"):
        finding_explainers(base, ["ham"])
    assert (network_kind(ham), network_kind(base)) == ("ham", "baseline")
    # both output the abnormality logit first: finding c is logit 1 + c
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert ham(x).shape[1] == base(x).shape[1] == 1 + len(FINDINGS)
    assert finding_target_offset(ham) == finding_target_offset(base) == 1
    with pytest.raises(TypeError):
        finding_target_offset(torch.nn.Linear(2, 2))


def test_baseline_gradcam_is_its_cam():
    torch.manual_seed(1)
    net = CAMResNet(arch="resnet18").eval()
    x = torch.randn(3, 3, 64, 64)
    target = torch.tensor([1, 4, 9])
    with finding_explainers(net, ["gradcam"])["gradcam"] as gradcam:
        gradcam.upsample = "none"
        ours = gradcam.attribute(x, target=target).detach()
    with torch.no_grad():
        cams = net.forward_with_maps(x, refine=False).cams[torch.arange(3), target]
    flat = cams.flatten(1)
    low, high = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    assert (high > low).all()
    torch.testing.assert_close(ours, (cams - low) / (high - low), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def written(tmp_path_factory, ham, cases) -> Path:
    out = tmp_path_factory.mktemp("run")
    explainers = finding_explainers(ham)
    write_explanations(ham, cases, explainers, out, batch_size=2, dataset_name="twin", init="ham",
                       activation="sigmoid", progress=False)  # fmt: skip
    release(explainers)
    return out


def release(explainers: dict) -> None:
    """Remove the Grad-CAM hooks from the module-scoped network."""
    for e in explainers.values():
        if hasattr(e, "release"):
            e.release()


def test_writer_stores_each_case_explained_with_its_own_finding(written, ham, cases):
    folder = written / "explanations"
    index = json.loads((folder / "index.json").read_text())
    assert index["target"] == "per_item" and index["activation"] == "sigmoid"
    assert index["methods"] == ["ham", "gradcam", "gradcampp"] and index["n_images"] == len(cases) == 3
    items = [cases[k] for k in range(len(cases))]
    images = torch.stack([it["image"] for it in items])
    target = torch.tensor([it["target"] for it in items])
    with torch.no_grad():
        direct = HAMAttention(ham).attribute(images, target)
        logits = ham(images)
    # float32 rounding: the writer's batches differ from this one (conv kernels vary with batch size and threads)
    np.testing.assert_allclose(np.load(folder / "maps" / "ham.npy"), direct.numpy(), atol=1e-5)
    # each case's own target: another finding's map is different
    with torch.no_grad():
        other = HAMAttention(ham).attribute(images, (target % 14) + 1)
    assert not np.allclose(np.load(folder / "maps" / "ham.npy"), other.numpy(), atol=1e-3)
    with finding_explainers(ham, ["gradcam"])["gradcam"] as gradcam:
        expected = gradcam.attribute(images, target).detach().numpy()
    np.testing.assert_allclose(np.load(folder / "maps" / "gradcam.npy"), expected, atol=1e-5)
    np.testing.assert_array_equal(np.load(folder / "masks.npy"), np.stack([it["mask"][0].numpy() > 0.5 for it in items]))
    display = np.load(folder / "images.npy")
    np.testing.assert_allclose(display[..., 0] / 255.0, (images[:, 0].numpy() + 1) / 2, atol=0.5 / 255 + 1e-6)
    for k, (it, rec) in enumerate(zip(items, index["items"], strict=True)):
        assert rec["target"] == it["target"] and rec["target_name"] == it["target_name"] and rec["case"] == it["case"]
        assert rec["label"] == it["label"] and rec["positive"] == bool(it["label"])
        assert rec["prob"] == pytest.approx(float(torch.sigmoid(logits[k, it["target"]])), abs=1e-6)
        assert rec["pred"] == int(rec["prob"] > 0.5)


def test_tensorboard_panels_for_ham(tmp_path, ham, cases):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    explainers = finding_explainers(ham)
    write_explanations(ham, cases, explainers, tmp_path, summary_writer=writer, num_panel_images=2,
                       activation="sigmoid", progress=False)  # fmt: skip
    release(explainers)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert {"explain/image", "explain/mask", "explain/ham", "explain/gradcam", "explain/gradcampp"} <= set(acc.Tags()["images"])


def hand_run(root: Path) -> tuple[Path, dict, np.ndarray]:
    """A per-item run by hand: 4 cases (two of Mass, one Nodule, one Effusion) and two methods."""
    n, size = 4, 16
    folder = root / "explanations"
    (folder / "maps").mkdir(parents=True)
    rng = np.random.default_rng(3)
    masks = np.zeros((n, size, size), np.uint8)
    masks[0, 2:6, 2:8] = 1
    masks[1, 8:14, 8:12] = 1
    masks[2, 0:4, 10:16] = 1
    masks[3, 5:9, 5:9] = 1
    maps = {"ham": rng.uniform(0, 1, (n, size, size)).astype(np.float32), "gradcam": np.zeros((n, size, size), np.float32)}
    maps["ham"][0, 3, 4] = 1.0  # a hit
    maps["gradcam"][:] = rng.uniform(0, 0.3, (n, size, size))
    maps["gradcam"][:, 2:6, 2:8] += 0.7  # exactly case 0's box
    names = ["Mass", "Mass", "Nodule", "Effusion"]
    items = [{"index": i, "image": f"images/img{i}.png", "case": f"img{i}/{f}", "label": 1, "prob": 0.5,
              "pred": 1, "positive": True, "has_mask": True, "target": 1 + FINDINGS.index(f), "target_name": f}
             for i, f in enumerate(names)]  # fmt: skip
    index = {"dataset": "hand", "init": "ham", "target": "per_item", "activation": "sigmoid", "image_size": size,
             "split": "test", "methods": list(maps), "n_images": n, "n_annotated": n, "items": items}  # fmt: skip
    (folder / "index.json").write_text(json.dumps(index))
    np.save(folder / "images.npy", np.zeros((n, size, size, 3), np.uint8))
    np.save(folder / "masks.npy", masks)
    for m, a in maps.items():
        np.save(folder / "maps" / f"{m}.npy", a)
    return root, maps, masks


def np_scores(m: np.ndarray, g: np.ndarray) -> dict[str, float]:
    g = g > 0
    thr = np.sort(m.ravel())[::-1][int(m.size * 10 / 100)]
    fg = m >= thr
    rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    box = np.zeros_like(g)
    box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    mm = (m - m.min()) / (m.max() - m.min())
    p = mm >= MINMAX_THRESHOLD
    return {
        "pointing_game": float(g[m == m.max()].any()),
        "iou_top10": (box & g).sum() / (box | g).sum(),
        "energy_pointing_game": m[g].sum() / m.sum(),
        "loc_iou": (p & g).sum() / (p | g).sum(),
        "loc_ior": (p & g).sum() / max(p.sum(), 1),
    }


def test_scorer_agrees_with_numpy_per_case_per_finding_and_tiou(tmp_path):
    run, maps, masks = hand_run(tmp_path)
    summary = score_explanations(run, ks=(10,), localization_threshold=MINMAX_THRESHOLD, progress=False)
    names = ["Mass", "Mass", "Nodule", "Effusion"]
    for method, arr in maps.items():
        per_case = [np_scores(arr[i], masks[i]) for i in range(4)]
        for key in ("pointing_game", "iou_top10", "energy_pointing_game", "loc_iou", "loc_ior"):
            assert summary["metrics"][method][key] == pytest.approx(np.mean([c[key] for c in per_case]), abs=1e-6)
            assert summary["per_target"][method]["Mass"][key] == pytest.approx(
                np.mean([per_case[0][key], per_case[1][key]]), abs=1e-6)
        # T(IoU): per finding the fraction of its cases at or above T, then the mean over the 3 findings
        for t in (0.1, 0.3, 0.5):
            per_finding = [np.mean([per_case[i]["loc_iou"] >= t for i in range(4) if names[i] == f])
                           for f in ("Mass", "Nodule", "Effusion")]  # fmt: skip
            assert summary["metrics"][method][f"tiou_{t:g}"] == pytest.approx(np.mean(per_finding))
    # gradcam's peak region is case 0's box: a hit there, and IoR 1 at the binarisation
    assert summary["per_target"]["gradcam"]["Mass"]["pointing_game"] >= 0.5
    assert summary["per_target"]["gradcam"]["Mass"]["n"] == 2 and summary["n_images"] == 4
    # the same numbers through localization_accuracy directly
    ref = localization_accuracy(torch.tensor([[c, np_scores(maps["ham"][i], masks[i])["loc_iou"],
                                               np_scores(maps["ham"][i], masks[i])["loc_ior"]]
                                              for i, c in enumerate([1, 1, 2, 0])], dtype=torch.float64),
                                ["Effusion", "Mass", "Nodule"])  # fmt: skip
    assert summary["metrics"]["ham"]["mtiou"] == pytest.approx(ref["mtiou"])
    assert summary["metrics"]["ham"]["mtior"] == pytest.approx(ref["mtior"])
    # outputs: markdown with the per-finding table, one CSV row per case and method, per-finding CSV
    md = (run / "explanation_metrics.md").read_text()
    assert "## Per target" in md and "| Nodule | gradcam |" in md
    with open(run / "explanation_scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["target_name"] for r in rows} == set(names)
    with open(run / "explanation_metrics_per_target.csv") as f:
        per = list(csv.DictReader(f))
    # findings in class order (Effusion, Mass, Nodule), each with every method
    assert [(r["target_name"], r["method"]) for r in per] == [(f, m) for f in ("Effusion", "Mass", "Nodule")
                                                               for m in ("ham", "gradcam")]  # fmt: skip
    assert float(per[2]["pointing_game"]) == pytest.approx(summary["per_target"]["ham"]["Mass"]["pointing_game"])
    assert json.loads((run / "explanation_metrics.json").read_text())["target"] == "per_item"


def test_deletion_insertion_use_each_case_target_and_sigmoid(written, ham, cases):
    summary = score_explanations(written, ks=(10,), network=ham, dataset=cases, faithfulness_steps=3, progress=False)
    index = json.loads((written / "explanations" / "index.json").read_text())
    positives = [i for i, it in enumerate(index["items"]) if it["positive"]]
    assert summary["n_target_class"] == len(positives) == 2  # the Nodule box's image is not labelled Nodule
    items = [cases[i] for i in positives]
    images = torch.stack([it["image"] for it in items])
    target = torch.tensor([it["target"] for it in items])
    maps = torch.from_numpy(np.load(written / "explanations" / "maps" / "ham.npy")[positives])
    black = -1.0  # 0 in [0, 1] image space after the bundle's [-1, 1] scaling
    expected = deletion_insertion_auc(ham, images, maps, target, steps=3, baseline=black, activation="sigmoid")
    softmax = deletion_insertion_auc(ham, images, maps, target, steps=3, baseline=black, activation="softmax")
    assert not torch.allclose(expected, softmax)
    with open(written / "explanation_scores.csv") as f:
        got = [float(r["deletion_auc"]) for r in csv.DictReader(f) if r["method"] == "ham" and r["deletion_auc"]]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert summary["metrics"]["ham"]["deletion_auc"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert not math.isnan(summary["metrics"]["gradcampp"]["insertion_auc"])


def test_report_shows_one_example_per_case(written, tmp_path):
    html = write_explanation_report([written], tmp_path / "r.html", n_examples=8).read_text()
    # three cases, two of them on the same image: three rows of input, ground truth and 3 maps
    assert html.count("<img") == 3 * (2 + 3)
    for finding in ("Mass", "Effusion", "Nodule"):
        assert f"finding {finding}" in html
    assert "each example&#x27;s own finding" in html or "each example's own finding" in html
