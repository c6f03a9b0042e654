"""The five training losses of HAM and the box-to-mask helper.

Ouyang et al., "Learning Hierarchical Attention for Weakly-supervised Chest X-Ray Abnormality
Localization and Diagnosis", IEEE TMI 40(10):2698-2710, 2021; spec ``specs/ham.md`` sections 4, 5,
9 and 10. With labels y (B, C) in {0, 1}, y_a = max_c y_c, the network's outputs (o_a, o_c, R_a,
R_c, M_a, M_c) and w_bc = tag_bc * flag_b:

- ``loss_ano``    BCE(o_a, y_a), mean over the batch (weight 0.01);
- ``loss_cls``    BCE(o_c, y), mean over B x C (weight 1);
- ``loss_ex_cls`` per class sum_b w_bc sum_p (R_c - B_c)^2 / max(sum_b w_bc (sum_p R_c + sum_p B_c), eps),
  averaged over the classes with a supervised sample (weight 0.5);
- ``loss_bound``  on the raw maps C = M_c y_c, A = M_a y_a, S_c = sigmoid(cam_w (C - cam_loss_sigma)):
  [sum_p C - sum_p min(C, A) S_c] / max(sum_p C, eps), mean over a class's positives, then over the
  classes with a positive (weight 0.001);
- ``loss_union``  with U = max_c C_c and S_a = sigmoid(cam_w (A - cam_loss_sigma)):
  [sum_p A - sum_p min(U, A) S_a] / max(sum_p A, eps), mean over the abnormal images (weight 0.001).

The soft masks S act on raw, un-normalised CAM values (thresholds 0.75 with slope 100); that is the
method (spec section 10) and stays. Gradients flow through S as in the reference.

Choices the spec leaves open, made here:

- BCE is computed from the logits (``binary_cross_entropy_with_logits``). The reference's BCE on
  sigmoid outputs saturates (sigmoid(o) rounds to 1 for o > ~17 in float32 and torch then clamps
  log(0) at -100) and cannot run under CUDA autocast; it is the option ``bce_on_probabilities=True``
  (computed in float32 with autocast off), never the default.
- Empty selections: a term without any supervised class / positive / abnormal image is an exact
  zero that is still attached to the inputs (zero gradients, never NaN). Counts of positives and
  of classes are floored at 1 (labels are binary, so this equals the reference's floor 1e-5).
- Maps are computed in at least float32 (half inputs are upcast, float64 stays float64).
- ``R_a`` (the refined abnormality map) is accepted so the network's output tuple can be passed
  whole, but no term reads it: the reference uses it only for display.
- Box tags and flags are multiplied as given (w may be fractional); a class counts as supervised
  when sum_b w_bc > 0. A supervised class whose box was cropped away (B = 0) with an empty map
  contributes 0/eps = 0 and still counts, as in the reference.

Box masks come from the data side (:func:`custom_components.data.nihcxr14.boxes_to_masks` / ``BoxMasksd``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "HAMLoss",
    "HAM_LOSS_TERMS",
    "ham_abnormality_loss",
    "ham_classification_loss",
    "ham_box_loss",
    "ham_bound_loss",
    "ham_union_loss",
]

#: the keys of the per-term losses, in the order of spec section 4
HAM_LOSS_TERMS = ("loss_ano", "loss_cls", "loss_ex_cls", "loss_bound", "loss_union")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 and integer inputs, float64 kept (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def _per_image(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B,) from (B,) or (B, 1)."""
    if x.dim() == 2 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1), got {list(x.shape)}")
    return x


def _single_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, H, W) from (B, H, W) or (B, 1, H, W)."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {list(x.shape)}")
    return x


def _check_labels(labels: torch.Tensor, batch: int, classes: int | None = None) -> None:
    if labels.dim() != 2 or labels.shape[0] != batch or (classes is not None and labels.shape[1] != classes):
        expected = f"({batch}, {'C' if classes is None else classes})"
        raise ValueError(f"labels must have shape {expected}, got {list(labels.shape)}")


def _bce(logits: torch.Tensor, targets: torch.Tensor, on_probabilities: bool) -> torch.Tensor:
    dtype = _compute_dtype(logits)
    if not on_probabilities:
        return F.binary_cross_entropy_with_logits(logits.to(dtype), targets.to(dtype))
    # reference: BCELoss(sigmoid(o), y); autocast off, where torch refuses it
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.binary_cross_entropy(torch.sigmoid(logits.to(dtype)), targets.to(dtype))


def ham_abnormality_loss(
    abnormality_logit: torch.Tensor, labels: torch.Tensor, bce_on_probabilities: bool = False
) -> torch.Tensor:
    """``loss_ano``: BCE of the abnormality logit o_a (B,) or (B, 1) against y_a = max_c y_c, batch mean."""
    o_a = _per_image(abnormality_logit, "abnormality_logit")
    _check_labels(labels, o_a.shape[0])
    y_a = labels.to(o_a.dtype).amax(dim=1)
    return _bce(o_a, y_a, bce_on_probabilities)


def ham_classification_loss(class_logits: torch.Tensor, labels: torch.Tensor, bce_on_probabilities: bool = False) -> torch.Tensor:
    """``loss_cls``: BCE of the class logits o_c (B, C) against y (B, C), mean over B x C."""
    if class_logits.dim() != 2:
        raise ValueError(f"class_logits must have shape (B, C), got {list(class_logits.shape)}")
    _check_labels(labels, *class_logits.shape)
    return _bce(class_logits, labels.to(class_logits.dtype), bce_on_probabilities)


def ham_box_loss(
    refined_classes: torch.Tensor,
    box_masks: torch.Tensor,
    box_tags: torch.Tensor,
    flags: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``loss_ex_cls``: the box-supervised extra classification term (spec section 4).

    Args:
        refined_classes: R_c (B, C, H, W) in [0, 1] at the input size.
        box_masks: B_c (B, C, H, W), the per-class union masks of the boxes (0/1).
        box_tags: (B, C), 1 where the image has a box for class c (for images without boxes, y).
        flags: (B,) or (B, 1), 1 iff the image is in the box-supervised list.
        eps: floor of the per-class denominator.

    Per class the squared error and the mass sum_p R + sum_p B are pooled over the supervised
    images before dividing, so the value lies in [0, 1] ((R - B)^2 <= R + B on [0, 1]); the result
    is the mean over classes with sum_b w_bc > 0, and an attached zero when there is none.
    """
    if refined_classes.dim() != 4 or box_masks.shape != refined_classes.shape:
        shapes = f"{list(refined_classes.shape)} and {list(box_masks.shape)}"
        raise ValueError(f"refined_classes and box_masks must both be (B, C, H, W), got {shapes}")
    batch, classes = refined_classes.shape[:2]
    dtype = _compute_dtype(refined_classes)
    r = refined_classes.to(dtype)
    b = box_masks.to(dtype)
    flags = _per_image(flags, "flags")
    if box_tags.shape != (batch, classes) or flags.shape[0] != batch:
        shapes = f"{list(box_tags.shape)}, {list(flags.shape)}"
        raise ValueError(f"box_tags must be ({batch}, {classes}) and flags ({batch},), got {shapes}")
    w = box_tags.to(dtype) * flags.to(dtype)[:, None]  # (B, C)
    squared = (r - b).pow(2).sum(dim=(2, 3))
    mass = r.sum(dim=(2, 3)) + b.sum(dim=(2, 3))
    per_class = (w * squared).sum(dim=0) / (w * mass).sum(dim=0).clamp_min(eps)
    supervised = (w.sum(dim=0) > 0).to(dtype)
    return (per_class * supervised).sum() / supervised.sum().clamp_min(1.0)


def _hidden_maps(raw_abnormality: torch.Tensor, raw_classes: torch.Tensor, labels: torch.Tensor):
    """(A, C, y, y_a): the raw maps with the maps of negative classes / normal images zeroed."""
    m_a = _single_map(raw_abnormality, "raw_abnormality")
    if raw_classes.dim() != 4 or raw_classes.shape[0] != m_a.shape[0] or raw_classes.shape[2:] != m_a.shape[1:]:
        shapes = f"{list(raw_classes.shape)} and {list(m_a.shape)}"
        raise ValueError(f"raw_classes (B, C, h, w) and raw_abnormality (B, h, w) do not match: {shapes}")
    _check_labels(labels, *raw_classes.shape[:2])
    dtype = torch.promote_types(_compute_dtype(m_a), _compute_dtype(raw_classes))
    y = labels.to(dtype)
    y_a = y.amax(dim=1)
    a_hat = m_a.to(dtype) * y_a[:, None, None]
    c_hat = raw_classes.to(dtype) * y[:, :, None, None]
    return a_hat, c_hat, y, y_a


def ham_bound_loss(
    raw_abnormality: torch.Tensor,
    raw_classes: torch.Tensor,
    labels: torch.Tensor,
    cam_w: float = 100.0,
    cam_loss_sigma: float = 0.75,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``loss_bound``: a class's attention must lie inside the abnormality attention.

    Args:
        raw_abnormality: M_a (B, h, w) or (B, 1, h, w), the raw (ReLU, un-normalised) CAM.
        raw_classes: M_c (B, C, h, w).
        labels: y (B, C) in {0, 1}.
        cam_w, cam_loss_sigma: slope and threshold of the soft mask S_c on raw CAM values.
        eps: floor of sum_p C.

    0 when C <= A pointwise and C is 0 or well above ``cam_loss_sigma``; 1 when A = 0 on C's support.
    """
    a_hat, c_hat, y, _ = _hidden_maps(raw_abnormality, raw_classes, labels)
    soft = torch.sigmoid(cam_w * (c_hat - cam_loss_sigma))
    total = c_hat.sum(dim=(2, 3))  # (B, C)
    inside = (torch.minimum(c_hat, a_hat[:, None]) * soft).sum(dim=(2, 3))
    ratio = (total - inside) / total.clamp_min(eps)
    positives = y.sum(dim=0)  # (C,)
    per_class = (ratio * y).sum(dim=0) / positives.clamp_min(1.0)
    has_positive = (positives > 0).to(per_class.dtype)
    return (per_class * has_positive).sum() / has_positive.sum().clamp_min(1.0)


def ham_union_loss(
    raw_abnormality: torch.Tensor,
    raw_classes: torch.Tensor,
    labels: torch.Tensor,
    cam_w: float = 100.0,
    cam_loss_sigma: float = 0.75,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``loss_union``: the abnormality attention must be covered by the union (max) of the class attentions.

    Arguments as :func:`ham_bound_loss`; the soft mask S_a is taken on A. The training term, not the
    symmetric variant the reference logs in validation. 0 when A <= U = max_c C_c pointwise and A is
    0 or well above ``cam_loss_sigma``; 1 when U = 0 on A's support.
    """
    a_hat, c_hat, _, y_a = _hidden_maps(raw_abnormality, raw_classes, labels)
    union = c_hat.amax(dim=1)
    soft = torch.sigmoid(cam_w * (a_hat - cam_loss_sigma))
    total = a_hat.sum(dim=(1, 2))  # (B,)
    covered = (torch.minimum(union, a_hat) * soft).sum(dim=(1, 2))
    ratio = (total - covered) / total.clamp_min(eps)
    return (ratio * y_a).sum() / y_a.sum().clamp_min(1.0)


class HAMLoss(nn.Module):
    """The weighted HAM objective, with every term returned separately.

    Args:
        weight_ano, weight_cls, weight_ex_cls, weight_bound, weight_union: term weights
            (paper defaults 0.01 / 1 / 0.5 / 0.001 / 0.001).
        cam_w: slope of the soft masks of bound/union (100).
        cam_loss_sigma: their threshold on raw CAM values (0.75).
        eps: floor of the normalising sums (1e-5).
        bce_on_probabilities: reproduce the reference's BCE on sigmoid outputs (quirk; off).

    ``forward(abnormality_logit, class_logits, refined_abnormality, refined_classes, raw_abnormality,
    raw_classes, labels, box_masks, box_tags, flags)``, i.e. ``loss(*network_outputs, labels,
    box_masks, box_tags, flags)``, returns ``{"loss", "loss_ano", "loss_cls", "loss_ex_cls",
    "loss_bound", "loss_union"}``; ``loss`` is the weighted sum, the terms are unweighted.
    ``refined_abnormality`` may be ``None``; no term reads it.
    """

    def __init__(
        self,
        weight_ano: float = 0.01,
        weight_cls: float = 1.0,
        weight_ex_cls: float = 0.5,
        weight_bound: float = 0.001,
        weight_union: float = 0.001,
        cam_w: float = 100.0,
        cam_loss_sigma: float = 0.75,
        eps: float = 1e-5,
        bce_on_probabilities: bool = False,
    ) -> None:
        super().__init__()
        weights = (weight_ano, weight_cls, weight_ex_cls, weight_bound, weight_union)
        if any(not math.isfinite(float(v)) or float(v) < 0 for v in weights):
            raise ValueError(f"loss weights must be finite and >= 0, got {weights}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.weights = dict(zip(HAM_LOSS_TERMS, (float(v) for v in weights), strict=True))
        self.cam_w = float(cam_w)
        self.cam_loss_sigma = float(cam_loss_sigma)
        self.eps = float(eps)
        self.bce_on_probabilities = bool(bce_on_probabilities)

    def forward(
        self,
        abnormality_logit: torch.Tensor,
        class_logits: torch.Tensor,
        refined_abnormality: torch.Tensor | None,
        refined_classes: torch.Tensor,
        raw_abnormality: torch.Tensor,
        raw_classes: torch.Tensor,
        labels: torch.Tensor,
        box_masks: torch.Tensor,
        box_tags: torch.Tensor,
        flags: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        del refined_abnormality  # display only in the reference
        soft = dict(cam_w=self.cam_w, cam_loss_sigma=self.cam_loss_sigma, eps=self.eps)
        terms = {
            "loss_ano": ham_abnormality_loss(abnormality_logit, labels, self.bce_on_probabilities),
            "loss_cls": ham_classification_loss(class_logits, labels, self.bce_on_probabilities),
            "loss_ex_cls": ham_box_loss(refined_classes, box_masks, box_tags, flags, eps=self.eps),
            "loss_bound": ham_bound_loss(raw_abnormality, raw_classes, labels, **soft),
            "loss_union": ham_union_loss(raw_abnormality, raw_classes, labels, **soft),
        }
        total = sum(self.weights[k] * terms[k] for k in HAM_LOSS_TERMS)
        return {"loss": total, **terms}
