"""Cheff stage 3 as typed data: SR3 super-resolution, the noisy high-resolution image concatenated with the
bicubic-upsampled low-resolution one, cosine schedule with T = 2000.

Torch-free, so `cxrray.config` can compose it. The low-resolution input is made from the training image
itself: `degrade="bicubic"` (the base training: bicubic down-sampling) or `"autoencoder"` (Cheff's
fine-tune: the down-sampled image through the frozen autoencoder, D(E(x)), so the model learns to undo
the autoencoder's artefacts the cascade will show it). A fine-tune starts from `init_from` (the base
model's checkpoint, copied in by `Family.initialise`).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrray.families.vae.config import VAEConfig


class SRConfig(BaseModel):
    """Architecture, schedule and degradation of the super-resolution model; saved beside the weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # how a run starts and samples, not what it trains: a continued run may change them (cxrray.train.pretrain)
    NOT_THE_MODEL: ClassVar[frozenset[str]] = frozenset({"init_from", "sample_start"})

    family: Literal["sr"] = "sr"
    image_size: int = Field(1024, ge=16, le=4096)  # high-resolution side
    low_size: int = Field(256, ge=8)  # low-resolution side (the autoencoder's image side)
    in_channels: int = Field(1, ge=1)
    base_channels: int = Field(64, ge=8)
    channel_mult: tuple[int, ...] = Field((1, 1, 2, 2, 4, 4), min_length=1)
    layers_per_block: int = Field(2, ge=1)
    attention_resolutions: tuple[int, ...] = (16,)
    norm_groups: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    timesteps: int = Field(2000, ge=2)  # SR3 / Cheff: T = 2000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"  # cosine
    degrade: Literal["bicubic", "autoencoder"] = "bicubic"
    vae_checkpoint: str | None = None  # the autoencoder of `degrade="autoencoder"` (weights copied in)
    vae: VAEConfig | None = None  # its config (prepare)
    init_from: str | None = None  # a base SR checkpoint to fine-tune from (weights copied in)
    # sampling starts from the bicubic upsample noised to t = sample_start * T (1: from pure noise, as SR3);
    # measured in `cxrray evaluate generation`'s start sweep (README): from noise a short-trained model is far
    # below bicubic, because each x0 estimate near T multiplies its noise error by sqrt((1 - ab) / ab)
    sample_start: float = Field(0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> "SRConfig":
        if self.low_size >= self.image_size:
            raise ValueError(f"low_size {self.low_size} must be below image_size {self.image_size}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} ({len(self.channel_mult)} levels)")
        resolutions = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not feature resolutions {resolutions}")
        for ch in self.block_channels:
            if ch % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} must divide every block width {self.block_channels}")
        if self.vae is not None and self.vae.image_size != self.low_size:
            raise ValueError(f"the autoencoder works at {self.vae.image_size}², low_size is {self.low_size}")
        return self

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(self.image_size // 2**i in self.attention_resolutions for i in range(len(self.channel_mult)))


PRESETS: dict[str, dict[str, Any]] = {
    # this machine: 64 -> 128
    "tiny": {"image_size": 128, "low_size": 64, "base_channels": 32, "channel_mult": (1, 1, 2, 2),
             "attention_resolutions": (), "layers_per_block": 1},
    "small": {"image_size": 512, "low_size": 256, "base_channels": 64, "channel_mult": (1, 1, 2, 2, 4),
              "attention_resolutions": (32,)},
    # Cheff: 256 -> 1024, SR3 with T = 2000 and a cosine schedule; six levels reach 32², where the attention
    # sits (16² was written here before and is not a level of this U-Net: the preset did not compose)
    "paper": {"image_size": 1024, "low_size": 256, "base_channels": 64, "channel_mult": (1, 1, 2, 2, 4, 4),
              "attention_resolutions": (32,)},
}
