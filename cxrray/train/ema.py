"""EMA of the weights: torch's AveragedModel with a warm-up on the decay.

torch's `get_ema_multi_avg_fn` uses a fixed decay, so a short run keeps most of the random
initialisation (decay 0.995 after 125 updates: 53% initial weights). The warm-up
decay_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage num_updates rule)
follows the weights early and reaches `decay` after ~10 / (1 - decay) updates.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def warmup_decay(decay: float, updates: int) -> float:
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_model(model: torch.nn.Module, decay: float) -> AveragedModel:
    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        d = warmup_decay(decay, int(num_averaged))
        torch._foreach_lerp_(list(ema_params), list(params), 1.0 - d)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
