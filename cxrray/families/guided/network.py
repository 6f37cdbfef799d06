"""The noise-aware classifier: conv blocks with a FiLM of the timestep, one logit per super-class.

Images float32 [B, 1, S, S] in [-1, 1] (any S divisible by 2^blocks); t long [B] in 0..T-1; logits [B, K].
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from cxrray.families.guided.config import GuidedConfig


class NoisyClassifier(nn.Module):
    """Conv blocks (conv-GN-SiLU, conv-GN, then a FiLM of the timestep's embedding, SiLU, max-pool), global
    average, one logit per class. The t embedding is diffusers' sinusoidal one through a small MLP."""

    def __init__(self, classes: int, width: int = 16, blocks: int = 3, t_dim: int = 64):
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, 4 * t_dim), nn.SiLU(), nn.Linear(4 * t_dim, 4 * t_dim))
        self.blocks = nn.ModuleList()
        channels = 1
        for b in range(blocks):
            out = width * 2 ** b
            self.blocks.append(nn.ModuleDict({
                "conv1": nn.Conv2d(channels, out, 3, padding=1), "norm1": nn.GroupNorm(min(8, out), out),
                "conv2": nn.Conv2d(out, out, 3, padding=1), "norm2": nn.GroupNorm(min(8, out), out),
                "film": nn.Linear(4 * t_dim, 2 * out)}))
            channels = out
        self.head = nn.Linear(channels, classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        emb = self.t_mlp(get_timestep_embedding(t.reshape(-1).float(), self.t_dim))
        h = x_t
        for block in self.blocks:
            h = nn.functional.silu(block["norm1"](block["conv1"](h)))
            h = block["norm2"](block["conv2"](h))
            scale, shift = block["film"](emb).chunk(2, dim=1)
            h = nn.functional.max_pool2d(nn.functional.silu(h * (1 + scale[..., None, None]) + shift[..., None, None]), 2)
        return self.head(h.mean(dim=(2, 3)))


def noised(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps on the pixel DDPM's default schedule."""
    from cxrray.diffusion.schedule import make_scheduler

    sched = make_scheduler("ddpm")
    return sched.add_noise(x0, torch.randn(x0.shape, generator=generator), t)


def build(cfg: GuidedConfig | Mapping) -> NoisyClassifier:
    """The family's network: a `NoisyClassifier` over `cfg.super_classes`, carrying its config."""
    cfg = cfg if isinstance(cfg, GuidedConfig) else GuidedConfig(**cfg)
    if not cfg.super_classes:
        raise ValueError(f"model.label_vocabulary {list(cfg.label_vocabulary)} gives no DAug super-class "
                         "(prepare fills it from the shards' labels)")
    net = NoisyClassifier(len(cfg.super_classes), cfg.width, cfg.blocks, cfg.t_dim)
    net.cfg = cfg.model_copy()
    return net
