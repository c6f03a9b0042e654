"""Load local timm / DINO / MAE / project checkpoints into :class:`AttributionViT`.

:class:`~custom_components.networks.vit.AttributionViT` uses timm's parameter names, so the key
mapping only strips wrappers and prefixes (``model``, ``teacher``, ``state_dict``; ``module.``,
``backbone.``), drops what a classifier does not use (MAE decoder, mask token, a head of another
size) and resamples the position embedding when the patch grid differs (timm's bicubic rule).
Nothing is downloaded: ``path`` is a local file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from custom_components.io import InputDataError, load_checkpoint

__all__ = ["load_pretrained_vit", "map_state_dict", "check_init", "STUDY_INITS"]

logger = logging.getLogger(__name__)

_WRAPPERS = ("model", "state_dict", "teacher", "student", "model_state")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
_DROPPED = ("decoder", "mask_token")


def _unwrap_checkpoint(ckpt: Mapping) -> Mapping[str, torch.Tensor]:
    for key in _WRAPPERS:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return _unwrap_checkpoint(ckpt[key])
    return ckpt


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Bicubically resample (1, prefix + n*n, D) to (1, prefix + grid*grid, D), keeping prefix tokens."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = math.isqrt(patches.shape[1])
    if old == grid:
        return pos_embed
    d = patches.shape[-1]
    patches = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def map_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a timm-layout state dict onto ``model``'s keys and shapes (see module docstring)."""
    state = dict(_unwrap_checkpoint(state))
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
        elif prefix == "backbone." and any(k.startswith(prefix) for k in state):
            # DINO teacher/student dicts hold ``backbone.*`` next to the DINO projection ``head.*``,
            # which is not a classifier head: keep the backbone only.
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("fc_norm.") for k in state) and not any(k.startswith("norm.") for k in state):
        # MAE fine-tuned (global-pool) checkpoints keep their final norm as fc_norm (as in the
        # ugent-korea study, it becomes the token-sequence norm of a CLS-pooled ViT).
        state = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in state.items()}
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_DROPPED) or key.startswith("fc_norm."):
            continue
        if key == "pos_embed" and key in target and value.shape != target[key].shape:
            value = resample_pos_embed(value, model.grid_size)
        if key == "patch_embed.proj.weight" and value.shape[1] != target[key].shape[1] and target[key].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # RGB weights on a single-channel input
        if key.startswith("head.") and key in target and value.shape != target[key].shape:
            logger.info("skipping %s: %s checkpoint head, model has %s", key, list(value.shape), list(target[key].shape))
            continue
        mapped[key] = value
    return mapped


def load_pretrained_vit(model: torch.nn.Module, path: str | Path, strict_backbone: bool = True) -> dict[str, list[str]]:
    """Load ``path`` into ``model``; returns the missing/unexpected keys.

    With ``strict_backbone`` every backbone parameter must be found (only the head may stay
    randomly initialised) and no checkpoint key may be left unused; otherwise an
    :class:`~custom_components.io.InputDataError` names the file and the keys.
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise InputDataError(path, f"expected a state dict, found {type(ckpt).__name__}")
    mapped = map_state_dict(ckpt, model)
    target = model.state_dict()
    wrong = [
        f"{k}: {list(v.shape)} vs {list(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and v.shape != target[k].shape
    ]
    if wrong:
        raise InputDataError(path, "shape mismatch for " + "; ".join(wrong[:5]))
    result = model.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head")]
    if strict_backbone and (missing or result.unexpected_keys):
        raise InputDataError(
            path, f"does not fit the network: missing {missing[:8]}, unexpected {list(result.unexpected_keys)[:8]}"
        )
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}


#: initialisations of the attention-map study (spec explanations.md section 8)
STUDY_INITS = ("random", "sup", "dino", "mae")


def check_init(init: str, pretrained_path: str | Path | None) -> None:
    """Check that the initialisation name and the checkpoint path agree before a long run starts.

    ``random`` trains from scratch and takes no file; ``sup`` (timm ImageNet), ``dino`` and
    ``mae`` need their local checkpoint file (weights cannot be downloaded at run time).
    """
    if init not in STUDY_INITS:
        raise ValueError(f"init must be one of {STUDY_INITS}, got {init!r}")
    if init == "random":
        if pretrained_path:
            raise ValueError(f"init 'random' trains from scratch but pretrained_path={str(pretrained_path)!r} is set")
        return
    if not pretrained_path:
        raise InputDataError(f"init {init!r}", "needs a local checkpoint file: pass --pretrained_path FILE")
    if not Path(pretrained_path).is_file():
        raise InputDataError(pretrained_path, f"checkpoint for init {init!r} does not exist")
