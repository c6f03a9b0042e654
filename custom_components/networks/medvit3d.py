"""MedViT-3D: the MedViT design (Manzari et al., Computers in Biology and Medicine 2023) for volumes.

No official 3-D MedViT exists; this is the project's variant for MedMNIST-3D (``specs/medvit.md``
section 7). Design choices:

* Every 2-D op becomes its 3-D counterpart: Conv3d, BatchNorm3d, AvgPool3d(2, s2, ceil mode,
  count_include_pad=False) in the patch embedding, grouped 3x3x3 MHCA (32 channels per head),
  depthwise 3x3x3 LFFN, SE on the global voxel mean, head BN3d -> global average pool -> Linear.
  Channel plan, block order (ECB / LTB), LFFN double skip, mix ratio 0.75, head_dim 32 and the
  stochastic-depth schedule are those of the 2-D model (:mod:`custom_components.networks.medvit`).
* **Resolution.** ``stem_stride`` 2 (one stride-2 stem conv) is the default for 28^3:
  stage grids 14^3 / 7^3 / 4^3 / 2^3. For 64^3 use ``stem_stride=4`` (16^3 / 8^3 / 4^3 / 2^3);
  :func:`medvit3d_t` picks it from ``input_size``. ``stem_stride=1`` is also accepted.
* **E-MHSA key/value reduction** is true 3-D average pooling (kernel = stride = k on every axis,
  ceil mode) with the smallest k such that the key/value length is <= ``max_kv_tokens`` (64),
  chosen at run time from the grid, followed by BatchNorm1d; k = 1 (no pooling, no BN) when the
  grid is already small. 28^3: stage 2 (7^3 = 343 tokens) k = 2 -> 64, stages 3-4 k = 1. The 1-D
  raster pooling of the released 2-D code is not carried over.
* **Patch Moment Changer** (off by default) is the 2-D module unchanged: PONO over channels at each
  voxel, applied after stage 1 in training, exposing ``pmc_applied`` / ``pmc_perm`` / ``pmc_lam``
  and :meth:`MedViT3D.pmc_loss` exactly like :class:`~custom_components.networks.medvit.MedViT`.
* Depthwise / grouped 3x3x3 kernels triple those layers' parameters; the count of the default
  (T-depth) model is pinned in ``tests/test_medvit.py`` rather than quoted from a paper.

``forward`` returns logits (one tensor); the model is TorchScript-scriptable.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_components.networks.medvit import (
    BN_EPS,
    MEDVIT_VARIANTS,
    DropPath,
    HSigmoid,
    HSwish,
    PatchMomentChanger,
    make_divisible,
)

__all__ = ["MedViT3D", "ECB3d", "LTB3d", "EMHSA3d", "medvit3d_t", "medvit3d_s", "medvit3d_l"]


class ConvBNReLU3d(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm3d(out_channels, eps=BN_EPS),
            nn.ReLU(inplace=True),
        )


class PatchEmbed3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.avgpool: nn.Module = (nn.AvgPool3d(2, 2, ceil_mode=True, count_include_pad=False)
                                   if stride == 2 else nn.Identity())
        if stride == 2 or in_channels != out_channels:
            self.conv: nn.Module = nn.Conv3d(in_channels, out_channels, 1, 1, bias=False)
            self.norm: nn.Module = nn.BatchNorm3d(out_channels, eps=BN_EPS)
        else:
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.avgpool(x)))


class MHCA3d(nn.Module):
    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.group_conv = nn.Conv3d(channels, channels, 3, 1, 1, groups=channels // head_dim, bias=False)
        self.norm = nn.BatchNorm3d(channels, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv3d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.act(self.norm(self.group_conv(x))))


class SELayer3d(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3, 4)))
        return x * w[:, :, None, None, None]


class LocalityFeedForward3d(nn.Module):
    def __init__(self, channels: int, expand_ratio: int):
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv = nn.Sequential(
            nn.Conv3d(channels, hidden, 1, bias=False),
            nn.BatchNorm3d(hidden, eps=BN_EPS),
            HSwish(),
            nn.Conv3d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
            nn.BatchNorm3d(hidden, eps=BN_EPS),
            HSwish(),
            SELayer3d(hidden, reduction=channels),
            nn.Conv3d(hidden, channels, 1, bias=False),
            nn.BatchNorm3d(channels, eps=BN_EPS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class ECB3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, path_dropout: float = 0.0,
                 head_dim: int = 32, mlp_ratio: int = 3):
        super().__init__()
        self.patch_embed = PatchEmbed3d(in_channels, out_channels, stride)
        self.mhca = MHCA3d(out_channels, head_dim)
        self.attention_path_dropout = DropPath(path_dropout)
        self.norm = nn.BatchNorm3d(out_channels, eps=BN_EPS)
        self.conv = LocalityFeedForward3d(out_channels, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.attention_path_dropout(self.mhca(x))
        return x + self.conv(self.norm(x))


def kv_pool_kernel(d: int, h: int, w: int, max_tokens: int) -> int:
    """Smallest cubic kernel k with ceil(d/k) * ceil(h/k) * ceil(w/k) <= max_tokens."""
    k = 1
    while ((d + k - 1) // k) * ((h + k - 1) // k) * ((w + k - 1) // k) > max_tokens:
        k += 1
    return k


class EMHSA3d(nn.Module):
    """E-MHSA over voxel tokens; keys/values from 3-D average pooling to at most ``max_kv_tokens``."""

    def __init__(self, dim: int, head_dim: int = 32, max_kv_tokens: int = 64, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.max_kv_tokens = int(max_kv_tokens)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm = nn.BatchNorm1d(dim, eps=BN_EPS)

    def reduce_kv(self, x: torch.Tensor, d: int, h: int, w: int) -> torch.Tensor:
        k = kv_pool_kernel(d, h, w, self.max_kv_tokens)
        if k == 1:
            return x
        b, n, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, d, h, w)
        grid = F.avg_pool3d(grid, k, k, ceil_mode=True, count_include_pad=False)
        return self.norm(grid.flatten(2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, d: int, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        kv = self.reduce_kv(x, d, h, w)
        m = kv.shape[1]
        k = self.k(kv).reshape(b, m, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.v(kv).reshape(b, m, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class LTB3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, path_dropout: float = 0.0,
                 head_dim: int = 32, mix_block_ratio: float = 0.75, mlp_ratio: int = 2, max_kv_tokens: int = 64,
                 attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.mhsa_out_channels = make_divisible(int(out_channels * mix_block_ratio), 32)
        self.mhca_out_channels = out_channels - self.mhsa_out_channels
        self.patch_embed = PatchEmbed3d(in_channels, self.mhsa_out_channels, stride)
        self.norm1 = nn.BatchNorm3d(self.mhsa_out_channels, eps=BN_EPS)
        self.e_mhsa = EMHSA3d(self.mhsa_out_channels, head_dim, max_kv_tokens, attn_drop, drop)
        self.mhsa_path_dropout = DropPath(path_dropout * mix_block_ratio)
        self.projection = PatchEmbed3d(self.mhsa_out_channels, self.mhca_out_channels, 1)
        self.mhca = MHCA3d(self.mhca_out_channels, head_dim)
        self.mhca_path_dropout = DropPath(path_dropout * (1.0 - mix_block_ratio))
        self.norm2 = nn.BatchNorm3d(out_channels, eps=BN_EPS)
        self.conv = LocalityFeedForward3d(out_channels, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b, c, d, h, w = x.shape
        tokens = self.norm1(x).flatten(2).transpose(1, 2)
        attn = self.mhsa_path_dropout(self.e_mhsa(tokens, d, h, w))
        x = x + attn.transpose(1, 2).reshape(b, c, d, h, w)
        y = self.projection(x)
        y = y + self.mhca_path_dropout(self.mhca(y))
        x = torch.cat([x, y], dim=1)
        return x + self.conv(self.norm2(x))


class MedViT3D(nn.Module):
    """MedViT for volumes (project design, see the module docstring). Arguments as :class:`MedViT`
    plus ``max_kv_tokens`` (key/value length bound of every E-MHSA); ``stem_stride`` 2 (28^3) or 4 (64^3)."""

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
    ):
        super().__init__()
        depths = [int(d) for d in depths]
        if len(depths) != 4 or depths[2] % 5 != 0 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive ints with depths[2] % 5 == 0, got {depths}")
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        s0, s1, s2 = (int(c) for c in stem_channels)
        self.stem = nn.Sequential(
            ConvBNReLU3d(in_channels, s0, 2 if stem_stride >= 2 else 1),
            ConvBNReLU3d(s0, s1, 1),
            ConvBNReLU3d(s1, s2, 1),
            ConvBNReLU3d(s2, s2, 2 if stem_stride == 4 else 1),
        )
        channels = [
            [96] * depths[0],
            [192] * (depths[1] - 1) + [256],
            [384, 384, 384, 384, 512] * (depths[2] // 5),
            [768] * (depths[3] - 1) + [1024],
        ]
        kinds = [
            ["ecb"] * depths[0],
            ["ecb"] * (depths[1] - 1) + ["ltb"],
            ["ecb", "ecb", "ecb", "ecb", "ltb"] * (depths[2] // 5),
            ["ecb"] * (depths[3] - 1) + ["ltb"],
        ]
        n_blocks = sum(depths)
        dpr = [float(path_dropout) * i / max(1, n_blocks - 1) for i in range(n_blocks)]
        in_ch, idx, stages = s2, 0, []
        for stage_id in range(4):
            blocks = []
            for block_id, (out_ch, kind) in enumerate(zip(channels[stage_id], kinds[stage_id])):
                stride = 2 if strides[stage_id] == 2 and block_id == 0 else 1
                if kind == "ecb":
                    blocks.append(ECB3d(in_ch, out_ch, stride, dpr[idx], head_dim))
                else:
                    blocks.append(LTB3d(in_ch, out_ch, stride, dpr[idx], head_dim, mix_block_ratio, 2,
                                        max_kv_tokens, attn_drop, drop))
                in_ch = out_ch
                idx += 1
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.pmc = PatchMomentChanger(pmc_prob, pmc_lambda)
        self.num_features = in_ch
        self.norm = nn.BatchNorm3d(in_ch, eps=BN_EPS)
        self.proj_head = nn.Linear(in_ch, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm3d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def pmc_applied(self) -> bool:
        return bool(self.pmc.applied)

    @property
    def pmc_perm(self) -> torch.Tensor:
        return self.pmc.perm

    @property
    def pmc_lam(self) -> float:
        return float(self.pmc.last_lam)

    def pmc_loss(self, logits: torch.Tensor, target: torch.Tensor,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``lam * crit(logits, y) + (1 - lam) * crit(logits, y[perm])`` for the last forward (plain loss if not mixed)."""
        if not self.pmc_applied:
            return criterion(logits, target)
        lam = self.pmc_lam
        return lam * criterion(logits, target) + (1.0 - lam) * criterion(logits, target[self.pmc_perm])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))
        x = self.pmc(x)
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.norm(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_head(self.forward_features(x))


def _variant3d(name: str, input_size: int, **kwargs) -> MedViT3D:
    _, depths, dp = MEDVIT_VARIANTS[name]
    kwargs.setdefault("path_dropout", dp)
    kwargs.setdefault("stem_stride", 2 if input_size <= 32 else 4)
    return MedViT3D(depths=depths, **kwargs)


def medvit3d_t(input_size: int = 28, **kwargs) -> MedViT3D:
    """T depths [3, 4, 10, 3]; ``stem_stride`` 2 for inputs <= 32^3, else 4."""
    return _variant3d("T", input_size, **kwargs)


def medvit3d_s(input_size: int = 28, **kwargs) -> MedViT3D:
    return _variant3d("S", input_size, **kwargs)


def medvit3d_l(input_size: int = 28, **kwargs) -> MedViT3D:
    return _variant3d("L", input_size, **kwargs)
