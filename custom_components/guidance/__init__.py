from .base import GuidanceLoss, positive_selection
from .blur import gaussian_blur, gaussian_kernel1d
from .lgmvit_kl import LGMViTKLLoss

__all__ = ["GuidanceLoss", "positive_selection", "gaussian_blur", "gaussian_kernel1d", "LGMViTKLLoss"]
