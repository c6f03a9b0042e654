from .guided import ExplainIteration, GuidedIteration
from .ham import HAMEvalIteration, HAMIteration

__all__ = ["GuidedIteration", "ExplainIteration", "HAMIteration", "HAMEvalIteration"]
