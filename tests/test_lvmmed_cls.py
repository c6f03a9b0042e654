"""LVM-Med classification pieces: class-folder / FGADR datalists and their checks, the heads, the frozen
encoder's eval mode, the feature cache (equal to recomputed features, invalidated by a changed
encoder or data), multi-class metrics against scikit-learn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

from custom_components.data.class_folders import (
    FundusTrainAugment,
    brain_tumor_datalist,
    fgadr_datalist,
    prepare_class_datalist,
    random_split,
)
from custom_components.data.image_folders import ImageFolderDataset
from custom_components.data.synthetic import write_brain_tumor_twin, write_fgadr_twin
from custom_components.engines.feature_cache import CachedFeatureDataset, compute_features
from custom_components.handlers.labelled_examples import pick_examples
from custom_components.io import InputDataError
from custom_components.metrics.multiclass import (
    MacroAUROC,
    MacroF1,
    MulticlassAccuracy,
    macro_auroc,
    macro_f1,
    multiclass_accuracy,
    per_class_rows,
)
from custom_components.networks.ham import DilatedResNet
from custom_components.networks.lvmmed_classifier import LVMMedClassifier, classifier_head

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    return write_brain_tumor_twin(tmp_path_factory.mktemp("brain"), n_per_class=(5, 2), size=32, seed=3)


# ----------------------------------------------------------------------------- data


def test_brain_datalist_splits(brain):
    d = brain_tumor_datalist(brain)
    assert len(d["training"]) + len(d["validation"]) == 20 and len(d["test"]) == 8
    assert len(d["validation"]) == 6  # round(0.3 * 20)
    train_names = {e["image"] for e in d["training"]}
    assert not train_names & {e["image"] for e in d["validation"]}
    assert all(e["image"].startswith("Training/") for e in d["training"] + d["validation"])
    assert {e["label"] for e in d["test"]} == {0, 1, 2, 3}
    assert brain_tumor_datalist(brain) == d  # deterministic
    assert brain_tumor_datalist(brain, seed=1) != d
    strat = brain_tumor_datalist(brain, stratify=True, val_fraction=0.4)
    assert sorted(e["label"] for e in strat["validation"]) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_random_split_fraction_and_strata():
    idx = random_split(100, 0.3, seed=42)
    assert len(idx) == 30 and idx == sorted(set(idx))
    labels = [i % 4 for i in range(40)]
    strat = random_split(40, 0.25, seed=0, labels=labels)
    assert [sum(labels[i] == c for i in strat) for c in range(4)] == [2, 2, 2, 2]


@pytest.mark.parametrize("damage, needle", [
    ("empty", "class folder is empty"),
    ("unknown", "unknown class folder"),
    ("missing", "class folder missing"),
    ("stray", "not an image file"),
])
def test_bad_class_folders_name_the_path(tmp_path, damage, needle):
    root = write_brain_tumor_twin(tmp_path / "b", n_per_class=(2, 1), size=16, seed=0)
    target = root / "Training" / "meningioma"
    if damage == "empty":
        for p in target.iterdir():
            p.unlink()
    elif damage == "unknown":
        (root / "Training" / "astrocytoma").mkdir()
        target = root / "Training" / "astrocytoma"
    elif damage == "missing":
        for p in target.iterdir():
            p.unlink()
        target.rmdir()
    else:
        target = target / "notes.txt"
        target.write_text("x")
    with pytest.raises(InputDataError) as err:
        brain_tumor_datalist(root)
    msg = str(err.value)
    assert needle in msg and str(target) in msg and "\n" not in msg


def test_truncated_image_stops_prepare(tmp_path):
    root = write_brain_tumor_twin(tmp_path / "b", n_per_class=(2, 1), size=32, seed=0)
    bad = root / "Testing" / "glioma" / "Te-gl_0000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(InputDataError) as err:
        prepare_class_datalist("brain_tumor", root, tmp_path / "dl.json")
    assert str(bad) in str(err.value) and "corrupt or truncated" in str(err.value)
    assert not (tmp_path / "dl.json").exists()


def test_configurable_class_names(tmp_path):
    root = write_brain_tumor_twin(tmp_path / "b", n_per_class=(2, 1), size=16, seed=0)
    for split in ("Training", "Testing"):
        (root / split / "notumor").rename(root / split / "no_tumor")
    with pytest.raises(InputDataError, match="unknown class folder"):
        brain_tumor_datalist(root)
    d = brain_tumor_datalist(root, classes=("glioma", "meningioma", "no_tumor", "pituitary"))
    assert {e["label"] for e in d["test"] if "no_tumor" in e["image"]} == {2}


def test_fgadr_datalist(tmp_path):
    root = write_fgadr_twin(tmp_path / "f", n_images=40, size=24, seed=0)
    d = fgadr_datalist(root)
    assert sum(len(v) for v in d.values()) == 40
    assert len(d["test"]) == 5 * round(8 * 0.185) and {e["label"] for e in d["test"]} == set(range(5))
    all_images = [e["image"] for v in d.values() for e in v]
    assert len(set(all_images)) == 40
    (root / "Original_Images" / "9999_1.png").write_bytes((root / "Original_Images").glob("*.png").__next__().read_bytes())
    with pytest.raises(InputDataError, match="not graded"):
        fgadr_datalist(root)
    (root / "Original_Images" / "9999_1.png").unlink()
    (root / "DR_Seg_Grading_Label.csv").write_text("image,grade\n0001_x.png,7\n")
    with pytest.raises(InputDataError, match=r"not one of 0\.\.4"):
        fgadr_datalist(root)
    (root / "DR_Seg_Grading_Label.csv").write_text("image,grade\n0001_x.png,inf\n")
    with pytest.raises(InputDataError, match="is not a number"):
        fgadr_datalist(root)


def test_fundus_augment_crop_and_autocontrast():
    torch.manual_seed(0)
    item = {"image": torch.randn(3, 20, 24) * 0.1, "label": 1}
    out = FundusTrainAugment(crop=16, flip_prob=0.0, autocontrast_prob=1.0)(item)
    assert out["image"].shape == (3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = out["image"] * std + mean
    torch.testing.assert_close(x.amin(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.amax(dim=(1, 2)), torch.ones(3), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- network


def test_heads_shapes():
    one = classifier_head(2048, 4, "1fc")
    assert [type(m).__name__ for m in one] == ["Linear"] and one[0].weight.shape == (4, 2048)
    fcns = classifier_head(2048, 4, "fcns", (512, 256))
    assert [tuple(m.weight.shape) for m in fcns if isinstance(m, torch.nn.Linear)] == [(512, 2048), (256, 512), (4, 256)]
    assert [type(m).__name__ for m in fcns] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    fg = classifier_head(2048, 5, "fcns", (512, 128))
    assert [m.out_features for m in fg if isinstance(m, torch.nn.Linear)] == [512, 128, 5]
    with pytest.raises(ValueError):
        classifier_head(2048, 4, "mlp")


def test_forward_is_head_of_pooled_features_and_scripts():
    torch.manual_seed(0)
    net = LVMMedClassifier(num_classes=4, arch="resnet18", head="fcns").eval()
    x = torch.rand(2, 3, 32, 32)
    feats = net.encoder(x).mean(dim=(2, 3))
    torch.testing.assert_close(net(x), net.head(feats))
    torch.testing.assert_close(torch.jit.script(net)(x), net(x))


def test_frozen_encoder_stays_in_eval_mode_and_keeps_bn_stats():
    torch.manual_seed(0)
    net = LVMMedClassifier(num_classes=4, arch="resnet18", frozen=True).train()
    assert not net.encoder.training and net.head.training
    assert all(not p.requires_grad for p in net.encoder.parameters())
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in net.head.parameters()}
    before = net.encoder.bn1.running_mean.clone()
    net(torch.rand(4, 3, 32, 32) * 5)
    torch.testing.assert_close(net.encoder.bn1.running_mean, before)
    ref = LVMMedClassifier(num_classes=4, arch="resnet18", frozen=True, frozen_bn_train=True).train()
    assert ref.encoder.training  # the reference's quirk: BN statistics keep updating
    before = ref.encoder.bn1.running_mean.clone()
    ref(torch.rand(4, 3, 32, 32) * 5)
    assert not torch.allclose(ref.encoder.bn1.running_mean, before)


def test_lvmmed_init_from_monai_resnet_file(tmp_path):
    torch.manual_seed(1)
    src = DilatedResNet("resnet18", output_stride=32, dilation=False)
    torch.save({**src.state_dict(), "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, tmp_path / "w.pt")
    net = LVMMedClassifier(num_classes=4, arch="resnet18", init="lvmmed", pretrained_path=tmp_path / "w.pt")
    assert net.loaded_tensors == len(src.state_dict())
    torch.testing.assert_close(net.encoder.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    with pytest.raises(InputDataError):
        LVMMedClassifier(num_classes=4, arch="resnet34", init="lvmmed", pretrained_path=tmp_path / "w.pt")


# ----------------------------------------------------------------------------- feature cache


def _images(brain, split="validation", size=32):
    d = brain_tumor_datalist(brain)
    return ImageFolderDataset(d[split], brain, split=split, image_size=size, resize_mode="resize", label_dtype="long")


def test_feature_cache_equals_recomputed_and_is_invalidated(brain, tmp_path):
    torch.manual_seed(0)
    net = LVMMedClassifier(num_classes=4, arch="resnet18", frozen=True)
    ds = _images(brain)
    first = CachedFeatureDataset(net, ds, tmp_path, "validation", batch_size=4)
    assert first.computed and first.path.is_file() and len(first) == len(ds)
    with torch.no_grad():
        direct = torch.stack([net.eval().features(ds[i]["image"][None])[0] for i in range(len(ds))])
    torch.testing.assert_close(first.features, direct, rtol=1e-4, atol=1e-5)
    assert first[0]["label"] == ds[0]["label"] and first[0]["image_path"] == ds[0]["image_path"]

    again = CachedFeatureDataset(net, ds, tmp_path, "validation", batch_size=4)
    assert not again.computed and torch.equal(again.features, first.features)

    with torch.no_grad():
        net.encoder.layer4[0].conv1.weight.mul_(2.0)  # another encoder
    changed = CachedFeatureDataset(net, ds, tmp_path, "validation", batch_size=4)
    assert changed.computed and changed.fingerprint != first.fingerprint
    assert not first.path.exists() and [p.name for p in tmp_path.glob("validation_*.pt")] == [changed.path.name]
    torch.testing.assert_close(changed.features, compute_features(net, ds, 4)[0])

    other_size = CachedFeatureDataset(net, _images(brain, size=40), tmp_path, "validation", batch_size=4)
    assert other_size.computed and other_size.fingerprint != changed.fingerprint


def test_feature_cache_refuses_unfrozen_or_random_transform(brain, tmp_path):
    net = LVMMedClassifier(num_classes=4, arch="resnet18", frozen=False)
    with pytest.raises(ValueError, match="frozen"):
        CachedFeatureDataset(net, _images(brain), tmp_path, "validation")
    bn = LVMMedClassifier(num_classes=4, arch="resnet18", frozen=True, frozen_bn_train=True)
    with pytest.raises(ValueError, match="frozen_bn_train"):
        CachedFeatureDataset(bn, _images(brain), tmp_path, "validation")
    ds = _images(brain)
    ds.transform = FundusTrainAugment(crop=24)
    with pytest.raises(ValueError, match="deterministic"):
        CachedFeatureDataset(LVMMedClassifier(4, "resnet18", frozen=True), ds, tmp_path, "validation")


# ----------------------------------------------------------------------------- metrics


def _scores(n=60, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    s, y = _scores(seed=seed)
    pred = s.argmax(1).numpy()
    probs = torch.softmax(s, 1).numpy()
    assert multiclass_accuracy(s, y) == pytest.approx(accuracy_score(y, pred))
    assert macro_f1(s, y) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert macro_auroc(s, y) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    p, r, f, n = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    rows = per_class_rows(s, y, ["a", "b", "c", "d"])
    np.testing.assert_allclose([row["precision"] for row in rows], p)
    np.testing.assert_allclose([row["recall"] for row in rows], r)
    np.testing.assert_allclose([row["f1"] for row in rows], f)
    assert [row["support"] for row in rows] == list(n)
    for c, row in enumerate(rows):
        assert row["auroc"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))


def test_macro_auroc_leaves_out_an_absent_class():
    s, y = _scores(n=40, c=4, seed=3)
    y[y == 3] = 0
    probs = torch.softmax(s, 1).numpy()
    expected = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert macro_auroc(s, y) == pytest.approx(expected)
    assert math.isnan(per_class_rows(s, y)[3]["auroc"])


def test_ignite_metrics_pool_batches():
    s, y = _scores(n=30, seed=4)
    for metric, fn in ((MulticlassAccuracy(), multiclass_accuracy), (MacroF1(), macro_f1), (MacroAUROC(), macro_auroc)):
        metric.reset()
        for i in range(0, 30, 7):
            metric.update((s[i:i + 7].float(), y[i:i + 7]))
        assert metric.compute() == pytest.approx(fn(s, y), rel=1e-6)
        assert metric.num_samples == 30 and len(metric.details) == 4


def test_pick_examples_round_robin():
    assert pick_examples([0, 0, 1, 2, 2, 1], 4) == [0, 2, 3, 1]
    assert pick_examples([1, 1], 5) == [0, 1]


def test_twin_written_as_jpeg_in_the_real_layout(brain):
    names = sorted(p.relative_to(brain).as_posix() for p in brain.rglob("*.jpg"))
    assert "Training/glioma/Tr-gl_0000.jpg" in names and "Testing/pituitary/Te-pi_0001.jpg" in names
    assert len(names) == 28
    assert json.dumps(brain_tumor_datalist(brain))  # serialisable


# ----------------------------------------------------------------------------- bundle configs (parsed, not run)


def _parsed(tmp_path, data, *configs, **overrides):
    from monai.bundle import ConfigParser

    from custom_components.data.class_folders import prepare_class_datalist

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "lvmmed_cls_brain" / "configs"
    parser = ConfigParser()
    parser.read_config([str(bundle / c) for c in ("train.json", *configs)])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(data), "num_workers": 0, **overrides})
    prepare_class_datalist(parser.get_parsed_content("dataset_name"), data, parser.get_parsed_content("datalist"),
                           val_fraction=parser.get_parsed_content("val_fraction"))
    return parser


def test_fgadr_override_crops_randomly_in_training_and_centrally_at_test(tmp_path):
    data = write_fgadr_twin(tmp_path / "fg", n_images=25, size=40, seed=0)
    parser = _parsed(tmp_path, data, "dataset/fgadr.json", "head/fcns.json", image_size=24, resize_short=32)
    train, val = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset")
    assert train[0]["image"].shape == val[0]["image"].shape == (3, 24, 24)
    torch.manual_seed(0)
    crops = {tuple(train[0]["image"][0, :2, :2].flatten().tolist()) for _ in range(6)}
    assert len(crops) > 1  # random crops in training
    assert torch.equal(val[0]["image"], val[0]["image"])  # deterministic at test
    net = parser.get_parsed_content("network_def")
    assert [m.out_features for m in net.head if isinstance(m, torch.nn.Linear)] == [512, 128, 5]
    probe = _parsed(tmp_path / "p", data, "dataset/fgadr.json", "linear_probe.json", "dataset/fgadr_linear_probe.json",
                    image_size=24, resize_short=32, arch="resnet18")  # fmt: skip
    cached = probe.get_parsed_content("train#dataset")
    assert isinstance(cached, CachedFeatureDataset) and cached.features.shape[1] == 512
    assert probe.get_parsed_content("learning_rate") == 5e-4


def test_linear_probe_config_trains_the_head_of_the_saved_network(tmp_path, brain):
    parser = _parsed(tmp_path, brain, "demo.json", "linear_probe.json", image_size=32)
    net = parser.get_parsed_content("network")
    assert parser.get_parsed_content("train#trainer").network is net.head
    assert parser.get_parsed_content("validate#evaluator").network is net.head
    assert {id(p) for p in parser.get_parsed_content("optimizer").param_groups[0]["params"]} == {
        id(p) for p in net.head.parameters()}
    assert parser.get_parsed_content("validate#best_saver").network is net  # model.pt is the whole classifier
