"""Gaussian blur of ground-truth masks with the reference's (torchvision's) kernel.

LGM-ViT blurs masks with kernel 51 and sigma unset, so torchvision's rule
``sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8`` gives 8.0; the kernel is sampled as exp(-x^2 / 2 sigma^2)
for x = -(k-1)/2 .. (k-1)/2, normalised to sum 1, applied separably with reflect padding
(spec ``specs/lgmvit.md`` section 4). MONAI's ``GaussianSmooth`` builds a different kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["default_sigma", "gaussian_kernel1d", "gaussian_blur"]


def default_sigma(kernel_size: int) -> float:
    """torchvision's sigma for an unset sigma: 0.3 * ((k - 1) * 0.5 - 1) + 0.8."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_kernel1d(kernel_size: int, sigma: float | None = None, dtype=torch.float32, device=None) -> torch.Tensor:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    sigma = default_sigma(kernel_size) if sigma is None else float(sigma)
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(masks: torch.Tensor, kernel_size: int = 51, sigma: float | None = None) -> torch.Tensor:
    """Blur (B, H, W) or (B, 1, H, W) maps separably with reflect padding; returns the input's shape."""
    squeeze = masks.dim() == 3
    x = masks.unsqueeze(1) if squeeze else masks
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W) masks, got {list(masks.shape)}")
    x = x.float()
    k = gaussian_kernel1d(kernel_size, sigma, dtype=x.dtype, device=x.device)
    pad = kernel_size // 2
    if pad >= min(x.shape[-2:]):
        raise ValueError(f"kernel {kernel_size} too large for reflect padding of a {list(x.shape[-2:])} mask")
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1) if squeeze else x
