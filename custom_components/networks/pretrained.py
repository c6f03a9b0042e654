"""Load local pretrained checkpoints: timm / DINO / MAE / project ViTs, torchvision ResNets.

:class:`~custom_components.networks.vit.AttributionViT` uses timm's parameter names, so the key
mapping only strips wrappers and prefixes (``model``, ``teacher``, ``state_dict``; ``module.``,
``backbone.``), drops what a classifier does not use (MAE decoder, mask token, a head of another
size) and resamples the position embedding when the patch grid differs (timm's bicubic rule).

:class:`~custom_components.networks.ham.DilatedResNet` (MONAI's ResNet) names its parameters as
torchvision does (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so an
ImageNet ResNet state dict maps after the same unwrapping, minus its classifier ``fc.*``. Strides
and dilations change no parameter shape, so the weights fit at every output stride.

Nothing is downloaded: ``path`` is a local file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNetBlock

from custom_components.io import InputDataError, load_checkpoint

__all__ = [
    "load_pretrained_vit",
    "map_state_dict",
    "check_init",
    "STUDY_INITS",
    "load_pretrained_resnet",
    "map_resnet_state_dict",
]

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



def _load_mapped(
    path: str | Path,
    module: torch.nn.Module,
    mapper: Callable[[Mapping[str, Any], torch.nn.Module], dict[str, torch.Tensor]],
    what: str,
    most: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Load ``path`` (weights only), map its keys onto ``module``; one line naming the file for a bad file or shape."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise InputDataError(path, f"expected a state dict, found {type(ckpt).__name__}")
    mapped = mapper(ckpt, module)
    target = module.state_dict()
    wrong = [
        f"{k}: file {list(v.shape)} vs network {list(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if wrong:
        raise InputDataError(path, what + "; ".join(wrong[:most]))
    return mapped, target

def load_pretrained_vit(model: torch.nn.Module, path: str | Path, strict_backbone: bool = True) -> dict[str, list[str]]:
    """Load ``path`` into ``model``; returns the missing/unexpected keys.

    With ``strict_backbone`` every backbone parameter must be found (only the head may stay
    randomly initialised) and no checkpoint key may be left unused; otherwise an
    :class:`~custom_components.io.InputDataError` names the file and the keys.
    """
    mapped, _ = _load_mapped(path, model, map_state_dict, "shape mismatch for ", 5)
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


def _strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    state = dict(state)
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def map_resnet_state_dict(state: Mapping[str, torch.Tensor], backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a torchvision-layout ResNet state dict onto ``backbone``'s keys (see module docstring).

    Wrappers and a common ``module.`` / ``model.`` / ``backbone.`` prefix are removed, the ImageNet
    classifier ``fc.*`` is dropped, and RGB stem weights are summed for a one-channel stem.
    """
    state = _strip_prefixes(_unwrap_checkpoint(state), ("module.", "model.", "backbone."))
    mapped = {k: v for k, v in state.items() if not k.startswith("fc.")}
    stem = backbone.state_dict().get("conv1.weight")
    weight = mapped.get("conv1.weight")
    if stem is not None and weight is not None and weight.dim() == 4 and weight.shape[1] == 3 and stem.shape[1] == 1:
        mapped["conv1.weight"] = weight.sum(dim=1, keepdim=True)  # RGB filters on a grey input
    return mapped


def load_pretrained_resnet(backbone: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local torchvision-layout ResNet checkpoint into ``backbone``; returns the keys left at init.

    Every backbone weight must come from the file, with the same shape, and every file weight but
    ``fc.*`` must belong to the backbone; otherwise an :class:`~custom_components.io.InputDataError`
    names the file and the keys. Two exceptions, since torchvision checkpoints lack them: BN
    ``num_batches_tracked`` counters (absent from the pre-0.4.1 files such as
    ``resnet50-19c8e357.pth``) and the ``layer1.0.downsample`` shortcut that a basic-block backbone
    only has when its layer1 is strided (output stride 32 without pooling).
    """
    mapped, target = _load_mapped(path, backbone, map_resnet_state_dict, "not this ResNet: shape mismatch for ", 3)
    unexpected = [k for k in mapped if k not in target]
    extra_shortcut = isinstance(backbone.layer1[0], ResNetBlock)
    missing = [
        k
        for k in target
        if k not in mapped
        and not k.endswith("num_batches_tracked")
        and not (extra_shortcut and k.startswith("layer1.0.downsample."))
    ]
    if missing or unexpected:
        raise InputDataError(path, f"not this ResNet: missing {missing[:6]}, unexpected {unexpected[:6]}")
    result = backbone.load_state_dict(mapped, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if left:
        logger.info("%s: %d backbone tensors keep their initialisation (%s)", path, len(left), ", ".join(left[:4]))
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}
