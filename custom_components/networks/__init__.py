from .vit import AttributionViT

__all__ = ["AttributionViT"]
