"""Training objective, evaluation and export of the diffusion autoencoder (torch side)."""
from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from cxrray.families.base import Evaluation, Generated, GenerateRequest
from cxrray.errors import InputError


def loss(model, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Diff-AE's L_simple (eps or v target, `cfg.prediction_type`) on the batch's images (labels and covariates are not used: self-supervised)."""
    from cxrray.diffusion.schedule import training_loss

    return training_loss(model, batch["image"], generator)


@torch.no_grad()
def evaluate(model, batch: dict, seed: int, steps: int) -> Evaluation:
    """DDIM samples from random x_T with the eval images' z, and reconstructions (inversion + decode)
    with their SSIM."""
    from cxrray.diffusion.ddim import reconstruct, sample

    device = next(model.parameters()).device
    x0 = batch["image"].to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = sample(model, x0.shape[0], steps=steps, generator=generator, images=x0)
    recon = reconstruct(model, x0, steps=steps)
    score = float(ssim((recon.clamp(-1, 1) + 1) / 2, (x0 + 1) / 2, data_range=1.0))
    return Evaluation({"recon_ssim": score}, {"samples": [x0, samples], "reconstructions": [x0, recon]})


@torch.no_grad()
def generate(model, request: GenerateRequest) -> Generated:
    """z ~ N(mean, diag(std^2)) from `request.z_prior` (the probe's statistics of the training codes), then
    x_T ~ N(0, I), both drawn in that order from `request.generator`; DDIM decode. No conditions."""
    from cxrray.diffusion.ddim import sample

    if request.z_prior is None:
        raise InputError("a diffusion autoencoder samples z from the codes' statistics: serve it with a probe")
    if request.conditions:
        raise InputError(f"this model takes no conditions, got {sorted(request.conditions)}")
    if request.sampler != "ddim":
        raise InputError(f"a diffusion autoencoder decodes with DDIM, not {request.sampler!r}")
    mean, std = (torch.as_tensor(a, dtype=torch.float32) for a in request.z_prior)
    z = mean + std * torch.randn(request.n, mean.shape[0], generator=request.generator)
    images = sample(model, request.n, steps=request.steps, generator=request.generator, z=z)
    return Generated(images, f"{request.steps} DDIM steps, z drawn from the probe's z mean/std")


def export(model, folder: Path) -> list[str]:
    """diffusers folders `unet/` and `scheduler/` (DDIM, the schedule it was trained with); the semantic
    encoder and the z projection have no diffusers class and are saved beside them."""
    from safetensors.torch import save_file

    from cxrray.diffusion.schedule import make_scheduler

    folder = Path(folder)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    make_scheduler("ddim", **model.schedule).save_pretrained(folder / "scheduler")
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(folder / "semantic_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in model.z_proj.state_dict().items()}, str(folder / "z_projection.safetensors"))
    return ["semantic encoder (semantic_encoder.safetensors): diffusers has no image -> vector encoder with attention",
            "z projection (z_projection.safetensors, Linear z_dim -> time-embedding width), passed to the UNet as "
            "class_labels (class_embed_type='identity')"]
