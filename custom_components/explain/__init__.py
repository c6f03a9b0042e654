from .base import Explainer, resize_maps
from .eafem import EAFEM, eafem_map
from .gae import GAE, gae_relevance, minmax_per_sample, target_scalar
from .input_gradient import InputCapture, InputGradient

__all__ = [
    "Explainer",
    "resize_maps",
    "EAFEM",
    "eafem_map",
    "GAE",
    "gae_relevance",
    "minmax_per_sample",
    "target_scalar",
    "InputGradient",
    "InputCapture",
]
