from .base import GuidanceLoss, positive_selection
from .blur import gaussian_blur, gaussian_kernel1d
from .gradmask import GradMaskLoss
from .ham import (
    HAM_LOSS_TERMS,
    HAMLoss,
    ham_abnormality_loss,
    ham_bound_loss,
    ham_box_loss,
    ham_classification_loss,
    ham_union_loss,
)
from .lgmvit_kl import LGMViTKLLoss
from .res import LearnedImputation, RESLoss, res_threshold, trainable_parameters
from .robustvit import RobustViTLoss

__all__ = [
    "GuidanceLoss",
    "positive_selection",
    "gaussian_blur",
    "gaussian_kernel1d",
    "LGMViTKLLoss",
    "GradMaskLoss",
    "RobustViTLoss",
    "RESLoss",
    "LearnedImputation",
    "res_threshold",
    "trainable_parameters",
    "HAMLoss",
    "HAM_LOSS_TERMS",
    "ham_abnormality_loss",
    "ham_classification_loss",
    "ham_box_loss",
    "ham_bound_loss",
    "ham_union_loss",
]
