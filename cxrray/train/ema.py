"""EMA of the weights: torch's AveragedModel with a warm-up on the decay.

torch's `get_ema_multi_avg_fn` uses a fixed decay, so a short run keeps most of the random
initialisation (decay 0.995 after 125 updates: 53% initial weights). The warm-up
decay_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage num_updates rule)
follows the weights early and reaches `decay` after ~10 / (1 - decay) updates.

Only trainable parameters are averaged: a frozen part of the model (a pretrained VAE or text encoder)
keeps the copy taken at construction, untouched, and costs no update. Buffers are averaged as before.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def warmup_decay(decay: float, updates: int) -> float:
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_model(model: torch.nn.Module, decay: float) -> AveragedModel:
    # AveragedModel hands over parameters then buffers, detached: which positions train is fixed here
    averaged = [p.requires_grad for p in model.parameters()] + [True] * len(list(model.buffers()))

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        d = warmup_decay(decay, int(num_averaged))
        pairs = [(e, p) for e, p, avg in zip(ema_params, params, averaged) if avg]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - d)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
