"""Covariate-conditioned DDPM network: diffusers `UNet2DModel` + a covariate embedding added to the
time embedding (cxr_ddpm). The embedding is an MLP of the conditioning vector (`DDPMConfig.
covariate_layout`) passed as `class_labels` with `class_embed_type="identity"`, so diffusers sums it
with the timestep embedding that feeds every residual block."""
from __future__ import annotations

from typing import Mapping

import torch
from diffusers import UNet2DModel
from torch import nn

from cxrray.families.ddpm.config import DDPMConfig


class CovariateDDPM(nn.Module):
    """eps(x_t, t, c): images [B, C, S, S] in [-1, 1], t integer [B], c the conditioning vector
    [B, len(cfg.covariate_layout())] (see `condition`); an unconditional model takes c = None."""

    def __init__(self, cfg: DDPMConfig | Mapping):
        super().__init__()
        cfg = cfg if isinstance(cfg, DDPMConfig) else DDPMConfig(**cfg)
        self.cfg = cfg.model_copy()
        attn = cfg.attention_levels()
        conditional = bool(cfg.covariates)
        self.unet = UNet2DModel(
            sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
            block_out_channels=cfg.block_channels,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups, dropout=cfg.dropout,
            class_embed_type="identity" if conditional else None, time_embedding_dim=cfg.time_embed_dim)
        width = len(cfg.covariate_layout())
        self.covariate_proj = nn.Sequential(nn.Linear(width, cfg.time_embed_dim), nn.SiLU(),
                                            nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)) if conditional else None
        self.schedule = {"beta_schedule": cfg.beta_schedule, "num_train_timesteps": cfg.timesteps}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        labels = self.covariate_proj(c.to(x_t.dtype)) if self.covariate_proj is not None else None
        return self.unet(x_t, t.reshape(-1).expand(x_t.shape[0]), class_labels=labels, return_dict=False)[0]

    def condition(self, values: Mapping[str, torch.Tensor], drop: torch.Tensor | None = None) -> torch.Tensor | None:
        """Raw covariates {name: [B] floats, NaN = missing; sex: 1 = M, 0 = F} -> conditioning vector
        [B, width]: z-scores under the stored training statistics with present bits, sex one-hot.
        `drop` [B] bool zeroes whole rows (unconditional). None for an unconditional model."""
        if not self.cfg.covariates:
            return None
        stats = self.cfg.covariate_stats or {}
        columns = []
        for name in self.cfg.covariates:
            v = values[name].float().reshape(-1)
            present = ~torch.isnan(v)
            if name == "sex":
                columns += [(present & (v > 0.5)).float(), (present & (v <= 0.5)).float()]
                continue
            mean, std = stats.get(name, (0.0, 1.0))
            z = torch.where(present, (v - mean) / max(std, 1e-6), torch.zeros_like(v))
            columns += [z, present.float()]
        c = torch.stack(columns, dim=1)
        if drop is not None:
            c = c * (~drop).float()[:, None]
        return c

    def null_condition(self, n: int, device=None) -> torch.Tensor | None:
        """The unconditional input (every covariate missing) for classifier-free guidance."""
        if not self.cfg.covariates:
            return None
        return torch.zeros(n, len(self.cfg.covariate_layout()), device=device)

