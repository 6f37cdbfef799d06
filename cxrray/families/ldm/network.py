"""The latent diffusion network: diffusers `UNet2DConditionModel` over latents, cross-attending to a
transformers `BertModel` built from a config (no download) over the report's WordPiece ids, plus the
frozen autoencoder that maps images to latents and back (copied in at the start of training, saved
with the model, never trained)."""
from __future__ import annotations

from typing import Mapping

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from cxrray.data.report_tokens import PAD_ID, SPECIAL
from cxrray.families.ldm.config import LDMConfig
from cxrray.families.parts import report_encoder
from cxrray.families.vae.network import KLAutoencoder

CLS_ID, SEP_ID = SPECIAL.index("[CLS]"), SPECIAL.index("[SEP]")


def empty_report(n: int, length: int, device=None) -> torch.Tensor:
    """Token ids of the empty report ([CLS] [SEP] + padding), long [n, length]: the unconditional input."""
    ids = torch.full((n, length), PAD_ID, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1] = CLS_ID, SEP_ID
    return ids


class LatentDiffusion(nn.Module):
    """eps(z_t, t, context): latents [B, C, s, s] (unit variance), t integer [B], context = `self.context(ids)`
    (a report-conditioned model) or `self.context(None, n)` (text=False: a learned constant)."""

    def __init__(self, cfg: LDMConfig | Mapping):
        super().__init__()
        cfg = cfg if isinstance(cfg, LDMConfig) else LDMConfig(**cfg)
        self.cfg = cfg.model_copy()
        attn = cfg.attention_levels()
        self.unet = UNet2DConditionModel(
            sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            norm_num_groups=cfg.norm_groups, cross_attention_dim=cfg.text_width,
            attention_head_dim=tuple(ch // cfg.head_channels for ch in cfg.block_channels))
        if cfg.text:
            self.text = report_encoder(cfg.vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.max_tokens)
        else:
            self.null_context = nn.Parameter(torch.zeros(1, 1, cfg.text_width))
        self.vae = KLAutoencoder(cfg.vae) if cfg.vae is not None else None
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.schedule = cfg.schedule

    def context(self, ids: torch.Tensor | None, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, L, text_width], attention mask [B, L]) of report ids long [B, L] (None: the
        empty report, or the constant of an unconditional model, for n rows)."""
        device = next(self.unet.parameters()).device
        if not self.cfg.text:
            n = n if ids is None else ids.shape[0]
            return self.null_context.expand(n, -1, -1), torch.ones(n, 1, dtype=torch.bool, device=device)
        ids = empty_report(n, self.cfg.max_tokens, device) if ids is None else ids.to(device).long()
        mask = ids != PAD_ID
        return self.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask = context
        if not torch.is_tensor(t):
            t = torch.full((z_t.shape[0],), int(t), dtype=torch.long, device=z_t.device)
        return self.unet(z_t, t.reshape(-1).expand(z_t.shape[0]), encoder_hidden_states=hidden.to(z_t.dtype),
                         encoder_attention_mask=mask, return_dict=False)[0]

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 1, S, S] in [-1, 1] (any S) -> scaled latents through the frozen autoencoder."""
        if self.vae is None:
            raise ValueError("this latent diffusion model has no autoencoder (model.vae_checkpoint was not set)")
        with torch.no_grad():
            return self.vae.latents(self.vae.fit(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("this latent diffusion model has no autoencoder (model.vae_checkpoint was not set)")
        with torch.no_grad():
            return self.vae.decode_latents(latents.float())
