"""MedViT: hybrid CNN-transformer classifier, 2-D and 3-D in one implementation.

Manzari et al., "MedViT: A Robust Vision Transformer for Generalized Medical Image
Classification", Computers in Biology and Medicine 157:106791, 2023 (arXiv 2302.09462); the
released architecture (``Omid-Nejati/MedViT``, derived from Next-ViT, Li et al. 2022) as described
in ``specs/medvit.md`` section 2. Written from the spec, not copied.

Blocks
------
* **ECB** (efficient convolution block): patch embedding, multi-head convolutional attention
  (MHCA: grouped 3x3 conv with 32 channels per head, BN, ReLU, 1x1 projection) with a residual,
  then the locality feed-forward (LFFN: 1x1 expand, depthwise 3x3, squeeze-excitation, 1x1
  project; inner residual) applied to ``BN(x)`` with an outer residual, i.e.
  ``x + BN(x) + F(BN(x))`` -- the released double skip, kept on purpose.
* **LTB** (local transformer block): patch embedding to ``m = make_divisible(0.75 * out, 32)``
  channels, efficient MHSA (E-MHSA) whose keys/values come from a spatially reduced token
  sequence (``sr_ratio``), then a 1x1 projection of the result to ``c = out - m`` channels with an
  MHCA residual; the two are concatenated and passed through the LFFN.

Variants (paper names T/S/L = released code names ``MedViT_small/base/large``)::

    medvit_t / medvit_small  depths [3, 4, 10, 3]  drop-path 0.1   32.16 M params @ 1000 classes
    medvit_s / medvit_base   depths [3, 4, 20, 3]  drop-path 0.2   45.43 M
    medvit_l / medvit_large  depths [3, 4, 30, 3]  drop-path 0.2   58.70 M

(The paper's own 10.8 / 23.6 / 45.8 M figures are not reproduced by the released code; the
released architecture is implemented, see spec section 2.)

Small inputs
------------
The network's total stride is 32 (stem 4 x stages 1, 2, 2, 2). ``stem_stride`` (4 default, 2 or
1) removes the stem's stride-2 convolutions: for native 28x28 MedMNIST use ``stem_stride=1``,
which gives stage grids 28/14/7/4 (224 input, default: 56/28/14/7), total stride 8. Pooling uses
ceil mode, so odd grids are fine; any input >= 1 pixel per stage runs. ``kv_pool`` chooses the
E-MHSA key/value reduction: ``"1d"`` (default, as released: AvgPool1d with kernel = stride =
sr^2 over the flattened raster order, which crosses row boundaries), ``"2d"`` (alias ``"grid"``:
true sr x sr average pooling on the grid, ceil mode) or ``"adaptive"`` (see below). When the sequence is shorter
than sr^2 the 1-D kernel is clipped to the sequence length (the released code would fail there); at 224 nothing
changes.

Patch Moment Changer (PMC)
--------------------------
Training-only feature augmentation (MoEx with positional normalisation, spec section 3), placed
after stage 1 and before stage 2. Off by default (``pmc_prob=0``). When ``pmc_prob > 0``, in
training mode, with probability ``pmc_prob`` per batch the per-position channel mean/std of each
sample are replaced by those of sample ``perm[b]`` (``perm`` a random batch permutation). After
each forward the model exposes:

* ``model.pmc_applied`` (bool): whether the last forward mixed,
* ``model.pmc_perm`` (long tensor (B,), identity when not applied),
* ``model.pmc_lam`` (float): the lambda of the label mix (``pmc_lambda``; 1.0 when not applied).

The trainer computes ``loss = lam * crit(logits, y) + (1 - lam) * crit(logits, y[perm])``, e.g.
with :meth:`MedViT.pmc_loss` ``(logits, y, criterion)`` (works for CE and, with float multi-label
targets, BCE-with-logits). Inference (eval mode) is never mixed.

Spatial dimensions
------------------
Every block takes ``spatial_dims`` (2 or 3, MONAI style) and picks its convolution, batch norm and
average pooling from it (``monai.networks.layers.factories``); the arithmetic (token reshapes,
squeeze-excitation pooling, PONO) is dimension-free. ``MedViT(spatial_dims=3)`` is the project's
MedViT-3D (spec section 7); :mod:`custom_components.networks.medvit3d` holds its defaults and the
3-D names (``MedViT3D``, ``medvit3d_t`` ...), thin wrappers over the classes here.
``kv_pool="adaptive"`` (the 3-D default) pools keys/values on the grid with the smallest cubic
kernel that leaves at most ``max_kv_tokens`` tokens, chosen at run time from the grid.

``forward`` returns the logits only (one tensor; MONAI ``verify_net_in_out`` friendly);
``forward_features`` returns the pooled 1024-d features. The model is TorchScript-scriptable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool

from custom_components.networks.vit import DropPath

__all__ = [
    "MedViT",
    "ECB",
    "LTB",
    "EMHSA",
    "MHCA",
    "LocalityFeedForward",
    "PatchEmbed",
    "PatchMomentChanger",
    "pono",
    "moment_exchange",
    "kv_pool_kernel",
    "medvit_t",
    "medvit_s",
    "medvit_l",
    "medvit_small",
    "medvit_base",
    "medvit_large",
    "MEDVIT_VARIANTS",
    "KV_POOLS",
]

BN_EPS = 1e-5

# paper name -> (code name, depths, max drop-path)
MEDVIT_VARIANTS: dict[str, tuple[str, tuple[int, int, int, int], float]] = {
    "T": ("small", (3, 4, 10, 3), 0.1),
    "S": ("base", (3, 4, 20, 3), 0.2),
    "L": ("large", (3, 4, 30, 3), 0.2),
}

#: E-MHSA key/value reductions: released raster pooling, per-axis grid pooling ("2d" is the spec's
#: name for it), and the 3-D variant's adaptive grid pooling to at most ``max_kv_tokens``.
KV_POOLS = ("1d", "2d", "grid", "adaptive")


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return int(spatial_dims)


def _conv(spatial_dims: int) -> type:
    return Conv[Conv.CONV, _check_dims(spatial_dims)]


def _bn(channels: int, spatial_dims: int) -> nn.Module:
    return Norm[Norm.BATCH, _check_dims(spatial_dims)](channels, eps=BN_EPS)


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without going below 90 % of ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def kv_pool_kernel(grid: list[int], max_tokens: int) -> int:
    """Smallest kernel k (the same on every axis) with prod(ceil(n / k) for n in grid) <= max_tokens."""
    k = 1
    count = max_tokens + 1
    while count > max_tokens:
        count = 1
        for n in grid:
            count *= (n + k - 1) // k
        k += 1
    return k - 1


class HSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class ConvBNReLU(nn.Sequential):
    """3x3 (x3) convolution without bias + BN + ReLU (the stem's unit)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, spatial_dims: int = 2):
        super().__init__(
            _conv(spatial_dims)(in_channels, out_channels, 3, stride, 1, bias=False),
            _bn(out_channels, spatial_dims),
            nn.ReLU(inplace=True),
        )


class PatchEmbed(nn.Module):
    """Stride 2: AvgPool(2, ceil) + 1x1 conv + BN; stride 1 with a channel change: 1x1 conv + BN; else identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, spatial_dims: int = 2):
        super().__init__()
        if stride == 2:
            pool = Pool[Pool.AVG, _check_dims(spatial_dims)]
            self.avgpool: nn.Module = pool(2, 2, ceil_mode=True, count_include_pad=False)
        else:
            self.avgpool = nn.Identity()
        if stride == 2 or in_channels != out_channels:
            self.conv: nn.Module = _conv(spatial_dims)(in_channels, out_channels, 1, 1, bias=False)
            self.norm: nn.Module = _bn(out_channels, spatial_dims)
        else:
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.avgpool(x)))


class MHCA(nn.Module):
    """Multi-head convolutional attention: grouped 3x3 (x3) conv (``head_dim`` channels per group), BN, ReLU, 1x1."""

    def __init__(self, channels: int, head_dim: int = 32, spatial_dims: int = 2):
        super().__init__()
        conv = _conv(spatial_dims)
        self.group_conv3x3 = conv(channels, channels, 3, 1, 1, groups=channels // head_dim, bias=False)
        self.norm = _bn(channels, spatial_dims)
        self.act = nn.ReLU(inplace=True)
        self.projection = conv(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class SELayer(nn.Module):
    """Squeeze-excitation (global mean over all spatial axes), a ``channels // reduction`` bottleneck, an h-sigmoid gate."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.flatten(2).mean(dim=-1))
        for _ in range(x.dim() - 2):
            w = w.unsqueeze(-1)
        return x * w


class LocalityFeedForward(nn.Module):
    """LFFN(u) = u + F(u): 1x1 expand + BN + h-swish, depthwise 3x3 (x3) + BN + h-swish, SE, 1x1 project + BN.

    The SE reduction equals the input width, so the SE bottleneck has ``expand_ratio`` units.
    """

    def __init__(self, channels: int, expand_ratio: int, spatial_dims: int = 2):
        super().__init__()
        hidden = int(channels * expand_ratio)
        conv = _conv(spatial_dims)
        self.conv = nn.Sequential(
            conv(channels, hidden, 1, 1, 0, bias=False),
            _bn(hidden, spatial_dims),
            HSwish(),
            conv(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
            _bn(hidden, spatial_dims),
            HSwish(),
            SELayer(hidden, reduction=channels),
            conv(hidden, channels, 1, 1, 0, bias=False),
            _bn(channels, spatial_dims),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class ECB(nn.Module):
    """Efficient convolution block: ``x = PE(x); x = x + DropPath(MHCA(x)); x = x + LFFN(BN(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, path_dropout: float = 0.0,
                 head_dim: int = 32, mlp_ratio: int = 3, spatial_dims: int = 2):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, out_channels, stride, spatial_dims)
        self.mhca = MHCA(out_channels, head_dim, spatial_dims)
        self.attention_path_dropout = DropPath(path_dropout)
        self.norm = _bn(out_channels, spatial_dims)
        self.conv = LocalityFeedForward(out_channels, mlp_ratio, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.attention_path_dropout(self.mhca(x))
        return x + self.conv(self.norm(x))


class EMHSA(nn.Module):
    """Efficient multi-head self-attention on tokens (B, N, C); keys/values from a reduced sequence.

    The tokens are a grid (n0, n1) in 2-D or (n0, n1, n2) in 3-D in raster order; the grid sizes
    are passed as ints (``n2 = -1`` for 2-D). Key/value reduction (``kv_pool``):

    * ``"1d"``: AvgPool1d(kernel = stride = sr^spatial_dims) along the raster order, as released
      (kernel clipped to the sequence length);
    * ``"2d"`` / ``"grid"``: sr per axis average pooling on the grid (ceil mode);
    * ``"adaptive"``: grid pooling with the smallest kernel k (every axis) that leaves at most
      ``max_kv_tokens`` tokens; no pooling when the grid is already small enough.

    BatchNorm1d follows the pooling (for ``"adaptive"`` it always exists, used only when k > 1).
    """

    def __init__(self, dim: int, head_dim: int = 32, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kv_pool: str = "1d", max_kv_tokens: int = 64):
        super().__init__()
        if kv_pool not in KV_POOLS:
            raise ValueError(f"kv_pool must be one of {KV_POOLS}, got {kv_pool!r}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sr_ratio = int(sr_ratio)
        self.pool_mode = {"1d": 0, "2d": 1, "grid": 1, "adaptive": 2}[kv_pool]
        self.max_kv_tokens = int(max_kv_tokens)
        self.q = nn.Linear(dim, dim, bias=True)
        self.k = nn.Linear(dim, dim, bias=True)
        self.v = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        uses_norm = self.sr_ratio > 1 or self.pool_mode == 2
        self.norm: nn.Module = nn.BatchNorm1d(dim, eps=BN_EPS) if uses_norm else nn.Identity()

    def reduce_kv(self, x: torch.Tensor, n0: int, n1: int, n2: int = -1) -> torch.Tensor:
        """Tokens (B, N, C) of the grid (n0, n1[, n2]) -> reduced tokens (B, N', C) used for keys and values."""
        grid = [n0, n1] if n2 < 0 else [n0, n1, n2]
        if self.pool_mode == 2:
            k = kv_pool_kernel(grid, self.max_kv_tokens)
        else:
            k = self.sr_ratio
        if k <= 1:
            return x
        b, n, c = x.shape
        if self.pool_mode == 0:
            kk = 1
            for _ in grid:
                kk *= k
            kk = min(kk, n)
            seq = F.avg_pool1d(x.transpose(1, 2), kk, kk)
        else:
            cube = x.transpose(1, 2).reshape([b, c] + grid)  # noqa: RUF005 (TorchScript has no starred list literals)
            if len(grid) == 2:
                cube = F.avg_pool2d(cube, k, k, ceil_mode=True, count_include_pad=False)
            else:
                cube = F.avg_pool3d(cube, k, k, ceil_mode=True, count_include_pad=False)
            seq = cube.flatten(2)
        return self.norm(seq).transpose(1, 2)

    def forward(self, x: torch.Tensor, n0: int, n1: int, n2: int = -1) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        kv = self.reduce_kv(x, n0, n1, n2)
        m = kv.shape[1]
        k = self.k(kv).reshape(b, m, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.v(kv).reshape(b, m, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class LTB(nn.Module):
    """Local transformer block (E-MHSA branch of m channels concatenated with an MHCA branch of c channels)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, sr_ratio: int = 1,
                 path_dropout: float = 0.0, head_dim: int = 32, mix_block_ratio: float = 0.75,
                 mlp_ratio: int = 2, attn_drop: float = 0.0, drop: float = 0.0, kv_pool: str = "1d",
                 spatial_dims: int = 2, max_kv_tokens: int = 64):
        super().__init__()
        self.mhsa_out_channels = make_divisible(int(out_channels * mix_block_ratio), 32)
        self.mhca_out_channels = out_channels - self.mhsa_out_channels
        self.patch_embed = PatchEmbed(in_channels, self.mhsa_out_channels, stride, spatial_dims)
        self.norm1 = _bn(self.mhsa_out_channels, spatial_dims)
        self.e_mhsa = EMHSA(self.mhsa_out_channels, head_dim, sr_ratio, attn_drop, drop, kv_pool, max_kv_tokens)
        self.mhsa_path_dropout = DropPath(path_dropout * mix_block_ratio)
        self.projection = PatchEmbed(self.mhsa_out_channels, self.mhca_out_channels, 1, spatial_dims)
        self.mhca = MHCA(self.mhca_out_channels, head_dim, spatial_dims)
        self.mhca_path_dropout = DropPath(path_dropout * (1.0 - mix_block_ratio))
        self.norm2 = _bn(out_channels, spatial_dims)
        self.conv = LocalityFeedForward(out_channels, mlp_ratio, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        shape = x.shape
        tokens = self.norm1(x).flatten(2).transpose(1, 2)
        if x.dim() == 5:
            attn = self.e_mhsa(tokens, shape[2], shape[3], shape[4])
        else:
            attn = self.e_mhsa(tokens, shape[2], shape[3])
        x = x + self.mhsa_path_dropout(attn).transpose(1, 2).reshape(shape)
        y = self.projection(x)
        y = y + self.mhca_path_dropout(self.mhca(y))
        x = torch.cat([x, y], dim=1)
        return x + self.conv(self.norm2(x))


def pono(h: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positional normalisation over channels: returns (normalised h, mean, std), mean/std shaped (B, 1, ...)."""
    mean = h.mean(dim=1, keepdim=True)
    std = (h.var(dim=1, keepdim=True, unbiased=False) + eps).sqrt()
    return (h - mean) / std, mean, std


def moment_exchange(h: torch.Tensor, perm: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MoEx: ``(h_b - mu_b) / sigma_b * sigma_perm[b] + mu_perm[b]`` with PONO moments (channel dim 1)."""
    normed, mean, std = pono(h, eps)
    return normed * std[perm] + mean[perm]


class PatchMomentChanger(nn.Module):
    """Training-only moment exchange applied with probability ``prob``; records ``perm``/``lam``/``applied``."""

    def __init__(self, prob: float = 0.0, lam: float = 0.5, eps: float = 1e-5):
        super().__init__()
        if not 0.0 <= prob <= 1.0 or not 0.0 <= lam <= 1.0:
            raise ValueError(f"PMC probability and lambda must lie in [0, 1], got {prob}, {lam}")
        self.prob = float(prob)
        self.lam = float(lam)
        self.eps = float(eps)
        self.applied = False
        self.last_lam = 1.0
        self.register_buffer("perm", torch.zeros(0, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        apply = self.training and self.prob > 0.0 and b > 1
        if apply and self.prob < 1.0:
            apply = bool(torch.rand(1).item() < self.prob)
        if apply:
            perm = torch.randperm(b, device=x.device)
            self.perm = perm
            self.applied = True
            self.last_lam = self.lam
            return moment_exchange(x, perm, self.eps)
        self.perm = torch.arange(b, device=x.device)
        self.applied = False
        self.last_lam = 1.0
        return x


class MedViT(nn.Module):
    """MedViT classifier (Manzari et al., CBM 2023; released architecture, spec ``specs/medvit.md``).

    Args:
        depths: blocks per stage; ``depths[2]`` must be a multiple of 5.
        num_classes: output logits.
        in_channels: input image channels (3 as released; 1 for grey MedMNIST without replication).
        stem_channels: the stem's widths (64, 32, 64).
        path_dropout: maximum stochastic-depth rate (linear 0 -> max over all blocks).
        stem_stride: 4 (released), 2 or 1 (small inputs; 1 recommended for 28x28).
        kv_pool: E-MHSA key/value reduction, one of :data:`KV_POOLS`; default ``"1d"`` (released
            raster pooling) in 2-D and ``"adaptive"`` in 3-D.
        pmc_prob, pmc_lambda: Patch Moment Changer probability per batch (0 = off) and label-mix lambda.
        attn_drop, drop: attention / projection dropout inside E-MHSA (0 as released).
        head_dim, mix_block_ratio, sr_ratios, strides: as released (32, 0.75, (8, 4, 2, 1), (1, 2, 2, 2)).
        spatial_dims: 2 (images) or 3 (volumes: the project's MedViT-3D, spec section 7).
        max_kv_tokens: key/value length bound of ``kv_pool="adaptive"`` (64).
    """

    #: block classes (ECB, LTB); MedViT-3D's thin subclasses override them
    block_types: tuple[type, type] = (ECB, LTB)
    __jit_ignored_attributes__ = ("block_types",)

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 10, 3),
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_channels: Sequence[int] = (64, 32, 64),
        path_dropout: float = 0.1,
        stem_stride: int = 4,
        kv_pool: str | None = None,
        pmc_prob: float = 0.0,
        pmc_lambda: float = 0.5,
        attn_drop: float = 0.0,
        drop: float = 0.0,
        head_dim: int = 32,
        mix_block_ratio: float = 0.75,
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        strides: Sequence[int] = (1, 2, 2, 2),
        spatial_dims: int = 2,
        max_kv_tokens: int = 64,
    ):
        super().__init__()
        spatial_dims = _check_dims(spatial_dims)
        depths = [int(d) for d in depths]
        if len(depths) != 4 or depths[2] % 5 != 0 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive ints with depths[2] % 5 == 0, got {depths}")
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        if kv_pool is None:
            kv_pool = "1d" if spatial_dims == 2 else "adaptive"
        self.spatial_dims = spatial_dims
        s0, s1, s2 = (int(c) for c in stem_channels)
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, s0, 2 if stem_stride >= 2 else 1, spatial_dims),
            ConvBNReLU(s0, s1, 1, spatial_dims),
            ConvBNReLU(s1, s2, 1, spatial_dims),
            ConvBNReLU(s2, s2, 2 if stem_stride == 4 else 1, spatial_dims),
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
        ecb_type, ltb_type = type(self).block_types
        n_blocks = sum(depths)
        dpr = [float(path_dropout) * i / max(1, n_blocks - 1) for i in range(n_blocks)]
        in_ch = s2
        idx = 0
        stages = []
        for stage_id in range(4):
            blocks = []
            for block_id, (out_ch, kind) in enumerate(zip(channels[stage_id], kinds[stage_id], strict=True)):
                stride = 2 if strides[stage_id] == 2 and block_id == 0 else 1
                if kind == "ecb":
                    blocks.append(ecb_type(in_channels=in_ch, out_channels=out_ch, stride=stride,
                                           path_dropout=dpr[idx], head_dim=head_dim, spatial_dims=spatial_dims))
                else:
                    blocks.append(ltb_type(in_channels=in_ch, out_channels=out_ch, stride=stride,
                                           sr_ratio=sr_ratios[stage_id], path_dropout=dpr[idx], head_dim=head_dim,
                                           mix_block_ratio=mix_block_ratio, mlp_ratio=2, attn_drop=attn_drop,
                                           drop=drop, kv_pool=kv_pool, spatial_dims=spatial_dims,
                                           max_kv_tokens=max_kv_tokens))
                in_ch = out_ch
                idx += 1
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.pmc = PatchMomentChanger(pmc_prob, pmc_lambda)
        self.num_features = in_ch
        self.norm = _bn(in_ch, spatial_dims)
        self.proj_head = nn.Linear(in_ch, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- PMC interface (valid after a forward) -------------------------------------------------
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

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 1024) after the final BN."""
        x = self.stem(x)
        x = self.stage1(x)
        x = self.pmc(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        return self.norm(x).flatten(2).mean(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_head(self.forward_features(x))


def _variant(name: str, **kwargs) -> MedViT:
    _, depths, dp = MEDVIT_VARIANTS[name]
    kwargs.setdefault("path_dropout", dp)
    return MedViT(depths=depths, **kwargs)


def medvit_t(**kwargs) -> MedViT:
    """MedViT-T (code ``MedViT_small``): depths [3, 4, 10, 3], drop-path 0.1."""
    return _variant("T", **kwargs)


def medvit_s(**kwargs) -> MedViT:
    """MedViT-S (code ``MedViT_base``): depths [3, 4, 20, 3], drop-path 0.2."""
    return _variant("S", **kwargs)


def medvit_l(**kwargs) -> MedViT:
    """MedViT-L (code ``MedViT_large``): depths [3, 4, 30, 3], drop-path 0.2."""
    return _variant("L", **kwargs)


medvit_small = medvit_t
medvit_base = medvit_s
medvit_large = medvit_l
