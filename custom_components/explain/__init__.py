from .attention import AttentionRollout, RawAttention, attention_rollout
from .base import Explainer, resize_maps
from .cnn_cam import CNNGradCAM
from .eafem import EAFEM, eafem_map
from .gae import GAE, gae_relevance, minmax_per_sample, target_scalar
from .gradcam import GradCAMCapture, ViTGradCAM
from .ham_cam import HAMAttention, HAMCapture, ham_target_index
from .input_gradient import InputCapture, InputGradient
from .lrp import LRPCapture, TransformerAttribution

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
    "RawAttention",
    "AttentionRollout",
    "attention_rollout",
    "TransformerAttribution",
    "LRPCapture",
    "ViTGradCAM",
    "GradCAMCapture",
    "CNNGradCAM",
    "HAMAttention",
    "HAMCapture",
    "ham_target_index",
]
