"""Diffusion autoencoder (Diff-AE / DiffChest): semantic encoder p(z|x0) + z-conditioned U-Net eps(x_t, t, z).

Networks only; the objective lives in `cxrray.diffusion.schedule.training_loss`, sampling and inversion in
`cxrray.diffusion.ddim`. Both halves are assembled from diffusers building blocks:

* denoiser: `diffusers.UNet2DModel` (ADM-style residual blocks, attention at the configured resolutions
  and in the mid block, through torch SDPA) with `resnet_time_scale_shift="scale_shift"` and
  `class_embed_type="identity"`. z is projected to the time-embedding width and passed as `class_labels`,
  so every residual block's adaptive group norm ``GN(h) * (1 + s) + b`` takes its (s, b) from its own
  SiLU -> Linear of (t-embedding + z-embedding). Diff-AE's exact form adds a separate ``* (1 + z_s)``;
  the summed form is what diffusers has and still lets z modulate every block, so no hand-written U-Net.
* encoder: the same channel plan built from diffusers' encoder down blocks (attention at the same
  resolutions) and mid block, then GroupNorm -> SiLU -> global average pool -> linear to `z_dim`, as in
  Diff-AE's `BeatGANsEncoderModel`. Hand-assembled because diffusers' VAE `Encoder` ends in a spatial
  3x3 conv and has no attention in its down path.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn


class DiffAEConfig(BaseModel):
    """Architecture of a diffusion autoencoder; plain data, saved beside the weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    image_size: int = Field(ge=16, le=1024)
    in_channels: int = Field(1, ge=1)
    base_channels: int = Field(ge=1)
    channel_mult: tuple[int, ...] = Field(min_length=1)
    layers_per_block: int = Field(2, ge=1)
    attention_resolutions: tuple[int, ...] = (16,)
    z_dim: int = Field(512, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm_groups: int = Field(32, ge=1)
    # None: one attention head per layer (head dim = channels), as Diff-AE; an int sets the head width.
    attention_head_dim: int | None = Field(None, ge=1)

    @field_validator("channel_mult")
    @classmethod
    def _positive_mult(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in v):
            raise ValueError(f"channel_mult entries must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DiffAEConfig":
        levels = len(self.channel_mult)
        factor = 2 ** (levels - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**(len(channel_mult)-1) = {factor} "
                f"(channel_mult has {levels} levels)")
        for ch in self.block_channels:
            if ch % self.norm_groups:
                raise ValueError(
                    f"norm_groups {self.norm_groups} must divide every block width {self.block_channels} "
                    f"(base_channels x channel_mult)")
            if self.attention_head_dim is not None and ch in self._attn_channels() and ch % self.attention_head_dim:
                raise ValueError(f"attention_head_dim {self.attention_head_dim} must divide attention width {ch}")
        bad = [r for r in self.attention_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} are not feature resolutions of this U-Net {self.resolutions} "
                f"(image_size {self.image_size}, {levels} levels)")
        return self

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side at each level, top (full resolution) first."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels

    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(r in self.attention_resolutions for r in self.resolutions)

    def _attn_channels(self) -> set[int]:
        chans = {ch for ch, a in zip(self.block_channels, self.attention_levels()) if a}
        return chans | {self.block_channels[-1]}  # the mid block always attends


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: one training step at batch 8 takes ~1-2 s on one thread.
    "tiny": {"image_size": 64, "base_channels": 32, "channel_mult": (1, 2, 2), "attention_resolutions": (16,)},
    "small": {"image_size": 128, "base_channels": 64, "channel_mult": (1, 1, 2, 2, 4),
              "attention_resolutions": (16,)},
    # DiffChest / Diff-AE 256^2 autoencoder.
    "paper": {"image_size": 256, "base_channels": 128, "channel_mult": (1, 1, 2, 2, 4, 4),
              "attention_resolutions": (16,)},
}


def preset_config(name: str, **overrides: Any) -> DiffAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown diffae preset {name!r}; choose from {sorted(PRESETS)}")
    return DiffAEConfig(**{**PRESETS[name], **overrides})


class SemanticEncoder(nn.Module):
    """x0 [B, C, S, S] -> z [B, z_dim]: the U-Net's encoder half, then GN -> SiLU -> avg pool -> linear."""

    def __init__(self, cfg: DiffAEConfig):
        super().__init__()
        chans, attn = cfg.block_channels, cfg.attention_levels()
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], kernel_size=3, padding=1)
        blocks, prev = [], chans[0]
        for i, (ch, use_attn) in enumerate(zip(chans, attn)):
            blocks.append(get_down_block(
                "AttnDownEncoderBlock2D" if use_attn else "DownEncoderBlock2D",
                num_layers=cfg.layers_per_block, in_channels=prev, out_channels=ch, temb_channels=None,
                add_downsample=i < len(chans) - 1, resnet_eps=1e-5, resnet_act_fn="silu",
                resnet_groups=cfg.norm_groups, attention_head_dim=cfg.attention_head_dim or ch,
                downsample_padding=1, dropout=cfg.dropout))
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(
            in_channels=prev, temb_channels=None, dropout=cfg.dropout, resnet_eps=1e-5, resnet_act_fn="silu",
            resnet_groups=cfg.norm_groups, attention_head_dim=cfg.attention_head_dim or prev)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, prev, eps=1e-5)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(prev, cfg.z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        h = self.pool(self.act(self.norm_out(h))).flatten(1)
        return self.proj(h)


class DiffAE(nn.Module):
    """Diffusion autoencoder: `encode(x0) -> z`, `forward(x_t, t, z) -> eps`.

    Images are [B, in_channels, S, S] in [-1, 1]; t is an integer tensor [B] (or a scalar) in [0, 999].
    No dtype is hard-coded: run under `torch.autocast` for bf16, `.to(memory_format=torch.channels_last)`
    for NHWC kernels.
    """

    def __init__(self, cfg: DiffAEConfig | Mapping[str, Any]):
        super().__init__()
        if not isinstance(cfg, DiffAEConfig):
            cfg = DiffAEConfig(**cfg)
        self.cfg = cfg.model_copy()
        self.encoder = SemanticEncoder(cfg)
        attn = cfg.attention_levels()
        self.unet = UNet2DModel(
            sample_size=cfg.image_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.in_channels,
            block_out_channels=cfg.block_channels,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_groups,
            dropout=cfg.dropout,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
            time_embedding_dim=cfg.time_embed_dim,
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        # z -> time-embedding width; summed with the t-embedding inside the U-Net (class_embed_type="identity").
        self.z_proj = nn.Linear(cfg.z_dim, cfg.time_embed_dim)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Semantic code z [B, z_dim] of clean images x0 in [-1, 1]."""
        return self.encoder(x0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, z: torch.Tensor) -> torch.Tensor:
        """Predicted noise eps(x_t, t, z), same shape as x_t."""
        if not torch.is_tensor(t):
            t = torch.tensor([int(t)], dtype=torch.long, device=x_t.device)
        t = t.to(x_t.device).reshape(-1)
        if t.numel() == 1 and x_t.shape[0] != 1:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t, class_labels=self.z_proj(z), return_dict=False)[0]

    def config_dict(self) -> dict[str, Any]:
        """JSON-safe architecture description (tuples become lists)."""
        return self.cfg.model_dump(mode="json")

    @classmethod
    def from_config_dict(cls, d: Mapping[str, Any]) -> "DiffAE":
        return cls(DiffAEConfig(**d))
