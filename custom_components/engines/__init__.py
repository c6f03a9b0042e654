from .guided import ExplainIteration, GuidedIteration

__all__ = ["GuidedIteration", "ExplainIteration"]
