"""EMA of the weights: torch's AveragedModel with a warm-up on the decay.

torch's `get_ema_multi_avg_fn` uses a fixed decay, so a short run keeps most of the random
initialisation (decay 0.995 after 125 updates: 53% initial weights). The warm-up
decay_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage num_updates rule)
follows the weights early and reaches `decay` after ~10 / (1 - decay) updates.

Only trainable parameters are averaged: a frozen part of the model (a pretrained VAE or text encoder)
keeps the copy taken at construction, untouched, and costs no update. Floating-point buffers are averaged
as before; integer ones (position ids) keep their copy.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def warmup_decay(decay: float, updates: int) -> float:
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_model(model: torch.nn.Module, decay: float) -> AveragedModel:
    # AveragedModel calls `update` once per (device, dtype) group of its detached parameters and buffers, so
    # positions do not identify tensors: storage does. Skipped: the EMA copies of frozen parameters, and
    # integer buffers (a text encoder's position ids).
    skip: set[int] = set()

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        d = warmup_decay(decay, int(num_averaged))
        pairs = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point() and e.data_ptr() not in skip]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - d)

    averaged = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    skip.update(e.data_ptr() for e, p in zip(averaged.module.parameters(), model.parameters()) if not p.requires_grad)
    return averaged
