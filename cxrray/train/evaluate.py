"""Periodic evaluation on rank 0: DDIM sample grid (random x_T, z of real images), reconstruction
grid (DDIM inversion + decode with the true z) and its SSIM; grids logged to MLflow."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from cxrray.config import Config
from cxrray.diffusion.ddim import reconstruct, sample
from cxrray.eval.grids import save_grid


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, cfg: Config, images_shown: int, logger=None) -> dict:
    """images: [B, 1, S, S] in [-1, 1] from the eval split. Returns {"recon_ssim": float}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x0 = images.to(device)
    steps = cfg.train.sample_steps
    generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    samples = sample(model, x0.shape[0], steps=steps, generator=generator, images=x0)
    recon = reconstruct(model, x0, steps=steps)
    score = float(ssim((recon.clamp(-1, 1) + 1) / 2, (x0 + 1) / 2, data_range=1.0))
    model.train(was_training)
    name = f"{cfg.preset} diffae EMA at {images_shown} images, DDIM {steps} steps"
    with tempfile.TemporaryDirectory() as tmp:
        sample_png = save_grid([x0, samples], Path(tmp) / f"samples_{images_shown:012d}.png", f"samples: {name}")
        recon_png = save_grid([x0, recon], Path(tmp) / f"recon_{images_shown:012d}.png", f"reconstructions: {name}")
        if logger:
            logger.artifact(sample_png, "samples")
            logger.artifact(recon_png, "reconstructions")
            logger.metrics({"recon_ssim": score}, step=images_shown)
    print(f"[pretrain] eval at {images_shown:,} images: reconstruction SSIM {score:.3f}", flush=True)
    return {"recon_ssim": score}
