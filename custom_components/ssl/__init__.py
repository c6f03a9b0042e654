"""LVM-Med self-supervision: views with geometry, graphs + GCN, affinities, matching solvers, IMLE, objective."""

from custom_components.ssl.objective import GraphMatchingObjective, SSLOutput
from custom_components.ssl.views import TwoViews, cell_centres

__all__ = ["GraphMatchingObjective", "SSLOutput", "TwoViews", "cell_centres"]
