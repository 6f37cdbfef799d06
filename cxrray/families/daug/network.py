"""DAug's downstream network: an image encoder over the stacked channels and a report encoder into one unit-
vector space, with one learned prototype per super-class in that space (the "class" side of the hybrid loss).

Images float32 [B, 1 + H, S, S] in [-1, 1]; report ids long [B, L] (0 = padding); embeddings float32 [B, D]
with unit norm; class logits float32 [B, K] = class_scale * cos(image, prototype_k) + class_bias_k.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from cxrray.data.report_tokens import PAD_ID
from cxrray.families.daug.config import DAugConfig
from cxrray.families.parts import report_encoder


def _block(channels: int, out: int) -> nn.Sequential:
    groups = min(8, out)
    return nn.Sequential(nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(groups, out), nn.SiLU(),
                         nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(groups, out), nn.SiLU(), nn.MaxPool2d(2))


class HybridEncoder(nn.Module):
    """`embed(images)`, `embed_reports(ids)`, `class_logits(embeddings)`; forward(images) = class logits."""

    def __init__(self, cfg: DAugConfig | Mapping):
        super().__init__()
        cfg = cfg if isinstance(cfg, DAugConfig) else DAugConfig(**cfg)
        self.cfg = cfg.model_copy()
        k = len(cfg.super_classes)
        if not k:
            raise ValueError(f"model.label_vocabulary {list(cfg.label_vocabulary)} gives no DAug super-class "
                             "(prepare fills it from the shards' labels)")
        layers, channels = [], cfg.in_channels
        for b in range(cfg.blocks):
            layers.append(_block(channels, cfg.width * 2 ** b))
            channels = cfg.width * 2 ** b
        self.image_encoder = nn.Sequential(*layers)
        self.image_proj = nn.Linear(channels, cfg.embed_dim)
        self.prototypes = nn.Parameter(torch.randn(k, cfg.embed_dim) / math.sqrt(cfg.embed_dim))
        # logs of the scales, shape [1]: DeepSpeed's parameter broadcast cannot take a 0-dim tensor
        self.class_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.temperature)))
        self.class_bias = nn.Parameter(torch.zeros(k))
        self.text = None
        if cfg.tokenizer:
            self.text_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.temperature)))
            self.text = report_encoder(cfg.vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.max_tokens)
            self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        h = self.image_encoder(images).mean(dim=(2, 3))
        return nn.functional.normalize(self.image_proj(h), dim=1)

    def embed_reports(self, ids: torch.Tensor) -> torch.Tensor:
        """The [CLS] state of each report, projected and normalised."""
        if self.text is None:
            raise ValueError("this model has no report encoder (it was trained without reports)")
        hidden = self.text(input_ids=ids, attention_mask=(ids != PAD_ID).long()).last_hidden_state[:, 0]
        return nn.functional.normalize(self.text_proj(hidden), dim=1)

    def class_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        prototypes = nn.functional.normalize(self.prototypes, dim=1)
        return self.class_scale.exp().clamp(max=100) * embeddings @ prototypes.T + self.class_bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.class_logits(self.embed(images))
