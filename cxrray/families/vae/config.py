"""Cheff's first stage as typed data: a KL-regularised autoencoder with downsampling factor 4.

Torch-free, so `cxrray.config` can compose it. Defaults follow Cheff (Weber et al.) and its public
code: 3 levels of 128/256/512 channels (factor 2^(levels-1) = 4), 2 residual layers each, no attention,
3 latent channels; loss = L1 + (1 - SSIM) + KL x 1e-6 (+ a perceptual term only from a local
TorchScript feature network), a patch discriminator switched on at step 5001 with weight 0.5.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class VAEConfig(BaseModel):
    """Architecture and loss weights of the autoencoder; saved beside the weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: Literal["vae"] = "vae"
    image_size: int = Field(128, ge=16, le=2048)
    in_channels: int = Field(1, ge=1)
    base_channels: int = Field(128, ge=1)
    channel_mult: tuple[int, ...] = Field((1, 2, 4), min_length=1)
    layers_per_block: int = Field(2, ge=1)
    latent_channels: int = Field(3, ge=1)
    norm_groups: int = Field(32, ge=1)
    kl_weight: float = Field(1e-6, ge=0.0)
    ssim_weight: float = Field(1.0, ge=0.0)  # weight of (1 - SSIM) beside L1
    # perceptual term: the squared distance of unit-normalised features of a local TorchScript network
    # (e.g. VGG/LPIPS weights the user has); never downloaded, off when None
    perceptual_model: str | None = None
    perceptual_weight: float = Field(1.0, ge=0.0)
    # patch discriminator (hinge loss), from optimiser step `disc_start` on; weight x the adaptive
    # ratio of the reconstruction and adversarial gradients at the decoder's last layer (their code)
    disc_start: int = Field(5001, ge=0)
    disc_weight: float = Field(0.5, ge=0.0)
    disc_channels: int = Field(64, ge=1)
    disc_layers: int = Field(3, ge=1)
    # momentum of the running std of training latents; latents are scaled by 1 / that std for diffusion
    latent_std_momentum: float = Field(0.01, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> "VAEConfig":
        if self.image_size % self.factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by the downsampling factor {self.factor}")
        for ch in self.block_channels:
            if ch % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} must divide every block width {self.block_channels}")
        return self

    @property
    def factor(self) -> int:
        """Spatial downsampling factor: image_size / latent_size."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor


PRESETS: dict[str, dict[str, Any]] = {
    # this machine: 64² -> 3 x 16², one residual layer per level (a 128², 2-layer step costs ~0.9 s per image
    # on one core: too slow for a cascade that must train in under an hour)
    "tiny": {"image_size": 64, "base_channels": 32, "channel_mult": (1, 2, 4), "layers_per_block": 1, "norm_groups": 16,
             "disc_start": 2001, "disc_channels": 32},
    "small": {"image_size": 256, "base_channels": 64, "channel_mult": (1, 2, 4)},
    # Cheff: 256² -> 3 x 64², 128/256/512, 2 layers, KL 1e-6, discriminator from step 5001 at weight 0.5
    "paper": {"image_size": 256, "base_channels": 128, "channel_mult": (1, 2, 4)},
}
