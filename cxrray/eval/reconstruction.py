"""Reconstruction quality on [0, 1] images, and the bicubic baseline an autoencoder must beat.

torchmetrics does the arithmetic; this module only fixes the conventions: images arrive in [-1, 1]
([B, C, S, S] tensors), are mapped to [0, 1], and PSNR / SSIM are per-image means (as Cheff's Table 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, float32."""
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def reconstruction_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """{mse, psnr (dB), ssim} of reconstructions against originals, both [B, C, S, S] in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = to_unit(original), to_unit(reconstruction)
    psnr = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
    return {"mse": float(((a - b) ** 2).mean()), "psnr": float(psnr.clamp(max=100).mean()), "ssim": float(ssim.mean())}


def bicubic_roundtrip(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, C, S, S] down to size x size and back up, both bicubic (antialiased going down)."""
    s = images.shape[-1]
    small = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(s, s), mode="bicubic", align_corners=False).clamp(-1, 1)


def equal_values_size(latent_size: int, latent_channels: int, image_channels: int = 1) -> int:
    """Side of a bicubic thumbnail holding as many numbers as the latent (C_z x s² = C_x x side²)."""
    return max(1, round(latent_size * math.sqrt(latent_channels / image_channels)))
