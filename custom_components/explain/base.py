"""Template-method base class of every explanation method.

An explainer maps a batch of images to one spatial map per image. Subclasses say which
internals they need (:meth:`Explainer.capture`) and how to turn them into a map
(:meth:`Explainer.explain`); :meth:`Explainer.attribute` is the single public entry point
(Captum's convention). The guided trainer uses the same two steps inside its own forward pass,
so a map used by a guidance loss stays in the autograd graph of that pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.capture import Capture

__all__ = ["Explainer", "resize_maps", "check_map_options", "UPSAMPLE_MODES", "NORMALIZE_MODES"]

#: what an explainer's :meth:`Explainer.capture` returns and its :meth:`Explainer.explain` reads
RecordT = TypeVar("RecordT", bound=Capture)

UPSAMPLE_MODES = ("bilinear", "nearest", "none")
NORMALIZE_MODES = ("minmax", "none")


def check_map_options(upsample: str, normalize: str, target: object = "auto") -> None:
    """Validate the post-processing options shared by the explainers (and a target, if given)."""
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if not (isinstance(target, int) or target in ("auto", "predicted")):
        raise ValueError(f"target must be 'auto', 'predicted' or a class index, got {target!r}")


def resize_maps(maps: torch.Tensor, out_size: Sequence[int] | None, mode: str = "bilinear") -> torch.Tensor:
    """Resize (B, h, w) maps to ``out_size`` with ``align_corners=False`` (no-op if None or equal)."""
    if out_size is None or tuple(maps.shape[-2:]) == tuple(out_size):
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.unsqueeze(1), size=tuple(int(s) for s in out_size), mode=mode, **kwargs).squeeze(1)


class Explainer(ABC, Generic[RecordT]):
    """Base of explanation methods for an attribution-ready network.

    Generic in the capture type ``RecordT`` (any :class:`~custom_components.capture.Capture`: a
    :class:`~custom_components.capture.ViTCapture` subclass for ViTs, a CNN's own hook owner), so
    :meth:`capture` and :meth:`explain` of a subclass agree on it.

    Args:
        model: the network (DDP wrappers are looked through by the capture).
    """

    #: Whether :meth:`explain` differentiates through the forward pass (GAE, Grad-CAM). Callers
    #: that explain without training (inference, TensorBoard panels) keep autograd on for these.
    needs_gradients: bool = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def capture(self, detach: bool = False) -> RecordT:
        """A capture object recording what :meth:`explain` needs during the next forward."""

    @abstractmethod
    def explain(
        self,
        logits: torch.Tensor,
        record: RecordT,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Maps (B, H, W) from the logits and the record of the forward that produced them."""

    def attribute(
        self, images: torch.Tensor, target: torch.Tensor | None = None, out_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Run the model on ``images`` and return one map per image, (B, H, W).

        ``out_size`` defaults to the image size. Gradients flow to the model's parameters only if
        the caller enables them (the maps are not detached).
        """
        out_size = tuple(images.shape[-2:]) if out_size is None else out_size
        with self.capture() as record:
            logits = self.model(images)
            return self.explain(logits, record, target=target, out_size=out_size)
