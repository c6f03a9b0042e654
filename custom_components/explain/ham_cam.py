"""HAM's class attention maps as an explainer.

Ouyang et al., "Learning Hierarchical Attention for Weakly-supervised Chest X-Ray Abnormality
Localization and Diagnosis", IEEE TMI 2021; spec ``specs/ham.md`` sections 2-3. For class t (0: the
abnormality head, 1..C: the findings) the map is the network's own

    M_t = ReLU(sum_k w_{t,k} F_k)

over the fused features F, with the head weights detached (the maps HAM's losses train). With LSE
pooling the Grad-CAM channel weights are exactly w_{t,k} (section 3), so no backward pass is needed:
the map is Grad-CAM of the fused features up to the 1/(hw) of Grad-CAM's gradient mean.

Post-processing: the raw map at the feature resolution, or resized with bilinear
``align_corners=True`` (HAM's convention, unlike the other explainers' ``False``) and min-maxed per
sample as :func:`~custom_components.networks.ham.minmax_cams`; thresholding that map at
0.4 + ln(999)/100 gives HAM's localisation mask. ``refine=True`` returns the refined map
R = sigmoid(cam_w (M_hat - cam_sigma)) itself (:func:`~custom_components.networks.ham.refine_cams`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.explain.base import Explainer, check_map_options
from custom_components.networks.ham import minmax_cams, refine_cams

__all__ = ["HAMAttention", "HAMCapture", "ham_target_index", "unwrap_ham"]


def unwrap_ham(model: nn.Module) -> nn.Module:
    """The HAM network inside DDP/DataParallel wrappers (anything with a ``.module``)."""
    while not hasattr(model, "cams_from_features") and hasattr(model, "module"):
        model = model.module
    if not (hasattr(model, "cams_from_features") and hasattr(model, "cls_head")):
        raise TypeError(f"{type(model).__name__} is not a HAM network (no fused features and class maps)")
    return model


def ham_target_index(logits: torch.Tensor, target: torch.Tensor | int | str | None = None) -> torch.Tensor:
    """Per-sample map index (B,) into HAM's logits (B, 1 + C): 0 is the abnormality, 1..C the findings.

    Args:
        logits: HAM's output, abnormality first.
        target: ``None`` or ``"predicted"``: the most probable finding, 1 + argmax(o_c) (the
            abnormality logit is left out: "any finding" is at least as likely as each finding, so
            it would win the argmax of a consistent model almost always; ask for it with 0);
            an int: that index for every sample; a tensor: indices (B,) or (B, 1), or the
            multi-hot finding labels (B, C): the positive finding with the highest logit, and the
            abnormality map (0) for an image without findings, or scores over the logits
            (B, 1 + C): their argmax.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"HAM logits must be (B, 1 + C), got {list(logits.shape)}")
    b, n = logits.shape
    findings = logits[:, 1:].detach()
    if target is None or (isinstance(target, str) and target == "predicted"):
        return 1 + findings.argmax(dim=1)
    if isinstance(target, int) and not isinstance(target, bool):
        index = torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor):
        t = target.to(logits.device)
        if t.shape[0] != b:
            raise ValueError(f"target {list(t.shape)} for a batch of {b}")
        if t.dim() == 1 or (t.dim() == 2 and t.shape[1] == 1):
            index = t.reshape(b).long()
        elif t.dim() == 2 and t.shape[1] == n - 1:
            positive = t > 0.5
            best = findings.masked_fill(~positive, float("-inf")).argmax(dim=1)
            index = torch.where(positive.any(dim=1), 1 + best, torch.zeros_like(best))
        elif t.dim() == 2 and t.shape[1] == n:
            index = t.argmax(dim=1)
        else:
            raise ValueError(f"target {list(t.shape)} is neither indices (B,), labels (B, {n - 1}) nor scores (B, {n})")
    else:
        raise ValueError(f"target must be 'predicted', a class index or a tensor, got {target!r}")
    if bool(((index < 0) | (index >= n)).any()):
        raise ValueError(f"target index out of range [0, {n}): {index.tolist()}")
    return index


class HAMCapture:
    """Records the fused features F (the output of ``cls_head``) of a HAM forward pass.

    Args:
        model: a :class:`~custom_components.networks.ham.HAMNet` (DDP wrappers are looked through).
        detach: store F detached (explanation at inference) instead of in the autograd graph.
    """

    def __init__(self, model: nn.Module, detach: bool = False) -> None:
        self.net = unwrap_ham(model)
        self.detach = detach
        self.features: torch.Tensor | None = None
        self._handles = [self.net.cls_head.register_forward_hook(self._hook)]

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.features = output.detach() if self.detach else output

    def clear(self) -> None:
        self.features = None

    def release(self) -> None:
        """Remove the hook; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> HAMCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if "_handles" in self.__dict__:
            self.release()


class HAMAttention(Explainer[HAMCapture]):
    """HAM class attention map of one class per image, (B, H, W).

    Args:
        model: a :class:`~custom_components.networks.ham.HAMNet`.
        target: ``"auto"`` (the target passed to :meth:`explain`, labels or indices, else the
            prediction), ``"predicted"`` or a map index (0 abnormality, 1..C findings); see
            :func:`ham_target_index`.
        refine: return HAM's refined map R at ``out_size`` (needs the default ``upsample`` and
            ``normalize``, which the refinement itself applies).
        upsample: ``"bilinear"`` (``align_corners=True``), ``"nearest"`` or ``"none"`` (feature grid).
        normalize: ``"minmax"`` per sample (a constant map gives zeros) or ``"none"`` (raw M).
    """

    needs_gradients = False

    def __init__(
        self,
        model: nn.Module,
        target: str | int = "auto",
        refine: bool = False,
        upsample: str = "bilinear",
        normalize: str = "minmax",
    ) -> None:
        super().__init__(model)
        check_map_options(upsample, normalize, target)
        if refine and (upsample != "bilinear" or normalize != "minmax"):
            raise ValueError(
                "refine=True applies HAM's own bilinear resize and min-max: leave upsample='bilinear' and normalize='minmax'"
            )
        unwrap_ham(model)
        self.target = target
        self.refine = bool(refine)
        self.upsample = upsample
        self.normalize = normalize

    def capture(self, detach: bool = False) -> HAMCapture:
        return HAMCapture(self.model, detach=detach)

    def explain(
        self,
        logits: torch.Tensor,
        record: HAMCapture,
        target: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        if record.features is None:
            raise RuntimeError("no features recorded: run the HAM network inside HAMAttention.capture()")
        index = ham_target_index(logits, target if self.target == "auto" else self.target)
        cams = record.net.cams_from_features(record.features)  # the very maps HAM's losses use
        maps = cams[torch.arange(cams.shape[0], device=cams.device), index.to(cams.device)]
        size = tuple(maps.shape[-2:]) if out_size is None else (int(out_size[0]), int(out_size[1]))
        if self.refine:
            return refine_cams(maps[:, None], size, True, record.net.cam_w, record.net.cam_sigma)[:, 0]
        if self.upsample != "none" and size != tuple(maps.shape[-2:]):
            kwargs = {"align_corners": True} if self.upsample == "bilinear" else {}
            maps = F.interpolate(maps[:, None], size=size, mode=self.upsample, **kwargs)[:, 0]
        if self.normalize == "minmax":
            maps = minmax_cams(maps[:, None])[:, 0]
        return maps
