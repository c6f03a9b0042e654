from .base import Explainer, resize_maps
from .eafem import EAFEM, eafem_map

__all__ = ["Explainer", "resize_maps", "EAFEM", "eafem_map"]
