from .ham import (
    DilatedResNet,
    FABlock,
    FAModule,
    HAMNet,
    HAMOutput,
    ham_network,
    lse_pool,
    minmax_cams,
    refine_cams,
)
from .vit import AttributionViT, attribution_vit

__all__ = [
    "AttributionViT",
    "attribution_vit",
    "HAMNet",
    "HAMOutput",
    "ham_network",
    "DilatedResNet",
    "FABlock",
    "FAModule",
    "lse_pool",
    "minmax_cams",
    "refine_cams",
]
