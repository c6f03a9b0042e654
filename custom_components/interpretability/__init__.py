"""The attention-map interpretability study as workflows: write every method's maps, score them.

:func:`write_explanations` (``explain.json``) and :func:`score_explanations`
(``evaluate_explanations.json``); the HTML report reads the same run folders. One target class for
every image (the ViT study) or one per item (``PER_ITEM``: HAM's (image, finding) cases).
"""

from .scoring import LOCALISATION_KS, load_explanations, score_explanations
from .writer import (
    EXPLANATIONS_DIR,
    PER_ITEM,
    input_normalization,
    item_is_positive,
    item_targets,
    load_network_weights,
    write_explanations,
)

__all__ = [
    "EXPLANATIONS_DIR",
    "PER_ITEM",
    "input_normalization",
    "item_is_positive",
    "item_targets",
    "LOCALISATION_KS",
    "load_explanations",
    "load_network_weights",
    "score_explanations",
    "write_explanations",
]
