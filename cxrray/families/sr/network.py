"""SR3 network: diffusers `UNet2DModel` on [noisy high-resolution image, bicubic-upsampled low-resolution
image] (2 channels in, 1 out: the noise), plus the frozen autoencoder of the D(E(x)) fine-tune."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from cxrray.families.sr.config import SRConfig
from cxrray.families.vae.network import KLAutoencoder


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased when shrinking) to size x size, clamped to [-1, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=images.shape[-1] > size,
                        align_corners=False)
    return out.clamp(-1, 1).to(images.dtype)


class SuperResolution(nn.Module):
    """eps(x_t, t, low): x_t [B, C, S, S] the noisy high-resolution image, low [B, C, s, s] in [-1, 1]."""

    def __init__(self, cfg: SRConfig | Mapping):
        super().__init__()
        cfg = cfg if isinstance(cfg, SRConfig) else SRConfig(**cfg)
        self.cfg = cfg.model_copy()
        attn = cfg.attention_levels()
        self.unet = UNet2DModel(
            sample_size=cfg.image_size, in_channels=2 * cfg.in_channels, out_channels=cfg.in_channels,
            block_out_channels=cfg.block_channels,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups, dropout=cfg.dropout)
        self.vae = KLAutoencoder(cfg.vae) if cfg.vae is not None else None
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.schedule = {"beta_schedule": cfg.beta_schedule, "num_train_timesteps": cfg.timesteps}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        up = resize(low.to(x_t.dtype), self.cfg.image_size)
        return self.unet(torch.cat([x_t, up], dim=1), t.reshape(-1).expand(x_t.shape[0]), return_dict=False)[0]

    @torch.no_grad()
    def degrade(self, high: torch.Tensor) -> torch.Tensor:
        """The low-resolution input training pairs use: bicubic down-sampling, then (`degrade="autoencoder"`)
        through the frozen autoencoder, D(E(x))."""
        low = resize(high, self.cfg.low_size)
        if self.cfg.degrade == "autoencoder":
            if self.vae is None:
                raise ValueError("degrade='autoencoder' needs model.vae_checkpoint")
            low = self.vae.decode_latents(self.vae.latents(low.float())).to(high.dtype)
        return low
