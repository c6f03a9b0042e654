"""The attention-map interpretability study as workflows: write every method's maps, score them.

:func:`write_explanations` (``explain.json``) and :func:`score_explanations`
(``evaluate_explanations.json``); the HTML report reads the same run folders.
"""

from .scoring import LOCALISATION_KS, load_explanations, score_explanations
from .writer import EXPLANATIONS_DIR, load_network_weights, write_explanations

__all__ = [
    "EXPLANATIONS_DIR",
    "LOCALISATION_KS",
    "load_explanations",
    "load_network_weights",
    "score_explanations",
    "write_explanations",
]
