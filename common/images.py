"""The image convention of vqgpt: float (B, C, H, W) in [-1, 1]; conversions to pixels and grids."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, same shape."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> list of PIL images (mode L for C = 1, RGB for C = 3)."""
    arr = rearrange(to_uint8(images), "b c h w -> b h w c").cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured in pixel range [0, 1]."""
    mse = (((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def image_grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one PIL image, ``nrow`` images per row, 2 px dark gutters."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    pad = rows * nrow - n
    x = images.float().clamp(-1, 1)
    x = torch.cat([x, x.new_full((pad, c, h, w), -1.0)]) if pad else x
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    return to_pil(rearrange(x, "(r k) c h w -> 1 c (r h) (k w)", k=nrow))[0]
