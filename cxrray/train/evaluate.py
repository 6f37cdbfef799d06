"""Periodic evaluation on rank 0, for any family: the family's `evaluate` (metrics and image rows) on
the EMA model and a fixed eval batch; grids written as PNG and logged to MLflow with the metrics."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from cxrray.config import Config
from cxrray.eval.grids import save_grid
from cxrray.train.console import say


@torch.no_grad()
def evaluate(family, model: torch.nn.Module, batch: dict, cfg: Config, images_shown: int, logger=None) -> dict:
    """batch: the eval split's first rows as the loss sees them (image [B, 1, S, S] in [-1, 1], covariates,
    report text as a list ...). Returns the metrics."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # text stays a list
    result = family.evaluate(model, on_device, cfg.train.seed, cfg.train.sample_steps)
    model.train(was_training)
    name = f"{cfg.preset} {family.name} EMA at {images_shown} images, {cfg.train.sample_steps} steps"
    with tempfile.TemporaryDirectory() as tmp:
        for title, rows in result.grids.items():
            png = save_grid(rows, Path(tmp) / f"{title}_{images_shown:012d}.png", f"{title}: {name}")
            if logger:
                logger.artifact(png, title)
    if logger and result.metrics:
        logger.metrics(result.metrics, step=images_shown)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
    say(f"[pretrain] eval at {images_shown:,} images: {shown}")
    return result.metrics
