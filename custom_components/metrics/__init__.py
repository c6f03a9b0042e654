"""Metrics shared by the bundles (slice-level binary classification, LGM-ViT spec §7)."""

from custom_components.metrics.classification import (
    AUROC,
    F1,
    Accuracy,
    AveragePrecision,
    CohenKappa,
    EpochScoreMetric,
    accuracy,
    auroc,
    average_precision,
    classification_metrics,
    cohen_kappa,
    f1_score,
    positive_probability,
)

__all__ = [
    "positive_probability",
    "f1_score",
    "accuracy",
    "cohen_kappa",
    "auroc",
    "average_precision",
    "classification_metrics",
    "EpochScoreMetric",
    "F1",
    "Accuracy",
    "AUROC",
    "AveragePrecision",
    "CohenKappa",
]
