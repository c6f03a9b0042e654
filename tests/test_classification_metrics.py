"""Slice classification metrics (LGM-ViT spec §7) against scikit-learn, ignite and MONAI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError

from custom_components.handlers.report import (
    MetricsReportWriter,
    format_mean_std,
    format_percent,
    markdown_table,
)
from custom_components.metrics import (
    AUROC,
    F1,
    Accuracy,
    AveragePrecision,
    CohenKappa,
    accuracy,
    auroc,
    average_precision,
    classification_metrics,
    cohen_kappa,
    f1_score,
    positive_probability,
)

skm = pytest.importorskip("sklearn.metrics")

KEYS = ("f1", "accuracy", "auroc", "ap", "kappa")

_rng = np.random.default_rng(0)
_big_labels = (_rng.random(200) < 0.3).astype(int)
_big_scores = np.clip(_big_labels * 0.25 + _rng.random(200) * 0.75, 0, 1)

# (scores, labels): ties, all-correct, all-wrong, imbalanced, random with rounded ties.
CASES = {
    "ties": ([0.1, 0.4, 0.4, 0.4, 0.8, 0.8, 0.3, 0.6, 0.6, 0.2], [0, 1, 0, 1, 1, 0, 0, 1, 0, 1]),
    "all_correct": ([0.9, 0.8, 0.7, 0.2, 0.1, 0.3], [1, 1, 1, 0, 0, 0]),
    "all_wrong": ([0.1, 0.2, 0.3, 0.9, 0.8, 0.7], [1, 1, 1, 0, 0, 0]),
    "imbalanced": ([0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.55, 0.6, 0.7, 0.52, 0.9], [0] * 10 + [1, 1]),
    "at_threshold": ([0.5, 0.5, 0.5, 0.7, 0.2], [1, 0, 1, 1, 0]),
    "random_ties": (np.round(_big_scores, 1).tolist(), _big_labels.tolist()),
    "random": (_big_scores.tolist(), _big_labels.tolist()),
}


def _sk(scores, labels, threshold=0.5):
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    pred = (s > threshold).astype(int)
    return {
        "f1": skm.f1_score(y, pred, zero_division=0),
        "accuracy": skm.accuracy_score(y, pred),
        "auroc": skm.roc_auc_score(y, s),
        "ap": skm.average_precision_score(y, s),
        "kappa": skm.cohen_kappa_score(y, pred),
    }


# ----------------------------------------------------------------------------- functions
@pytest.mark.parametrize("name", sorted(CASES))
def test_functions_match_sklearn(name):
    scores, labels = CASES[name]
    ours = classification_metrics(torch.tensor(scores), torch.tensor(labels))
    ref = _sk(scores, labels)
    for k in KEYS:
        assert isinstance(ours[k], float)
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k
    assert ours["n"] == len(labels) and ours["n_positive"] == sum(labels)
    # the single functions agree with the dict, and accept lists / numpy arrays
    assert f1_score(scores, labels) == ours["f1"]
    assert accuracy(np.asarray(scores), np.asarray(labels)) == ours["accuracy"]
    assert cohen_kappa(scores, labels) == ours["kappa"]
    assert auroc(scores, labels) == ours["auroc"]
    assert average_precision(scores, labels) == ours["ap"]


def test_other_threshold_matches_sklearn():
    scores, labels = CASES["random"]
    ours = classification_metrics(scores, labels, threshold=0.3)
    ref = _sk(scores, labels, threshold=0.3)
    for k in KEYS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_known_values():
    assert classification_metrics(*CASES["all_correct"])["f1"] == 1.0
    m = classification_metrics(*CASES["all_wrong"])
    assert m["f1"] == 0.0 and m["accuracy"] == 0.0 and m["auroc"] == 0.0 and m["kappa"] == -1.0
    # a positive tied with a negative counts 1/2
    assert auroc([0.5, 0.5], [0, 1]) == 0.5


def test_rank_metrics_invariant_to_sigmoid():
    logits = torch.tensor([-3.0, -1.0, -1.0, 0.0, 0.5, 2.0, 2.0, 4.0, -0.2, 1.3])
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1, 1, 0])
    probs = torch.sigmoid(logits)
    assert auroc(logits, labels) == pytest.approx(auroc(probs, labels), abs=1e-12)
    assert average_precision(logits, labels) == pytest.approx(average_precision(probs, labels), abs=1e-12)
    assert auroc(logits, labels) == pytest.approx(skm.roc_auc_score(labels.numpy(), logits.numpy()), abs=1e-12)


def test_positive_probability_shapes():
    z = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(positive_probability(z), torch.sigmoid(z))
    assert torch.allclose(positive_probability(z[:, None]), torch.sigmoid(z))
    two = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-2.0, 2.0]])
    expected = torch.softmax(two, dim=1)[:, 1]
    out = positive_probability(two)
    assert out.shape == (3,) and torch.allclose(out, expected)
    # (B,2) logits [0, z] are equivalent to a single logit z
    assert torch.allclose(positive_probability(torch.stack([torch.zeros(3), z], 1)), torch.sigmoid(z))
    for bad in (torch.zeros(3, 3), torch.zeros(2, 1, 1)):
        with pytest.raises(ValueError, match="shape"):
            positive_probability(bad)


def test_degenerate_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no positives at all, none predicted: F1 0 like sklearn zero_division=0
        assert f1_score([0.1, 0.2], [0, 0]) == 0.0 == skm.f1_score([0, 0], [0, 0], zero_division=0)
        # p_e == 1: sklearn returns nan, so do we
        assert math.isnan(cohen_kappa([0.1, 0.2], [0, 0]))
        assert math.isnan(skm.cohen_kappa_score([0, 0], [0, 0]))
        assert math.isnan(cohen_kappa([0.9, 0.8], [1, 1]))
        # labels all one class but predictions not: p_e < 1, defined
        assert cohen_kappa([0.9, 0.1], [1, 1]) == pytest.approx(skm.cohen_kappa_score([1, 1], [1, 0]))
    # rank metrics undefined with a single class -> nan (documented; sklearn AP gives 0/1 here)
    for labels in ([0, 0, 0], [1, 1, 1]):
        assert math.isnan(auroc([0.1, 0.5, 0.9], labels))
        assert math.isnan(average_precision([0.1, 0.5, 0.9], labels))
    m = classification_metrics([0.7], [1])
    assert m["accuracy"] == 1.0 and m["f1"] == 1.0 and math.isnan(m["auroc"])


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match=r"labels must be 0 or 1.*2\.0"):
        f1_score([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match=r"-1\.0"):
        auroc([0.1, 0.2], [-1, 1])
    with pytest.raises(ValueError, match="NaN in predictions"):
        average_precision([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="infinite"):
        accuracy([0.1, float("inf")], [0, 1])
    with pytest.raises(ValueError, match="different lengths"):
        cohen_kappa([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="zero samples"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="1-D"):
        auroc(torch.zeros(2, 2), torch.zeros(2, 2))


# ----------------------------------------------------------------------------- ignite
def _batches():
    """3 iterations of uneven size; logits (B,1) and labels (B,) / (B,1) / list-of-tensors."""
    g = torch.Generator().manual_seed(1)
    sizes = (5, 2, 7)
    out = []
    for i, b in enumerate(sizes):
        y = (torch.rand(b, generator=g) < 0.5).long()
        z = torch.randn(b, 1, generator=g) + 1.5 * (y[:, None].float() - 0.5)
        out.append((z, y if i != 1 else y[:, None]))
    return out


METRIC_CLASSES = {"f1": F1, "accuracy": Accuracy, "auroc": AUROC, "ap": AveragePrecision, "kappa": CohenKappa}


@pytest.mark.parametrize("decollated", [False, True])
def test_ignite_metrics_accumulate_over_iterations(decollated):
    batches = _batches()
    if decollated:  # MONAI decollate=True gives lists of per-sample tensors
        batches = [(list(z), list(y)) for z, y in batches]
    engine = Engine(lambda e, batch: batch)
    for name, cls in METRIC_CLASSES.items():
        cls().attach(engine, name)
    state = engine.run(batches, max_epochs=1)
    z = torch.cat([torch.as_tensor(b[0]).reshape(-1) for b in _batches()])
    y = torch.cat([b[1].reshape(-1) for b in _batches()])
    expected = classification_metrics(torch.sigmoid(z.double()), y)
    for name in METRIC_CLASSES:
        assert state.metrics[name] == pytest.approx(expected[name], abs=1e-12), name
    assert state.metric_sample_counts["f1"] == 14


def test_ignite_metric_two_logits_and_reset():
    m = AUROC()
    two = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.5], [0.2, 0.3]])
    y = torch.tensor([1, 0, 1, 0])
    m.update((two, y))
    assert m.compute() == pytest.approx(auroc(torch.softmax(two, 1)[:, 1], y))
    m.reset()
    with pytest.raises(NotComputableError):
        m.compute()
    with pytest.raises(ValueError, match="predictions but"):
        m.update((torch.zeros(3, 1), torch.zeros(2)))


def test_monai_supervised_evaluator():
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    g = torch.Generator().manual_seed(2)
    data = []
    for b in (4, 3, 5):
        data.append({"image": torch.randn(b, 4, generator=g), "label": (torch.rand(b, generator=g) < 0.5).float()})

    def metric(cls):
        return cls(output_transform=from_engine(["pred", "label"]))

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=net,
        key_val_metric={"val_f1": metric(F1)},
        additional_metrics={
            "val_accuracy": metric(Accuracy),
            "val_auroc": metric(AUROC),
            "val_ap": metric(AveragePrecision),
            "val_kappa": metric(CohenKappa),
        },
    )
    evaluator.run()
    with torch.no_grad():
        logits = torch.cat([net(d["image"]) for d in data]).reshape(-1).double()
    labels = torch.cat([d["label"] for d in data])
    expected = classification_metrics(torch.sigmoid(logits), labels)
    for k in KEYS:
        assert evaluator.state.metrics[f"val_{k}"] == pytest.approx(expected[k], abs=1e-6), k
    assert evaluator.state.best_metric == pytest.approx(expected["f1"], abs=1e-6)


# ----------------------------------------------------------------------------- report
def test_markdown_helpers():
    assert format_percent(0.914) == "91.40"
    assert format_percent(float("nan")) == "n/a"
    assert format_mean_std([0.9126, 0.9140, 0.9154]) == "91.40 ± 0.14"
    assert format_mean_std([0.5]) == "50.00"
    table = markdown_table([{"method": "LGM-ViT", "F1": "91.40"}, {"method": "a|b"}], ["method", "F1"])
    assert table.splitlines() == ["| method | F1 |", "|---|---|", "| LGM-ViT | 91.40 |", "| a\\|b |  |"]


def test_metrics_report_writer(tmp_path):
    values = {"f1": 0.914, "accuracy": 0.928, "auroc": 0.973, "ap": 0.974, "kappa": float("nan")}
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _fill(e):
        e.state.metrics.update(values)
        e.state.metric_sample_counts = {"f1": 42}

    writer = MetricsReportWriter(tmp_path / "out", filename="test_metrics", title="BraTS test", extra={"seed": 3})
    writer.attach(engine)
    engine.run([0], max_epochs=1)

    report = json.loads((tmp_path / "out" / "test_metrics.json").read_text())
    assert report["metrics"] == {**values, "kappa": None}
    assert report["n_samples"] == 42 and report["extra"] == {"seed": 3} and report["title"] == "BraTS test"
    md = (tmp_path / "out" / "test_metrics.md").read_text()
    assert md.startswith("# BraTS test\n")
    for line in ("| metric | value |", "| f1 | 91.40 |", "| accuracy | 92.80 |", "| auroc | 97.30 |",
                 "| ap | 97.40 |", "| kappa | n/a |"):
        assert line in md.splitlines()
    assert "42 samples" in md


def test_report_writer_with_monai_names(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update({"val_f1": 0.5}))
    MetricsReportWriter(tmp_path, metric_names={"val_f1": "F1", "val_auroc": "AUROC"}).attach(engine)
    engine.run([0], max_epochs=1)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["metrics"] == {"F1": 0.5, "AUROC": None} and report["n_samples"] is None
    assert "| F1 | 50.00 |" in (tmp_path / "metrics.md").read_text()


def test_report_counts_follow_the_reported_metrics(tmp_path):
    """Metrics counting different units: n_samples is the first reported metric's, each count is listed."""
    engine = Engine(lambda e, b: None)

    def metrics(e):
        e.state.metrics.update({"auroc": 0.8, "mtiou": 0.3})
        e.state.metric_sample_counts = {"mtiou": 9, "auroc": 7}

    engine.add_event_handler(Events.EPOCH_COMPLETED, metrics)
    MetricsReportWriter(tmp_path, metric_names=("auroc", "mtiou")).attach(engine)
    engine.run([0], max_epochs=1)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["n_samples"] == 7 and report["sample_counts"] == {"auroc": 7, "mtiou": 9}
    md = (tmp_path / "metrics.md").read_text()
    assert "7 samples" in md and "Counts: auroc 7, mtiou 9." in md


def test_one_class_split_is_noted_once_and_reported(tmp_path, caplog):
    """AUROC / AP of a split with negatives only stay NaN (n/a), with one warning each and a report note."""
    import logging

    batches = [(torch.tensor([0.3, -1.0]), torch.tensor([0.0, 0.0])), (torch.tensor([2.0]), torch.tensor([0.0]))]
    engine = Engine(lambda e, batch: batch)
    for name in ("f1", "auroc", "ap"):
        METRIC_CLASSES[name]().attach(engine, name)
    MetricsReportWriter(tmp_path, metric_names=["f1", "auroc", "ap"]).attach(engine)
    with caplog.at_level(logging.WARNING):
        state = engine.run(batches, max_epochs=3)  # validation-like: every epoch, warned once
    assert math.isnan(state.metrics["auroc"]) and math.isnan(state.metrics["ap"]) and state.metrics["f1"] == 0.0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and warned[0].startswith("auroc (AUROC)") and warned[1].startswith("ap (AveragePrecision)")
    assert all("3 samples" in w and "every sample is negative" in w for w in warned), warned
    assert state.metric_notes == {"f1": [], "auroc": [warned[0]], "ap": [warned[1]]}
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["metrics"]["auroc"] is None and report["notes"] == warned
    md = (tmp_path / "metrics.md").read_text()
    assert "| auroc | n/a |" in md and f"- {warned[0]}" in md
    # both classes present: no note, and the notes of the previous run do not leak into a new one
    m = AUROC()
    m.update((torch.tensor([0.1, 0.9]), torch.tensor([0, 1])))
    assert m.compute() == 1.0 and m.undefined is None
