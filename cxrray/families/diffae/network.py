"""Diffusion autoencoder (Diff-AE / DiffChest): semantic encoder p(z|x0) + z-conditioned U-Net eps(x_t, t, z).

Networks only; the objective lives in `cxrray.diffusion.schedule.training_loss`, sampling and inversion in
`cxrray.diffusion.ddim`. Both halves are assembled from diffusers building blocks:

* denoiser: `diffusers.UNet2DModel` (ADM-style residual blocks, attention at the configured resolutions
  and in the mid block, through torch SDPA) with `resnet_time_scale_shift="scale_shift"` and
  `class_embed_type="identity"`. z is projected to the time-embedding width and passed as `class_labels`,
  so every residual block's adaptive group norm ``GN(h) * (1 + s) + b`` takes its (s, b) from its own
  SiLU -> Linear of (t-embedding + z-embedding). Diff-AE's exact form adds a separate ``* (1 + z_s)``;
  the summed form is what diffusers has and still lets z modulate every block, so no hand-written U-Net.
* encoder: diffusers' encoder down blocks (attention at the same resolutions) and mid block, then
  GroupNorm -> SiLU -> global average pool -> linear to `z_dim`, as in Diff-AE's `BeatGANsEncoderModel`.
  Its channel plan (`encoder_channel_mult`) goes deeper than the U-Net's, down to 4x4 as Diff-AE's
  `net_enc_channel_mult` does: pooling a 16x16 map averages away global geometry (a heart's width relative
  to the thorax), and a linear probe on z then cannot read it. Hand-assembled because diffusers' VAE `Encoder` ends in a spatial
  3x3 conv and has no attention in its down path.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

from cxrray.families.diffae.config import PRESETS, DiffAEConfig, preset_config  # noqa: F401 (re-exported for callers)


class SemanticEncoder(nn.Module):
    """x0 [B, C, S, S] -> z [B, z_dim]: down blocks of `encoder_channel_mult`, mid block, GN -> SiLU -> avg
    pool -> linear."""

    def __init__(self, cfg: DiffAEConfig):
        super().__init__()
        chans, attn = cfg.encoder_channels, cfg.encoder_attention_levels()
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
    """Diffusion autoencoder: `encode(x0) -> z`, `forward(x_t, t, z) -> eps or v` (`cfg.prediction_type`).

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
        # scheduler settings this model was trained under (read by the samplers and the loss)
        self.schedule = {"prediction_type": cfg.prediction_type}

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Semantic code z [B, z_dim] of clean images x0 in [-1, 1]."""
        return self.encoder(x0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, z: torch.Tensor) -> torch.Tensor:
        """The prediction at (x_t, t) under z: noise eps or velocity v (`cfg.prediction_type`), same shape as x_t."""
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
