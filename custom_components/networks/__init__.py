from .vit import AttributionViT, attribution_vit

__all__ = ["AttributionViT", "attribution_vit"]
