"""MedViT-3D: the MedViT design (Manzari et al., Computers in Biology and Medicine 2023) for volumes.

No official 3-D MedViT exists; this is the project's variant for MedMNIST-3D (``specs/medvit.md``
section 7). The implementation is the one of :mod:`custom_components.networks.medvit` with
``spatial_dims=3``; this module holds the 3-D defaults and names (thin subclasses and
constructors). Design choices:

* Every 2-D op becomes its 3-D counterpart: Conv3d, BatchNorm3d, AvgPool3d(2, s2, ceil mode,
  count_include_pad=False) in the patch embedding, grouped 3x3x3 MHCA (32 channels per head),
  depthwise 3x3x3 LFFN, SE on the global voxel mean, head BN3d -> global average pool -> Linear.
  Channel plan, block order (ECB / LTB), LFFN double skip, mix ratio 0.75, head_dim 32 and the
  stochastic-depth schedule are those of the 2-D model.
* **Resolution.** ``stem_stride`` 2 (one stride-2 stem conv) is the default for 28^3:
  stage grids 14^3 / 7^3 / 4^3 / 2^3. For 64^3 use ``stem_stride=4`` (16^3 / 8^3 / 4^3 / 2^3);
  :func:`medvit3d_t` picks it from ``input_size``. ``stem_stride=1`` is also accepted.
* **E-MHSA key/value reduction** (``kv_pool="adaptive"``) is true 3-D average pooling (kernel =
  stride = k on every axis, ceil mode) with the smallest k such that the key/value length is
  <= ``max_kv_tokens`` (64), chosen at run time from the grid, followed by BatchNorm1d; k = 1 (no
  pooling, no BN) when the grid is already small. 28^3: stage 2 (7^3 = 343 tokens) k = 2 -> 64,
  stages 3-4 k = 1. The 1-D raster pooling of the released 2-D code is not carried over.
* **Patch Moment Changer** (off by default) is the 2-D module unchanged: PONO over channels at each
  voxel, applied after stage 1 in training, exposing ``pmc_applied`` / ``pmc_perm`` / ``pmc_lam``
  and ``pmc_loss`` exactly like :class:`~custom_components.networks.medvit.MedViT`.
* Depthwise / grouped 3x3x3 kernels triple those layers' parameters; the count of the default
  (T-depth) model is pinned in ``tests/test_medvit.py`` rather than quoted from a paper.

``forward`` returns logits (one tensor); the model is TorchScript-scriptable.
"""

from __future__ import annotations

from collections.abc import Sequence

from custom_components.networks.medvit import (
    ECB,
    EMHSA,
    LTB,
    MEDVIT_VARIANTS,
    MedViT,
)
from custom_components.networks.medvit import kv_pool_kernel as _kv_pool_kernel

__all__ = ["MedViT3D", "ECB3d", "LTB3d", "EMHSA3d", "medvit3d_t", "medvit3d_s", "medvit3d_l"]


def _require_3d(spatial_dims: int) -> None:
    if spatial_dims != 3:
        raise ValueError(f"the 3-D blocks need spatial_dims=3, got {spatial_dims}")


def kv_pool_kernel(d: int, h: int, w: int, max_tokens: int) -> int:
    """Smallest cubic kernel k with ceil(d/k) * ceil(h/k) * ceil(w/k) <= max_tokens."""
    return _kv_pool_kernel([d, h, w], max_tokens)


class ECB3d(ECB):
    """:class:`~custom_components.networks.medvit.ECB` with 3-D convolutions."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, path_dropout: float = 0.0,
                 head_dim: int = 32, mlp_ratio: int = 3, spatial_dims: int = 3):
        _require_3d(spatial_dims)
        super().__init__(in_channels, out_channels, stride, path_dropout, head_dim, mlp_ratio, spatial_dims=3)


class EMHSA3d(EMHSA):
    """E-MHSA over voxel tokens; keys/values from 3-D average pooling to at most ``max_kv_tokens``.

    ``forward(x, d, h, w)`` (the grid sizes of the raster-ordered tokens).
    """

    def __init__(self, dim: int, head_dim: int = 32, max_kv_tokens: int = 64, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, head_dim, 1, attn_drop, proj_drop, kv_pool="adaptive", max_kv_tokens=max_kv_tokens)


class LTB3d(LTB):
    """:class:`~custom_components.networks.medvit.LTB` with 3-D convolutions and adaptive key/value pooling."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, path_dropout: float = 0.0,
                 head_dim: int = 32, mix_block_ratio: float = 0.75, mlp_ratio: int = 2, max_kv_tokens: int = 64,
                 attn_drop: float = 0.0, drop: float = 0.0, kv_pool: str = "adaptive", sr_ratio: int = 1,
                 spatial_dims: int = 3):
        _require_3d(spatial_dims)
        super().__init__(in_channels, out_channels, stride, sr_ratio, path_dropout, head_dim, mix_block_ratio,
                         mlp_ratio, attn_drop, drop, kv_pool, spatial_dims=3, max_kv_tokens=max_kv_tokens)


class MedViT3D(MedViT):
    """MedViT for volumes: :class:`~custom_components.networks.medvit.MedViT` with ``spatial_dims=3``
    and the 3-D defaults (2 classes, 1 input channel, ``stem_stride`` 2 for 28^3, adaptive key/value
    pooling bounded by ``max_kv_tokens``). Arguments as :class:`MedViT`; ``stem_stride`` 4 for 64^3."""

    block_types = (ECB3d, LTB3d)

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 10, 3),
        num_classes: int = 2,
        in_channels: int = 1,
        stem_channels: Sequence[int] = (64, 32, 64),
        path_dropout: float = 0.1,
        stem_stride: int = 2,
        max_kv_tokens: int = 64,
        pmc_prob: float = 0.0,
        pmc_lambda: float = 0.5,
        attn_drop: float = 0.0,
        drop: float = 0.0,
        head_dim: int = 32,
        mix_block_ratio: float = 0.75,
        strides: Sequence[int] = (1, 2, 2, 2),
        kv_pool: str = "adaptive",
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
    ):
        super().__init__(
            depths=depths, num_classes=num_classes, in_channels=in_channels, stem_channels=stem_channels,
            path_dropout=path_dropout, stem_stride=stem_stride, kv_pool=kv_pool, pmc_prob=pmc_prob,
            pmc_lambda=pmc_lambda, attn_drop=attn_drop, drop=drop, head_dim=head_dim,
            mix_block_ratio=mix_block_ratio, sr_ratios=sr_ratios, strides=strides, spatial_dims=3,
            max_kv_tokens=max_kv_tokens,
        )  # fmt: skip


def _variant3d(name: str, input_size: int, **kwargs) -> MedViT3D:
    _, depths, dp = MEDVIT_VARIANTS[name]
    kwargs.setdefault("path_dropout", dp)
    kwargs.setdefault("stem_stride", 2 if input_size <= 32 else 4)
    return MedViT3D(depths=depths, **kwargs)


def medvit3d_t(input_size: int = 28, **kwargs) -> MedViT3D:
    """T depths [3, 4, 10, 3]; ``stem_stride`` 2 for inputs <= 32^3, else 4."""
    return _variant3d("T", input_size, **kwargs)


def medvit3d_s(input_size: int = 28, **kwargs) -> MedViT3D:
    """S depths [3, 4, 20, 3], drop-path 0.2; ``stem_stride`` as :func:`medvit3d_t`."""
    return _variant3d("S", input_size, **kwargs)


def medvit3d_l(input_size: int = 28, **kwargs) -> MedViT3D:
    """L depths [3, 4, 30, 3], drop-path 0.2; ``stem_stride`` as :func:`medvit3d_t`."""
    return _variant3d("L", input_size, **kwargs)
