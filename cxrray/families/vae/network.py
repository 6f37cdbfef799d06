"""The KL autoencoder (diffusers `AutoencoderKL`, no attention) and its patch discriminator.

Buffers checkpointed with the weights: `latent_std`, the running std of training latents (latents for
diffusion are z / latent_std, LDM's scale factor), and `steps`, the optimiser steps taken (the
discriminator's warm-up is counted in it, so a resumed run keeps its place)."""
from __future__ import annotations

from typing import Mapping

import torch
from diffusers import AutoencoderKL
from torch import nn

from cxrray.families.vae.config import VAEConfig


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.), as Cheff's taming-transformers setup: strided 4x4 convolutions whose output
    map scores overlapping patches [B, 1, h, w]. GroupNorm instead of BatchNorm, so per-worker batches of a
    few images and the EMA copy need no batch statistics. Hand-written: diffusers has no discriminator."""

    def __init__(self, in_channels: int, channels: int, layers: int):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.GroupNorm(1, nxt), nn.LeakyReLU(0.2)]
            width = nxt
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class KLAutoencoder(nn.Module):
    """Images [B, C, S, S] in [-1, 1] <-> latents [B, latent_channels, S/f, S/f] (f = cfg.factor)."""

    def __init__(self, cfg: VAEConfig | Mapping):
        super().__init__()
        cfg = cfg if isinstance(cfg, VAEConfig) else VAEConfig(**cfg)
        self.cfg = cfg.model_copy()
        levels = len(cfg.channel_mult)
        self.autoencoder = AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_groups, sample_size=cfg.image_size, mid_block_add_attention=False)
        self.discriminator = PatchDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers)
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("steps", torch.zeros(()))  # float: the EMA copy lerps buffers

    def posterior(self, images: torch.Tensor):
        """diffusers' DiagonalGaussianDistribution q(z | x) (unscaled latents)."""
        return self.autoencoder.encode(images).latent_dist

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images (not clamped)."""
        return self.autoencoder.decode(z).sample

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        """Images of any side -> this autoencoder's side (bicubic, antialiased, clamped to [-1, 1])."""
        size = self.cfg.image_size
        if images.shape[-1] == size and images.shape[-2] == size:
            return images
        resized = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic",
                                                  antialias=True, align_corners=False)
        return resized.clamp(-1, 1).to(images.dtype)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents for diffusion: the posterior mean / latent_std (unit variance over the training set)."""
        return self.posterior(images).mode() / self.latent_std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.decode(latents * self.latent_std).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean, in [-1, 1]."""
        return self.decode(self.posterior(images).mode()).clamp(-1, 1)
